"""The stock pipeline as PEA loads and drives it: the safety checker as a spec choice, and SDXL's
unconditional branch following the pipeline's own `force_zeros_for_empty_prompt` rule."""

import json
import types

import numpy as np
import pytest
import torch

from pea.models import _build_student, _build_teacher, load_pipeline, load_student
from pea.models.pipeline import generate, prompt_kwargs
from pea.spec import StudentSpec, TeacherSpec

ENGLISH = ["one red circle on the left", "two blue squares at the top", "one green triangle in the center"]
TARGET = ["左边有一个红色的圆形", "上面有两个蓝色的正方形", "中间有一个绿色的三角形"]
CALL = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    """Tiny teachers built for this module (the zoo's shared ones stay as they are)."""
    root = tmp_path_factory.mktemp("teachers")
    for kind in ("sd15", "sdxl"):
        _build_teacher(root / kind, ENGLISH, 32, kind)
    index = json.loads((root / "sdxl" / "model_index.json").read_text())
    (root / "sdxl" / "model_index.json").write_text(json.dumps(index | {"force_zeros_for_empty_prompt": True}))
    _build_student(root / "student", TARGET)
    return {name: str(root / name) for name in ("sd15", "sdxl", "student")}


# --- Safety checker ------------------------------------------------------------------------------------
def test_the_safety_checker_off_loads_none(teachers):
    pipe = load_pipeline(TeacherSpec(id=teachers["sd15"]))
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_the_safety_checker_on_without_one_in_the_repo_names_the_repo_and_the_fix(teachers):
    with pytest.raises(ValueError, match=rf"teacher {teachers['sd15']} ships no safety_checker/feature_extractor"
                                         r".*teacher.safety_checker: false \(pea generate --no-safety-checker\)"):
        load_pipeline(TeacherSpec(id=teachers["sd15"], safety_checker=True))
    with pytest.raises(ValueError, match="ships no safety_checker"):  # the CLI flag overrides the spec
        load_pipeline(TeacherSpec(id=teachers["sd15"]), safety_checker=True)


def test_sdxl_has_no_safety_checker_to_turn_on():
    with pytest.raises(ValueError, match="sdxl pipelines have no safety checker"):
        TeacherSpec(id="x", kind="sdxl", safety_checker=True)


def test_the_safety_checker_on_loads_and_runs_the_repos_own(teachers, tmp_path):
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessorPil

    pipe = load_pipeline(TeacherSpec(id=teachers["sd15"]))
    torch.manual_seed(0)
    pipe.register_modules(
        safety_checker=StableDiffusionSafetyChecker(CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
            vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16), projection_dim=16)),
        feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(TeacherSpec(id=str(tmp_path), safety_checker=True))
    assert isinstance(loaded.safety_checker, StableDiffusionSafetyChecker)
    out = loaded(prompt=ENGLISH[:1], generator=torch.Generator().manual_seed(0), **CALL)
    assert out.nsfw_content_detected is not None  # the checker ran on the image
    assert load_pipeline(TeacherSpec(id=str(tmp_path))).safety_checker is None


# --- SDXL's unconditional branch ---------------------------------------------------------------------------
class TeacherEcho(torch.nn.Module):
    """A perfectly trained "adapter": for the student states of a target prompt it returns the teacher's own
    conditioning of its English caption; for anything else (the "" negative) large noise, which would change
    every image were it used."""

    def __init__(self, pipe, student):
        super().__init__()
        tokens, _, pooled, _ = pipe.encode_prompt(ENGLISH, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        self.register_buffer("keys", student.encode(TARGET))
        self.register_buffer("tokens", tokens)
        self.register_buffer("pooled", pooled)
        self.config = types.SimpleNamespace(student_dim=self.keys.shape[-1])

    device = property(lambda self: self.keys.device)
    dtype = property(lambda self: self.keys.dtype)

    def forward(self, states):
        generator = torch.Generator().manual_seed(1)
        tokens = 10 * torch.randn((len(states), *self.tokens.shape[1:]), generator=generator)
        pooled = 10 * torch.randn((len(states), *self.pooled.shape[1:]), generator=generator)
        for i, row in enumerate(states):
            match = (row == self.keys).flatten(1).all(1).nonzero()
            if len(match):
                tokens[i], pooled[i] = self.tokens[match[0, 0]], self.pooled[match[0, 0]]
        return tokens, pooled


def test_sdxl_guidance_with_the_adapter_equals_guidance_with_the_teachers_own_conditioning(teachers):
    pipe = load_pipeline(TeacherSpec(id=teachers["sdxl"], kind="sdxl"))
    assert pipe.config.force_zeros_for_empty_prompt
    student = load_student(StudentSpec(id=teachers["student"], max_length=16))
    echo = TeacherEcho(pipe, student)

    kwargs = prompt_kwargs(echo, student, TARGET[:2], pipe=pipe)
    for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
        assert kwargs[name].abs().max() == 0, name  # the stock rule: zeros, not the adapter's ""
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    stock = pipe(prompt=ENGLISH[:2], generator=seeds(), output_type="latent", **CALL).images
    ours = pipe(**kwargs, generator=seeds(), output_type="latent", **CALL).images
    torch.testing.assert_close(ours, stock)
    # generate() (what evaluation calls) follows it too, down to the pixels
    pictures = generate(pipe, echo, student, TARGET[:2], [0, 1], **CALL)
    stock_pictures = pipe(prompt=ENGLISH[:2], generator=seeds(), **CALL).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pictures, stock_pictures))

    # The test can fail: the adapter's "" negative (the old behaviour) changes the image.
    old = prompt_kwargs(echo, student, TARGET[:2])
    assert old["negative_pooled_prompt_embeds"].abs().max() > 0
    assert not torch.allclose(pipe(**old, generator=seeds(), output_type="latent", **CALL).images, stock)
    # A real negative prompt still goes through the adapter.
    negative = prompt_kwargs(echo, student, TARGET[:1], negative_prompt=TARGET[2], pipe=pipe)
    torch.testing.assert_close(negative["negative_pooled_prompt_embeds"], echo.pooled[2:3])


def test_a_teacher_without_the_flag_keeps_the_adapters_empty_prompt(teachers):
    pipe = load_pipeline(TeacherSpec(id=teachers["sdxl"], kind="sdxl"))
    pipe.register_to_config(force_zeros_for_empty_prompt=False)  # as the zoo's SDXL teacher is saved
    student = load_student(StudentSpec(id=teachers["student"], max_length=16))
    kwargs = prompt_kwargs(echo := TeacherEcho(pipe, student), student, TARGET[:1], pipe=pipe)
    adapters_own = echo(student.encode(TARGET[:1] + [""]))[1][1:]  # the same batch prompt_kwargs encodes
    torch.testing.assert_close(kwargs["negative_pooled_prompt_embeds"], adapters_own)
    assert adapters_own.abs().max() > 0
