"""Training throughput: precomputed embeddings vs a naive loop vs the UNet floor, measured in one run,
with tiny models sized so that their costs keep SD 1.5's proportions.

(a) precomputed: the training step of pea.train: stored teacher conditioning, student states and
    latents → adapter → frozen UNet twice (teacher under no_grad, student with grad) → backward.
(b) naive: the same step, but the teacher's text encoder, the student encoder and the VAE encoder run
    on the raw captions and images every step (what the reference code does).
(c) floor: the UNet alone: teacher forward under no_grad + student forward and backward.

Proportions. First the real SD 1.5 models are built on the meta device from their public configs
(below, as dicts; nothing is downloaded, no weights exist) and torch.utils.flop_counter counts one
sample's FLOPs: the CLIP ViT-L/14 text encoder at 77 tokens, the zh spec's student (Chinese-CLIP
ViT-H/14's RoBERTa-wwm-ext-large text tower) at 77 tokens, the VAE encoder at 512×512, and the UNet
floor at 64×64×4 latents with 77×768 context. Their shares of the floor are the targets. Then the tiny
models (random weights) are sized by measurement on this machine: the UNet wide enough that the
cheapest possible text encoder is not above its share, then the text encoders' depth and the VAE
encoder's width so that each one's measured time per sample is its share of the measured floor. Both
the SD 1.5 shares and the measured ones are printed, so the speedup means what it would on the real
models (where FLOPs, not per-call overheads, set the time). Component times are the fastest of seven
batches; the three paths are timed interleaved step by step, so a change in the machine's load falls on
all three alike.

    python benchmarks/train_throughput.py [--steps 30] [--batch 16] [--threads 1]

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

# SD 1.5's and the zh student's public configs, as pea.models.fullsize builds them (one copy in the project).
from pea.models.fullsize import SD15_TEXT as SD15_TEXT_ENCODER  # noqa: E402
from pea.models.fullsize import SD15_UNET, SD15_VAE  # noqa: E402,F401 (gpu_step imports SD15_UNET from here)
from pea.models.fullsize import ZH_TEXT as ZH_STUDENT  # noqa: E402

COMPONENTS = ("teacher text encoder", "student encoder", "VAE encoder")


def sd15_flops() -> dict[str, float]:
    """FLOPs of one sample through each SD 1.5 component (meta device: shapes only, no memory, no weights)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    with torch.device("meta"):
        # Eager attention everywhere: its matmuls are what the counter sees (fused SDPA kernels vary by device).
        text_config, student_config = CLIPTextConfig(**SD15_TEXT_ENCODER), BertConfig(**ZH_STUDENT)
        text_config._attn_implementation = student_config._attn_implementation = "eager"
        text, student = CLIPTextModel(text_config), BertModel(student_config, add_pooling_layer=False)
        vae, unet = AutoencoderKL(**SD15_VAE), UNet2DConditionModel(**SD15_UNET)
        for model in (vae, unet):
            model.set_attn_processor(AttnProcessor())
        unet.requires_grad_(False)  # frozen, as in training: the backward computes no weight gradients
        ids = torch.zeros(1, 77, dtype=torch.long)
        latents, t, context = torch.zeros(1, 4, 64, 64), torch.zeros(1, dtype=torch.long), torch.zeros(1, 77, 768)

        def floor() -> None:
            with torch.no_grad():
                unet(latents, t, encoder_hidden_states=context)
            student_context = context.clone().requires_grad_()
            unet(latents, t, encoder_hidden_states=student_context).sample.pow(2).mean().backward()

        with torch.no_grad():
            flops = {"teacher text encoder": count(lambda: text(ids)),
                     "student encoder": count(lambda: student(ids)),  # no padding mask: all 77 attended
                     "VAE encoder": count(lambda: vae.encode(torch.zeros(1, 3, 512, 512)).latent_dist.mean)}
        flops["UNet floor"] = count(floor)
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared machine, two "
                        "threads wait on each other whenever one is descheduled, which swamps small models)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from PIL import Image
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizerFast,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
    )

    from pea import models
    from pea.corpus.synthetic import ENGLISH, all_scenes, caption, render
    from pea.method.adapter import PEAAdapter
    from pea.method.distill import Conditioning, distill_loss
    from pea.models.embedded import prepare_zoo
    from pea.spec import load_spec

    torch.set_num_threads(args.threads)
    flops = sd15_flops()
    share = {name: flops[name] / flops["UNet floor"] for name in COMPONENTS}
    print("SD 1.5, one sample (FlopCounterMode on the meta device):")
    for name, value in flops.items():
        print(f"  {name:22} {value / 1e9:9.1f} GFLOP" + (f"  {share[name]:7.2%} of the UNet floor" if name in share
                                                         else "  (teacher fwd + student fwd/bwd)"))

    zoo = Path(tempfile.mkdtemp(prefix="pea-bench-")) / "zoo"
    prepare_zoo(zoo, image_size=32)
    spec = load_spec("zh", "embedded", zoo_dir=zoo)
    teacher_tokenizer = CLIPTokenizer.from_pretrained(Path(spec.teacher.id) / "tokenizer")
    student_tokenizer = BertTokenizerFast.from_pretrained(spec.student.id)
    scheduler = models.load_noise_scheduler(spec.teacher)
    b = args.batch
    scenes = (all_scenes() * 2)[: b * 4]
    english = [caption(s, ENGLISH) for s in scenes]
    target = [caption(s, spec.synthetic_captions) for s in scenes]
    pngs = []
    for i, s in enumerate(scenes):
        buffer = io.BytesIO()
        render(s, 32, i).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())

    def rows(step: int) -> slice:
        start = (step * b) % len(scenes)
        return slice(start, start + b)

    def pixels(batch: list[bytes]) -> torch.Tensor:
        arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32) for b in batch]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1

    # --- the tiny models: fixed interfaces (32-wide context, 4×8×8 latents), one size knob each --------------
    def unet_of(width: int) -> UNet2DConditionModel:
        torch.manual_seed(0)
        return models._frozen(UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(width, 2 * width),
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
            attention_head_dim=8, norm_num_groups=16, cross_attention_dim=32))

    def teacher_of(layers: int):
        torch.manual_seed(1)
        model = models._frozen(CLIPTextModel(CLIPTextConfig(
            vocab_size=len(teacher_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=teacher_tokenizer.bos_token_id,
            eos_token_id=teacher_tokenizer.eos_token_id, pad_token_id=teacher_tokenizer.pad_token_id)))

        @torch.no_grad()
        def encode(captions: list[str]) -> torch.Tensor:  # what the SD 1.5 pipeline's encode_prompt computes
            ids = teacher_tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids
            return model(ids).last_hidden_state
        return encode

    def student_of(layers: int) -> models.StudentEncoder:
        torch.manual_seed(2)
        model = BertModel(BertConfig(vocab_size=len(student_tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
                                     pad_token_id=student_tokenizer.pad_token_id), add_pooling_layer=False)
        return models.StudentEncoder(student_tokenizer, models._frozen(model), max_length=77)  # the zh spec's 77

    def vae_of(width: int) -> AutoencoderKL:
        torch.manual_seed(3)
        return models._frozen(AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width, 2 * width, 2 * width),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1, norm_num_groups=8, sample_size=32))

    def per_sample_ms(fn, repeats: int = 7) -> float:
        """The fastest of `repeats` calls on a batch, per sample (after one warm-up call): on a shared machine
        the minimum is the least disturbed estimate of a component's own cost."""
        fn(rows(0))
        times = []
        for step in range(repeats):
            start = time.perf_counter()
            fn(rows(step))
            times.append(time.perf_counter() - start)
        return min(times) / b * 1000

    def floor_fn(unet, latents, context):
        def run(r: slice) -> None:
            noise, t = torch.randn_like(latents[r]), torch.randint(0, 1000, (b,))
            noisy = scheduler.add_noise(latents[r], noise, t)
            with torch.no_grad():
                unet(noisy, t, encoder_hidden_states=context[r])
            cond = context[r].clone().requires_grad_()
            unet(noisy, t, encoder_hidden_states=cond).sample.pow(2).mean().backward()
        return run

    calls = {  # size -> one call of the component on a batch of rows
        "teacher text encoder": lambda n: (lambda enc: lambda r: enc(english[r]))(teacher_of(n)),
        "student encoder": lambda n: (lambda enc: lambda r: enc.encode(target[r]))(student_of(n)),
        "VAE encoder": lambda n: (lambda v: lambda r: v.encode(pixels(pngs[r])))(vae_of(n)),
    }

    def measure(name: str, n: int) -> float:
        return per_sample_ms(calls[name](n))

    # 1. The floor must be long enough that the cheapest encoder (one layer, eight channels) fits its share.
    cheapest = {name: measure(name, n) for name, n in zip(COMPONENTS, (1, 1, 8))}
    floor_needed = max(cheapest[name] / share[name] for name in COMPONENTS)
    with torch.no_grad():
        context = teacher_of(1)(english)
    latents = torch.randn(len(scenes), 4, 8, 8)
    width = 32
    floor_ms = per_sample_ms(floor_fn(unet_of(width), latents, context), 3)
    while floor_ms < floor_needed and width < 512:  # cost grows about with width²
        width = min(512, max(width + 16, int(width * (floor_needed / floor_ms) ** 0.5 / 16 + 1) * 16))
        floor_ms = per_sample_ms(floor_fn(unet_of(width), latents, context), 3)
    unet = unet_of(width)
    print(f"floor sized: UNet blocks ({width}, {2 * width}), {floor_ms:.2f} ms/sample (needed ≥ {floor_needed:.2f}: "
          f"the cheapest encoders cost {', '.join(f'{v:.3f}' for v in cheapest.values())} ms/sample)", flush=True)

    # 2. Each encoder's knob: cost ≈ a + c·n^p (p = 1 for depth, 2 for width), fitted on two measured sizes,
    #    solved for the share of the measured floor, then checked once (and refitted on the nearer pair).
    def fit(name: str, lo: int, hi: int, power: int, step: int, largest: int) -> int:
        goal = share[name] * floor_ms
        points = {lo: measure(name, lo), hi: measure(name, hi)}
        n = lo
        for _ in range(2):
            (n0, t0), (n1, t1) = sorted(points.items(), key=lambda p: abs(np.log(p[1] / goal)))[:2]
            c = (t1 - t0) / (n1 ** power - n0 ** power) if n1 != n0 else 0.0
            a = t0 - c * n0 ** power
            n = lo if c <= 0 or goal <= a + c * lo ** power else ((goal - a) / c) ** (1 / power)
            n = int(min(largest, max(lo, round(n / step) * step)))
            if n in points:
                break
            points[n] = measure(name, n)
        return min(points, key=lambda k: abs(np.log(points[k] / goal)))

    sizes = {"teacher text encoder": fit("teacher text encoder", 1, 4, 1, 1, 48),
             "student encoder": fit("student encoder", 1, 4, 1, 1, 48),
             "VAE encoder": fit("VAE encoder", 8, 64, 2, 8, 512)}
    print(f"sized: teacher text encoder {sizes['teacher text encoder']} layers, student {sizes['student encoder']} "
          f"layers, VAE encoder width {sizes['VAE encoder']}; timing {args.steps} steps of each path", flush=True)
    encode_text, student, vae = teacher_of(sizes["teacher text encoder"]), student_of(sizes["student encoder"]), \
        vae_of(sizes["VAE encoder"])

    with torch.no_grad():  # what the embed stage stores
        stored_teacher = encode_text(english)
        stored_student = student.encode(target)
        stored_latents = vae.encode(pixels(pngs)).latent_dist.mean * vae.config.scaling_factor

    torch.manual_seed(0)
    adapter = PEAAdapter(kind="sd15", student_dim=student.hidden_size, hidden_dim=spec.train.hidden_dim,
                         token_dim=stored_teacher.shape[-1])
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4)

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
            teacher_tokens = encode_text(english[r])
            states = student.encode(target[r])
            latents = vae.encode(pixels(pngs[r])).latent_dist.mean * vae.config.scaling_factor
        kd_step(teacher_tokens, states, latents)

    floor = floor_fn(unet, stored_latents, stored_teacher)

    paths = {"precomputed": precomputed, "naive": naive, "floor": lambda step: floor(rows(step))}

    def timed(steps: int) -> dict[str, float]:
        """Seconds per step of each path, the paths interleaved step by step so that a change in the
        machine's load falls on all three alike."""
        for step in range(3):
            for fn in paths.values():
                fn(step)
        total = dict.fromkeys(paths, 0.0)
        for step in range(steps):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn(step)
                total[name] += time.perf_counter() - start
        return {name: seconds / steps for name, seconds in total.items()}

    components = {"teacher text encoder": per_sample_ms(lambda r: encode_text(english[r])),
                  "student encoder": per_sample_ms(lambda r: student.encode(target[r])),
                  "VAE encoder": per_sample_ms(lambda r: vae.encode(pixels(pngs[r])))}
    times = timed(args.steps)
    floor_per_sample = times["floor"] / b * 1000
    print(f"tiny models sized to those shares: UNet blocks ({width}, {2 * width}); teacher text encoder "
          f"{sizes['teacher text encoder']} layers; student {sizes['student encoder']} layers; VAE encoder blocks "
          f"({sizes['VAE encoder']}, {2 * sizes['VAE encoder']}, {2 * sizes['VAE encoder']})")
    print(f"batch {b}, {args.steps} timed steps of each path (interleaved), torch threads {torch.get_num_threads()}; "
          "measured per sample (fastest of 7 batches):")
    for name, ms in components.items():
        print(f"  {name:36} {ms:8.3f} ms  {ms / floor_per_sample:7.2%} of the floor (SD 1.5: {share[name]:.2%})")
    print(f"  {'UNet floor (fwd no_grad + fwd/bwd)':36} {floor_per_sample:8.3f} ms")
    for name, seconds in times.items():
        print(f"{name:12} {b / seconds:9.1f} samples/s")
    print(f"speedup_vs_naive={times['naive'] / times['precomputed']:.3f}")
    print(f"overhead_vs_floor={times['precomputed'] / times['floor']:.3f}")


if __name__ == "__main__":
    main()
