"""Embed's inputs are hashed once, by the launcher, for every worker: a worker reads its bucket and hashes nothing."""

import duckdb
import pyarrow.parquet as pq

import pea.io.keys
from pea.corpus.synthetic import all_scenes, write_pairs
from pea.embed import embed, write_inputs
from pea.embed.store import TensorStore
from pea.spec import load_spec


def test_the_launcher_hashes_each_caption_once_and_its_workers_hash_none(tmp_path, zoo_dir, monkeypatch):
    zh = load_spec("zh", "embedded", zoo_dir=zoo_dir)
    pairs = write_pairs(tmp_path, zh, all_scenes()[:30] * 3)  # each caption three times (three images)
    rows = pq.read_table(pairs, columns=["caption_en", "caption"]).to_pylist()
    texts = {r["caption_en"] for r in rows if r["caption_en"] is not None} | {r["caption"] for r in rows} | {""}
    calls = []
    real = pea.io.keys.text_hash
    monkeypatch.setattr(pea.io.keys, "text_hash", lambda text: calls.append(text) or real(text))

    write_inputs(zh, pairs, tmp_path / "inputs", workers=2)
    english = {r["caption_en"] for r in rows if r["caption_en"] is not None} | {""}
    assert len(calls) == len(english) + len({r["caption"] for r in rows} | {""}) < 2 * len(rows)
    assert set(calls) == texts
    calls.clear()
    workers = [embed(zh, tmp_path / "lake", pairs, worker=w, workers=2, inputs=tmp_path / "inputs") for w in (0, 1)]
    assert not calls  # the workers read their buckets; nothing was hashed again

    one = embed(zh, tmp_path / "one", pairs)  # one worker, hashing in its own process
    for name in ("teacher", "student", "latents"):
        assert sum(w.computed[name] for w in workers) == one.computed[name]
    for field in ("teacher_store", "student_store", "latent_store"):
        split, whole = TensorStore.open(getattr(workers[0], field)), TensorStore.open(getattr(one, field))
        assert split.hashes() == whole.hashes()
        buckets = [duckdb.connect().execute("SELECT count(*) FROM read_parquet($p)", {"p": p}).fetchall()[0][0]
                   for p in split.parts()]
        assert sum(buckets) == len(whole.hashes())  # each input stored once, by one worker
