"""Teachers and students load by path through the same from_pretrained code as Hub ids."""

import json

import pytest
import torch
from transformers import (
    AltCLIPConfig,
    AltCLIPModel,
    BertConfig,
    BertModel,
    ChineseCLIPConfig,
    ChineseCLIPModel,
    CLIPConfig,
    CLIPModel,
    MT5Config,
    MT5Model,
    T5Config,
    T5EncoderModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from pea.method.adapter import PEAAdapter
from pea.models import load_pipeline, load_student, load_teacher_text, model_key
from pea.models.pipeline import check_compatible
from pea.spec import StudentSpec, load_spec

TINY_TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
STUDENTS = {
    "bert": lambda v: BertModel(BertConfig(vocab_size=v, **TINY_TEXT)),
    "xlm-roberta": lambda v: XLMRobertaModel(XLMRobertaConfig(vocab_size=v, pad_token_id=0, **TINY_TEXT)),
    "t5-encoder": lambda v: T5EncoderModel(T5Config(vocab_size=v, d_model=48, d_kv=12, d_ff=64, num_layers=1,
                                                    num_heads=4)),
    "mt5": lambda v: MT5Model(MT5Config(vocab_size=v, d_model=48, d_kv=12, d_ff=64, num_layers=1, num_heads=4,
                                        num_decoder_layers=1)),
    "clip": lambda v: CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=v, max_position_embeddings=32, **TINY_TEXT),
        vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16), projection_dim=16)),
    "chinese-clip": lambda v: ChineseCLIPModel(ChineseCLIPConfig(
        text_config=dict(vocab_size=v, **TINY_TEXT),
        vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16), projection_dim=16)),
    "altclip": lambda v: AltCLIPModel(AltCLIPConfig(
        text_config=dict(vocab_size=v, project_dim=16, pad_token_id=0, **TINY_TEXT),
        vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16), projection_dim=16)),
}


@pytest.mark.parametrize("family", sorted(STUDENTS))
def test_any_transformers_encoder_serves_as_a_student(family, zoo_dir, tmp_path):
    tokenizer = load_student(StudentSpec(id=str(zoo_dir / "student-zh"), max_length=12)).tokenizer
    torch.manual_seed(0)
    STUDENTS[family](len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    student = load_student(StudentSpec(id=str(tmp_path), max_length=12))
    states = student.encode(["左边有一个红色的圆形", "上面有两个蓝色的正方形", ""])
    width = 16 if family == "altclip" else 48  # AltCLIP projects its token states to project_dim
    assert states.shape == (3, 12, width) and student.hidden_size == width
    assert not any(p.requires_grad for p in student.model.parameters())
    assert not torch.allclose(states[0], states[1])


def test_student_max_length_pads_and_truncates(zoo_dir):
    student = load_student(StudentSpec(id=str(zoo_dir / "student-zh"), max_length=6))
    assert student.encode(["左边有一个红色的圆形" * 5, "左"]).shape == (2, 6, 64)


def test_an_adapter_refuses_a_student_of_another_width_naming_both(zoo_dir):
    student = load_student(StudentSpec(id=str(zoo_dir / "student-zh"), max_length=8))
    with pytest.raises(ValueError, match="hidden size 64 .* student_dim 1024"):
        check_compatible(PEAAdapter(kind="sd15", student_dim=1024, hidden_dim=8, token_dim=32), student)


@pytest.mark.parametrize("kind,profile,shapes", [
    ("sd15", "embedded", {"tokens": (2, 77, 32)}),
    ("sdxl", "embedded,sdxl", {"tokens": (2, 77, 64), "pooled": (2, 32)}),
])
def test_teacher_conditioning_equals_the_stock_pipeline_encoding(kind, profile, shapes, zoo_dir):
    spec = load_spec("zh", profile, zoo_dir=zoo_dir)
    assert spec.teacher.kind == kind
    encoded = load_teacher_text(spec.teacher).encode(["one red circle on the left", ""])
    assert {k: tuple(v.shape) for k, v in encoded.items()} == shapes
    pipe = load_pipeline(spec.teacher)
    reference = pipe.encode_prompt(["one red circle on the left", ""], device="cpu", num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    torch.testing.assert_close(encoded["tokens"], reference[0])


def test_the_zoo_is_built_once_and_keyed_by_its_content(zoo_dir):
    from pea.models.embedded import prepare_zoo

    before = {p: p.stat().st_mtime_ns for p in zoo_dir.rglob("*.safetensors")}
    prepare_zoo(zoo_dir, image_size=32)
    assert before and before == {p: p.stat().st_mtime_ns for p in zoo_dir.rglob("*.safetensors")}
    stamp = json.loads((zoo_dir / "sd15-teacher" / "pea-zoo.json").read_text())["fingerprint"]
    assert model_key(load_spec("zh", "embedded", zoo_dir=zoo_dir).teacher)["content"] == stamp
    pinned = load_spec("zh").teacher.model_copy(update={"revision": "0" * 40})  # a commit: no cache needed
    assert model_key(pinned) == {"id": "stable-diffusion-v1-5/stable-diffusion-v1-5", "revision": "0" * 40}


def test_truncation_off_refuses_a_caption_longer_than_max_length(zoo_dir):
    student = load_student(StudentSpec(id=str(zoo_dir / "student-zh"), max_length=6, truncation=False))
    assert student.encode(["左边"]).shape == (1, 6, 64)
    with pytest.raises(ValueError, match="longer than student.max_length=6"):
        student.encode(["左边有一个红色的圆形"])


def test_the_device_follows_pea_device_and_refuses_one_torch_cannot_use(monkeypatch):
    from pea.models import device

    monkeypatch.delenv("PEA_DEVICE", raising=False)
    assert device() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    monkeypatch.setenv("PEA_DEVICE", "cpu")
    assert device() == torch.device("cpu")
    monkeypatch.setenv("PEA_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="PEA_DEVICE='gpu0' is not a torch device.*cpu, cuda, cuda:N or mps"):
        device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("PEA_DEVICE", "cuda")
        with pytest.raises(ValueError, match="torch sees no CUDA device; unset it or set PEA_DEVICE=cpu"):
            device()
