"""Plug-and-play as a user meets it (#19, docs/results.md): a LoRA trained on the English toy teacher, loaded
into the pipeline with diffusers' `load_lora_weights`, then driven by the English prompt and by each adapter.

    .venv/bin/python benchmarks/style_lora.py --lake /work/tables/ja/ja --language ja --style recolour --threads 1

The LoRA (rank 8, every attention projection, peft through diffusers' `add_adapter`, the recipe of diffusers'
examples/text_to_image/train_text_to_image_lora.py) is trained on the toy teacher's own English captions to
draw a *style* of each scene: `recolour` shifts every colour one step round the palette (red draws green, …),
`mirror` swaps left and right. It is saved as diffusers LoRA weights (safetensors) in `<lake>/style-<style>/`
and reused from there. The systems of the lake's seed-0 run (benchmarks/toy_table.py; lora_robustness.py's
load_systems) then draw the held-out prompts with and without it; the attribute judge scores the plain images
against the prompt's scene and the styled ones against the styled scene. Also the held-out UNet-output error
under the LoRA, against the teacher with it (lora_robustness.py's measure, for a trained LoRA).

Prints a table, and last a `style_ratio[<system>]=<(system ÷ teacher with the LoRA) ÷ (system ÷ teacher without
it)>` line per PEA adapter: 1.0 means the adapter keeps with the LoRA all it has without.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path

import torch
from lora_robustness import TARGETS, load_systems

PALETTE = ["red", "green", "blue", "yellow", "purple", "orange"]
MIRROR = {"left": "right", "right": "left"}
STYLES = {"recolour": lambda s: dataclasses.replace(s, color=PALETTE[(PALETTE.index(s.color) + 1) % len(PALETTE)]),
          "mirror": lambda s: dataclasses.replace(s, position=MIRROR.get(s.position, s.position))}


def train_style(spec, style: str, folder: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0) -> Path:
    """The style LoRA on the toy teacher, trained once into `folder` (temp dir, then rename)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from pea import models
    from pea.corpus.synthetic import ENGLISH, all_scenes, caption
    from pea.io import progress
    from pea.io.atomic import publish
    from pea.models.toy import denoising_loss

    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return folder
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pipe = models.load_pipeline(spec.teacher)
    scenes = all_scenes()
    context = pipe.encode_prompt([caption(s, ENGLISH) for s in scenes] + [""], pipe.device, 1, False)[0]
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS["all attention"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    bar = progress.bar(range(steps), desc=f"train {style} LoRA", unit="step")
    for _ in bar:  # the teacher's own objective (10 % empty captions), on styled images
        loss = denoising_loss(unet, noise_scheduler, context, scenes, rng, batch, drawn=STYLES[style])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with publish(folder, f"style LoRA {style}") as staging:
        StableDiffusionPipeline.save_lora_weights(
            staging, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            safe_serialization=True)
    return folder


def main() -> None:
    from pea import models
    from pea.evaluate import judge_systems, relative_errors

    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", type=Path, required=True, help="a benchmarks/toy_table.py lake (one language)")
    parser.add_argument("--language", default="zh")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--style", choices=sorted(STYLES), default="recolour")
    parser.add_argument("--steps", type=int, default=600, help="LoRA training steps (batch 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 beside other jobs)")
    parser.add_argument("--lora", type=Path, default=None, help="where the style LoRA is kept (trained there once; "
                        "every language's lake shares the English teacher, so one serves them all); default "
                        "<lake>/style-<style>")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec, table, systems, _ = load_systems(args.lake, args.language, args.noise)
    folder = train_style(spec, args.style, args.lora or args.lake / f"style-{args.style}", args.steps)
    adapters = {name: system for name, system in systems.items() if name != "untrained"}
    pipe = models.load_pipeline(spec.teacher, dtype=models.inference_dtype(spec.train.precision))
    student = models.load_student(spec.student)
    prompts = list(zip(table.captions, table.captions_en))
    plain = judge_systems(spec, pipe, student, adapters, prompts)
    errors_plain = relative_errors(spec, table, systems, unet=pipe.unet)
    pipe.load_lora_weights(folder, adapter_name=args.style)  # what a user of the English model does with a LoRA
    styled = judge_systems(spec, pipe, student, adapters, prompts, expected=STYLES[args.style])
    errors_styled = relative_errors(spec, table, systems, unet=pipe.unet)
    # The teacher with the LoRA against its own plain scenes: how much the style changes what it draws.
    unstyled = judge_systems(spec, pipe, student, {}, prompts)["teacher_en"]["all_right"]

    print(f"\n{args.language}, {args.noise:.0%} world, {args.style} LoRA ({args.steps} steps); the teacher with it "
          f"still draws the unstyled scene on {unstyled:.3f} of its images\n")
    print("| system | judge, no LoRA | judge with the LoRA (styled scene) | with ÷ without, relative to the "
          "teacher | UNet error, no LoRA | UNet error with the LoRA (vs teacher + LoRA) |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = {}
    for name in plain:
        kept = None
        if name != "teacher_en" and plain[name]["all_right"] > 0:  # nothing right without it: no ratio to keep
            kept = (styled[name]["all_right"] / max(styled["teacher_en"]["all_right"], 1e-9)) / (
                plain[name]["all_right"] / max(plain["teacher_en"]["all_right"], 1e-9))
        if name.startswith("PEA") and kept is not None:
            ratios[name] = kept
        label = {"teacher_en": "English teacher"}.get(name, name)
        error = (f"{errors_plain[name]:.4f} | {errors_styled[name]:.4f}" if name in errors_plain else "— | —")
        print(f"| {label} | {plain[name]['all_right']:.3f} | {styled[name]['all_right']:.3f} | "
              f"{'—' if kept is None else f'{kept:.2f}'} | {error} |")
    print(f"untrained UNet error: {errors_plain['untrained']:.4f} without, {errors_styled['untrained']:.4f} with")
    print(" ".join(f"style_ratio[{name.removeprefix('PEA').strip() or 'PEA'}]={ratio:.3f}"
                   for name, ratio in ratios.items()))


if __name__ == "__main__":
    main()
