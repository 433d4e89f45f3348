"""The embed stage as many workers: disjoint hash buckets, exactly once, stores as one worker leaves them."""

import io

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pea.corpus.synthetic import all_scenes, write_pairs
from pea.embed import embed, launch, open_stores
from pea.embed.store import TensorStore
from pea.spec import EmbedSpec, LanguageSpec, load_spec


def _owner(hash_: str, workers: int) -> int:
    return int(hash_[:8], 16) % workers  # pea.embed.bucket, in Python


def _rows(store: TensorStore) -> tuple[int, int]:
    """(rows, distinct hashes) over a store's parts: equal when nothing was computed twice."""
    parts = store.parts()
    if not parts:
        return 0, 0
    return tuple(duckdb.connect().execute("SELECT count(*), count(DISTINCT hash) FROM read_parquet($p)",
                                          {"p": parts}).fetchall()[0])


def _contents(store: TensorStore) -> dict[str, dict[str, torch.Tensor]]:
    """Every stored row's tensors as their bit patterns (16-bit values widened exactly to float32)."""
    hashes = sorted(store.hashes())
    tensors = store.read(hashes)
    return {h: {name: t[i].view(torch.int32) for name, t in tensors.items()} for i, h in enumerate(hashes)}


def test_the_former_batch_size_sets_both_and_one_worker_is_the_default():
    spec = EmbedSpec.model_validate({"batch_size": 16})
    assert (spec.text_batch_size, spec.image_batch_size) == (16, 16)
    spec = EmbedSpec.model_validate({"batch_size": 16, "image_batch_size": 4})
    assert (spec.text_batch_size, spec.image_batch_size) == (16, 4)
    assert EmbedSpec().launcher.world_size == 1


def test_workers_take_disjoint_buckets_and_a_rerun_computes_only_what_is_missing(tmp_path, zoo_dir):
    zh = load_spec("zh", profile="embedded", zoo_dir=zoo_dir)
    pairs = write_pairs(tmp_path, zh, all_scenes()[:24])
    lake = tmp_path / "lake"
    with pytest.raises(ValueError, match="worker 2 of 2 does not exist"):
        embed(zh, lake, pairs, worker=2, workers=2)

    # Worker 0 of 2 finishes; worker 1 is killed before it writes anything.
    first = embed(zh, lake, pairs, worker=0, workers=2)
    stores = open_stores(zh, lake)
    for name, store in stores.items():
        hashes = store.hashes()
        assert len(hashes) == first.computed[name] > 0
        assert {_owner(h, 2) for h in hashes} == {0}
    # Worker 1 alone computes the rest, and nothing of worker 0's.
    second = embed(zh, lake, pairs, worker=1, workers=2)
    assert second.reused == {"teacher": 0, "student": 0, "latents": 0}
    assert {k: first.computed[k] + second.computed[k] for k in first.computed} == \
        {"teacher": 25, "student": 25, "latents": 24}
    rerun = embed(zh, lake, pairs)
    assert rerun.computed == {"teacher": 0, "student": 0, "latents": 0}
    assert all(_rows(store)[0] == _rows(store)[1] for store in stores.values())


def test_two_launched_workers_leave_the_stores_exactly_as_one_does(tmp_path, zoo_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two torch processes on this machine's 2 cores
    zh = load_spec("zh", profile="embedded", zoo_dir=zoo_dir)
    pairs = write_pairs(tmp_path, zh, all_scenes()[:40])
    one = embed(zh, tmp_path / "one", pairs)

    two_workers = LanguageSpec.model_validate(
        {**zh.model_dump(), "embed": {**zh.embed.model_dump(), "launcher": {"num_gpus": 2}}})
    two = launch(two_workers, tmp_path / "two", pairs)
    assert two.computed == one.computed == {"teacher": 41, "student": 41, "latents": 40}
    assert not list((tmp_path / "two").glob(".embed-*"))  # the scratch folder is gone
    for name in ("teacher_store", "student_store", "latent_store"):
        a, b = TensorStore.open(getattr(one, name)), TensorStore.open(getattr(two, name))
        assert len(b.parts()) >= 2 and _rows(b)[0] == _rows(b)[1]  # both wrote; nothing twice
        left, right = _contents(a), _contents(b)
        assert left.keys() == right.keys()
        for h in left:
            for tensor in left[h]:
                assert torch.equal(left[h][tensor], right[h][tensor]), f"{name} {tensor} differs for {h}"

    again = launch(two_workers, tmp_path / "two", pairs)
    assert again.computed == {"teacher": 0, "student": 0, "latents": 0} and again.reused == one.computed


def test_an_image_of_another_size_is_refused_by_name(tmp_path, zoo_dir):
    zh = load_spec("zh", profile="embedded", zoo_dir=zoo_dir)
    pairs = write_pairs(tmp_path, zh, all_scenes()[:6])
    raw = tmp_path / "raw-zh.parquet"
    table = pq.read_table(raw).to_pydict()
    wide = io.BytesIO()
    Image.new("RGB", (32, 24), "red").save(wide, format="png")  # what keep_ratio makes of a 4:3 picture
    table["png"][3] = wide.getvalue()
    pq.write_table(pa.table(table), raw)
    with pytest.raises(ValueError, match=r"image '0000003' of .*raw-zh.parquet .* is 32x24 pixels, not "
                                         r"corpus.image_size 32x32.*corpus.resize_mode to center_crop or border"):
        embed(zh, tmp_path / "lake", pairs)


def test_a_worker_killed_mid_part_loses_only_that_part(tmp_path, zoo_dir, monkeypatch):
    from pea import models

    zh = load_spec("zh", profile="embedded", zoo_dir=zoo_dir)
    zh = zh.model_copy(update={"embed": zh.embed.model_copy(update={"text_batch_size": 4})})
    monkeypatch.setattr("pea.embed.ROWS_PER_PART", 8)
    pairs = write_pairs(tmp_path, zh, all_scenes()[:24])
    load_student = models.load_student
    calls = []

    def dies_on_the_fourth_batch(ref):
        student = load_student(ref)
        encode = student.encode

        def encode_or_die(captions):
            calls.append(len(captions))
            if len(calls) == 4:  # 12 rows encoded, one part of 8 written, 4 rows in flight
                raise KeyboardInterrupt("killed")
            return encode(captions)
        student.encode = encode_or_die
        return student
    monkeypatch.setattr("pea.models.load_student", dies_on_the_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        embed(zh, tmp_path / "lake", pairs)
    student = open_stores(zh, tmp_path / "lake")["student"]
    assert _rows(student) == (8, 8)

    monkeypatch.setattr("pea.models.load_student", load_student)
    rerun = embed(zh, tmp_path / "lake", pairs)
    assert rerun.computed == {"teacher": 0, "student": 25 - 8, "latents": 24}
    assert rerun.reused == {"teacher": 25, "student": 8, "latents": 0}
    assert _rows(student) == (25, 25)
