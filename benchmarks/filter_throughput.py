"""Filter throughput: pea.corpus.filter (DuckDB + Arrow) vs the same rules in pandas, over generated raw shards.

    nice -n 19 .venv/bin/python benchmarks/filter_throughput.py --rows 1000000 [--shards 10]

Generates `--rows` raw rows as `--shards` img2dataset shards (`shard_table`: zh; failed downloads, sizes, aspect
ratios and scores spread over the metadata rules; native traditional captions, English and other scripts where
Chinese belongs, mojibake, captions failing a caption rule, the custom rule or the caption-pair limit), then
runs `filter_pairs` and `pandas_filter` below (the same rules in idiomatic pandas, writing the same outputs) over
the same shards three times, each run asserting both keep the same rows (keys, cleaned captions) and count the
same drops:

- full: the zh rule set (cleaning, language id, thresholds, a custom WHERE, both duplicate rules, pairs.parquet
  and the data-quality report). pea's language rule decides captions from their scripts and asks lingua only
  about the rest (pea.corpus.langid); pandas asks lingua about every distinct caption. `rows_per_s` is pea's.
- language_id off (both sides): everything but language identification, so cleaning (ftfy where needed, NFC,
  keep-only, OpenCC), a cost both sides share in the same Python libraries, is included: `sql_speedup_vs_pandas`.
- language_id off and cleaning minimal (no ftfy, Unicode form, keep-only, OpenCC; control characters and
  whitespace still): the rules alone, `sql_speedup_vs_pandas_no_cleaning`.

Both sides first run once over a 2,000-row lake, so neither pays lingua's model loading or matplotlib's font
cache. Seconds are wall time; CPU seconds (this process, all threads) are printed beside them, steadier on a
shared machine. `lingua_share` = distinct captions lingua judged / distinct captions the language rule saw (the
filter's report once it carries `language_id`, else wrong_language over the captions pandas judged);
`lingua_disagreements` = those captions where pea's verdict differs from lingua alone (each one printed).
Printed last: sql_speedup_vs_pandas=, sql_speedup_vs_pandas_no_cleaning=, lingua_share=, lingua_disagreements=,
rows_per_s= (the full zh filter).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import ftfy
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pea.corpus.clean import CONTROL, FTFY_CONFIG, HAN, NEEDS_FTFY, _opencc
from pea.corpus.filter import filter_pairs
from pea.corpus.langid import LINGUA, lingua_verdicts, script_decisions, wrong_language
from pea.corpus.report import Histogram, ReportData, _edges, write_report
from pea.spec import CleaningSpec, load_spec

ZH = ["红色的", "圆形", "左边", "有", "两个", "蓝色的", "正方形", "上面", "一只", "猫", "坐在", "桌子", "旁边", "漂亮的", "花园"]
TRAD = ["紅色的", "圓形", "兩個", "藍色的", "貓", "漂亮的", "花園"]
EN = ["a", "red", "circle", "on", "the", "left", "two", "blue", "squares", "cat", "sits", "table", "garden", "café"]
# Target captions in other scripts (2% of rows): decided from their scripts (ja, ko) or by lingua (Hangul with
# Han, Cyrillic, Latin glued to Han). No caption mixes kana, Han and Hangul: lingua itself is not deterministic
# on those (docs/data.md, "Language identification").
OTHER_SCRIPTS = ((["猫", "が", "赤い", "丸", "左に", "あります", "カメラ", "の", "写真", "ひとつ"], ""),
                 (["빨간", "원", "고양이", "두", "마리", "왼쪽에", "있다"], " "),
                 (["大韓民國", "사람", "한국", "地圖", "서울"], " "),
                 (["красный", "круг", "кошка", "слева", "два"], " "),
                 (["iPhone", "手机", "壳", "LED", "灯", "红色的", "USB"], ""))
SIZES = np.array([(640, 480), (512, 512), (1024, 768), (100, 80), (2000, 500)])
ERRORS = ["http_error: HTTP 404", "timeout: x", "connection: y", "HTTP Error 404: Not Found",
          "The read operation timed out", "not_image: content type 'text/html'"]


def _words(rng: np.random.Generator, vocab: list[str], n: int, low: int, high: int, sep: str) -> pa.Array:
    """n strings of low..high words drawn from vocab, joined by sep, built as Arrow buffers with numpy: every
    word after a row's first is drawn from the words prefixed by sep; a byte gather makes the data buffer."""
    pieces = [w.encode() for w in vocab] + [(sep + w).encode() for w in vocab]
    sizes = np.array([len(p) for p in pieces], np.int64)
    starts = np.cumsum(sizes) - sizes
    blob = np.frombuffer(b"".join(pieces), np.uint8)
    index = rng.integers(0, len(vocab), (n, high), dtype=np.int32)
    index[:, 1:] += len(vocab)
    used = np.arange(high) < rng.integers(low, high + 1, n, dtype=np.int32)[:, None]
    tokens = index[used]  # row by row, in word order
    token_sizes = sizes[tokens]
    total = int(token_sizes.sum())
    gather = np.repeat(starts[tokens] - (np.cumsum(token_sizes) - token_sizes), token_sizes) + np.arange(total)
    offsets = np.concatenate([[0], np.cumsum(np.where(used, sizes[index], 0).sum(axis=1))]).astype(np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(blob[gather]))


def shard_table(rng: np.random.Generator, start: int, n: int, total: int) -> pa.Table:
    """Raw rows start..start+n-1 of a `total`-row corpus (zh; img2dataset's columns), vectorized: 10% failed
    downloads, sizes, aspect ratios and scores spread over the metadata rules; 20% of target captions native and
    traditional, 2% English and 2% in other scripts where Chinese belongs, 1% mojibake English captions, 2.5%
    failing a caption rule, the custom rule or the caption-pair limit; ~1% of images repeated."""
    native = rng.random(n) < 0.2
    zh = pc.replace_with_mask(_words(rng, ZH, n, 3, 8, ""), pa.array(native),
                              _words(rng, TRAD, int(native.sum()), 3, 8, ""))
    en = _words(rng, EN, n, 3, 12, " ")
    en = pc.if_else(pa.array(rng.random(n) < 0.01), pc.replace_substring(en, "é", "\u00c3\u00a9"), en)
    fault = rng.random(n)  # 2.5% of captions fail a caption rule, the custom rule or the caption-pair limit
    zh = pc.if_else(pa.array(fault < 0.005), " ", zh)
    zh = pc.if_else(pa.array((fault >= 0.005) & (fault < 0.01)), "★★★ 123 ###", zh)
    zh = pc.if_else(pa.array((fault >= 0.01) & (fault < 0.015)), pc.binary_join_element_wise(zh, " logo", ""), zh)
    template = (fault >= 0.015) & (fault < 0.025)  # one template pair on many images
    native &= ~template
    en = pc.if_else(pa.array(template), "a red circle", en)
    zh = pc.if_else(pa.array(template), "红色的圆形", zh)
    script = rng.random(n)
    zh = pc.if_else(pa.array(script < 0.02), "The quick brown fox jumps", zh)
    other = (script >= 0.02) & (script < 0.04)
    m = int(other.sum())
    kinds = pa.array(rng.integers(0, len(OTHER_SCRIPTS), m))
    zh = pc.replace_with_mask(zh, pa.array(other), pc.choose(kinds, *[_words(rng, vocab, m, 2, 5, sep)
                                                                      for vocab, sep in OTHER_SCRIPTS]))
    ok = rng.random(n) > 0.1
    w, h = SIZES[rng.integers(0, len(SIZES), n)].T
    side = np.minimum(w, h)
    errors = pc.take(pa.array(ERRORS), pa.array(rng.integers(0, len(ERRORS), n)))
    return pa.table({
        "caption": en, "caption_zh": zh, "native": native, "similarity": rng.uniform(0.2, 0.4, n),
        "punsafe": rng.random(n) * 0.6, "pwatermark": rng.random(n) * 0.7,
        "key": pc.utf8_lpad(pc.cast(pa.array(np.arange(start, start + n)), pa.string()), 12, "0"),
        "status": pc.if_else(pa.array(ok), "success", "failed_to_download"),
        "error_message": pc.if_else(pa.array(ok), None, errors), "width": side, "height": side,
        "original_width": w, "original_height": h,
        "sha256": pc.utf8_lpad(pc.cast(pa.array(rng.integers(0, total * 50, n)), pa.string()), 64, "0")})


def generate(raw_dir: Path, rows: int, shards: int = 10, seed: int = 0) -> list[Path]:
    """`rows` raw rows as `shards` img2dataset shards (NNNNN.parquet + NNNNN_stats.json, keys unique across
    them), one shard in memory at a time. Returns the shard paths, resolved."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, rows, shards + 1).astype(np.int64)
    paths = []
    for shard, (start, stop) in enumerate(itertools.pairwise(bounds)):
        table = shard_table(np.random.default_rng([seed, shard]), int(start), int(stop - start), rows)
        path = (raw_dir / f"{shard:05d}.parquet").resolve()
        pq.write_table(table, path, row_group_size=100_000)
        successes = int(pc.sum(pc.equal(table["status"], "success")).as_py() or 0)
        path.with_name(f"{shard:05d}_stats.json").write_text(json.dumps({"count": table.num_rows,
                                                                         "successes": successes}))
        paths.append(path)
    return paths


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


def pandas_filter(spec, raw_files: list[Path], out_dir: Path, where) -> tuple[pd.DataFrame, dict[str, int], dict]:  # noqa: ANN001
    """The rules of pea.corpus.filter in pandas: the metadata rules first (np.select: the first rule a row fails),
    then cleaning and the caption rules on the rows left, lingua alone on their distinct captions (no script
    rule), `where` (the benchmark's custom rule, translated by hand), the duplicate rules in key order.
    Writes pairs.parquet and the same report. Returns (kept pairs, dropped counts, the language rule's distinct
    captions and lingua's verdicts on them: {"captions": [...], "wrong": bool array}, empty without the rule)."""
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

    language = {}
    if f.language_id is not None:
        undecided = left_reason.isna()
        captions = left.loc[undecided, "caption"].unique().tolist()
        if captions:
            confidence, first = lingua_verdicts(spec, captions)
            verdict = pd.DataFrame({"confidence": confidence, "first": first}, index=captions)
            verdict = ~verdict["first"] | (verdict["confidence"] < f.language_id.min_confidence)
            language = {"captions": captions, "wrong": verdict.to_numpy()}
            wrong = verdict.reindex(left.loc[undecided, "caption"].to_numpy()).to_numpy()
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
    # The same bins as pea's report (edges from the min and max), counted over the in-memory columns.
    width = df.loc[success, "original_width"].to_numpy().astype(float)
    height = df.loc[success, "original_height"].to_numpy().astype(float)
    ratio = np.maximum(width, height) / np.maximum(np.minimum(width, height), 1)
    on_success = kept.to_numpy()[success]
    lengths = {"en": pairs["caption_en"].str.len().to_numpy(), "target": pairs["caption"].str.len().to_numpy()}
    top = max([v.max() for v in lengths.values() if v.size] + [1])
    data = ReportData(lengths=Histogram(np.linspace(0, top + 1, 40)), image_rows=len(width), pair_rows=len(pairs))
    for name, values, log in (("width", width, True), ("height", height, True), ("ratio", ratio, False)):
        data.images[name] = Histogram(_edges(values.min() if values.size else None,
                                             values.max() if values.size else None, log=log))
        data.images[name].add("kept", values[on_success])
        data.images[name].add("dropped", values[~on_success])
    for series, values in lengths.items():
        data.lengths.add(series, values)
    report = {"language": spec.language, "rows_in": len(df), "rows_out": int(kept.sum()), "dropped": dropped}
    write_report(report, data, out_dir, spec.language)
    return pairs, {k: int(v) for k, v in dropped.items()}, language



def _where(df: pd.DataFrame) -> pd.Series:
    """WHERE below, by hand: `original_width <= 4096 AND caption NOT LIKE '%logo%'`."""
    return (df["original_width"] <= 4096) & ~df["caption"].str.contains("logo", regex=False)


WHERE = "original_width <= 4096 AND caption NOT LIKE '%logo%'"


def _run(spec, lake: Path, shards: list[Path], out: Path) -> dict:
    """filter_pairs then pandas_filter over the same shards; asserts both keep the same rows (keys, cleaned
    captions) and count the same drops. Wall and CPU seconds of each (CPU: this process, all threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = filter_pairs(spec, lake)
    pea = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    pairs, dropped, language = pandas_filter(spec, shards, out, _where)
    pandas = time.perf_counter() - start, time.process_time() - cpu
    ours = pq.read_table(result.pairs_path).to_pandas()
    assert ours["key"].tolist() == pairs["key"].tolist(), "pea and pandas keep different rows"
    for column in ("caption_en", "caption", "image_sha256"):
        assert ours[column].tolist() == pairs[column].astype(object).tolist(), f"{column} differs"
    assert {k: v for k, v in result.dropped.items() if v} == dropped, (result.dropped, dropped)
    return {"result": result, "pea": pea, "pandas": pandas, "language": language}


def _line(name: str, run: dict) -> str:
    (pea, pea_cpu), (pandas, pandas_cpu) = run["pea"], run["pandas"]
    return (f"{name}: pea {pea:.2f} s ({run['result'].rows_in / pea:.0f} rows/s), pandas {pandas:.2f} s, "
            f"speedup {pandas / pea:.2f} (CPU seconds, all threads: pea {pea_cpu:.2f}, pandas {pandas_cpu:.2f})")


def _language_share(spec, run: dict) -> tuple[int, int, int, int]:
    """(captions the language rule saw, how many lingua judged, disagreements with lingua alone, of which among
    the captions decided from their scripts), over the distinct captions pandas gave lingua alone."""
    captions, alone = run["language"]["captions"], run["language"]["wrong"]
    wrong, judged = wrong_language(spec, pa.array(captions, pa.string()))
    differs = np.asarray(wrong) != alone
    decided = script_decisions(spec, pa.array(captions, pa.string())) != LINGUA
    for caption in np.asarray(captions, object)[differs][:10]:
        print(f"differs from lingua alone: {caption!r}")
    report = run["result"].report.get("language_id")  # the filter's own count, once it reports one
    if report:
        return report["captions"], report["lingua"], int(differs.sum()), int((differs & decided).sum())
    return len(captions), judged, int(differs.sum()), int((differs & decided).sum())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=10, help="raw shards the rows are written as")
    args = parser.parse_args()
    spec = load_spec("zh")
    spec = spec.model_copy(update={"filter": spec.filter.model_copy(update={"min_similarity": 0.25, "where": WHERE})})
    no_language = spec.model_copy(update={"filter": spec.filter.model_copy(update={"language_id": None})})
    minimal = CleaningSpec(fix_text=False, unicode_form=None, opencc=None, keep_only=None, keep_only_if=None)
    no_cleaning = no_language.model_copy(update={"filter": no_language.filter.model_copy(update={"cleaning": minimal})})
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        shards = generate(warm / "zh" / "raw", 2_000, 2)
        filter_pairs(spec, warm)
        pandas_filter(spec, shards, warm / "pandas", _where)

        lake = Path(tmp) / "lake"
        start = time.perf_counter()
        shards = generate(lake / "zh" / "raw", args.rows, args.shards)
        print(f"generated {args.rows} rows as {args.shards} raw shards in {time.perf_counter() - start:.1f} s")
        for name, run_spec in (("full", spec), ("language_id off", no_language),
                               ("language_id off, cleaning minimal", no_cleaning)):
            runs[name] = _run(run_spec, lake, shards, Path(tmp) / f"pandas-{len(runs)}")
    full = runs["full"]
    result = full["result"]
    captions, judged, disagreements, decided_disagreements = _language_share(spec, full)
    print(json.dumps({k: v for k, v in result.dropped.items() if v}))
    print(f"rows={result.rows_in} kept={result.rows_out} (every run: pea and pandas keep the same rows and count "
          "the same drops)")
    for name, run in runs.items():
        print(_line(name, run))
    print(f"speedup_vs_pandas={full['pandas'][0] / full['pea'][0]:.2f}")
    print(f"language rule: {captions} distinct captions, {judged} judged by lingua, {captions - judged} decided "
          f"from their scripts; disagreements with lingua alone: {disagreements} ({decided_disagreements} among "
          "the script-decided)")
    sql, bare = runs["language_id off"], runs["language_id off, cleaning minimal"]
    print(f"sql_speedup_vs_pandas={sql['pandas'][0] / sql['pea'][0]:.2f}")
    print(f"sql_speedup_vs_pandas_no_cleaning={bare['pandas'][0] / bare['pea'][0]:.2f}")
    print(f"lingua_share={judged / max(captions, 1):.4f}")
    print(f"lingua_disagreements={disagreements}")
    print(f"rows_per_s={result.rows_in / full['pea'][0]:.0f}")


if __name__ == "__main__":
    main()
