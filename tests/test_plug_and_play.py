"""The adapter, trained on the unmodified UNet, drives pipelines it never saw: LoRA, ControlNet, LCM, img2img.

For each, on held-out prompts at fixed seeds: the adapter's images must differ from the unconditional
ones and be closer to the English teacher's images than the untrained adapter's are.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

from pea.evaluate.baselines import untrained_like
from pea.method.adapter import PEAAdapter
from pea.models import load_pipeline, load_student
from pea.models.pipeline import prompt_kwargs
from pea.train.table import load_table

SEEDS = [0, 1, 2, 3]


def _images(pipe, seeds, **kwargs) -> np.ndarray:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(generator=generators, output_type="np", **kwargs).images


def _check(pipe, trained, **call) -> None:
    heldout = load_table(trained.spec, trained.pairs, trained.embedded, "heldout")
    english, target = heldout.captions_en[:len(SEEDS)], heldout.captions[:len(SEEDS)]
    adapter = PEAAdapter.from_pretrained(trained.adapter_dir).eval()
    student = load_student(trained.spec.student)
    n = len(english)
    teacher = _images(pipe, SEEDS, prompt=english, negative_prompt=[""] * n, **call)
    ours = _images(pipe, SEEDS, **prompt_kwargs(adapter, student, target), **call)
    untrained = _images(pipe, SEEDS, **prompt_kwargs(untrained_like(adapter, trained.spec.train.seed), student,
                                                     target), **call)
    unconditional = _images(pipe, SEEDS, **prompt_kwargs(adapter, student, [""] * n), **call)
    mse = lambda a, b: float(np.mean((a - b) ** 2))  # noqa: E731
    assert mse(ours, unconditional) > 1e-6, "the adapter's conditioning must change the picture"
    assert mse(ours, teacher) < mse(untrained, teacher), (mse(ours, teacher), mse(untrained, teacher))


def _call(trained) -> dict:
    size = trained.spec.corpus.image_size
    return {"height": size, "width": size, "num_inference_steps": 8}


def _control_image(size: int) -> Image.Image:
    image = np.zeros((size, size, 3), np.uint8)
    image[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return Image.fromarray(image)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_lora_loaded_with_load_lora_weights(kind, request, tmp_path):
    trained = request.getfixturevalue(f"trained_{kind}")
    donor = load_pipeline(trained.spec.teacher)
    torch.manual_seed(0)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    type(donor).save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(donor.unet))
    pipe = load_pipeline(trained.spec.teacher)
    before = _images(pipe, [0], prompt=["one red circle"], **_call(trained))
    pipe.load_lora_weights(tmp_path)
    assert float(np.abs(_images(pipe, [0], prompt=["one red circle"], **_call(trained)) - before).max()) > 0
    _check(pipe, trained, **_call(trained))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_controlnet_pipeline(kind, request):
    trained = request.getfixturevalue(f"trained_{kind}")
    base = load_pipeline(trained.spec.teacher)
    torch.manual_seed(0)
    # The tiny VAE downsamples by 4, so the control image's embedding needs two stride-2 stages, not three.
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32, 64))
    cls = StableDiffusionControlNetPipeline if kind == "sd15" else StableDiffusionXLControlNetPipeline
    pipe = cls(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    size = trained.spec.corpus.image_size
    _check(pipe, trained, image=_control_image(size), **_call(trained))


def test_lcm_scheduler_with_few_steps(trained_sd15):
    pipe = load_pipeline(trained_sd15.spec.teacher)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    _check(pipe, trained_sd15, **{**_call(trained_sd15), "num_inference_steps": 4})


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_img2img(kind, request):
    trained = request.getfixturevalue(f"trained_{kind}")
    base = load_pipeline(trained.spec.teacher)
    cls = StableDiffusionImg2ImgPipeline if kind == "sd15" else StableDiffusionXLImg2ImgPipeline
    pipe = cls(**base.components)
    pipe.set_progress_bar_config(disable=True)
    size = trained.spec.corpus.image_size
    _check(pipe, trained, image=_control_image(size), strength=0.8, num_inference_steps=8)
