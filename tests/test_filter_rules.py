"""Filter rules over raw shards in img2dataset's layout, and manifests in every format (no download here)."""

import gzip
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pea.corpus.filter import REASONS, filter_pairs
from pea.corpus.manifest import prepare_url_list
from pea.corpus.where import WhereError
from pea.spec import ColumnMapping, LanguageSpec, ManifestSpec

GOOD_ZH = "左边有一个红色的圆形"
GOOD_EN = "one red circle on the left"


def _row(key: int, **over) -> dict:
    row = {"caption": GOOD_EN, "url": f"http://127.0.0.1:9/{key}.png", "caption_zh": f"{GOOD_ZH}{key}",
           "native": False, "similarity": None, "punsafe": None, "pwatermark": None, "key": f"{key:09d}",
           "status": "success", "error_message": None, "width": 32, "height": 32, "original_width": 64,
           "original_height": 64, "sha256": f"{key:064x}", "png": b"\x89PNG"}
    row["caption"] = f"{GOOD_EN} {key}"
    row.update(over)
    return row


def _lake(tmp_path: Path, rows: list[dict]) -> Path:
    raw = tmp_path / "lake" / "zh" / "raw"
    raw.mkdir(parents=True)
    schema = pa.schema([("caption", pa.string()), ("url", pa.string()), ("caption_zh", pa.string()),
                        ("native", pa.bool_()), ("similarity", pa.float64()), ("punsafe", pa.float64()),
                        ("pwatermark", pa.float64()), ("key", pa.string()), ("status", pa.string()),
                        ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                        ("original_width", pa.int32()), ("original_height", pa.int32()), ("sha256", pa.string()),
                        ("png", pa.binary())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), raw / "00000.parquet")
    (raw / "00000_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    return tmp_path / "lake"


def _spec(spec: LanguageSpec, **filter_fields) -> LanguageSpec:
    return spec.model_copy(update={"filter": spec.filter.model_copy(update=filter_fields)})


def _dropped(result) -> dict[str, int]:
    return {k: v for k, v in result.dropped.items() if v}


def test_each_rule_drops_under_its_own_reason(zh_spec: LanguageSpec, tmp_path: Path) -> None:
    rows = [_row(i) for i in range(6)] + [
        _row(10, status="failed_to_download", error_message="HTTP Error 404: Not Found"),  # plain img2dataset text
        _row(11, status="failed_to_download", error_message="<urlopen error [Errno 111] Connection refused>"),
        _row(12, status="failed_to_download", error_message="The read operation timed out"),
        _row(13, status="failed_to_resize", error_message="image area too large"),
        _row(14, original_width=8, width=8),
        _row(15, original_width=640, original_height=100),
        _row(16, similarity=0.1), _row(17, punsafe=0.9), _row(18, pwatermark=0.8),
        _row(19, caption_zh="   "), _row(20, caption_zh="圆"), _row(21, caption="x" * 500),
        _row(22, caption_zh="★★★ 123 ###"), _row(23, caption_zh="左に赤い丸が一つあります"),
        _row(24, sha256=f"{0:064x}"),  # the same image bytes as row 0
        _row(25, caption=f"{GOOD_EN} 1", caption_zh=f"{GOOD_ZH}1"),  # the caption pair of row 1
        _row(26, caption_zh="", caption="", native=True),  # native, but nothing left: empty
        _row(27, caption="", native=True, caption_zh="蓝色的正方形在上面"),  # native rows need no English
    ]
    spec = _spec(zh_spec, min_caption_chars=3, min_similarity=0.2, max_punsafe=0.5, max_pwatermark=0.5,
                 max_images_per_caption_pair=1, max_image_pixels=10**6)
    result = filter_pairs(spec, _lake(tmp_path, rows))
    assert _dropped(result) == {
        "download_http_error": 1, "download_connection": 1, "download_timeout": 1, "too_large": 1, "too_small": 1,
        "bad_aspect": 1, "low_similarity": 1, "unsafe": 1, "watermark": 1, "caption_empty": 2,
        "caption_too_short": 1, "caption_too_long": 1, "caption_not_text": 1, "wrong_language": 1,
        "duplicate_image": 1, "duplicate_caption": 1}
    pairs = pq.read_table(result.pairs_path).to_pylist()
    assert [p["key"] for p in pairs] == [f"{k:09d}" for k in (0, 1, 2, 3, 4, 5, 27)]
    assert pairs[-1]["native"] is True and pairs[0]["native"] is False
    assert result.rows_in == len(rows) == result.rows_out + sum(result.dropped.values())


def test_captions_are_cleaned_before_the_checks(zh_spec: LanguageSpec, tmp_path: Path) -> None:
    mojibake = "caf\u00c3\u00a9 &amp; cr\u00c3\u00a8me"  # UTF-8 read as Latin-1, and an HTML entity
    rows = [_row(0, caption=mojibake + "\x00\x07", caption_zh="這是一個\u3000紅色的圓形"),  # traditional, parallel
            _row(1, native=True, caption_zh="Photo 漢字很好看 ABC 12，好！ www"),  # native: keep_only, t2s
            _row(2, caption="ｆｕｌｌ　ｗｉｄｔｈ", caption_zh="\u200b左边\u200b有一个红色的圆形")]
    result = filter_pairs(zh_spec, _lake(tmp_path, rows))
    pairs = {p["key"][-1]: p for p in pq.read_table(result.pairs_path).to_pylist()}
    assert pairs["0"]["caption_en"] == "café & crème" and pairs["0"]["caption"] == "这是一个 红色的圆形"
    assert pairs["1"]["caption"] == "汉字很好看12，好！"  # Latin letters and spaces gone; simplified
    assert pairs["2"]["caption"] == "左边 有一个红色的圆形"  # a format character became a space
    assert pairs["2"]["caption_en"] == "ｆｕｌｌ ｗｉｄｔｈ"  # zh keeps widths (NFC); ja's NFKC would fold them


def test_custom_where_keeps_only_matching_rows(zh_spec: LanguageSpec, tmp_path: Path) -> None:
    rows = [_row(i, original_width=64 + i) for i in range(6)]
    spec = _spec(zh_spec, where="original_width >= 67 AND caption NOT LIKE '%;%' AND NOT native")
    result = filter_pairs(spec, _lake(tmp_path, rows))
    assert _dropped(result) == {"custom_where": 3} and result.rows_out == 3


@pytest.mark.parametrize("where, why", [
    ("true; DROP TABLE judged", "does not parse"),
    ("true) UNION SELECT rid FROM judged_rows --", "changes the query"),
    ("rid IN (SELECT rid FROM judged_rows)", "subquery"),
    ("getenv('HOME') IS NOT NULL", "getenv"),
    ("length(read_text('/etc/passwd')) > 0", "read_text"),
    ("current_setting('threads') > 0", "current_setting"),
    ("random() < 0.5", "random"),
    ("$1", "parameter"),
    ("width", "not BOOLEAN"),
    ("no_such_column > 1", "does not bind"),
    ("true) LIMIT 1 --", "changes the query"),
    ("true); ATTACH '/tmp/x.db' AS x; SELECT (1", "more than one"),
])
def test_hostile_where_is_refused_with_the_reason(zh_spec: LanguageSpec, tmp_path: Path, where: str, why: str) -> None:
    lake = _lake(tmp_path, [_row(0)])
    with pytest.raises(WhereError, match="filter.where") as err:
        filter_pairs(_spec(zh_spec, where=where), lake)
    assert why in str(err.value).lower() or why in str(err.value)
    assert "width >= 512" in str(err.value)  # says what to write instead
    assert not (lake / "zh" / "pairs" / "pairs.parquet").exists()


LAION = {"URL": ["http://127.0.0.1:9/a.jpg", "ftp://127.0.0.1/b.jpg", "http://127.0.0.1:9/c.jpg",
                 "file:///etc/passwd", "http://127.0.0.1:9/e.jpg"],
         "TEXT": ["红色的圆形", "蓝色", "赤い丸", "x", "绿色"], "ENG TEXT": ["red circle", "blue", "red", "x", "green"],
         "WIDTH": [640, 640, 640, 640, 800], "HEIGHT": [480, 480, 480, 480, 600],
         "similarity": [0.3, 0.3, 0.3, 0.3, 0.31], "punsafe": [0.1, 0.1, 0.1, 0.1, 0.2],
         "pwatermark": [0.1, 0.2, 0.3, 0.4, 0.5], "LANGUAGE": ["zh", "zh", "ja", "zh", "zh"]}
LAION_COLUMNS = ColumnMapping(url="URL", caption_en="ENG TEXT", caption="TEXT", width="WIDTH", height="HEIGHT",
                              language="LANGUAGE")


def _write(table: pa.Table, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt in ("csv", "tsv"):
        import pyarrow.csv as pcsv
        if fmt == "csv":
            pcsv.write_csv(table, path)
        else:  # LAION's TSVs: no quoting at all
            rows = ["\t".join(table.column_names)] + ["\t".join(str(v) for v in r.values()) for r in table.to_pylist()]
            path.write_text("\n".join(rows) + "\n")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table.to_pylist()))


@pytest.mark.parametrize("name", ["laion.parquet", "laion.csv", "laion.tsv", "laion.jsonl.gz", "laion.csv.gz"])
def test_laion_columns_map_in_every_format(zh_spec: LanguageSpec, tmp_path: Path, name: str) -> None:
    fmt = name.split(".")[1]
    plain = tmp_path / name.removesuffix(".gz")
    _write(pa.table(LAION), plain, fmt)
    path = plain
    if name.endswith(".gz"):
        path = tmp_path / name
        path.write_bytes(gzip.compress(plain.read_bytes()))
    manifest = ManifestSpec(path=str(path), columns=LAION_COLUMNS, native=True, languages=["zh"])
    urls = prepare_url_list(zh_spec, [manifest], tmp_path / "urls.parquet")
    assert urls.rows_in == 5 and urls.rows == 2
    assert urls.dropped == {"manifest_unreadable": 0, "bad_url": 2, "manifest_language": 1}
    table = pq.read_table(urls.path)
    assert table.column_names == ["url", "caption_en", "caption_zh", "native", "similarity", "punsafe", "pwatermark",
                                  "manifest_width", "manifest_height", "manifest_language"]
    assert table["caption_zh"].to_pylist() == ["红色的圆形", "绿色"] and all(table["native"].to_pylist())
    assert table["manifest_width"].to_pylist() == [640, 800] and table["pwatermark"].to_pylist() == [0.1, 0.5]
    assert json.loads((tmp_path / "urls.json").read_text())["dropped"] == urls.dropped


def test_plain_parallel_manifest_from_an_fsspec_url(zh_spec: LanguageSpec, tmp_path: Path) -> None:
    with fsspec.open("memory://manifests/zh.parquet", "wb") as f:
        pq.write_table(pa.table({"url": ["https://127.0.0.1:9/a.png"], "caption_en": ["a"], "caption_zh": ["甲"]}), f)
    urls = prepare_url_list(zh_spec, [ManifestSpec(path="memory://manifests/zh.parquet")], tmp_path / "u.parquet")
    table = pq.read_table(urls.path)
    assert table.column_names == ["url", "caption_en", "caption_zh", "native"] and table["native"].to_pylist() == [False]
    with pytest.raises(FileNotFoundError, match="memory://manifests/missing.parquet does not exist"):
        prepare_url_list(zh_spec, [ManifestSpec(path="memory://manifests/missing.parquet")], tmp_path / "v.parquet")


def test_unreadable_rows_are_counted_and_bad_manifests_refused(zh_spec: LanguageSpec, tmp_path: Path) -> None:
    jsonl = tmp_path / "zh.jsonl"
    jsonl.write_bytes(b'{"url": "http://127.0.0.1:9/a.png", "caption_en": "a", "caption_zh": "\xe7\x94\xb2"}\n'
                      b'{"url": "http://127.0.0.1:9/b.png", "caption_en": "bad \xff", "caption_zh": "x"}\n')
    urls = prepare_url_list(zh_spec, [ManifestSpec(path=str(jsonl))], tmp_path / "u.parquet")
    assert (urls.rows_in, urls.rows, urls.dropped["manifest_unreadable"]) == (2, 1, 1)
    with pytest.raises(ValueError, match="cannot tell its format"):
        prepare_url_list(zh_spec, [ManifestSpec(path=str(tmp_path / "zh.txt"))], tmp_path / "u.parquet")
    no_english = tmp_path / "native.csv"
    no_english.write_text("url,caption_zh\nhttp://127.0.0.1:9/a.png,甲\n")
    manifest = ManifestSpec(path=str(no_english), columns=ColumnMapping(caption_en=None))
    table = pq.read_table(prepare_url_list(zh_spec, [manifest], tmp_path / "w.parquet").path)
    assert table["native"].to_pylist() == [True] and table["caption_en"].to_pylist() == [""]
    assert len(REASONS) == len(set(REASONS))
