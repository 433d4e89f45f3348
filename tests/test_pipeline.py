"""The stock pipeline as PEA loads and drives it: the safety checker as a spec choice."""

import json

import pytest
import torch

from pea.models import _build_student, _build_teacher, load_pipeline
from pea.spec import TeacherSpec

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
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
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
