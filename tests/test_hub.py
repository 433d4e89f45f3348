"""Hub revisions pin to commits, weights load from safetensors only, variants load when asked (pea.spec.hub).

Hub ids load from a real Hugging Face cache layout built in tmp (`models--org--name/refs/main` naming a
`snapshots/<commit>/` that holds a tiny saved model), through the same from_pretrained calls as production.
"""

from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import BertConfig, BertModel

from pea.embed import key_digest, store_keys
from pea.models import _train_wordpiece_tokenizer, load_student, load_unet, model_key
from pea.spec import StudentSpec, TeacherSpec, load_spec

CAPTIONS = ["左边有一个红色的圆形", "上面有两个蓝色的正方形", "中间有一个绿色的三角形"]
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
REPO = "org/tiny-student"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that every loader reads (huggingface_hub read HF_HUB_CACHE at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _tiny_bert(path: Path, seed: int, **save) -> Path:
    torch.manual_seed(seed)
    tokenizer = _train_wordpiece_tokenizer(CAPTIONS)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4)).save_pretrained(path, **save)
    tokenizer.save_pretrained(path)
    return path


def _publish(cache: Path, repo: str, commit: str, seed: int) -> None:
    """What `hf download` leaves: the snapshot of `commit`, and refs/main naming it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    _tiny_bert(root / "snapshots" / commit, seed)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)


def test_a_branch_loads_as_the_commit_it_names_and_the_store_key_follows_upstream(hub_cache, tmp_path):
    _publish(hub_cache, REPO, COMMIT_A, seed=0)
    ref = StudentSpec(id=REPO, revision="main", max_length=8)
    before = load_student(ref).encode(CAPTIONS)
    assert model_key(ref) == {"id": REPO, "revision": COMMIT_A}
    spec = load_spec("zh")
    spec = spec.model_copy(update={"student": ref, "teacher": spec.teacher.model_copy(
        update={"id": str(tmp_path), "revision": None})})  # a local teacher: keyed by its content
    key_a = store_keys(spec)["student"]

    _publish(hub_cache, REPO, COMMIT_B, seed=1)  # upstream pushed; the cache's refs/main moved
    assert model_key(ref) == {"id": REPO, "revision": COMMIT_B}
    assert key_digest(store_keys(spec)["student"]) != key_digest(key_a)
    assert not torch.allclose(load_student(ref).encode(CAPTIONS), before)  # and the new weights load

    pinned = StudentSpec(id=REPO, revision=COMMIT_A, max_length=8)  # a commit is used as is
    assert model_key(pinned)["revision"] == COMMIT_A
    torch.testing.assert_close(load_student(pinned).encode(CAPTIONS), before)


def _tiny_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                                norm_num_groups=16)


def test_a_teacher_by_hub_id_loads_the_commit_its_branch_names(hub_cache):
    root = hub_cache / "models--org--tiny-teacher"
    for commit, seed in ((COMMIT_A, 0), (COMMIT_B, 1)):
        _tiny_unet(seed).save_pretrained(root / "snapshots" / commit / "unet")
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT_B)
    ref = TeacherSpec(id="org/tiny-teacher", revision="main")
    assert model_key(ref) == {"id": "org/tiny-teacher", "revision": COMMIT_B}
    loaded = load_unet(ref).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in _tiny_unet(1).state_dict().items())


def test_a_repo_missing_from_the_offline_cache_is_named_with_the_fix(hub_cache):
    with pytest.raises(ValueError, match=r"org/absent at revision 'main' is not in the Hugging Face cache .*"
                                         r"hf download org/absent --revision main.*40-hex commit"):
        model_key(StudentSpec(id="org/absent", revision="main", max_length=8))
    with pytest.raises(ValueError, match="org/absent at revision 'v1.0'"):
        load_student(StudentSpec(id="org/absent", revision="v1.0", max_length=8))


def test_a_local_directory_is_keyed_by_its_content(tmp_path):
    path = _tiny_bert(tmp_path / "student", seed=0)
    key = model_key(StudentSpec(id=str(path), max_length=8))
    assert key["revision"] is None and len(key["content"]) == 16
    (path / "config.json").write_text((path / "config.json").read_text() + "\n")
    assert model_key(StudentSpec(id=str(path), max_length=8))["content"] != key["content"]


def test_pickled_weights_are_refused_naming_the_repo_and_never_unpickled(tmp_path, monkeypatch):
    student = _tiny_bert(tmp_path / "student", seed=0)
    model = BertModel.from_pretrained(student)
    (student / "model.safetensors").unlink()
    torch.save(model.state_dict(), student / "pytorch_model.bin")  # what an old repo ships
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or pytest.fail("torch.load was called"))
    with pytest.raises(ValueError, match=rf"student {student} has no .safetensors weights.*never loads pickled"):
        load_student(StudentSpec(id=str(student), max_length=8))

    _tiny_unet(0).save_pretrained(tmp_path / "teacher" / "unet", safe_serialization=False)
    with pytest.raises(ValueError, match=rf"teacher {tmp_path / 'teacher'} has no .safetensors weights"):
        load_unet(TeacherSpec(id=str(tmp_path / "teacher")))
    assert loads == []


def test_a_variant_loads_when_the_spec_asks_and_is_named_when_missing(tmp_path):
    path = _tiny_bert(tmp_path / "student", seed=0, variant="fp16")
    assert [p.name for p in path.glob("*.safetensors")] == ["model.fp16.safetensors"]
    ref = StudentSpec(id=str(path), max_length=8, variant="fp16")
    assert load_student(ref).encode(CAPTIONS).shape == (3, 8, 32)
    assert model_key(ref)["variant"] == "fp16"
    with pytest.raises(ValueError, match=rf"student {path} has no .safetensors weights"):
        load_student(StudentSpec(id=str(path), max_length=8))
    with pytest.raises(ValueError, match=rf"student {path} has no bf16.safetensors weights.*variant"):
        load_student(StudentSpec(id=str(path), max_length=8, variant="bf16"))


def test_lineage_tags_name_the_commits_not_the_branch(hub_cache, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pea.registry import lineage

    _publish(hub_cache, REPO, COMMIT_A, seed=0)
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"image_sha256": ["0" * 64], "caption_en": ["a"], "caption": ["甲"]}), pairs)
    spec = load_spec("zh")
    spec = spec.model_copy(update={"student": StudentSpec(id=REPO, revision="main", max_length=8),
                                   "teacher": spec.teacher.model_copy(update={"revision": COMMIT_B})})
    tags = lineage(spec, pairs)
    assert (tags["student_revision"], tags["teacher_revision"]) == (COMMIT_A, COMMIT_B)
