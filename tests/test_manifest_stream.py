"""The url list out of core: streamed into parts, digested, replaced only when it changed, never half written."""

import json
import math
import time
from pathlib import Path

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import pea.corpus.urllist as urllist
from pea.corpus.acquire import _missing_shards
from pea.corpus.manifest import prepare_url_list
from pea.spec import DuckDBSpec, LanguageSpec, ManifestSpec, load_spec

ROWS_PER_SHARD = 10  # parts of 100 shards = 1000 rows, row groups of 100 rows


@pytest.fixture(scope="module")
def spec() -> LanguageSpec:
    base = load_spec("zh")
    return base.model_copy(update={"corpus": base.corpus.model_copy(update={"rows_per_shard": ROWS_PER_SHARD})})


def _manifest(rows: int, start: int = 0, every_bad: int = 7) -> pa.Table:
    """`rows` rows; every `every_bad`-th URL is ftp:// (dropped before download). Built by DuckDB, no Python loop."""
    return duckdb.sql(f"""SELECT CASE WHEN i % {every_bad} = 0 THEN 'ftp://h/' ELSE 'https://h/' END || i || '.png'
                                     AS url,
                                 'caption ' || i AS caption_en, '标题' || i AS caption_zh,
                                 (i % 100) / 100 AS similarity
                          FROM range({start}, {start + rows}) t(i)""").to_arrow_table()


def _expected(tables: list[pa.Table]) -> pa.Table:
    """The straightforward reading: every manifest whole, in order, minus the non-http rows."""
    table = pa.concat_tables([t.select(["url", "caption_en", "caption_zh"]) for t in tables])
    return table.filter(pc.starts_with(table["url"], "https://"))


def _mtimes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(root.iterdir())}


def test_manifests_stream_into_parts_in_order(spec: LanguageSpec, tmp_path: Path) -> None:
    first, second, third = _manifest(1500), _manifest(700, start=1500), _manifest(900, start=2200)
    pq.write_table(first, tmp_path / "a.parquet", row_group_size=256)
    pcsv.write_csv(second, tmp_path / "b.csv")
    with fsspec.open("memory://stream/c.parquet", "wb") as f:
        pq.write_table(third, f)
    with fsspec.open("memory://stream/d.parquet", "wb") as f:  # a second URL of one filesystem, same connection
        pq.write_table(third.slice(0, 10), f)
    manifests = [ManifestSpec(path=str(tmp_path / "a.parquet")), ManifestSpec(path=str(tmp_path / "b.csv")),
                 ManifestSpec(path="memory://stream/c.parquet"), ManifestSpec(path="memory://stream/d.parquet")]
    urls = prepare_url_list(spec, manifests, tmp_path / "lake" / "manifest-urls")

    expected = _expected([first, second, third, third.slice(0, 10)])
    assert urls.rows == expected.num_rows and urls.rows_in == 1500 + 700 + 900 + 10
    assert urls.dropped == {"manifest_unreadable": 0, "bad_url": urls.rows_in - urls.rows, "manifest_language": 0}
    names = sorted(p.name for p in urls.path.glob("*.parquet"))
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert urls.parts == (1000, 1000, expected.num_rows - 2000)
    for name, rows in zip(names, urls.parts):
        meta = pq.ParquetFile(urls.path / name).metadata
        assert meta.num_rows == rows and meta.row_group(0).num_rows == 10 * ROWS_PER_SHARD
    listed = pa.concat_tables([pq.read_table(urls.path / n) for n in names])
    assert listed.select(["url", "caption_en", "caption_zh"]).equals(expected)  # every row, in manifest order
    assert listed.column_names == ["url", "caption_en", "caption_zh", "native", "similarity"]  # no role no one has
    assert pq.read_table(urls.path).num_rows == urls.rows  # the folder reads as one table too
    summary = json.loads((tmp_path / "lake" / "manifest-urls.json").read_text())
    assert summary["digest"] == urls.digest == (urls.path / "_digest").read_text().strip()
    assert summary["dropped"] == urls.dropped
    assert [p["rows"] for p in summary["parts"]] == list(urls.parts)
    assert not (tmp_path / "lake" / ".spill").exists()
    assert [p.name for p in (tmp_path / "lake").iterdir() if p.name.startswith(".")] == []


def test_img2dataset_numbers_shards_across_the_parts(spec: LanguageSpec, tmp_path: Path) -> None:
    from img2dataset.reader import Reader

    pq.write_table(_manifest(2345), tmp_path / "m.parquet")
    urls = prepare_url_list(spec, [ManifestSpec(path=str(tmp_path / "m.parquet"))], tmp_path / "urls")
    (tmp_path / "i2d").mkdir()
    reader = Reader(str(urls.path), "parquet", "url", "caption_en", None, None, ["caption_zh"], ROWS_PER_SHARD,
                    set(), str(tmp_path / "i2d"))
    ids = [shard_id for shard_id, _ in reader]
    expected = urls.shards(ROWS_PER_SHARD)
    assert ids == list(range(expected)) and expected == math.ceil(urls.rows / ROWS_PER_SHARD)
    # acquire's completeness check reads the raw folder as img2dataset's incremental mode does
    raw = tmp_path / "raw"
    raw.mkdir()
    for shard in (*range(expected), expected + 5):
        if shard != 3:
            (raw / f"{shard:05d}_stats.json").write_text("{}")
    assert _missing_shards(raw, expected) == [3]


def test_an_unchanged_list_is_not_rewritten_and_a_changed_one_is(spec: LanguageSpec, tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(_manifest(2500), manifest)
    out = tmp_path / "lake" / "manifest-urls"
    first = prepare_url_list(spec, [ManifestSpec(path=str(manifest))], out)
    before = _mtimes(out)
    time.sleep(0.01)
    out.with_suffix(".json").write_text("{")  # the decision rests on the folder's own record, not the summary
    again = prepare_url_list(spec, [ManifestSpec(path=str(manifest))], out)
    assert (again.digest, again.replaced, first.replaced) == (first.digest, False, True)
    assert _mtimes(out) == before  # img2dataset's shards stay valid: the same files

    pq.write_table(_manifest(2500).set_column(1, "caption_en", pa.array(["changed"] * 2500)), manifest)
    changed = prepare_url_list(spec, [ManifestSpec(path=str(manifest))], out)
    assert changed.replaced and changed.digest != first.digest and changed.parts == first.parts
    assert set(pq.read_table(out, columns=["caption_en"])["caption_en"].to_pylist()) == {"changed"}
    assert json.loads(out.with_suffix(".json").read_text())["digest"] == changed.digest

    (out / "part-00001.parquet").unlink()  # the summary says the same list, but its parts are gone
    pq.write_table(_manifest(2500).set_column(1, "caption_en", pa.array(["changed"] * 2500)), manifest)
    restored = prepare_url_list(spec, [ManifestSpec(path=str(manifest))], out)
    assert restored.replaced and restored.digest == changed.digest and (out / "part-00001.parquet").is_file()


def test_a_failed_write_leaves_the_previous_list_and_nothing_half_written(spec: LanguageSpec, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(_manifest(2500), manifest)
    out = tmp_path / "manifest-urls"
    first = prepare_url_list(spec, [ManifestSpec(path=str(manifest))], out)
    before, summary = _mtimes(out), out.with_suffix(".json").read_text()
    pq.write_table(_manifest(2500, start=10), manifest)

    closed = []

    def dies_on_the_second_part(self):  # as if the run were killed while writing the second part
        closed.append(1)
        if len(closed) == 2:
            raise KeyboardInterrupt
        return original(self)

    original = urllist.PartWriter._close_part
    monkeypatch.setattr(urllist.PartWriter, "_close_part", dies_on_the_second_part)
    monkeypatch.setattr(urllist.PartWriter, "abort", lambda self: None)  # a kill cleans nothing up
    with pytest.raises(KeyboardInterrupt):
        prepare_url_list(spec, [ManifestSpec(path=str(manifest))], out)
    assert _mtimes(out) == before and out.with_suffix(".json").read_text() == summary  # the old list, whole
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".manifest-urls.tmp-")]
    assert len(leftovers) == 1  # the parts written so far stay hidden, never taken for the list

    monkeypatch.undo()
    fresh = prepare_url_list(spec, [ManifestSpec(path=str(manifest))], out)
    assert fresh.replaced and fresh.digest != first.digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".manifest-urls.")]  # the leftover cleared

    pq.write_table(_manifest(30, every_bad=1), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no row of .* can be fetched"):  # nothing fetchable: the list stays
        prepare_url_list(spec, [ManifestSpec(path=str(tmp_path / "bad.parquet"))], out)
    assert json.loads(out.with_suffix(".json").read_text())["digest"] == fresh.digest


def test_a_small_memory_limit_streams_a_large_manifest(spec: LanguageSpec, tmp_path: Path) -> None:
    rows = 400_000
    manifest = tmp_path / "big.parquet"
    duckdb.sql(f"""COPY (SELECT 'https://img.example/' || i || '/' || md5(i::VARCHAR) || '.jpg' AS url,
                                'a photo of thing ' || i || ' ' || repeat('x', (i % 50)::INTEGER) AS caption_en,
                                '一张照片' || i AS caption_zh FROM range({rows}) t(i))
                   TO '{manifest}' (FORMAT parquet, ROW_GROUP_SIZE 50000)""")
    # 32MB with 2 threads completes; DuckDB runs out at 16MB (its floor for this scan)
    corpus = spec.corpus.model_copy(update={"rows_per_shard": 1000,
                                            "duckdb": DuckDBSpec(memory_limit="32MB", threads=2)})
    start = time.perf_counter()
    urls = prepare_url_list(spec.model_copy(update={"corpus": corpus}), [ManifestSpec(path=str(manifest))],
                            tmp_path / "manifest-urls")
    seconds = time.perf_counter() - start
    assert urls.rows == rows and urls.parts == (100_000,) * 4 and seconds < 20
    got = pq.read_table(tmp_path / "manifest-urls", columns=["url"])["url"]
    assert got.equals(pq.read_table(manifest, columns=["url"])["url"])  # order kept under the limit
