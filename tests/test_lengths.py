"""student.max_length against the model's own limits (pea.spec.lengths), on tiny models saved like the real ones."""

import re
import shutil

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    ChineseCLIPConfig,
    ChineseCLIPModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from pea.cli import main
from pea.models import StudentEncoder, _train_wordpiece_tokenizer, load_student
from pea.spec import PACKAGE_ROOT, SpecError, StudentSpec, load_spec

CAPTIONS = ["左边有一个红色的圆形", "上面有两个蓝色的正方形", "中间有一个绿色的三角形"]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
VISION = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=16)


def _save(model, path, **tokenizer_settings) -> str:
    tokenizer = _train_wordpiece_tokenizer(CAPTIONS)
    for name, value in tokenizer_settings.items():
        setattr(tokenizer, name, value)
    model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_roberta_style_positions_start_after_the_padding_index(tmp_path):
    torch.manual_seed(0)  # XLM-R as AltCLIP and klue/roberta use it: 514 positions hold 512 tokens; here 20 hold 18
    path = _save(lambda v: XLMRobertaModel(XLMRobertaConfig(vocab_size=v, max_position_embeddings=20, pad_token_id=1,
                                                            **TINY)), tmp_path)
    with pytest.raises(ValueError, match=r"max_length=19 is more than the usable positions of its config "
                                         r"\(max_position_embeddings 20 less 2.*18 tokens for .*at most 18"):
        load_student(StudentSpec(id=path, max_length=19))
    assert load_student(StudentSpec(id=path, max_length=18)).encode(CAPTIONS).shape == (3, 18, 32)
    unchecked = StudentEncoder(load_student(StudentSpec(id=path, max_length=18)).tokenizer,
                               XLMRobertaModel.from_pretrained(path), max_length=19)
    with pytest.raises((IndexError, RuntimeError), match="index"):  # what the check prevents: position 20
        unchecked.encode(CAPTIONS)


def test_the_tokenizer_limit_binds_when_it_is_the_smallest(tmp_path):
    path = _save(lambda v: BertModel(BertConfig(vocab_size=v, max_position_embeddings=64, **TINY)), tmp_path,
                 model_max_length=10)
    with pytest.raises(ValueError, match=r"max_length=12 is more than its tokenizer's model_max_length: 10 tokens"):
        load_student(StudentSpec(id=path, max_length=12))
    assert load_student(StudentSpec(id=path, max_length=10)).encode(CAPTIONS).shape == (3, 10, 32)


def test_chinese_clip_is_held_to_the_52_tokens_it_was_trained_at(tmp_path, monkeypatch):
    """The real id, from a Hugging Face cache in tmp; the config allows 512 positions, as the Hub's does."""
    import huggingface_hub

    repo, commit = "OFA-Sys/chinese-clip-vit-huge-patch14", "c" * 40
    root = tmp_path / "hub" / "models--OFA-Sys--chinese-clip-vit-huge-patch14"
    torch.manual_seed(0)
    _save(lambda v: ChineseCLIPModel(ChineseCLIPConfig(
        text_config=dict(vocab_size=v, max_position_embeddings=512, **TINY), vision_config=VISION,
        projection_dim=16)), root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    with pytest.raises(ValueError, match=r"max_length=77 is more than the length it was trained at .*52 tokens for "
                                         r"OFA-Sys/chinese-clip-vit-huge-patch14; set student.max_length to at most 52"):
        StudentSpec(id=repo, revision="main", max_length=77)
    assert load_student(StudentSpec(id=repo, revision="main", max_length=52)).encode(CAPTIONS).shape == (3, 52, 32)
    # Someone who knows better may say so: the config's 512 positions are then the limit.
    assert load_student(StudentSpec(id=repo, revision="main", max_length=77, trained_length=77)).max_length == 77


def test_every_shipped_spec_fits_its_student(tmp_path):
    for language in ("zh", "ja", "ko", "ru", "it", "vi"):
        load_spec(language)  # refuses a max_length beyond a known trained length
    assert load_spec("zh").student.max_length == 52
    (tmp_path / "languages").mkdir()
    shutil.copytree(PACKAGE_ROOT / "data" / "profiles", tmp_path / "profiles")
    spec = (PACKAGE_ROOT / "data" / "languages" / "zh.yaml").read_text().replace("max_length: 52", "max_length: 77")
    (tmp_path / "languages" / "zh.yaml").write_text(spec)  # what zh.yaml said before
    with pytest.raises(SpecError, match=r"zh.yaml is invalid:\n  student: .*max_length=77 .*trained at .*at most 52"):
        load_spec("zh", data_dir=tmp_path)


def test_pea_validate_checks_a_student_that_is_on_this_machine(tmp_path, monkeypatch, capsys):
    student = _save(lambda v: XLMRobertaModel(XLMRobertaConfig(vocab_size=v, max_position_embeddings=20,
                                                               pad_token_id=1, **TINY)), tmp_path / "student")
    spec = (PACKAGE_ROOT / "data" / "languages" / "zh.yaml").read_text()
    spec = spec.replace("id: OFA-Sys/chinese-clip-vit-huge-patch14", f"id: {student}").replace("max_length: 52",
                                                                                            "max_length: 19")
    (tmp_path / "data" / "languages").mkdir(parents=True)
    (tmp_path / "data" / "languages" / "zh.yaml").write_text(spec)
    shutil.copytree(PACKAGE_ROOT / "data" / "profiles", tmp_path / "data" / "profiles")
    monkeypatch.setenv("PEA_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as refused:
        main(["validate", "zh"])
    assert refused.value.code == 1  # one masked line on stderr names the limit and the fix
    assert re.search(r"max_length=19 is more than the usable positions .* at most 18", capsys.readouterr().err)
    (tmp_path / "data" / "languages" / "zh.yaml").write_text(spec.replace("max_length: 19", "max_length: 18"))
    main(["validate", "zh"])
    assert "max_length 18 fits its limits" in capsys.readouterr().out


def test_pea_validate_checks_the_teachers_configs_fit_its_kind(zoo_dir, capsys):
    """The tiny zoo's teachers have the real layouts: SD 1.5 (one encoder = context width) and SDXL (two encoders
    summed, added embedding of 6 time ids + pooled). A kind that does not match the repo is refused by name."""
    from pea.cli import _teacher_shapes
    from pea.spec import load_spec

    for profile, kind, width in (("embedded", "sd15", 32), ("embedded,sdxl", "sdxl", 64)):
        teacher = load_spec("zh", profile, zoo_dir=zoo_dir).teacher
        assert f"{kind}, context {width} wide" in _teacher_shapes(teacher)
    wrong = load_spec("zh", "embedded,sdxl", zoo_dir=zoo_dir).teacher.model_copy(update={"kind": "sd15"})
    with pytest.raises(SystemExit, match="SDXL-style .* but the spec says kind: sd15"):
        _teacher_shapes(wrong)
    missing = wrong.model_copy(update={"id": "nobody/nothing", "revision": "0" * 40})
    assert "configs not checked" in _teacher_shapes(missing)
