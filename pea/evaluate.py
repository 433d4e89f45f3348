"""Evaluate an adapter on held-out parallel prompts against the English teacher.

    evaluate(spec, pairs_path, embedded, adapter_dir, out_dir) -> Evaluation

- UNet-output agreement: for every held-out pair and every timestep of the spec, the same latents,
  noise and timestep go through the frozen UNet under the teacher's English conditioning and under
  each adapter's; relative error = Σ‖ε_adapter − ε_teacher‖² / Σ‖ε_teacher‖². The baseline is the
  untrained adapter: the exact initialisation training started from (same seed, same config).
- Image space: the stock pipeline draws each grid prompt at fixed seeds for the teacher (English),
  the trained adapter and the untrained one (target language); we report the pixel MSE to the
  teacher's image and write the grid `teacher | PEA | untrained` as a PNG (captions in grid.json,
  since the default fonts have no CJK glyphs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pea import models
from pea.adapter import PEAAdapter
from pea.embed import EmbedResult
from pea.distill import Conditioning, sdxl_time_ids
from pea.pipeline import generate
from pea.spec import LanguageSpec
from pea.table import load_table


@dataclass(frozen=True)
class Evaluation:
    heldout_pairs: int
    relative_error: dict[str, float]   # {"trained": ..., "untrained": ...}
    image_mse: dict[str, float]
    grid: Path
    report: Path

    @property
    def improvement(self) -> float:
        """How much of the untrained adapter's error training removed (0.5 = halved)."""
        return 1.0 - self.relative_error["trained"] / self.relative_error["untrained"]

    def metrics(self) -> dict[str, float]:
        return {"rel_error_trained": self.relative_error["trained"],
                "rel_error_untrained": self.relative_error["untrained"],
                "improvement": self.improvement,
                "image_mse_trained": self.image_mse["trained"], "image_mse_untrained": self.image_mse["untrained"]}


def untrained_like(adapter: PEAAdapter, seed: int) -> PEAAdapter:
    torch.manual_seed(seed)
    return PEAAdapter(**{k: v for k, v in adapter.config.items() if not k.startswith("_")}).eval()


@torch.no_grad()
def _relative_errors(spec: LanguageSpec, table, adapters: dict[str, PEAAdapter]) -> dict[str, float]:
    unet = models.load_unet(spec.teacher)
    scheduler = models.load_noise_scheduler(spec.teacher)
    g = torch.Generator().manual_seed(spec.evaluate.seed)
    noise = torch.randn(table.latents.shape, generator=g)
    size = spec.corpus.image_size
    errors = {name: 0.0 for name in adapters}
    reference = 0.0
    for t in spec.evaluate.timesteps:
        for rows in torch.arange(len(table)).split(32):
            timesteps = torch.full((len(rows),), t)
            time_ids = sdxl_time_ids(size, size, len(rows)) if spec.teacher.kind == "sdxl" else None
            noisy = scheduler.add_noise(table.latents[rows], noise[rows], timesteps)
            pooled = None if table.teacher_pooled is None else table.teacher_pooled[rows]
            teacher = Conditioning(table.teacher[rows], pooled, time_ids)
            eps_teacher = unet(noisy, timesteps, **teacher.unet_kwargs(unet.dtype)).sample
            reference += eps_teacher.pow(2).sum().item()
            for name, adapter in adapters.items():
                student = Conditioning(*adapter(table.student[rows]), time_ids)
                eps = unet(noisy, timesteps, **student.unet_kwargs(unet.dtype)).sample
                errors[name] += (eps - eps_teacher).pow(2).sum().item()
    return {name: err / reference for name, err in errors.items()}


def _grid(rows: list[list[Image.Image]], labels: list[str], header: list[str], path: Path, cell: int = 128) -> Path:
    font = ImageFont.load_default(size=11)
    top, label_h = 18, 16
    grid = Image.new("RGB", (cell * len(header), top + len(rows) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(header):
        draw.text((col * cell + 4, 3), title, fill="black", font=font)
    for r, (images, label) in enumerate(zip(rows, labels)):
        y = top + r * (cell + label_h)
        draw.text((4, y + 2), label, fill="black", font=font)
        for col, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (col * cell, y + label_h))
    tmp = path.with_suffix(".tmp.png")
    grid.save(tmp)
    os.replace(tmp, path)
    return path


def evaluate(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, adapter_dir: Path,
             out_dir: Path) -> Evaluation:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = load_table(spec, pairs_path, embedded, "heldout")
    trained = PEAAdapter.from_pretrained(adapter_dir).eval()
    adapters = {"trained": trained, "untrained": untrained_like(trained, spec.train.seed)}
    relative = _relative_errors(spec, table, adapters)

    cfg, size = spec.evaluate, spec.corpus.image_size
    n = min(cfg.grid_prompts, len(table))
    seeds = [cfg.seed + i for i in range(n)]
    pipe = models.load_pipeline(spec.teacher)
    student = models.load_student(spec.student)
    call = {"num_inference_steps": cfg.inference_steps, "guidance_scale": cfg.guidance_scale, "height": size,
            "width": size}
    teacher_images = pipe(prompt=table.captions_en[:n], negative_prompt=[""] * n,
                          generator=[torch.Generator().manual_seed(s) for s in seeds], **call).images
    columns = {"English teacher": teacher_images}
    for name, adapter in adapters.items():
        columns[f"PEA {name}"] = generate(pipe, adapter, student, table.captions[:n], seeds, **call)

    def mse(a: list[Image.Image], b: list[Image.Image]) -> float:
        return float(np.mean([np.mean((np.asarray(x, np.float32) - np.asarray(y, np.float32)) ** 2 / 255**2)
                              for x, y in zip(a, b)]))
    image_mse = {name: mse(columns[f"PEA {name}"], teacher_images) for name in adapters}
    grid = _grid([[col[i] for col in columns.values()] for i in range(n)], table.captions_en[:n], list(columns),
                 out_dir / "grid.png")
    evaluation = Evaluation(len(table), relative, image_mse, grid, out_dir / "evaluation.json")
    report = {"language": spec.language, "heldout_pairs": len(table), **evaluation.metrics(),
              "grid": str(grid), "grid_captions": [{"en": e, spec.language: c}
                                                   for e, c in zip(table.captions_en[:n], table.captions[:n])]}
    tmp = evaluation.report.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, ensure_ascii=False, indent=2))
    os.replace(tmp, evaluation.report)
    return evaluation
