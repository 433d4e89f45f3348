import pytest
import torch

from pea.corpus.synthetic import ENGLISH, all_scenes, caption, write_pairs
from pea.embed import embed, open_stores
from pea.embed.store import StoreMismatch, TensorStore
from pea.io.keys import text_hash
from pea.spec import load_spec
from pea.train.shards import pack


def test_embeddings_are_computed_once_and_shared_across_languages(tmp_path, zoo_dir, monkeypatch):
    zh = load_spec("zh", profile="embedded", zoo_dir=zoo_dir)
    ja = load_spec("ja", profile="embedded", zoo_dir=zoo_dir)
    scenes = all_scenes()[:24]
    lake = tmp_path / "lake"

    first = embed(zh, lake, write_pairs(tmp_path, zh, scenes))
    assert first.computed == {"teacher": 25, "student": 25, "latents": 24}  # +1: the empty caption
    again = embed(zh, lake, write_pairs(tmp_path, zh, scenes))
    assert again.computed == {"teacher": 0, "student": 0, "latents": 0}
    assert again.reused == first.computed

    # The second language must not even load the teacher's encoders or the VAE: zero calls.
    def must_not_run(*_):
        raise AssertionError("a stored embedding was computed again")
    monkeypatch.setattr("pea.models.load_teacher_text", must_not_run)
    monkeypatch.setattr("pea.models.load_vae", must_not_run)
    other = embed(ja, lake, write_pairs(tmp_path, ja, scenes))
    assert other.teacher_store == first.teacher_store and other.latent_store == first.latent_store
    assert other.computed == {"teacher": 0, "student": 25, "latents": 0}
    assert other.student_store != first.student_store


def test_stored_tensors_are_what_the_models_produce(tmp_path, zoo_dir):
    from pea import models

    zh = load_spec("zh", profile="embedded", zoo_dir=zoo_dir)
    scenes = all_scenes()[:8]
    result = embed(zh, tmp_path / "lake", write_pairs(tmp_path, zh, scenes))
    english = [caption(s, ENGLISH) for s in scenes]
    stored = TensorStore.open(result.teacher_store).read([text_hash(c) for c in english])["tokens"]
    fresh = models.load_teacher_text(zh.teacher).encode(english)["tokens"]
    assert stored.shape == (8, 77, 32)
    torch.testing.assert_close(stored, fresh, atol=2e-3, rtol=2e-3)  # stored in float16
    shards = pack(zh, tmp_path / "pairs-zh.parquet", result).train
    assert shards.tensors["student"] == ((zh.student.max_length, 64), "float16")
    assert shards.tensors["latents"] == ((4, 8, 8), "float16")


def test_stores_refuse_other_models_or_settings(tmp_path, zoo_dir):
    zh = load_spec("zh", profile="embedded", zoo_dir=zoo_dir)
    stores = open_stores(zh, tmp_path)
    with pytest.raises(StoreMismatch, match="refusing to mix"):
        TensorStore(stores["student"].root, {**stores["student"].key, "max_length": 77}, "float16")
    with pytest.raises(FileNotFoundError, match="run the filter stage first"):
        embed(zh, tmp_path, tmp_path / "missing.parquet")


def test_embed_streams_batches_and_writes_bounded_parts(tmp_path, zoo_dir, monkeypatch):
    """Memory is bounded by a batch and a part: the text encoders never see more than embed.text_batch_size
    inputs at once, the VAE never more than embed.image_batch_size, and no part holds more than
    ROWS_PER_PART rows plus one batch."""
    import pyarrow.parquet as pq

    from pea import models

    zh = load_spec("zh", profile="embedded", zoo_dir=zoo_dir)
    zh = zh.model_copy(update={"embed": zh.embed.model_copy(update={"text_batch_size": 5, "image_batch_size": 3})})
    monkeypatch.setattr("pea.embed.ROWS_PER_PART", 8)
    seen: list[int] = []
    images: list[int] = []
    load_student, load_vae = models.load_student, models.load_vae

    def counting(ref):
        student = load_student(ref)
        encode = student.encode
        student.encode = lambda captions: (seen.append(len(captions)), encode(captions))[1]
        return student

    def counting_vae(ref):
        vae = load_vae(ref)
        encode = vae.encode
        vae.encode = lambda x: (images.append(len(x)), encode(x))[1]
        return vae
    monkeypatch.setattr("pea.models.load_student", counting)
    monkeypatch.setattr("pea.models.load_vae", counting_vae)

    result = embed(zh, tmp_path / "lake", write_pairs(tmp_path, zh, all_scenes()[:24]))
    assert result.computed == {"teacher": 25, "student": 25, "latents": 24}
    assert max(seen) <= 5 and sum(seen) == 25
    assert max(images) <= 3 and sum(images) == 24
    for store, batch in ((result.teacher_store, 5), (result.student_store, 5), (result.latent_store, 3)):
        rows = [pq.read_metadata(p).num_rows for p in TensorStore.open(store).parts()]
        assert sum(rows) in (24, 25) and max(rows) <= 8 + batch - 1 and len(rows) == 3
