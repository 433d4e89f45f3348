"""pea.corpus: the synthetic corpus, acquire over real HTTP on 127.0.0.1 with img2dataset, and filter."""

import io
import json
import os
import shutil
from pathlib import Path

# img2dataset imports wandb and albumentations, which reach for the network unless told not to.
os.environ.update(WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pea.corpus.acquire import acquire  # noqa: E402
from pea.corpus.filter import REASONS, filter_pairs  # noqa: E402
from pea.corpus.synthetic import (  # noqa: E402
    BROKEN,
    ENGLISH,
    Scene,
    all_scenes,
    caption,
    make_corpus,
    render,
    serve,
)
from pea.spec import (  # noqa: E402
    LanguageSpec,
    ManifestSpec,
    SyntheticCorpus,
    available_languages,
    load_spec,
)

SIZE = 40  # good samples
ROWS = SIZE + len(BROKEN)  # manifest rows
FETCHED = ROWS - 1  # the ftp:// entry is dropped before download
SHARD_ROWS = 20  # 49 rows -> 3 shards


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> LanguageSpec:
    base = load_spec("zh", profile="embedded", zoo_dir=tmp_path_factory.mktemp("zoo"))
    corpus = base.corpus.model_copy(update={"synthetic": SyntheticCorpus(size=SIZE, seed=0), "rows_per_shard": SHARD_ROWS})
    return base.model_copy(update={"corpus": corpus})


@pytest.fixture(scope="module")
def lake(spec: LanguageSpec, tmp_path_factory: pytest.TempPathFactory) -> Path:
    lake = tmp_path_factory.mktemp("lake")
    first = acquire(spec, lake)
    assert (first.shards_total, first.shards_skipped) == (3, 0)
    return lake


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_captions_in_both_languages(spec: LanguageSpec) -> None:
    scene = Scene(count="two", color="blue", shape="square", position="top")
    assert caption(scene, ENGLISH) == "two blue squares at the top"
    assert caption(scene, spec.synthetic_captions) == "上面有两个蓝色的正方形"
    assert caption(Scene("one", "red", "circle", "left"), ENGLISH) == "one red circle on the left"
    assert len(all_scenes()) == len(set(all_scenes())) == 2 * 6 * 3 * 5


def test_render_draws_the_scene_where_it_says() -> None:
    for size in (32, 256):
        image = render(Scene("one", "red", "circle", "left"), size, seed=3)
        assert image.mode == "RGB" and image.size == (size, size)
        r, g, b = image.getpixel((size // 4, size // 2))
        assert r > 180 and g < 90 and b < 90  # red at the centre of the left region
        assert image.getpixel((size * 3 // 4, size // 2)) == image.getpixel((size - 1, size - 1))  # right is background


def test_corpus_is_deterministic_and_idempotent(spec: LanguageSpec, tmp_path: Path) -> None:
    scene = all_scenes()[7]
    assert render(scene, 64, 5).tobytes() == render(scene, 64, 5).tobytes()
    assert render(scene, 64, 5).tobytes() != render(scene, 64, 6).tobytes()
    manifest = make_corpus(spec, tmp_path / "a")
    make_corpus(spec, tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    make_corpus(spec, tmp_path / "a")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")} == before
    table = pq.read_table(manifest)
    assert table.column_names == ["url", "caption_en", "caption_zh", "native"] and table.num_rows == ROWS
    first = table["url"][0].as_py()
    assert first.startswith("images/00000-") and first.endswith(".png")  # named by content too
    with Image.open(tmp_path / "a" / first) as image:
        assert image.size == (spec.corpus.image_size * 2,) * 2


def test_acquire_downloads_over_http_then_skips_complete_shards(spec: LanguageSpec, lake: Path) -> None:
    raw = lake / "zh" / "raw"
    before = {p: p.stat().st_mtime_ns for p in raw.iterdir()}
    again = acquire(spec, lake)
    assert (again.shards_total, again.shards_skipped) == (3, 3)
    assert again.rows == FETCHED and again.manifest_rows == ROWS and again.dropped_before_download["bad_url"] == 1
    assert again.successes == FETCHED - 2  # the 404 and the corrupt file; the rest download and decode
    assert {p: p.stat().st_mtime_ns for p in raw.iterdir()} == before  # nothing was downloaded again
    table = pq.read_table(raw / "00000.parquet")
    assert {"key", "status", "sha256", "caption", "caption_zh", "native", "original_width", "png"} <= set(table.column_names)
    urls = pq.read_table(lake / "zh" / "manifest-urls")["url"].to_pylist()
    assert urls[0].startswith("http://127.0.0.1:") and "/images/00000-" in urls[0]


def test_filter_counts_every_drop_and_ignores_partial_shards(spec: LanguageSpec, lake: Path) -> None:
    raw = lake / "zh" / "raw"
    shutil.copy(raw / "00000.parquet", raw / "00042.parquet")  # a shard without stats, as a killed run leaves
    result = filter_pairs(spec, lake)
    assert result.rows_in == ROWS
    assert list(result.dropped) == list(REASONS)
    expected = {reason: 0 for reason in REASONS}
    for reason in BROKEN.values():
        expected[reason] += 1
    assert result.dropped == expected  # each broken entry under its own reason, nothing else dropped
    assert result.rows_out == SIZE
    report = json.loads(result.report_path.read_text())
    assert report["dropped"] == result.dropped and report["rows_out"] == SIZE
    assert set(result.histograms) == {"image_sizes", "aspect_ratios", "caption_lengths"}
    for path in result.histograms.values():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 200
        assert path.parent == result.pairs_path.parent and report["histograms"]

    pairs = pq.read_table(result.pairs_path)
    assert pairs.schema.names == ["key", "image_sha256", "caption_en", "caption", "width", "height", "raw_file", "native"]
    assert pq.ParquetFile(result.pairs_path).metadata.num_row_groups == 1
    assert not any(pairs["native"].to_pylist())  # the synthetic corpus is parallel pairs
    assert pairs.schema.field("width").type == pa.int32()
    rows = pairs.to_pylist()
    assert len({r["key"] for r in rows}) == SIZE and all(r["caption"] and r["caption_en"] for r in rows)
    # the good samples fill shards 0 and 1; shard 2 holds only the broken entries; 00042 was never read
    assert {r["raw_file"] for r in rows} == {str((raw / f"0000{i}.parquet").resolve()) for i in range(2)}
    first = rows[0]
    shard = pq.read_table(first["raw_file"], columns=["key", "png"]).to_pylist()
    png = next(r["png"] for r in shard if r["key"] == first["key"])
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (first["width"], first["height"]) == (spec.corpus.image_size,) * 2


def test_filter_refuses_without_complete_shards(spec: LanguageSpec, tmp_path: Path) -> None:
    (tmp_path / "zh" / "raw").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete raw shard"):
        filter_pairs(spec, tmp_path)


def test_manifest_missing_a_column_is_refused(spec: LanguageSpec, tmp_path: Path) -> None:
    manifest = tmp_path / "zh.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x.png"], "caption_en": ["x"]}), manifest)
    corpus = spec.corpus.model_copy(update={"manifests": [ManifestSpec(path=str(manifest))], "synthetic": None})
    with pytest.raises(ValueError, match=r"zh\.parquet lacks column\(s\) caption_zh"):
        acquire(spec.model_copy(update={"corpus": corpus}), tmp_path / "lake")


def test_acquire_from_several_manifests(spec: LanguageSpec, tmp_path: Path) -> None:
    table = pq.read_table(make_corpus(spec, tmp_path / "site"))
    with serve(tmp_path / "site") as base_url:
        table = table.set_column(0, "url", pa.array([u if "://" in u else base_url + u for u in table["url"].to_pylist()]))
        parts = [tmp_path / "part-1.parquet", tmp_path / "part-2.parquet"]
        pq.write_table(table.slice(0, 25).append_column("extra", pa.array(["x"] * 25)), parts[0])
        pq.write_table(table.slice(25), parts[1])
        corpus = spec.corpus.model_copy(update={"manifests": [ManifestSpec(path=str(p)) for p in parts],
                                                "synthetic": None})
        result = acquire(spec.model_copy(update={"corpus": corpus}), tmp_path / "lake")
    assert (result.shards_total, result.rows, result.successes) == (3, FETCHED, FETCHED - 2)
    combined = pq.read_table(tmp_path / "lake" / "zh" / "manifest-urls")
    fetched = [u for u in table["url"].to_pylist() if u.startswith("http")]
    assert combined["url"].to_pylist() == fetched  # the manifests' order, kept


def test_every_shipped_language_loads_in_both_forms_and_has_a_tiny_student(zoo_dir: Path) -> None:
    languages = available_languages()
    assert {"zh", "ja", "ko", "ru", "it", "vi"} <= set(languages)
    for language in languages:
        real, tiny = load_spec(language), load_spec(language, "embedded", zoo_dir=zoo_dir)
        assert real.student.id != tiny.student.id and "/" in real.student.id  # a Hub id for production
        assert real.filter.language_id is not None and real.synthetic_captions is not None
        assert tiny.corpus.synthetic is not None
        assert (zoo_dir / f"student-{language}" / "config.json").is_file()
        scenes = all_scenes()
        captions = {caption(s, real.synthetic_captions) for s in scenes}
        assert len(captions) == len(scenes)  # every scene says something different
