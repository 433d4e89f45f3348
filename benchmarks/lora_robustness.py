"""How much of an adapter's gain survives a LoRA it never saw (#19, docs/results.md): plug-and-play, measured.

    .venv/bin/python benchmarks/lora_robustness.py --lake /work/tables/zh --noise 0.3     # a toy_table.py lake

The UNet is frozen, so a LoRA made for the English model should work with the adapter. Random rank-4 LoRAs
(peft, through diffusers' `add_adapter`) on the toy teacher's UNet: on every attention projection, on the
cross-attention to_k/to_v alone, or on self-attention alone (pea.method.perturb.RandomLoRA, drawn from seeds training
never uses); each is scaled (secant steps on ρ = ‖B·A‖/‖W‖, the same on every projection) so that it moves the
teacher's own output by a chosen multiple of the conditioning's effect (the untrained adapter's relative error).
Under each LoRA, every system's held-out UNet-output error is measured against the teacher *with the same LoRA*,
and the gap it keeps is (1 − err/err_untrained) under the LoRA ÷ the same without it (1.0: unaffected).

Systems: the PEA adapter, the diffusion-loss-only adapter and the linear map of the lake's seed-0 run, and
toy_table.py's ablations trained in that run (e.g. `perturbed`: distilled under random LoRAs; `aligned`: the
teacher's token count aligned token by token; both). The linear map outputs the teacher's whole 77-token context, the plain
adapters one token per student token (16): whether a system keeps its gap says whether its agreement with the
teacher comes from matching the attention *output* with another set of tokens, which a change of the key/value
projections undoes.

Also prints, for SD 1.5's and SDXL's UNet configs (pea.models.fullsize, built on the meta device: shapes only), each
cross-attention width against its context width: where the context is wider, to_k/to_v have a null space
(context − width dimensions) in which tokens may differ unseen until a LoRA changes the projection.

Also prints, for the systems with the teacher's 77 tokens, the context error on the held-out pairs and on the parallel
rows among `--training-rows` rows of the training stream: alike, the system underfits (more steps help); far lower on training rows,
it overfits.

Prints, last, each system's gap kept at 3× (mean/worst of the LoRAs) per target, and `gap_kept_min_3x=<min over LoRA
targets of PEA's mean gap kept at 3× the conditioning's effect>` (PEA: the lake's default adapter).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

TARGETS = {"all attention": ["to_q", "to_k", "to_v", "to_out.0"], "cross-attn to_k/to_v": ["attn2.to_k", "attn2.to_v"],
           "self-attn only": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]}


def context_widths() -> list[str]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from pea.models.fullsize import SD15_UNET, SDXL_UNET

    lines = []
    for name, config in (("SD 1.5", SD15_UNET), ("SDXL", SDXL_UNET)):
        with init_empty_weights():
            unet = UNet2DConditionModel(**config)
        widths: dict[int, int] = {}
        for module_name, module in unet.named_modules():
            if module_name.endswith("attn2.to_k"):
                widths[module.out_features] = widths.get(module.out_features, 0) + 1
        context = unet.config.cross_attention_dim
        lines += [f"| {name} | {context} | {width} | {count} | {max(0, context - width)} |"
                  for width, count in sorted(widths.items())]
    return lines


def _teacher_outputs(spec, table, unet) -> list[torch.Tensor]:
    """The UNet's outputs under the teacher's conditioning, with relative_errors' latents, noise and timesteps."""
    from pea import models

    scheduler = models.load_noise_scheduler(spec.teacher)
    noise = torch.randn(table.latents.shape, generator=torch.Generator().manual_seed(spec.evaluate.seed))
    out = []
    with torch.no_grad():
        for t in spec.evaluate.timesteps:
            for rows in torch.arange(len(table)).split(32):
                steps = torch.full((len(rows),), t)
                noisy = scheduler.add_noise(table.latents[rows].float(), noise[rows], steps)
                out.append(unet(noisy, steps, encoder_hidden_states=table.teacher[rows].float()).sample)
    return out


def unseen_lora(unet, targets: list[str], seed: int):
    """A rank-4 LoRA on `targets` drawn from its own seed (training's perturbations come from other streams);
    `.apply(generator(seed), ρ)` sets ‖B·A‖ = ρ‖W‖ on every projection, same directions at every ρ."""
    from pea.method.perturb import RandomLoRA
    from pea.spec import PerturbationSpec

    return RandomLoRA(unet, PerturbationSpec(share=1.0, rank=4, targets=targets), seed, name=f"unseen-{seed}")


def scale_lora(lora, seed: int, goal: float, effect_of) -> tuple[float, float]:
    """Size an unseen LoRA so that it moves the teacher's output by `goal` (relative error, within 3 %): secant
    steps on ρ in log-log (the effect grows about as ρ squared). `effect_of()` measures the applied LoRA's effect.
    Returns (ρ, effect)."""
    size, seen = 0.1, []
    for _ in range(10):
        lora.apply(torch.Generator().manual_seed(10_000 + seed), size)
        effect = effect_of()
        if abs(effect / goal - 1) < 0.03:
            break
        seen.append((math.log(size), math.log(effect)))
        slope = 2.0 if len(seen) < 2 else (seen[-1][1] - seen[-2][1]) / (seen[-1][0] - seen[-2][0] or 1e-9)
        size *= math.exp(math.log(goal / effect) / min(max(slope, 0.5), 6.0))
    return size, effect


def gaps_kept(unet, modules: list[str], goal: float, loras: int, gaps: dict[str, float], effect_of, errors_of):
    """Under `loras` unseen LoRAs on `modules`, each sized to move the teacher by `goal`: every system's gap kept
    ((1 − err/err_untrained) under the LoRA ÷ its gap without), as {system: [one per LoRA]}, and the LoRAs' effects
    and sizes. `errors_of()` measures every system (and "untrained") against the teacher under the applied LoRA."""
    kept: dict[str, list[float]] = {k: [] for k in gaps}
    effects, sizes = [], []
    for seed in range(loras):
        lora = unseen_lora(unet, modules, seed)
        size, effect = scale_lora(lora, seed, goal, effect_of)
        sizes.append(size)
        effects.append(effect)
        errors = errors_of()
        for k in gaps:
            kept[k].append((1 - errors[k] / errors["untrained"]) / gaps[k])
        lora.remove()
    return kept, effects, sizes


def table_row(target: str, multiple: float, kept: dict[str, list[float]], effects: list[float], sizes: list[float],
              gaps: dict[str, float]) -> str:
    """One row of the gap-kept table: mean (min) over the LoRAs per system. A system with no gap to keep (worse than
    untrained without a LoRA) has no ratio to report."""
    return (f"| {target} | {multiple:g}× ({statistics.fmean(effects):.3f}) | {statistics.fmean(sizes):.3f} | "
            + " | ".join(f"{statistics.fmean(v):.2f} ({min(v):.2f})" if gaps[k] > 0 else "— (no gap)"
                         for k, v in kept.items()) + " |")


def _effect(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    return sum(float((o - r).pow(2).sum()) for o, r in zip(outputs, reference)) / sum(float(r.pow(2).sum())
                                                                                     for r in reference)


@torch.no_grad()
def token_errors(teacher: torch.Tensor, student: torch.Tensor, systems: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Σ‖c − c_teacher‖² / Σ‖c_teacher‖² over the given contexts, for the systems that output the teacher's token
    count: how close the context itself is, which is what a LoRA on to_k/to_v reads anew."""
    teacher = teacher.float()
    found = {}
    for name, system in systems.items():
        tokens = torch.cat([system(student[rows].float().to(system.device))[0].float().cpu()
                            for rows in torch.arange(len(student)).split(64)])
        if tokens.shape == teacher.shape:
            found[name] = float((tokens - teacher).pow(2).sum() / teacher.pow(2).sum())
    return found


def training_contexts(train, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The parallel rows among up to `rows` of the training stream (teacher tokens, student states): the sample the
    linear map is fit on (LinearMap.sample). The context error there beside the held-out one tells a system that
    underfits (both alike) from one that overfits."""
    from pea.evaluate.baselines import LinearMap

    sample = LinearMap.sample(train, rows, seed)
    return (sample["teacher"].unflatten(1, train.tensors["teacher"][0]),
            sample["student"].unflatten(1, train.tensors["student"][0]))


def load_world(lake: Path, language: str, noise: float, seed: int = 0):
    """A toy_table.py lake's world at one noise share, its filter and embed outputs reused as they are:
    (spec, pairs path, embedding stores, the run folder of training seed `seed`)."""
    from pea import embed, ops
    from pea.corpus import filter as filter_stage
    from pea.spec import load_spec

    world = lake / f"noise-{noise:g}"
    spec = ops.with_overrides(load_spec(language, "embedded,toy", zoo_dir=lake / "zoo"),
                              corpus={"synthetic": {"mismatched": noise}})
    filtered = filter_stage.filter_pairs(spec, world)
    return spec, filtered.pairs_path, embed.embed(spec, world, filtered.pairs_path), world / language / f"seed-{seed}"


def load_systems(lake: Path, language: str, noise: float, seed: int = 0):
    """A toy_table.py lake's held-out table and the systems of training seed `seed`: (spec, table, {name: adapter or
    map}, the training shards)."""
    from pea.evaluate.baselines import LinearMap, untrained_like
    from pea.method.adapter import PEAAdapter
    from pea.train.shards import pack
    from pea.train.table import load_table

    spec, pairs_path, embedded, run = load_world(lake, language, noise, seed)
    table = load_table(spec, pairs_path, embedded, "heldout").with_english()
    train = pack(spec, pairs_path, embedded).train
    trained = PEAAdapter.from_pretrained(run / "adapter").eval()
    systems = {"PEA": trained, "untrained": untrained_like(trained, seed),
               **({"diffusion only": PEAAdapter.from_pretrained(run / "diffusion_only" / "adapter").eval()}
                  if (run / "diffusion_only" / "adapter").is_dir() else {}),
               # toy_table.py's ablations, whichever were trained in this run (aligned, perturbed, ...)
               **{f"PEA {folder.name}": PEAAdapter.from_pretrained(folder / "adapter").eval()
                  for folder in sorted(run.iterdir()) if (folder / "adapter").is_dir() and folder.name != "diffusion_only"},
               "linear map": LinearMap.fit(train, spec.evaluate.linear_map_rows, spec.evaluate.seed)}
    return spec, table, systems, train


def main() -> None:
    from pea import models
    from pea.evaluate import relative_errors

    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", type=Path, required=True, help="a benchmarks/toy_table.py lake (one language)")
    parser.add_argument("--language", default="zh")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--multiples", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--loras", type=int, default=3, help="random LoRAs per target and multiple")
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=list(TARGETS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 beside other jobs)")
    parser.add_argument("--seed", type=int, default=0, help="the training seed whose run is measured")
    parser.add_argument("--training-rows", type=int, default=512,
                        help="training rows read; the context error is measured on the parallel ones as well")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec, table, systems, train = load_systems(args.lake, args.language, args.noise, args.seed)
    unet = models.load_unet(spec.teacher)
    base = relative_errors(spec, table, systems, unet=unet)
    conditioning = base["untrained"]
    reference = _teacher_outputs(spec, table, unet)
    print(f"held-out pairs {len(table)}; without a LoRA: " + ", ".join(f"{k} {v:.4f}" for k, v in base.items())
          + f"; the conditioning's effect (untrained) {conditioning:.4f}", flush=True)
    print("context error, token by token (systems with the teacher's token count): "
          + ", ".join(f"{k} {v:.4f}" for k, v in token_errors(table.teacher, table.student, systems).items()),
          flush=True)
    seen = training_contexts(train, args.training_rows, spec.evaluate.seed)
    print(f"the same on the parallel rows among {args.training_rows} of the training stream: "
          + ", ".join(f"{k} {v:.4f}" for k, v in token_errors(*seen, systems).items()), flush=True)
    gaps = {k: 1 - base[k] / conditioning for k in systems if k != "untrained"}
    rows, kept_3x = [], {}
    for target, modules in ((t, TARGETS[t]) for t in args.targets):
        for multiple in args.multiples:
            kept, effects, sizes = gaps_kept(
                unet, modules, multiple * conditioning, args.loras, gaps,
                lambda: _effect(reference, _teacher_outputs(spec, table, unet)),
                lambda: relative_errors(spec, table, systems, unet=unet))
            rows.append(table_row(target, multiple, kept, effects, sizes, gaps))
            print(rows[-1], flush=True)
            if multiple == 3.0:
                kept_3x[target] = kept
    print("\n| LoRA on | effect on the teacher (relative error) | ‖B·A‖/‖W‖ | "
          + " | ".join(f"{k}: gap kept, mean (min)" for k in gaps) + " |")
    print("|---|---:|---:|" + "---:|" * len(gaps))
    print("\n".join(rows))
    print("\n| model | context width | cross-attention width | layers | null space of to_k/to_v on the context |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(context_widths()))
    for target, kept in kept_3x.items():  # #31's aim: mean ≥ 0.90 and worst ≥ 0.85 at 3× on every attention projection
        print(f"gap_kept_3x[{target}]: " + " ".join(f"{name}={statistics.fmean(v):.3f}/{min(v):.3f}"
                                                     for name, v in kept.items() if gaps[name] > 0) + " (mean/worst)")
    if kept_3x:
        print(f"gap_kept_min_3x={min(statistics.fmean(kept['PEA']) for kept in kept_3x.values()):.3f}")


if __name__ == "__main__":
    main()
