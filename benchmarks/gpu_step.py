"""The distillation step at SD 1.5 scale on a GPU: samples/s and model-FLOP utilisation, fp32 against bf16.

    python benchmarks/gpu_step.py [--batch 16 32] [--steps 20] [--peak-tflops 989]     # needs a CUDA device

The UNet is SD 1.5's, built from its public config (`train_throughput.SD15_UNET`) with random weights: nothing
is downloaded, and the FLOPs and kernels depend only on the shapes. The step is pea.train's, on one 512-pixel
batch (4×64×64 latents): the adapter (zh student width 1024, 77 tokens, hidden 2048: 6.0 M parameters) under
`deepspeed.initialize` with pea.train's own config, then `pea.distill.distill_loss` (the frozen UNet twice: the
teacher context under no_grad, the student context with grad, block features hooked on both), backward, AdamW.

- fp32: `precision: fp32`; everything in float32, TF32 off (torch's default for matmuls).
- bf16: `precision: bf16`; DeepSpeed keeps the adapter in bf16 (fp32 master weights) and pea.train holds the
  frozen UNet in bf16.

FLOPs of one step are counted once with torch.utils.flop_counter; MFU is against the dense bf16 tensor-core peak
(--peak-tflops; 989 for an H100 SXM or H200), for both rows, so the fp32 row shows how far it is from that peak.
Last line: bf16_speedup_vs_fp32=<samples/s ratio at the largest batch>.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row, after 3 warm-up steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()

    import torch
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py needs a CUDA device; torch sees none")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from train_throughput import SD15_UNET

    from pea import train as pea_train
    from pea.adapter import PEAAdapter
    from pea.distill import Conditioning, distill_loss
    from pea.spec import TrainSpec

    pea_train._single_process_env()
    import deepspeed

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).requires_grad_(False).eval()  # cast per row, as pea.train casts it
    print(f"{torch.cuda.get_device_name()}; SD 1.5 UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M "
          f"parameters (random), 4x64x64 latents, 77x768 context")

    def make_step(precision: str, batch: int):
        cfg = TrainSpec(precision=precision, micro_batch_size=batch, steps=10**6, lr=1e-5)
        torch.manual_seed(1)
        adapter = PEAAdapter(kind="sd15", student_dim=1024, hidden_dim=2048, token_dim=768)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        engine, *_ = deepspeed.initialize(model=adapter, optimizer=optimizer, config=pea_train.ds_config(cfg))
        dtype = next(engine.module.parameters()).dtype
        unet.to(device, dtype=dtype)  # what pea.train does with the frozen UNet
        g = torch.Generator(device).manual_seed(2)
        latents = torch.randn(batch, 4, 64, 64, device=device, generator=g)
        noise = torch.randn(latents.shape, device=device, generator=g)
        timesteps = torch.randint(0, 1000, (batch,), device=device, generator=g)
        states = torch.randn(batch, 77, 1024, device=device, generator=g)
        teacher = Conditioning(torch.randn(batch, 77, 768, device=device, generator=g))
        native = torch.zeros(batch, device=device)
        noisy = latents + noise  # the scheduler's arithmetic is not what is measured

        def step() -> float:
            tokens, _ = engine(states.to(dtype))
            terms = distill_loss(unet, noisy, timesteps, noise, teacher, Conditioning(tokens), native, 1.0, 0.1)
            engine.backward(terms.total)
            engine.step()
            return terms.total.detach()
        return step, engine

    rows, speed = [], {}
    for batch in args.batch:
        for precision in ("fp32", "bf16"):
            step, engine = make_step(precision, batch)
            for _ in range(3):
                step()
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            float(loss)  # waits for the last step
            seconds = (time.perf_counter() - start) / args.steps
            speed[precision, batch] = batch / seconds
            rows.append((precision, batch, seconds * 1000, batch / seconds, flops / seconds / 1e12,
                         flops / seconds / 1e12 / args.peak_tflops, torch.cuda.max_memory_allocated() / 2**30))
            del step, engine
            torch.cuda.empty_cache()

    print(f"| precision | batch | ms/step | samples/s | TFLOP/s | MFU (of {args.peak_tflops:.0f}) | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for precision, batch, ms, sps, tflops, mfu, gib in rows:
        print(f"| {precision} | {batch} | {ms:.1f} | {sps:.1f} | {tflops:.1f} | {mfu:.1%} | {gib:.1f} |")
    largest = max(args.batch)
    print(f"bf16_speedup_vs_fp32={speed['bf16', largest] / speed['fp32', largest]:.2f}")


if __name__ == "__main__":
    main()
