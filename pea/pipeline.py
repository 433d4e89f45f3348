"""Inference: target-language prompts → adapter → `prompt_embeds` for a stock diffusers pipeline.

The UNet, VAE and scheduler are the teacher's own, untouched, so anything that plugs into the stock
pipeline (LoRA, ControlNet, LCM) still plugs in. The negative / empty prompt goes through the adapter
too, exactly as caption dropout trained it, so classifier-free guidance compares like with like.

    pipe = load_pipeline(spec.teacher)
    images = generate(pipe, adapter, student, ["左边有一个红色的圆形"], seeds=[0])
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from pea.adapter import PEAAdapter
from pea.models import StudentEncoder
from pea.spec import TeacherSpec


def load_pipeline(teacher: TeacherSpec) -> StableDiffusionPipeline:
    if teacher.kind != "sd15":
        raise NotImplementedError(f"teacher kind {teacher.kind!r}: only 'sd15' is wired in this version")
    pipe = StableDiffusionPipeline.from_pretrained(teacher.id, revision=teacher.revision, use_safetensors=True,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_prompts(adapter: PEAAdapter, student: StudentEncoder, prompts: list[str]) -> torch.Tensor:
    """Target-language prompts → the (B, tokens, cross_attention_dim) conditioning the UNet expects."""
    states = student.encode(prompts).to(adapter.device, adapter.dtype)
    embeds, _pooled = adapter(states)
    return embeds


def generate(pipe: StableDiffusionPipeline, adapter: PEAAdapter, student: StudentEncoder, prompts: list[str],
             seeds: list[int], negative_prompt: str = "", **call_kwargs) -> list[Image.Image]:
    """One image per prompt, each from its own seed, through the unmodified pipeline call."""
    embeds = encode_prompts(adapter, student, prompts).to(pipe.unet.dtype)
    negative = encode_prompts(adapter, student, [negative_prompt] * len(prompts)).to(pipe.unet.dtype)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generators, **call_kwargs).images
