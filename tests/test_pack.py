"""The pack reads each store part once whatever wrote the stores; ranks and later stages open the launcher's pack;
the pairs' fingerprint is scanned once and recorded in the pack's index."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import pea.train.shards
import pea.train.table
from pea.corpus.synthetic import all_scenes, write_pairs
from pea.embed import ROWS_PER_PART, EmbedResult, embed
from pea.embed.store import TensorStore
from pea.io.keys import key_digest, text_hash
from pea.spec import load_spec
from pea.train import shards
from pea.train.shards import Packed, pack

SHAPES = {"teacher": (77, 64), "student": (77, 96), "latents": (4, 16, 16)}  # ≈ 27 KB a pair in fp16
COLUMNS = {"teacher": "tokens", "student": "states", "latents": "latents"}
PAIRS = 3000  # with 8 writers a chunk of 1,024 pairs spans every writer's part: the old gather re-read them


def _tensor(hash_: str, shape) -> np.ndarray:
    """A row's tensor, a function of its hash alone: any layout stores the same bytes for it."""
    return np.random.default_rng(int(hash_[:12], 16)).standard_normal(shape, dtype=np.float32)


def _lake(root: Path, writers: int, teacher_shared: bool) -> tuple[Path, EmbedResult]:
    """pairs.parquet and three stores in pea.embed's layout: worker w of `writers` stores its hash bucket in key
    order, ROWS_PER_PART rows a part; with `teacher_shared` the teacher store is in another language's (random)
    order of the same English captions."""
    (root / "pairs").mkdir(parents=True)
    en = [f"an english caption {i}" for i in range(PAIRS)]
    zh = [f"第{i}个说明" for i in range(PAIRS)]
    images = [text_hash(f"image {i}") for i in range(PAIRS)]
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(PAIRS)], "image_sha256": images, "caption_en": en,
                             "caption": zh, "native": [False] * PAIRS}), root / "pairs" / "pairs.parquet")
    hashes = {"teacher": [text_hash(c) for c in en], "student": [text_hash(c) for c in zh], "latents": images}
    roots = {}
    for name, shape in SHAPES.items():
        store = TensorStore(root / name / key_digest({"test": name}), {"test": name}, "float16")
        order = np.random.default_rng(7).permutation(PAIRS).tolist() if name == "teacher" and teacher_shared \
            else range(PAIRS)
        for worker in range(writers):
            mine = [hashes[name][i] for i in order if int(hashes[name][i][:8], 16) % writers == worker]
            for start in range(0, len(mine), ROWS_PER_PART):
                part = mine[start:start + ROWS_PER_PART]
                store.write(part, {COLUMNS[name]: torch.from_numpy(np.stack([_tensor(h, shape) for h in part]))})
        if name != "latents":
            store.write([text_hash("")], {COLUMNS[name]: torch.zeros(1, *shape)})
        roots[name] = store.root
    return root / "pairs" / "pairs.parquet", EmbedResult(roots["teacher"], roots["student"], roots["latents"])


@pytest.fixture(scope="module")
def spec(zoo_dir):
    spec = load_spec("zh", "embedded", zoo_dir=zoo_dir)
    return spec.model_copy(update={"train": spec.train.model_copy(update={"data": spec.train.data.model_copy(
        update={"row_group_rows": 256})})})


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, spec):
    """The same pairs and tensors in three store layouts, each packed once."""
    out = {}
    for name, writers, shared in (("one writer", 1, False), ("eight writers", 8, False), ("shared teacher", 1, True)):
        pairs, embedded = _lake(tmp_path_factory.mktemp(name.replace(" ", "-")), writers, shared)
        stats = {}
        out[name] = (embedded, pack(spec, pairs, embedded, stats), stats)
    return out


@pytest.mark.parametrize("layout", ["one writer", "eight writers", "shared teacher"])
def test_the_pack_reads_each_store_part_once_whatever_wrote_the_stores(layouts, layout):
    embedded, packed, gather = layouts[layout]
    parts = {name: len(TensorStore.open(root).parts()) for name, root in
             zip(("teacher", "student", "latents"), (embedded.teacher_store, embedded.student_store,
                                                      embedded.latent_store))}
    assert gather["parts_read"] == parts  # every part once, none twice
    # The OS's count of bytes read while each store was located and gathered, against the tensor bytes packed. The
    # former gather read 5.0× here with 8 writers (each 1,024-pair chunk needed all 8 parts of a store, 3 stayed
    # cached) and 3.0× with one (whole stores scanned for the empty caption, parts re-read for the held-out sample).
    amplification = sum(gather["read_bytes"].values()) / gather["packed_bytes"]
    assert 1.0 <= amplification <= 1.2, gather
    assert gather["packed_bytes"] == sum(
        int(np.prod(shape)) * 2 for shape in SHAPES.values()) * (packed.train.rows + packed.heldout.rows)


def test_the_pack_is_the_same_bytes_whatever_wrote_the_stores(layouts):
    files = {name: {f"{split}/{f.name}": f.read_bytes() for split in ("train", "heldout")
                    for f in sorted((packed.root / split).iterdir())} | {
                        "empty": (packed.root / "empty.safetensors").read_bytes()}
             for name, (_, packed, _) in layouts.items()}
    assert files["one writer"] == files["eight writers"] == files["shared teacher"]
    # and the rows hold the stored tensors: the first training row's teacher tokens are its caption's
    _, packed, _ = layouts["eight writers"]
    row = pq.read_table(packed.root / "train" / packed.train.files[0]).slice(0, 1).to_pylist()[0]
    tokens = np.frombuffer(row["teacher"], np.float16).reshape(SHAPES["teacher"])
    np.testing.assert_array_equal(tokens, _tensor(text_hash(row["caption_en"]), SHAPES["teacher"]).astype(np.float16))


def test_stores_of_eight_real_embed_workers_pack_as_one_worker_s(tmp_path, zoo_dir):
    zh = load_spec("zh", "embedded", zoo_dir=zoo_dir)
    packs = {}
    for workers in (1, 8):
        lake = tmp_path / f"workers-{workers}"
        pairs = write_pairs(lake, zh, all_scenes()[:60])
        for worker in range(workers):
            embedded = embed(zh, lake, pairs, worker=worker, workers=workers)
        gather = {}
        packs[workers] = pack(zh, pairs, embedded, gather)
        assert gather["parts_read"] == {name: len(TensorStore.open(root).parts()) for name, root in zip(
            ("teacher", "student", "latents"), (embedded.teacher_store, embedded.student_store, embedded.latent_store))}
    assert max(gather["parts_read"].values()) >= 8  # eight writers wrote at least eight parts of a store
    # Every file, index.json included: the stores' layout leaves no trace. The tensors themselves were computed in
    # other batches by the eight writers (a batch's composition can move an encoder's last bit on some CPUs), so
    # they are compared as fp16 values to a bit's tolerance; a row out of place would differ entirely.
    one = sorted(f.relative_to(packs[1].root) for f in packs[1].root.rglob("*") if f.is_file())
    assert one == sorted(f.relative_to(packs[8].root) for f in packs[8].root.rglob("*") if f.is_file())
    for name in one:
        a, b = packs[1].root / name, packs[8].root / name
        if name.suffix != ".parquet":
            assert a.read_bytes() == b.read_bytes(), name
            continue
        ta, tb = pq.read_table(a), pq.read_table(b)
        assert ta.schema == tb.schema and ta.num_rows == tb.num_rows, name
        for column in ta.column_names:
            kind = ta.schema.field(column).type
            if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
                for x, y in zip(ta[column].to_pylist(), tb[column].to_pylist()):
                    np.testing.assert_allclose(np.frombuffer(x, np.float16).astype(np.float32),
                                               np.frombuffer(y, np.float16).astype(np.float32), rtol=2e-3, atol=2e-3)
            else:
                assert ta[column].equals(tb[column]), (name, column)


@pytest.fixture
def scans(monkeypatch):
    """Counts the full scans of the pairs (pea.train.shards.data_fingerprint, run for real)."""
    calls = []
    real = pea.train.shards.data_fingerprint
    monkeypatch.setattr(pea.train.shards, "data_fingerprint", lambda path: calls.append(path) or real(path))
    monkeypatch.setattr(shards, "_FINGERPRINTS", {})
    return calls


def test_the_fingerprint_is_scanned_once_and_recorded_in_the_pack_index(tmp_path, zoo_dir, scans):
    from pea.registry import lineage

    zh = load_spec("zh", "embedded", zoo_dir=zoo_dir)
    pairs = write_pairs(tmp_path, zh, all_scenes()[:40])
    embedded = embed(zh, tmp_path, pairs)
    packed = pack(zh, pairs, embedded)
    again = pack(zh, pairs, embedded)  # a later stage of the same process: no second scan
    opened = Packed.open(packed.root)  # another process (a rank, a retried stage): the index says it
    assert len(scans) == 1 and again.root == opened.root == packed.root
    index = json.loads((packed.root / "index.json").read_text())
    assert index["fingerprint"] == opened.fingerprint == pea.train.shards.data_fingerprint(pairs)
    scans.clear()
    table = pea.train.table.load_table(zh, tmp_path / "gone.parquet", embedded, packed=opened)
    assert len(table) == packed.heldout.rows
    assert lineage(zh, tmp_path / "gone.parquet", opened.fingerprint)["data_fingerprint"] == index["fingerprint"]
    assert not scans
    # A new version of the table (the filter stage renames a new file in) is scanned again.
    shutil.copy(pairs, tmp_path / "copy.parquet")
    (tmp_path / "copy.parquet").replace(pairs)
    assert pack(zh, pairs, embedded).root == packed.root and len(scans) == 1


def test_ranks_open_the_launchers_pack_and_never_repack(tmp_path, zoo_dir, scans, monkeypatch):
    from pea import train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    zh = load_spec("zh", "embedded", zoo_dir=zoo_dir)
    pairs = write_pairs(tmp_path, zh, all_scenes()[:96])
    embedded = embed(zh, tmp_path, pairs)
    packed = pack(zh, pairs, embedded)
    command = train.launch_command(zh, pairs, embedded, tmp_path / "run", packed)
    assert command[command.index("--pack") + 1] == str(packed.root)
    # What a rank runs, with a pairs path that does not exist: it can only read the pack it was handed.
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**zh.model_dump(mode="json"), "train": {
        **zh.train.model_dump(mode="json"), "warmup_steps": 1, "checkpoint_every": 2}}))
    scans.clear()
    train.main(["--spec", str(spec_file), "--run-dir", str(tmp_path / "run"), "--pairs", str(tmp_path / "none.parquet"),
                "--stores", str(embedded.teacher_store), str(embedded.student_store), str(embedded.latent_store),
                "--pack", str(packed.root), "--steps", "2"])
    assert (tmp_path / "run" / "adapter" / "config.json").is_file()
    assert not scans and [p.name for p in (tmp_path / "shards").iterdir()] == [packed.root.name]
