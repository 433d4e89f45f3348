"""ControlNet kept (#31, docs/results.md): a ControlNet trained on the English toy teacher, then driven by the
English prompt and by each adapter, as a user of the English model would plug it in.

    .venv/bin/python benchmarks/controlnet.py --lake /work/tables/zh --language zh --threads 1
    .venv/bin/python benchmarks/controlnet.py --lake /work/tables/ja --language ja --controlnet /work/tables/zh/controlnet-position

The ControlNet (diffusers' `ControlNetModel.from_unet`: a trainable copy of the frozen UNet's encoder whose zero
convolutions feed the UNet's skip connections; the recipe of diffusers' examples/controlnet/train_controlnet.py)
is trained on the teacher's own objective (v-prediction, 10 % empty captions) to put the scene where its control
image says: the control image is a white box over one of the world's five regions on black, and the training image
shows the captioned scene moved into that region (the caption's own region one time in five). So the caption still
says colour, shape and count, and the control image overrides the position. It is saved with `save_pretrained`
(safetensors) in `<lake>/controlnet-position/` and reused from there.

Each system of the lake's seed-0 run (benchmarks/lora_robustness.py's load_systems) then draws the held-out prompts
whose position is not `--to`, through the stock pipeline and through `StableDiffusionControlNetPipeline` with the
control image for `--to`; the attribute judge scores the plain images against the prompt's scene and the controlled
ones against the scene moved to `--to`. Kept = (system ÷ teacher with the ControlNet) ÷ (system ÷ teacher without).

Prints a table, the share of the teacher's controlled images that still show the caption's own position (the
ControlNet steers when that is low), and last a `controlnet_kept[<system>]=<kept>` line per PEA adapter.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path

import numpy as np
import torch
from lora_robustness import load_systems
from PIL import Image


def region_mask(position: str, size: int) -> Image.Image:
    """The control image: a white box over the world's region `position`, on black."""
    from pea.corpus.synthetic import REGIONS

    x0, y0, x1, y1 = (round(v * size) for v in REGIONS[position])
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[y0:y1, x0:x1] = 255
    return Image.fromarray(pixels)


def train_controlnet(spec, folder: Path, steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0) -> Path:
    """The position ControlNet on the toy teacher, trained once into `folder` (temp dir, then rename)."""
    from diffusers import ControlNetModel, DDPMScheduler

    from pea import models
    from pea.corpus.synthetic import ENGLISH, REGIONS, all_scenes, caption
    from pea.io import progress
    from pea.io.atomic import publish
    from pea.models.toy import render_batch, to_tensor

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pipe = models.load_pipeline(spec.teacher)
    scenes = all_scenes()
    context = pipe.encode_prompt([caption(s, ENGLISH) for s in scenes] + [""], pipe.device, 1, False)[0]
    unet = pipe.unet.requires_grad_(False)
    size = unet.config.sample_size
    # A pixel-space UNet: the control image enters at the sample's own resolution (no downsampling stage).
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16,)).train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    masks = {p: (to_tensor([region_mask(p, size)]) + 1) / 2 for p in REGIONS}  # [0, 1], as the pipeline feeds it
    bar = progress.bar(range(steps), desc="train position ControlNet", unit="step")
    for _ in bar:
        index = [rng.randrange(len(scenes)) for _ in range(batch)]
        moved = [dataclasses.replace(scenes[i], position=rng.choice(list(REGIONS))) for i in index]
        x = render_batch(moved, [rng.getrandbits(31) for _ in index], size)
        rows = torch.tensor([len(scenes) if rng.random() < 0.1 else i for i in index])
        control = torch.cat([masks[m.position] for m in moved])
        noise = torch.randn_like(x)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,))
        noisy = noise_scheduler.add_noise(x, noise, t)
        down, mid = controlnet(noisy, t, encoder_hidden_states=context[rows], controlnet_cond=control,
                               return_dict=False)
        v = unet(noisy, t, encoder_hidden_states=context[rows], down_block_additional_residuals=down,
                 mid_block_additional_residual=mid).sample
        loss = torch.nn.functional.mse_loss(v, noise_scheduler.get_velocity(x, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with publish(folder, "position ControlNet") as staging:
        controlnet.save_pretrained(staging, safe_serialization=True)
    return folder


def main() -> None:
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from pea import models
    from pea.evaluate import judge_systems
    from pea.models.toy import is_scene, scene_of

    parser = argparse.ArgumentParser()
    parser.add_argument("--lake", type=Path, required=True, help="a benchmarks/toy_table.py lake (one language)")
    parser.add_argument("--language", default="zh")
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--to", default="top", help="the region the control image asks for")
    parser.add_argument("--steps", type=int, default=600, help="ControlNet training steps (batch 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 beside other jobs)")
    parser.add_argument("--controlnet", type=Path, default=None, help="where the ControlNet is kept (trained there "
                        "once; every language's lake shares the English teacher, so one can serve them all); "
                        "default <lake>/controlnet-position")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec, table, systems, _ = load_systems(args.lake, args.language, args.noise)
    folder = train_controlnet(spec, args.controlnet or args.lake / "controlnet-position", args.steps)
    adapters = {name: system for name, system in systems.items() if name != "untrained"}
    pipe = models.load_pipeline(spec.teacher, dtype=models.inference_dtype(spec.train.precision))
    student = models.load_student(spec.student)
    prompts = [(t, e) for t, e in zip(table.captions, table.captions_en) if is_scene(e)
               and scene_of(e).position != args.to]
    plain = judge_systems(spec, pipe, student, adapters, prompts)
    controlnet = ControlNetModel.from_pretrained(folder).to(pipe.unet.dtype)
    controlled_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    controlled_pipe.set_progress_bar_config(disable=True)
    control = {"image": region_mask(args.to, spec.corpus.image_size)}
    moved = lambda scene: dataclasses.replace(scene, position=args.to)  # noqa: E731
    controlled = judge_systems(spec, controlled_pipe, student, adapters, prompts, expected=moved, extra=control)
    # The teacher with the ControlNet against the prompts' own scenes: how often the control image is ignored.
    ignored = judge_systems(spec, controlled_pipe, student, {}, prompts, extra=control)["teacher_en"]["all_right"]

    print(f"\n{args.language}, {args.noise:.0%} world, position ControlNet ({args.steps} steps) moving the scene to "
          f"{args.to}; {len(prompts)} held-out prompts; the teacher with it still draws the caption's own scene on "
          f"{ignored:.3f} of its images\n")
    print("| system | judge, no ControlNet | judge with the ControlNet (moved scene) | with ÷ without, relative to "
          "the teacher |")
    print("|---|---:|---:|---:|")
    kept = {}
    for name in plain:
        ratio = None
        if name != "teacher_en" and plain[name]["all_right"] > 0:  # nothing right without it: no ratio to keep
            ratio = (controlled[name]["all_right"] / max(controlled["teacher_en"]["all_right"], 1e-9)) / (
                plain[name]["all_right"] / max(plain["teacher_en"]["all_right"], 1e-9))
            if name.startswith("PEA"):
                kept[name] = ratio
        label = {"teacher_en": "English teacher"}.get(name, name)
        print(f"| {label} | {plain[name]['all_right']:.3f} | {controlled[name]['all_right']:.3f} | "
              f"{'—' if ratio is None else f'{ratio:.2f}'} |")
    print(" ".join(f"controlnet_kept[{name.removeprefix('PEA').strip() or 'PEA'}]={ratio:.3f}"
                   for name, ratio in kept.items()))


if __name__ == "__main__":
    main()
