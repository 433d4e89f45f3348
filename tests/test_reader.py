"""Packed shards and the streaming reader: bounded, deterministic, each rank its own share, any filesystem."""

import shutil
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import torch

from pea.corpus.synthetic import all_scenes, write_pairs
from pea.embed import embed
from pea.spec import LanguageSpec, load_spec
from pea.train.reader import ShardStream
from pea.train.shards import Shards, data_fingerprint, pack
from pea.train.table import is_heldout, load_table


@pytest.fixture(scope="module")
def packed(tmp_path_factory, zoo_dir):
    lake = tmp_path_factory.mktemp("reader-lake")
    spec = load_spec("zh", "embedded", zoo_dir=zoo_dir)
    pairs = write_pairs(lake, spec, all_scenes() * 2)  # 180 scenes, each drawn twice: distinct images
    embedded = embed(spec, lake, pairs)
    return spec, pairs, embedded, pack(spec, pairs, embedded)


def _ids(batch) -> list[bytes]:
    """A row's identity: its latents' bytes (every synthetic image differs)."""
    return [row.numpy().tobytes() for row in batch.latents]


def test_the_pack_holds_every_pair_once_split_by_the_rule(packed):
    spec, pairs, embedded, result = packed
    rows = pq.read_table(pairs, columns=["caption_en", "caption"]).to_pylist()
    heldout = sum(is_heldout(r["caption_en"], r["caption"], spec.evaluate.heldout_percent) for r in rows)
    assert result.train.rows == len(rows) - heldout and result.heldout.rows == min(heldout, spec.evaluate.heldout_rows)
    assert all(n == spec.train.data.row_group_rows for groups in result.train.row_groups for n in groups[:-1])
    again = pack(spec, pairs, embedded)  # same key: the same pack, not a second one
    assert again.root == result.root and len(list(result.root.parent.iterdir())) == 1
    table = load_table(spec, pairs, embedded)
    assert all(is_heldout(e, t, spec.evaluate.heldout_percent) for e, t in zip(table.captions_en, table.captions))
    bounded = spec.model_copy(update={"evaluate": spec.evaluate.model_copy(update={"heldout_rows": 5})})
    small = load_table(bounded, pairs, embedded)
    assert small.captions == table.captions[:5]  # the same deterministic order, cut: lowest pair hashes first


def test_one_epoch_serves_each_row_at_most_once_and_the_order_is_a_pure_function_of_the_step(packed):
    _, _, _, result = packed
    stream = ShardStream(result.train, 16, seed=3, partitions=2)
    epoch, first = stream.locate(0), []
    step = 0
    while stream.locate(step)[0] == 0:
        first += _ids(stream.batch(step))
        step += 1
    assert len(first) == len(set(first)) >= result.train.rows - 2 * 4 * 16  # rows left over: < one window a partition
    fresh = ShardStream(result.train, 16, seed=3, partitions=2)
    assert _ids(fresh.batch(step + 2)) == _ids(stream.batch(step + 2))  # random access = sequential reading
    assert _ids(fresh.batch(1)) == _ids(stream.batch(1))
    other_seed = ShardStream(result.train, 16, seed=4, partitions=2)
    assert _ids(other_seed.batch(0)) != _ids(stream.batch(0))
    for s in (stream, fresh, other_seed):
        s.close()
    assert epoch == (0, 0)


def test_two_ranks_read_disjoint_row_groups_and_together_make_the_one_process_batch(packed, monkeypatch):
    _, _, _, result = packed
    read: dict[tuple[str, int], set] = {}
    original = ShardStream._read_window

    def recording(self, e, p, w, blocks):
        who = f"{self.mine.start}/{self.world}"
        read.setdefault((who, e), set()).update(self.blocks[b][:2] for b in blocks)
        return original(self, e, p, w, blocks)
    monkeypatch.setattr(ShardStream, "_read_window", recording)
    one = ShardStream(result.train, 16, seed=0, partitions=2, prefetch=0)
    ranks = [ShardStream(result.train, 8, seed=0, rank=r, world=2, partitions=2, prefetch=0) for r in (0, 1)]
    steps = 0
    while one.locate(steps)[0] < 2:  # two whole epochs
        assert _ids(one.batch(steps)) == _ids(ranks[0].batch(steps)) + _ids(ranks[1].batch(steps))
        steps += 1
    for epoch in (0, 1):  # within an epoch each rank reads only its own row groups
        rank0, rank1 = read[("0/2", epoch)], read[("1/2", epoch)]
        assert rank0 and rank1 and not rank0 & rank1 and rank0 | rank1 == read[("0/1", epoch)]
    for s in (one, *ranks):
        s.close()


def test_memory_is_bounded_by_the_windows_in_use_and_read_ahead(packed):
    _, _, _, result = packed
    stream = ShardStream(result.train, 16, seed=0, partitions=2, shuffle_row_groups=2, prefetch=1)
    for step in range(20):
        stream.batch(step)
        # Per partition: at most the windows a batch spans (2) and one read ahead.
        assert len(stream._windows) <= 2 * 3
    stream.close()


def test_a_layout_that_does_not_fit_is_refused_by_name(packed):
    spec, _, _, result = packed
    with pytest.raises(ValueError, match="partitions"):
        ShardStream(result.train, 16, seed=0, world=3, partitions=2)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ShardStream(result.train, result.train.rows, seed=0, partitions=2)
    with pytest.raises(ValueError, match="train.data.partitions=2 does not fit 4"):
        LanguageSpec.model_validate({**spec.model_dump(), "train": {**spec.train.model_dump(),
                                                                    "launcher": {"num_gpus": 4}}})


def test_shards_on_another_filesystem_read_the_same(packed):
    """A pack copied to an fsspec URL (here fsspec's in-memory filesystem, standing in for s3:// or gs://)
    is read through the same code path as the local folder."""
    _, _, _, result = packed
    fs = fsspec.filesystem("memory")
    for path in Path(result.root).rglob("*"):
        if path.is_file():
            fs.pipe(f"/pack/{path.relative_to(result.root)}", path.read_bytes())
    remote = Shards.open("memory://pack", "train")
    assert remote.row_groups == result.train.row_groups and remote.tensors == result.train.tensors
    local = ShardStream(result.train, 16, seed=0, partitions=2)
    other = ShardStream(remote, 16, seed=0, partitions=2)
    assert _ids(other.batch(5)) == _ids(local.batch(5))
    assert torch.equal(remote.empty()["student"], result.train.empty()["student"])
    local.close()
    other.close()


def test_the_pack_is_a_pure_function_of_its_inputs_with_row_groups_mixed(packed):
    spec, pairs, embedded, result = packed
    first = {f.name: f.read_bytes() for f in (result.root / "train").iterdir()}
    keys = pq.read_table(result.root / "train", columns=["key"]).column("key").to_pylist()
    shutil.rmtree(result.root)
    again = pack(spec, pairs, embedded)
    assert again.root == result.root and {f.name: f.read_bytes() for f in (again.root / "train").iterdir()} == first
    # Rows are shuffled at pack time (the corpus is written in scene order): a row group is not a run of neighbours.
    assert keys != sorted(keys) and sorted(keys) == sorted(set(keys))


def test_an_incomplete_pack_is_never_opened(packed, tmp_path):
    _, _, _, result = packed
    copy = tmp_path / "pack"
    shutil.copytree(result.root, copy)
    (copy / "index.json").unlink()  # what a killed packer leaves (it writes index.json last, then renames)
    with pytest.raises(FileNotFoundError, match="no index.json"):
        Shards.open(copy, "train")


def test_the_fingerprint_ignores_row_order_but_sees_content(packed, tmp_path):
    _, pairs, _, _ = packed
    table = pq.read_table(pairs)
    pq.write_table(table.take(list(reversed(range(table.num_rows)))), tmp_path / "reversed.parquet")
    pq.write_table(table.slice(1), tmp_path / "fewer.parquet")
    pq.write_table(pa_concat(table, table.slice(0, 1)), tmp_path / "duplicated.parquet")
    base = data_fingerprint(pairs)
    assert data_fingerprint(tmp_path / "reversed.parquet") == base
    assert len({base, data_fingerprint(tmp_path / "fewer.parquet"), data_fingerprint(tmp_path / "duplicated.parquet")}) == 3


def pa_concat(*tables):
    import pyarrow as pa

    return pa.concat_tables(tables)
