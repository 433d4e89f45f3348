"""What the default adapter costs at real widths (#31): its parameters and its training step against the paper's
adapter, with SD 1.5's and SDXL's UNets (pea.models.fullsize's configs, random weights) on the CPU.

    .venv/bin/python benchmarks/adapter_cost.py --model sd15 --threads 2
    .venv/bin/python benchmarks/adapter_cost.py --model sdxl --threads 2

Both adapters are built by pea.train.build_adapter from the zh spec's train section for the zh student (52 tokens of
1024, Chinese-CLIP's RoBERTa-large text tower) against the model's teacher context (SD 1.5: 77 × 768; SDXL: 77 × 2048
and a 1280 pooled vector): the shipped default, and the same spec with `--profile paper` (the paper's adapter, one
token per student token). Each step is pea.train's distillation step: adapter forward, pea.method.distill.distill_loss
(teacher pass under no_grad, student pass, output + feature KD, and the token term for the default), backward, an
AdamW step; the default's steps also draw its random LoRA (pea.method.perturb, on its `perturbation.share` of the steps).
Each system has its own copy of the UNet (the LoRA wraps the projections it perturbs) and the two are timed in
alternating blocks, so a change in the machine's load falls on both alike. The latents are `--latent` wide (16: 128
px, far below 512 / 1024 px, so the UNet's share of a step, and with it the ratio's closeness to 1, is understated).

Also counts each step's FLOPs at the real resolution (64 × 64 latents for SD 1.5, 128 × 128 for SDXL) with
torch.utils.flop_counter on the meta device (shapes only: no weights, no memory), without the random LoRA (rank 4:
8/width of a projection's FLOPs).

A third system, the default without its random LoRA (sharing the paper's plain UNet), splits the default's extra time
between the adapter with its token term and the perturbation; the FLOPs are also counted at the timed latents, so the
time ratio can be set against the work ratio of the regime it was measured in.

Prints the table and last `flop_ratio_timed[<model>]=`, `flop_ratio[<model>]=` (real resolution),
`step_time_ratio_without_perturbation[<model>]=`, `param_ratio[<model>]=` and `step_time_ratio[<model>]=<default ÷
paper>`.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _systems(model: str):
    """{name: (train spec section, adapter builder)} for the zh spec, shipped default and --profile paper."""
    from pea.spec import load_spec
    from pea.train import build_adapter

    width = 768 if model == "sd15" else 2048
    shapes = {"student": (52, 1024), "teacher": (77, width)} | ({"teacher_pooled": (1280,)} if model == "sdxl" else {})
    systems = {}
    for name, profile in (("paper", "paper"), ("default", None)):
        cfg = load_spec("zh", profile).train
        systems[name] = (cfg, lambda cfg=cfg: build_adapter(cfg, model, shapes))
    # The default's adapter and loss without its random LoRA: splits the default's cost between the two.
    cfg = systems["default"][0]
    cfg = cfg.model_copy(update={"perturbation": cfg.perturbation.model_copy(update={"share": 0.0})})
    systems["default, no perturbation"] = (cfg, lambda cfg=cfg: build_adapter(cfg, model, shapes))
    return systems, shapes


def _unet(model: str, device: str | torch.device = "cpu"):
    from diffusers import UNet2DConditionModel

    from pea.models.fullsize import SD15_UNET, SDXL_UNET

    with torch.device(device):
        return UNet2DConditionModel(**(SD15_UNET if model == "sd15" else SDXL_UNET)).requires_grad_(False).eval()


def _batch(model: str, shapes: dict, batch: int, latent: int, device="cpu", dtype=torch.float32) -> dict:
    from pea.method.distill import sdxl_time_ids

    g = torch.Generator().manual_seed(0)
    make = (lambda *s: torch.randn(*s, generator=g).to(device, dtype)) if device == "cpu" else \
        (lambda *s: torch.empty(*s, device=device, dtype=dtype))
    out = {"student": make(batch, *shapes["student"]), "teacher": make(batch, *shapes["teacher"]),
           "noisy": make(batch, 4, latent, latent), "target": make(batch, 4, latent, latent),
           "t": torch.full((batch,), 500, device=device), "native": torch.zeros(batch, device=device)}
    if model == "sdxl":
        out |= {"pooled": make(batch, 1280), "time_ids": sdxl_time_ids(latent * 8, latent * 8, batch).to(device, dtype)}
    return out


def _step(unet, adapter, cfg, b: dict) -> torch.Tensor:
    """pea.train's distillation step for one batch (loss and backward; the optimizer step is the caller's)."""
    from pea.method.distill import Conditioning, distill_loss

    tokens, pooled = adapter(b["student"].to(next(adapter.parameters()).dtype))
    student = Conditioning(tokens, pooled, b.get("time_ids"))
    teacher = Conditioning(b["teacher"], b.get("pooled"), b.get("time_ids"))
    terms = distill_loss(unet, b["noisy"], b["t"], b["target"], teacher, student, b["native"], cfg.output_kd_weight,
                         cfg.feature_kd_weight, token_weight=cfg.token_kd_weight)
    terms.total.backward()
    return terms.total


def flops_per_sample(model: str, latent: int | None = None) -> dict[str, float]:
    """FLOPs of one distillation step per sample at `latent` (default the real resolution), meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    systems, shapes = _systems(model)
    latent = latent or (64 if model == "sd15" else 128)
    unet = _unet(model, "meta")
    flops = {}
    for name, (cfg, build) in systems.items():
        with torch.device("meta"):
            adapter = build()
        batch = _batch(model, shapes, 1, latent, device="meta", dtype=torch.float32)
        with FlopCounterMode(display=False) as counter:
            _step(unet, adapter, cfg, batch)
        flops[name] = float(counter.get_total_flops())
    return flops


def main() -> None:
    from pea.method.perturb import RandomLoRA

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--latent", type=int, default=16, help="latent side of the timed steps")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=3, help="alternating timed blocks per system")
    parser.add_argument("--steps", type=int, default=2, help="steps per block")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    flops = flops_per_sample(args.model)
    timed_flops = flops_per_sample(args.model, args.latent)  # in the regime the steps are timed in
    systems, shapes = _systems(args.model)
    base = _unet(args.model).to(torch.bfloat16)  # the spec's precision: the frozen UNet in bf16 (pea.train)
    batch = _batch(args.model, shapes, args.batch, args.latent, dtype=torch.bfloat16)
    runs = {}
    for name, (cfg, build) in systems.items():
        torch.manual_seed(cfg.seed)
        adapter = build()
        # A UNet with the random LoRA is the default's own copy; the others share the plain one (never written).
        unet = copy.deepcopy(base) if cfg.perturbation.share > 0 else base
        lora = RandomLoRA(unet, cfg.perturbation, cfg.seed) if cfg.perturbation.share > 0 else None
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr)
        runs[name] = {"cfg": cfg, "adapter": adapter, "unet": unet, "lora": lora, "optimizer": optimizer,
                      "params": sum(p.numel() for p in adapter.parameters()), "times": [], "micro": 0}

    def block(run: dict, timed: bool) -> None:
        for _ in range(args.steps):
            started = time.perf_counter()
            if run["lora"] is not None:
                run["lora"].draw(run["micro"])
            run["micro"] += 1
            _step(run["unet"], run["adapter"], run["cfg"], batch)
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            if timed:
                run["times"].append(time.perf_counter() - started)

    for run in runs.values():  # one untimed block each: allocator and kernels warm
        block(run, timed=False)
    for _ in range(args.blocks):
        for run in runs.values():
            block(run, timed=True)

    paper, default = runs["paper"], runs["default"]
    time_ratio = statistics.fmean(default["times"]) / statistics.fmean(paper["times"])
    plain_ratio = statistics.fmean(runs["default, no perturbation"]["times"]) / statistics.fmean(paper["times"])
    print(f"\n{args.model}: zh student 52 × 1024 → teacher 77 × {shapes['teacher'][1]}; timed at {args.latent} × "
          f"{args.latent} latents, batch {args.batch}, bf16 UNet, {torch.get_num_threads()} threads, "
          f"{args.blocks} × {args.steps} steps each (alternating blocks); FLOPs per sample at the real resolution\n")
    print("| adapter | parameters | step (s), mean (min) | GFLOPs per sample and step, timed regime | real resolution |")
    print("|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        print(f"| {name} | {run['params'] / 1e6:.2f} M | {statistics.fmean(run['times']):.2f} ({min(run['times']):.2f}) | "
              f"{timed_flops[name] / 1e9:,.1f} | {flops[name] / 1e9:,.0f} |")
    print(f"flop_ratio_timed[{args.model}]={timed_flops['default'] / timed_flops['paper']:.3f}")
    print(f"flop_ratio[{args.model}]={flops['default'] / flops['paper']:.3f}")
    print(f"step_time_ratio_without_perturbation[{args.model}]={plain_ratio:.3f}")
    print(f"param_ratio[{args.model}]={default['params'] / paper['params']:.3f}")
    print(f"step_time_ratio[{args.model}]={time_ratio:.3f}")


if __name__ == "__main__":
    main()
