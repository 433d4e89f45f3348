"""The PEA objective (METHOD.md, "Objective"): distil the frozen UNet's behaviour under the English
teacher's conditioning into the same UNet under the adapter's conditioning.

Per sample, with m = 1 for native-only captions and 0 for parallel pairs:
    L = m·MSE(ε_s, ε) + (1−m)·[MSE(ε_s, ε_t) + w·Σ_F MSE(F_s, F_t) + w_tok·MSE(c_s, c_t)]
F are the outputs of every down block (its hidden state, not the skip tuple), the mid block and
every up block, read with forward hooks that are removed as soon as the forward pass returns. c are the token
contexts themselves (w_tok > 0 only for an adapter that outputs the teacher's token count).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel


@contextmanager
def unet_features(unet: UNet2DConditionModel):
    """Collect the block outputs of one UNet forward pass into the yielded list, in call order."""
    maps: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        maps.append(output[0] if isinstance(output, tuple) else output)

    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    handles = [block.register_forward_hook(keep) for block in blocks]
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class Conditioning:
    """What the UNet is conditioned on: token context, and for SDXL the pooled vector and time_ids."""

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        kwargs = {"encoder_hidden_states": self.tokens.to(dtype)}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}
        return kwargs


def sdxl_time_ids(height: int, width: int, batch: int) -> torch.Tensor:
    """SDXL's micro-conditioning, height first as diffusers orders it: original size, crop top-left,
    target size. Images are resized to cover and centre-cropped, so original = target, crop = (0, 0)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(batch, 6)


@dataclass
class LossTerms:
    """total: the batch's loss. The others, for the history: the diffusion loss over native rows (all rows with
    diffusion_everywhere), the KD terms over parallel rows; NaN where the batch has none."""

    total: torch.Tensor
    diffusion: torch.Tensor
    output_kd: torch.Tensor
    feature_kd: torch.Tensor
    token_kd: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in vars(self).items()}


def distill_loss(unet: UNet2DConditionModel, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                 target: torch.Tensor, teacher: Conditioning, student: Conditioning, native: torch.Tensor,
                 output_weight: float = 1.0, feature_weight: float = 0.1, diffusion_everywhere: bool = False,
                 native_weight: float = 1.0, token_weight: float = 0.0) -> LossTerms:
    """One batch of the objective. Gradients reach only the student conditioning (the adapter's output).

    `diffusion_everywhere` applies the diffusion loss to every sample instead of KD (an ablation);
    otherwise it applies where `native` is 1, as in the paper. It never needs the teacher, so its pass is
    skipped (the KD terms are then reported as NaN: not computed). `native_weight` 0 drops native rows' loss
    (the ablation without native captions). `token_weight` adds the token-by-token term (same token counts).
    """
    if diffusion_everywhere:
        eps_student = unet(noisy_latents.to(unet.dtype), timesteps, **student.unet_kwargs(unet.dtype)).sample
        diffusion = _per_sample_mse(eps_student, target)
        unused = torch.full((), float("nan"))
        return LossTerms(diffusion.mean(), diffusion.mean(), unused, unused, unused)
    with torch.no_grad(), unet_features(unet) as teacher_maps:
        eps_teacher = unet(noisy_latents.to(unet.dtype), timesteps, **teacher.unet_kwargs(unet.dtype)).sample
    with unet_features(unet) as student_maps:
        eps_student = unet(noisy_latents.to(unet.dtype), timesteps, **student.unet_kwargs(unet.dtype)).sample
    diffusion = _per_sample_mse(eps_student, target)
    output_kd = _per_sample_mse(eps_student, eps_teacher)
    feature_kd = sum(_per_sample_mse(s, t) for s, t in zip(student_maps, teacher_maps, strict=True))
    token_kd = torch.zeros_like(output_kd)
    if token_weight:
        if student.tokens.shape != teacher.tokens.shape:
            raise ValueError(f"token_kd compares contexts token by token, but the adapter gives {tuple(student.tokens.shape)}"
                             f" and the teacher {tuple(teacher.tokens.shape)}; train with adapter_tokens: teacher")
        token_kd = _per_sample_mse(student.tokens, teacher.tokens)
    m = native.float()
    per_sample = m * native_weight * diffusion + (1 - m) * (output_weight * output_kd + feature_weight * feature_kd
                                                            + token_weight * token_kd)
    # Each term as the objective sees it: over the rows its rule covers. Averaged over the whole batch, the KD
    # terms would count native rows, whose "teacher" is the empty caption, and rise as the adapter learns what
    # the native captions draw. A batch without such rows gives NaN (0/0), as the unused terms above.
    return LossTerms(per_sample.mean(), _mean_over(diffusion, m), _mean_over(output_kd, 1 - m),
                     _mean_over(feature_kd, 1 - m), _mean_over(token_kd, 1 - m))


def token_fit_loss(student: Conditioning, teacher: Conditioning, native: torch.Tensor,
                   weight: torch.Tensor | None = None) -> LossTerms:
    """The warm start's objective (train.token_warmup): the adapter's context regressed on the teacher's, token by
    token (and the pooled vector on SDXL), over the parallel rows; no UNet pass, so a step costs the adapter's
    forward and backward only. Native-only rows have no English side and take no part. `weight`: each row's share of
    the mean (default equal); a row every rank holds (the empty caption) weighs 1/world on each, so any process layout
    with the same global batch takes the same mean."""
    if student.tokens.shape != teacher.tokens.shape:
        raise ValueError(f"the token warm start fits contexts token by token, but the adapter gives "
                         f"{tuple(student.tokens.shape)} and the teacher {tuple(teacher.tokens.shape)}; train with "
                         "adapter_tokens: teacher")
    pairs = 1 - native.float()
    per_sample = _per_sample_mse(student.tokens, teacher.tokens)
    if student.pooled is not None:
        pooled = _per_sample_mse(student.pooled, teacher.pooled)
        per_sample = per_sample + torch.nn.functional.pad(pooled, (0, len(per_sample) - len(pooled)))
    unused = torch.full((), float("nan"))
    token_kd = _mean_over(per_sample, pairs)
    weight = torch.ones_like(per_sample) if weight is None else weight.to(per_sample)
    return LossTerms((per_sample * pairs * weight).sum() / weight.sum(), unused, unused, unused, token_kd)


def _mean_over(per_sample: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (per_sample * rows).sum() / rows.sum()
