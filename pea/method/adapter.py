"""The PEA adapter: the only trained part. A small MLP from a student encoder's per-token states to
the frozen UNet's conditioning space (METHOD.md, "Adapter").

    x      = Linear(h→out)(GELU(Linear(h→h)(GELU(Linear(d→h)(LayerNorm(d))))))      # no biases
    sd15:  prompt_embeds = x                                  (out = token_dim, e.g. 768)
    sdxl:  pooled = mean_tokens(x)  (out = pooled_dim 1280); prompt_embeds = Linear(1280→token_dim)(GELU(x))

One output token per student token (the paper), or, with `output_tokens` (spec train.adapter_tokens: teacher),
the teacher's count: prompt_embeds = Mix(L→T) over the token axis + a learned vector per output position, so
the context can be the teacher's token by token (train.token_kd_weight aligns it; #19: a LoRA made for the
English model then reads the adapter's context as it reads the teacher's). With `mixer_heads` (train.token_mixer:
attention) each mixed token also attends over the adapter's tokens (multi-head, output projection starting at
zero, so training starts from the fixed mix): where a word sits in the student's sequence and in the teacher's
77 differs from caption to caption, which one fixed map over positions cannot follow.

A diffusers ModelMixin + ConfigMixin, so `save_pretrained` writes config.json beside safetensors and
`from_pretrained` rebuilds exactly the saved widths (the reference's train/inference mismatch cannot
happen here).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

DEFAULT_DIMS = {"sd15": {"token_dim": 768, "pooled_dim": None}, "sdxl": {"token_dim": 2048, "pooled_dim": 1280}}


class PEAAdapter(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, kind: str = "sd15", student_dim: int = 1024, hidden_dim: int = 2048,
                 token_dim: int | None = None, pooled_dim: int | None = None, student_tokens: int | None = None,
                 output_tokens: int | None = None, mixer_heads: int | None = None):
        super().__init__()
        if kind not in DEFAULT_DIMS:
            raise ValueError(f"adapter kind {kind!r} is not one of {sorted(DEFAULT_DIMS)}")
        token_dim = token_dim or DEFAULT_DIMS[kind]["token_dim"]
        pooled_dim = pooled_dim or DEFAULT_DIMS[kind]["pooled_dim"]
        self.register_to_config(token_dim=token_dim, pooled_dim=pooled_dim)
        mlp_out = pooled_dim if kind == "sdxl" else token_dim
        self.mlp = nn.Sequential(
            nn.LayerNorm(student_dim),
            nn.Linear(student_dim, hidden_dim, bias=False), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim, bias=False), nn.GELU(),
            nn.Linear(hidden_dim, mlp_out, bias=False),
        )
        self.to_tokens = nn.Sequential(nn.GELU(), nn.Linear(pooled_dim, token_dim)) if kind == "sdxl" else None
        self.mix, self.positions = None, None
        if (student_tokens is None) != (output_tokens is None):
            raise ValueError("student_tokens and output_tokens go together (the token mixer maps one count to the other)")
        if output_tokens is not None:
            self.mix = nn.Linear(student_tokens, output_tokens, bias=False)
            with torch.no_grad():  # starts as the per-token adapter: the first tokens copied, the rest their mean
                self.mix.weight.zero_()
                kept = min(student_tokens, output_tokens)
                self.mix.weight[:kept, :kept] = torch.eye(kept)
                self.mix.weight[kept:] = 1 / student_tokens
            self.positions = nn.Parameter(torch.zeros(output_tokens, token_dim))
        self.attend = None
        if mixer_heads is not None:
            if output_tokens is None:
                raise ValueError("mixer_heads needs output_tokens (the attention refines the token mixer's output)")
            if token_dim % mixer_heads:
                raise ValueError(f"mixer_heads {mixer_heads} does not divide the teacher's width {token_dim}; pick a "
                                 "divisor (train.mixer_heads)")
            self.attend = nn.MultiheadAttention(token_dim, mixer_heads, batch_first=True)
            nn.init.zeros_(self.attend.out_proj.weight)
            nn.init.zeros_(self.attend.out_proj.bias)

    def forward(self, student_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, student_dim) → (prompt_embeds (B, L, token_dim), pooled (B, pooled_dim) or None)."""
        if student_states.shape[-1] != self.config.student_dim:
            raise ValueError(f"student hidden size {student_states.shape[-1]} does not match the adapter's "
                             f"student_dim {self.config.student_dim}; train an adapter for this encoder")
        x = self.mlp(student_states)
        # SDXL's pooled vector: a plain mean over every position, padding included, as the reference does.
        tokens, pooled = (x, None) if self.to_tokens is None else (self.to_tokens(x), x.mean(dim=1))
        if self.mix is not None:
            if tokens.shape[1] != self.config.student_tokens:
                raise ValueError(f"{tokens.shape[1]} student tokens, but the adapter's token mixer takes "
                                 f"{self.config.student_tokens}; encode with the spec's student.max_length")
            mixed = self.mix(tokens.transpose(1, 2)).transpose(1, 2) + self.positions
            if self.attend is not None:
                mixed = mixed + self.attend(mixed, tokens, tokens, need_weights=False)[0]
            tokens = mixed
        return tokens, pooled
