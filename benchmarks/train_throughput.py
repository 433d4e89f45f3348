"""Training throughput: precomputed embeddings vs a naive loop vs the UNet floor, measured in one run.

(a) precomputed: the training step of pea.train: stored teacher conditioning, student states and
    latents → adapter → frozen UNet twice (teacher under no_grad, student with grad) → backward.
(b) naive: the same step, but the teacher's text encoder, the student encoder and the VAE encoder run
    on the raw captions and images every step (what the reference code does).
(c) floor: the UNet alone: teacher forward under no_grad + student forward and backward.
Tiny embedded-default models on CPU; it prints the measured cost of each component per sample, since
their proportions (not SD 1.5's) decide the speedup here.

    python benchmarks/train_throughput.py [--steps 30] [--batch 16]

Last two lines: speedup_vs_naive=<a/b>, overhead_vs_floor=<time_a/time_c>.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", TRANSFORMERS_VERBOSITY="error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from pea import models
    from pea.adapter import PEAAdapter
    from pea.corpus.synthetic import ENGLISH, all_scenes, caption, render
    from pea.distill import Conditioning, distill_loss
    from pea.embedded import prepare_zoo
    from pea.spec import load_spec

    zoo = Path(tempfile.mkdtemp(prefix="pea-bench-")) / "zoo"
    prepare_zoo(zoo, image_size=32)
    spec = load_spec("zh", "embedded", zoo_dir=zoo)
    teacher_text = models.load_teacher_text(spec.teacher)
    student = models.load_student(spec.student)
    vae, unet = models.load_vae(spec.teacher), models.load_unet(spec.teacher)
    scheduler = models.load_noise_scheduler(spec.teacher)

    scenes = (all_scenes() * 2)[: args.batch * 4]
    english = [caption(s, ENGLISH) for s in scenes]
    target = [caption(s, spec.synthetic_captions) for s in scenes]
    pngs = []
    for i, s in enumerate(scenes):
        buffer = io.BytesIO()
        render(s, 32, i).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())

    def pixels(batch: list[bytes]) -> torch.Tensor:
        arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32) for b in batch]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1

    with torch.no_grad():  # what the embed stage stores
        stored_teacher = teacher_text.encode(english)["tokens"]
        stored_student = student.encode(target)
        stored_latents = vae.encode(pixels(pngs)).latent_dist.mean * vae.config.scaling_factor

    torch.manual_seed(0)
    adapter = PEAAdapter(kind="sd15", student_dim=student.hidden_size, hidden_dim=spec.train.hidden_dim,
                         token_dim=stored_teacher.shape[-1])
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    b = args.batch

    def rows(step: int) -> slice:
        start = (step * b) % len(scenes)
        return slice(start, start + b)

    def kd_step(teacher_tokens, student_states, latents) -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(latents),))
        tokens, _ = adapter(student_states)
        loss = distill_loss(unet, scheduler.add_noise(latents, noise, t), t, noise, Conditioning(teacher_tokens),
                            Conditioning(tokens), torch.zeros(len(latents))).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def precomputed(step: int) -> None:
        r = rows(step)
        kd_step(stored_teacher[r], stored_student[r], stored_latents[r])

    def naive(step: int) -> None:
        r = rows(step)
        with torch.no_grad():
            teacher_tokens = teacher_text.encode(english[r])["tokens"]
            states = student.encode(target[r])
            latents = vae.encode(pixels(pngs[r])).latent_dist.mean * vae.config.scaling_factor
        kd_step(teacher_tokens, states, latents)

    def floor(step: int) -> None:
        r = rows(step)
        latents, noise = stored_latents[r], torch.randn_like(stored_latents[r])
        t = torch.randint(0, 1000, (b,))
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.no_grad():
            unet(noisy, t, encoder_hidden_states=stored_teacher[r])
        cond = stored_teacher[r].clone().requires_grad_()
        unet(noisy, t, encoder_hidden_states=cond).sample.pow(2).mean().backward()

    def timed(fn, steps: int) -> float:
        for step in range(3):
            fn(step)
        start = time.perf_counter()
        for step in range(steps):
            fn(step)
        return (time.perf_counter() - start) / steps

    def per_sample_ms(fn) -> float:
        with torch.no_grad():
            fn(rows(0))
            start = time.perf_counter()
            for step in range(args.steps):
                fn(rows(step))
        return (time.perf_counter() - start) / (args.steps * b) * 1000

    components = {
        "teacher text encoder": per_sample_ms(lambda r: teacher_text.encode(english[r])),
        "student encoder": per_sample_ms(lambda r: student.encode(target[r])),
        "VAE encoder (decode PNG + encode)": per_sample_ms(lambda r: vae.encode(pixels(pngs[r]))),
    }
    times = {name: timed(fn, args.steps) for name, fn in
             {"precomputed": precomputed, "naive": naive, "floor": floor}.items()}
    print(f"batch {b}, {args.steps} timed steps, torch threads {torch.get_num_threads()}")
    for name, ms in components.items():
        print(f"  {name:36} {ms:8.3f} ms/sample")
    print(f"  {'UNet floor (fwd no_grad + fwd/bwd)':36} {times['floor'] / b * 1000:8.3f} ms/sample")
    for name, seconds in times.items():
        print(f"{name:12} {b / seconds:9.1f} samples/s")
    print(f"speedup_vs_naive={times['naive'] / times['precomputed']:.3f}")
    print(f"overhead_vs_floor={times['precomputed'] / times['floor']:.3f}")


if __name__ == "__main__":
    main()
