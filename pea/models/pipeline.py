"""Inference: target-language prompts → adapter → conditioning for a stock diffusers pipeline.

The UNet, VAE and scheduler are the teacher's own, untouched, so anything that plugs into the stock
pipeline (LoRA, ControlNet, img2img, LCM) still plugs in: the adapter only supplies `prompt_embeds`
(and for SDXL `pooled_prompt_embeds`). A negative prompt goes through the adapter too, as caption dropout
trained it, so classifier-free guidance compares like with like; an empty one follows the pipeline's own
rule instead: an SDXL pipeline whose config sets `force_zeros_for_empty_prompt` (SDXL base does) guides
against zeros, never against the adapter's pooled output for "" (which no loss ever trained).

    pipe = pea.models.load_pipeline(spec.teacher)
    images = generate(pipe, adapter, student, ["左边有一个红色的圆形"], seeds=[0])

A pixel-space teacher (the toy teacher of `pea.models.toy`: its VAE does not downsample, vae_scale_factor 1)
is called with `output_type="latent"`, which returns the denoised pixels; `draw` only denormalizes them.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from pea.method.adapter import PEAAdapter
from pea.models import StudentEncoder


def is_pixel_space(pipe: DiffusionPipeline) -> bool:
    return getattr(pipe, "vae_scale_factor", None) == 1


def draw(pipe: DiffusionPipeline, **call_kwargs) -> list[Image.Image]:
    """The stock pipeline call, returning PIL images; for a pixel-space teacher its VAE is never run."""
    if is_pixel_space(pipe):
        pixels = pipe(**call_kwargs, output_type="latent").images
        return pipe.image_processor.postprocess(pixels, output_type="pil")
    return pipe(**call_kwargs).images


def check_compatible(adapter: PEAAdapter, student: StudentEncoder) -> None:
    if student.hidden_size != adapter.config.student_dim:
        raise ValueError(f"the student encoder yields hidden size {student.hidden_size} but the adapter was trained "
                         f"for student_dim {adapter.config.student_dim}; load the student it was trained with")


def zeros_for_empty_prompt(pipe: DiffusionPipeline | None) -> bool:
    """The stock SDXL rule: with no negative prompt, guide against zero embeddings (its config says so)."""
    return pipe is not None and bool(pipe.config.get("force_zeros_for_empty_prompt", False))


@torch.no_grad()
def prompt_kwargs(adapter: PEAAdapter, student: StudentEncoder, prompts: list[str],
                  negative_prompt: str | list[str] | None = "", pipe: DiffusionPipeline | None = None
                  ) -> dict[str, torch.Tensor]:
    """The pipeline keyword arguments that replace `prompt=` / `negative_prompt=`. With `pipe`, empty negatives
    follow its `force_zeros_for_empty_prompt` (zeros, as the stock call with no negative prompt)."""
    check_compatible(adapter, student)
    negative_prompt = "" if negative_prompt is None else negative_prompt
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    states = student.encode(list(prompts) + negatives).to(adapter.device, adapter.dtype)
    tokens, pooled = adapter(states)
    n = len(prompts)
    kwargs = {"prompt_embeds": tokens[:n], "negative_prompt_embeds": tokens[n:]}
    if pooled is not None:
        kwargs |= {"pooled_prompt_embeds": pooled[:n], "negative_pooled_prompt_embeds": pooled[n:]}
    if zeros_for_empty_prompt(pipe):
        empty = torch.tensor([not text for text in negatives], device=tokens.device)
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            if name in kwargs:
                kwargs[name] = torch.where(empty.view(-1, *[1] * (kwargs[name].dim() - 1)), 0.0, kwargs[name])
    return kwargs


def generate(pipe: DiffusionPipeline, adapter: PEAAdapter, student: StudentEncoder, prompts: list[str],
             seeds: list[int], negative_prompt: str | list[str] | None = "", **call_kwargs) -> list[Image.Image]:
    """One image per prompt, each from its own seed, through the unmodified pipeline call."""
    dtype = pipe.unet.dtype
    kwargs = {k: v.to(dtype) for k, v in prompt_kwargs(adapter, student, prompts, negative_prompt, pipe).items()}
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return draw(pipe, **kwargs, generator=generators, **call_kwargs)
