"""Random low-rank perturbations of the frozen UNet's attention, for distilling an adapter that survives LoRAs
it never saw (spec `train.perturbation`, #19; measured by benchmarks/lora_robustness.py).

    perturbation = RandomLoRA(unet, spec.train.perturbation, spec.train.seed)
    perturbation.draw(micro_step)     # before the step's teacher and student passes: both see the same UNet

Why: the adapter's tokens are not the teacher's (another count, other directions); distillation only makes
the frozen UNet's *outputs* agree, so differences the frozen key/value projections cannot see stay, and a
LoRA trained on the English model (which changes those projections) exposes them (docs/results.md). Under a
random update B·A of the projections on a share of the steps, the KD terms also ask for agreement where such
updates look. A LoRA is added once through peft (diffusers' `add_adapter`), frozen; each step overwrites its
A and B from a generator seeded by (seed, micro-step) — the same draw on every rank, layout and resume — or
switches it off. The UNet's own weights are never written.
"""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig

from pea.spec import PerturbationSpec

ADAPTER_NAME = "pea-perturbation"


class RandomLoRA:
    """One peft LoRA on `cfg.targets`, redrawn per micro-step: ‖B·A‖_F = ρ·‖W‖_F on every projection W,
    ρ uniform in [0, cfg.relative_norm], on a `cfg.share` of the steps; off on the others."""

    def __init__(self, unet, cfg: PerturbationSpec, seed: int, name: str = ADAPTER_NAME):
        self.unet, self.cfg, self.seed, self.name = unet, cfg, seed, name
        try:
            unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=list(cfg.targets),
                                        init_lora_weights=False), adapter_name=name)
        except ValueError as err:  # peft's own words name its target_modules, not our spec field
            raise ValueError(f"train.perturbation.targets {list(cfg.targets)} match no layer of the UNet ({err}); "
                             "name attention projections, e.g. to_q, to_k, to_v, to_out.0 or attn2.to_k") from err
        self.layers = []  # (lora A weight, lora B weight, ‖W‖_F of the frozen projection)
        for module in unet.modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                a, b = module.lora_A[name].weight, module.lora_B[name].weight
                self.layers.append((a, b, float(module.base_layer.weight.float().norm())))
        self.off()

    def _freeze(self) -> None:
        # peft marks an adapter trainable whenever it is switched on; frozen like the UNet, no gradient is ever
        # computed for it.
        for a, b, _ in self.layers:
            a.requires_grad_(False)
            b.requires_grad_(False)

    def apply(self, generator: torch.Generator, relative_norm: float) -> None:
        """Draw A, B from `generator` and scale each B so that ‖B·A‖_F = relative_norm·‖W‖_F; switch the LoRA on."""
        with torch.no_grad():
            for a, b, weight_norm in self.layers:
                a_new = torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5
                b_new = torch.randn(b.shape, generator=generator)
                # ‖BA‖²_F = tr(BᵀB · AAᵀ): rank × rank products instead of the out × in update.
                norm = float(torch.trace((b_new.T @ b_new) @ (a_new @ a_new.T)).clamp_min(1e-24).sqrt())
                a.copy_(a_new)
                b.copy_(b_new * (relative_norm * weight_norm / norm))
        self.unet.enable_adapters()
        self._freeze()

    def off(self) -> None:
        self.unet.disable_adapters()
        self._freeze()

    def draw(self, micro_step: int) -> float:
        """This micro-step's perturbation: on with a random size on `share` of the steps, off otherwise.
        Returns the relative norm drawn (0.0: off)."""
        # SeedSequence mixes (seed, step) into independent streams; a tag keeps them apart from pea.train's
        # per-sample noise draws.
        state = np.random.SeedSequence([self.seed, micro_step, 0x5EA]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state))
        on, size = torch.rand(2, generator=generator).tolist()
        if on >= self.cfg.share:
            self.off()
            return 0.0
        relative_norm = size * self.cfg.relative_norm
        self.apply(generator, relative_norm)
        return relative_norm

    def remove(self) -> None:
        """Take the LoRA out of the UNet (it is back to its loaded state)."""
        self.unet.delete_adapters(self.name)
