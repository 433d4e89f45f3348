"""Filter throughput: pea.corpus.filter (DuckDB + Arrow) vs the same rules in pandas, over one generated raw table.

    nice -n 19 .venv/bin/python benchmarks/filter_throughput.py --rows 1000000

Generates `--rows` raw rows in img2dataset's layout (zh; 10% failed downloads, sizes, aspect ratios and scores
spread over the metadata rules; 20% of target captions native and traditional, 2% English where Chinese belongs,
1% mojibake English captions, 2.5% failing a caption rule, the custom rule or the caption-pair limit), then times, in this order over the same file: `filter_pairs` with the full rule
set (cleaning, lingua language id, thresholds, a custom WHERE, both duplicate rules, pairs.parquet and the
data-quality report) and `pandas_filter` below, the same rules in idiomatic pandas writing the same outputs.
Both first run once over a 2,000-row table, so neither pays lingua's model loading or matplotlib's font cache.
It asserts both keep the same rows (keys and cleaned captions) and count the same drops, prints rows/s for
both (and the CPU seconds each used, steadier than wall time on a shared machine) and, last,
`speedup_vs_pandas=<pea rows/s / pandas rows/s>` (wall time).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import ftfy
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pea.corpus.clean import CONTROL, FTFY_CONFIG, HAN, NEEDS_FTFY, _opencc
from pea.corpus.filter import filter_pairs
from pea.corpus.langid import lingua_verdicts
from pea.corpus.report import write_report
from pea.spec import load_spec

ZH = ["红色的", "圆形", "左边", "有", "两个", "蓝色的", "正方形", "上面", "一只", "猫", "坐在", "桌子", "旁边", "漂亮的", "花园"]
TRAD = ["紅色的", "圓形", "兩個", "藍色的", "貓", "漂亮的", "花園"]
EN = ["a", "red", "circle", "on", "the", "left", "two", "blue", "squares", "cat", "sits", "table", "garden", "café"]


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    data = {k: [] for k in ("caption", "caption_zh", "native", "similarity", "punsafe", "pwatermark", "key", "status",
                            "error_message", "width", "height", "original_width", "original_height", "sha256")}
    for i in range(rows):
        native = rng.random() < 0.2
        zh = "".join(rng.choices(TRAD if native else ZH, k=rng.randint(3, 8)))
        en = " ".join(rng.choices(EN, k=rng.randint(3, 12)))
        if rng.random() < 0.01:
            en = en.replace("é", "\u00c3\u00a9")
        fault = rng.random()  # 2.5% of captions fail a caption rule, the custom rule or the caption-pair limit
        if fault < 0.005:
            zh = " "
        elif fault < 0.01:
            zh = "★★★ 123 ###"
        elif fault < 0.015:
            zh += " logo"
        elif fault < 0.025:
            native, en, zh = False, "a red circle", "红色的圆形"  # one template pair on many images
        ok = rng.random() > 0.1
        w, h = rng.choice([(640, 480), (512, 512), (1024, 768), (100, 80), (2000, 500)])
        data["caption"].append(en)
        data["caption_zh"].append(zh if rng.random() > 0.02 else "The quick brown fox jumps")
        data["native"].append(native)
        data["similarity"].append(rng.uniform(0.2, 0.4))
        data["punsafe"].append(rng.random() * 0.6)
        data["pwatermark"].append(rng.random() * 0.7)
        data["key"].append(f"{i:012d}")
        data["status"].append("success" if ok else "failed_to_download")
        data["error_message"].append(None if ok else rng.choice(
            ["http_error: HTTP 404", "timeout: x", "connection: y", "HTTP Error 404: Not Found",
             "The read operation timed out", "not_image: content type 'text/html'"]))
        data["width"].append(min(w, h))
        data["height"].append(min(w, h))
        data["original_width"].append(w)
        data["original_height"].append(h)
        data["sha256"].append(f"{rng.randrange(rows * 50):064x}")
    pq.write_table(pa.table(data), path, row_group_size=100_000)
    path.with_name(path.stem + "_stats.json").write_text(json.dumps({"count": rows, "successes": rows}))


# --- the same rules in pandas ---------------------------------------------------------------------------------
# Strings as pandas' pyarrow-backed StringDtype (numbers stay numpy), so .str.contains/.str.replace run RE2 and
# accept the same patterns as pea's filter; the Python-only steps (ftfy, Unicode normalization, OpenCC) run per
# string with .map / .str.normalize, only where needed, as a pandas user would write them.
STRING = pd.StringDtype("pyarrow")
STRINGS = {pa.string(): STRING, pa.large_string(): STRING}


def _search(texts: pd.Series, pattern: str) -> pd.Series:
    """texts.str.contains(pattern, regex=True), but pandas first compiles the pattern with Python's re (to warn
    about groups), which rejects RE2's \\p{...} and \\x{...}: count the RE2 matches instead."""
    return texts.str.count(pattern) > 0


def _b(condition: pd.Series) -> np.ndarray:
    """A nullable boolean Series as a numpy bool array, NA (SQL NULL) as False."""
    return condition.to_numpy(dtype=bool, na_value=False)


def _pd_download_reason(df: pd.DataFrame) -> np.ndarray:
    message = df["error_message"]

    def starts(*prefixes: str) -> np.ndarray:
        return np.logical_or.reduce([_b(message.str.startswith(p)) for p in prefixes])

    def contains(text: str, case: bool = True) -> np.ndarray:
        return _b(message.str.contains(text, case=case, regex=False))

    resize = {"image too small": "too_small", "image area too large": "too_large",
              "aspect ratio too large": "bad_aspect"}
    resized = _b(df["status"].eq("failed_to_resize"))
    return np.select(
        [resized, starts("http_error:", "HTTP Error 4", "HTTP Error 5"), starts("redirect:", "HTTP Error 3"),
         starts("timeout:") | contains("timed out", case=False), starts("connection:", "<urlopen error"),
         starts("not_image:"), starts("too_large:"), starts("disallowed:") | contains("X-Robots-Tag"),
         starts("bad_url:")],
        [message.map(resize).fillna("download_not_image").astype(object).to_numpy(), "download_http_error",
         "download_redirect", "download_timeout", "download_connection", "download_not_image", "download_too_large",
         "download_disallowed", "bad_url"], "download_other")


def _pd_clean(texts: pd.Series, cleaning, *, target: bool, native: pd.Series) -> pd.Series:  # noqa: ANN001
    texts = texts.fillna("")
    if cleaning.fix_text:
        fix = _search(texts, NEEDS_FTFY)
        texts = texts.mask(fix, texts[fix].map(lambda t: ftfy.fix_text(t, FTFY_CONFIG)).astype(STRING))
    texts = texts.str.replace(CONTROL, " ", regex=True)
    if cleaning.unicode_form is not None:
        texts = texts.str.normalize(cleaning.unicode_form)
    if target and cleaning.keep_only is not None:
        applies = _search(texts, cleaning.keep_only_if or ".")
        if cleaning.keep_only_for == "native":
            applies &= native
        texts = texts.mask(applies, texts.str.replace(f"[^{cleaning.keep_only}]", "", regex=True))
    if target and cleaning.opencc is not None:
        han = _search(texts, HAN)
        texts = texts.mask(han, texts[han].map(_opencc(cleaning.opencc).convert).astype(STRING))
    return texts.str.replace(r"[\s\p{Z}]+", " ", regex=True).str.strip()


def _pd_ratio(texts: pd.Series) -> pd.Series:
    letters = texts.str.replace(r"[^\p{L}\p{M}]", "", regex=True).str.len().astype("float64")
    return letters / texts.str.replace(r"[\s\p{Z}]", "", regex=True).str.len().clip(lower=1).astype("float64")


def pandas_filter(spec, raw_files: list[Path], out_dir: Path, where) -> tuple[pd.DataFrame, dict[str, int]]:  # noqa: ANN001
    """The rules of pea.corpus.filter in pandas: the metadata rules first (np.select: the first rule a row fails),
    then cleaning and the caption rules on the rows left, lingua on their distinct captions (the same call as
    pea's), `where` (the benchmark's custom rule, translated by hand), the duplicate rules in key order.
    Writes pairs.parquet and the same report. Returns (kept pairs, dropped counts)."""
    f = spec.filter
    df = pd.concat([pq.read_table(p).to_pandas(types_mapper=STRINGS.get).assign(raw_file=str(p)) for p in raw_files],
                   ignore_index=True)
    df = df.rename(columns={"sha256": "image_sha256", "caption": "caption_en", spec.caption_column: "caption"})
    df["native"] = df["native"].fillna(False).astype(bool) if "native" in df else False
    never = np.zeros(len(df), bool)
    original = df[["original_width", "original_height"]]
    failed = ~_b(df["status"].eq("success"))

    def over(column: str, limit: float | None, below: bool = False) -> np.ndarray:
        if limit is None or column not in df:
            return never
        return _b(df[column] < limit if below else df[column] > limit)

    pixels = df["original_width"].astype("int64") * df["original_height"].astype("int64")
    reason = pd.Series(np.select(
        [failed, _b(df[["width", "height", "original_width", "original_height"]].min(axis=1) < f.min_image_side),
         _b(pixels > f.max_image_pixels) if f.max_image_pixels else never,
         _b(original.max(axis=1) / original.min(axis=1) > f.max_aspect_ratio),
         over("similarity", f.min_similarity, True), over("punsafe", f.max_punsafe), over("pwatermark", f.max_pwatermark)],
        [_pd_download_reason(df), "too_small", "too_large", "bad_aspect", "low_similarity", "unsafe", "watermark"],
        None), index=df.index, dtype=object)

    left = df[reason.isna()].copy()
    left["caption_en"] = _pd_clean(left["caption_en"], f.cleaning, target=False, native=left["native"])
    left["caption"] = _pd_clean(left["caption"], f.cleaning, target=True, native=left["native"])
    native = left["native"].to_numpy()
    length, length_en = left["caption"].str.len().to_numpy(), left["caption_en"].str.len().to_numpy()
    ratio, ratio_en = _pd_ratio(left["caption"]).to_numpy(), _pd_ratio(left["caption_en"]).to_numpy()
    left_reason = pd.Series(np.select(
        [(length == 0) | (~native & (length_en == 0)),
         (length < f.min_caption_chars) | (~native & (length_en < f.min_caption_chars)),
         (length > f.max_caption_chars) | (length_en > f.max_caption_chars),
         (ratio < f.min_text_ratio) | (~native & (ratio_en < f.min_text_ratio))],
        ["caption_empty", "caption_too_short", "caption_too_long", "caption_not_text"], None),
        index=left.index, dtype=object)

    if f.language_id is not None:
        undecided = left_reason.isna()
        captions = left.loc[undecided, "caption"].unique().tolist()
        if captions:
            confidence, first = lingua_verdicts(spec, captions)
            verdict = pd.DataFrame({"confidence": confidence, "first": first}, index=captions)
            judged = verdict.reindex(left.loc[undecided, "caption"].to_numpy())
            wrong = (~judged["first"] | (judged["confidence"] < f.language_id.min_confidence)).to_numpy()
            left_reason[left_reason.index[undecided.to_numpy()][wrong]] = "wrong_language"
    if where is not None:
        left_reason[left_reason.isna().to_numpy() & ~_b(where(left))] = "custom_where"

    left = left.sort_values("key")  # the duplicate rules keep the rows with the smallest keys
    left_reason = left_reason[left.index]
    undecided = left_reason.isna().to_numpy()
    copies = left.loc[undecided, "image_sha256"].duplicated()
    left_reason[copies.index[copies.to_numpy()]] = "duplicate_image"
    if f.max_images_per_caption_pair is not None:
        undecided = left_reason.isna().to_numpy()
        rank = left[undecided].groupby(["caption_en", "caption"], sort=False).cumcount()
        left_reason[rank.index[rank.to_numpy() >= f.max_images_per_caption_pair]] = "duplicate_caption"
    reason.loc[left_reason.index] = left_reason.to_numpy()

    kept = reason.isna()
    pairs = df.loc[kept[kept].index, ["key", "image_sha256", "width", "height", "raw_file", "native"]].join(
        left[["caption_en", "caption"]]).sort_values("key", ignore_index=True)
    pairs = pairs[["key", "image_sha256", "caption_en", "caption", "width", "height", "raw_file", "native"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(out_dir / "pairs.parquet", row_group_size=100_000, index=False)
    dropped = reason.value_counts().to_dict()
    success = _b(df["status"].eq("success"))
    images = pa.table({"original_width": df.loc[success, "original_width"].to_numpy(),
                       "original_height": df.loc[success, "original_height"].to_numpy(),
                       "kept": kept.to_numpy()[success]})
    report = {"language": spec.language, "rows_in": len(df), "rows_out": int(kept.sum()), "dropped": dropped}
    write_report(report, images, pa.Table.from_pandas(pairs[["caption_en", "caption"]], preserve_index=False),
                 out_dir, spec.language)
    return pairs, {k: int(v) for k, v in dropped.items()}



def _where(df: pd.DataFrame) -> pd.Series:
    """WHERE below, by hand: `original_width <= 4096 AND caption NOT LIKE '%logo%'`."""
    return (df["original_width"] <= 4096) & ~df["caption"].str.contains("logo", regex=False)


WHERE = "original_width <= 4096 AND caption NOT LIKE '%logo%'"


def _raw(root: Path, rows: int) -> Path:
    raw = root / "zh" / "raw"
    raw.mkdir(parents=True)
    generate(raw / "00000.parquet", rows)
    return raw / "00000.parquet"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    spec = load_spec("zh")
    spec = spec.model_copy(update={"filter": spec.filter.model_copy(update={"min_similarity": 0.25, "where": WHERE})})
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        shard = _raw(warm, 2_000)
        filter_pairs(spec, warm)
        pandas_filter(spec, [shard.resolve()], warm / "pandas", _where)

        lake = Path(tmp) / "lake"
        shard = _raw(lake, args.rows).resolve()
        start, cpu = time.perf_counter(), time.process_time()
        result = filter_pairs(spec, lake)
        pea_seconds, pea_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        pairs, dropped = pandas_filter(spec, [shard], Path(tmp) / "pandas", _where)
        pandas_seconds, pandas_cpu = time.perf_counter() - start, time.process_time() - cpu

        ours = pq.read_table(result.pairs_path).to_pandas()
        assert ours["key"].tolist() == pairs["key"].tolist(), "pea and pandas keep different rows"
        for column in ("caption_en", "caption", "image_sha256"):
            assert ours[column].tolist() == pairs[column].astype(object).tolist(), f"{column} differs"
        assert {k: v for k, v in result.dropped.items() if v} == dropped, (result.dropped, dropped)
    print(json.dumps({k: v for k, v in result.dropped.items() if v}))
    print(f"rows={result.rows_in} kept={result.rows_out} (pea and pandas keep the same rows and count the same drops)")
    print(f"pea_filter_seconds={pea_seconds:.2f} pandas_seconds={pandas_seconds:.2f} "
          f"(CPU seconds, all threads: pea {pea_cpu:.2f}, pandas {pandas_cpu:.2f})")
    print(f"pea_filter_rows_per_s={result.rows_in / pea_seconds:.0f}")
    print(f"pandas_rows_per_s={args.rows / pandas_seconds:.0f}")
    print(f"speedup_vs_pandas={pandas_seconds / pea_seconds:.2f}")


if __name__ == "__main__":
    main()
