"""The distillation step at SD 1.5 and SDXL size on a GPU, fed by the streaming reader: samples/s and bf16 MFU, as
pea.train runs it and tuned (torch.compile, channels-last, fused AdamW).

    python benchmarks/gpu_step.py [--models sd15,sdxl] [--batch-sd15 32] [--batch-sdxl 8] [--steps 20]
                                  [--peak-tflops 989] [--work DIR]                                  # needs CUDA
    python benchmarks/gpu_step.py --tiny                      # every path on the CPU with tiny UNets (a smoke test)

Per model, a pack of random rows with the model's shapes (benchmarks/sd15_lake.py: SD 1.5 at 512 px, SDXL at 1024 px
with its pooled vector; pea.train.shards.pack, the default 256-row row groups) is read by pea.train.reader.ShardStream (prefetch 1,
one partition) and every micro-batch goes through pea.train's step: the same noise, timestep and caption-dropout
draws (pea.train._draws), the adapter under `deepspeed.initialize` with pea.train's config (bf16, ZeRO-1), the frozen
UNet in bf16 built from its public config with random weights (pea.models.fullsize: 860 M / 2,567 M parameters; nothing
downloaded), pea.method.distill.distill_loss (teacher pass under no_grad, student pass with grad, block features hooked),
backward, the optimizer. Two rows per model:
- `pea.train`: as it runs today (eager, contiguous NCHW, torch's AdamW for-each);
- `tuned`: the UNet's repeated regions compiled (torch.compile of every Transformer2DModel and ResnetBlock2D: the
  feature hooks on the down/mid/up blocks stay outside the compiled code, so hooks added and removed at each pass do
  not recompile), the UNet and latents channels-last, AdamW(fused=True).
Timed: --steps steps after 3 warm-up steps (compilation included in those), reads and host draws included, wall
clock with a device sync at the end. FLOPs of one step are counted once with torch.utils.flop_counter on the eager
step (the same arithmetic as the tuned one: a dispatch mode around compiled code would recompile it); MFU is
against --peak-tflops (dense bf16: 989 for an H100 SXM or H200). Last line: sdxl_mfu_tuned=<MFU of the tuned SDXL row>
(aim ≥ 0.40).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", TRANSFORMERS_VERBOSITY="error",
                  TQDM_DISABLE="1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

KINDS = {"sd15": {"token_dim": 768, "pooled_dim": None, "size": 512},
         "sdxl": {"token_dim": 2048, "pooled_dim": 1280, "size": 1024}}
TINY = {"sd15": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=768,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16),
        "sdxl": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=2048,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8,
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=16,
                     addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 1280)}
COMPILED = ("Transformer2DModel", "ResnetBlock2D")


def _pack(kind: str, rows: int, work: Path, tiny: bool):
    """A pack of `rows` random pairs with `kind`'s shapes (tiny: latents of 8×8, i.e. 64 px)."""
    from sd15_lake import stores, write_lake

    from pea.embed import EmbedResult
    from pea.spec import load_spec
    from pea.train.shards import pack

    lake = work / f"{kind}-{rows}{'-tiny' if tiny else ''}"
    write_lake(lake, rows, kind=kind, latent_size=8 if tiny else None)
    spec = load_spec("zh", "embedded", zoo_dir=work)
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"data": spec.train.data.model_copy(
        update={"row_group_rows": 16 if tiny else 256})})})
    return pack(spec, lake / "pairs" / "pairs.parquet", EmbedResult(*stores(lake).values())).train


def _unet(kind: str, tiny: bool, device):
    import torch
    from diffusers import UNet2DConditionModel

    from pea.models.fullsize import SD15_UNET, SDXL_UNET

    torch.manual_seed(0)
    config = TINY[kind] if tiny else (SDXL_UNET if kind == "sdxl" else SD15_UNET)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: SDXL's 2.6 B parameters never exist in fp32
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(default)
    return unet.requires_grad_(False).eval()


def run(kind: str, variant: str, batch: int, steps: int, shards, device, tiny: bool, flops: float | None
        ) -> dict:
    import deepspeed
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pea import train as pea_train
    from pea.method.adapter import PEAAdapter
    from pea.method.distill import Conditioning, distill_loss, sdxl_time_ids
    from pea.spec import TrainSpec
    from pea.train.reader import ShardStream

    tuned = variant == "tuned"
    cfg = TrainSpec(precision="bf16", micro_batch_size=batch, steps=10**6, lr=1e-5)
    unet = _unet(kind, tiny, device)
    if tuned:
        unet = unet.to(memory_format=torch.channels_last)
        # Static shapes, one graph per (shape, grad mode): the regions repeat at a few sizes, and dynamo's automatic
        # dynamic shapes fail in inductor on channels-last strides ("cannot determine truth value of Relational").
        torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 512
        for module in unet.modules():
            if type(module).__name__ in COMPILED:
                module.compile(dynamic=False)
    torch.manual_seed(1)
    adapter = PEAAdapter(kind=kind, student_dim=1024, hidden_dim=2048, token_dim=KINDS[kind]["token_dim"],
                         pooled_dim=KINDS[kind]["pooled_dim"])
    fused = {"fused": True} if tuned and device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    engine, *_ = deepspeed.initialize(model=adapter, optimizer=optimizer, config=pea_train.ds_config(cfg))
    dtype = next(engine.module.parameters()).dtype
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2  # SD's scaled-linear schedule
    alphas = torch.cumprod(1 - betas, 0).to(device)
    size = 64 if tiny else KINDS[kind]["size"]
    time_ids = sdxl_time_ids(size, size, batch).to(device) if kind == "sdxl" else None
    stream = ShardStream(shards, batch, seed=0, partitions=1, shuffle_row_groups=4, prefetch=1)
    empty = {"student": torch.zeros(77, 1024, device=device), "teacher": torch.zeros(77, KINDS[kind]["token_dim"],
                                                                                      device=device)}

    def step(i: int) -> torch.Tensor:
        b = stream.batch(i)
        latents = b.latents.to(device, torch.float32)
        noise, timesteps, drop = (t.to(device) for t in pea_train._draws(cfg, i, range(batch), latents.shape[1:], 1000))
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        if tuned:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        states = torch.cat([b.student.to(device, torch.float32), empty["student"][None]]).to(dtype)
        tokens, pooled = engine(states)
        student = Conditioning(torch.where(drop, tokens[-1:], tokens[:-1]), None if pooled is None else pooled[:-1],
                               time_ids)
        teacher = Conditioning(torch.where(drop, empty["teacher"], b.teacher.to(device, torch.float32)),
                               None if b.teacher_pooled is None else b.teacher_pooled.to(device, torch.float32),
                               time_ids)
        terms = distill_loss(unet, noisy, timesteps, noise, teacher, student, b.native.to(device), 1.0, 0.1)
        engine.backward(terms.total)
        engine.step()
        return terms.total.detach()

    for i in range(3):  # warm-up: compilation, the allocator, the reader's first windows
        step(i)
    if flops is None:  # counted on the eager step (a dispatch mode around compiled code would recompile it)
        with FlopCounterMode(display=False) as counter:
            step(3)
        flops = counter.get_total_flops()
    else:
        step(3)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    started = time.perf_counter()
    for i in range(4, 4 + steps):
        loss = step(i)
    float(loss)
    sync()
    seconds = (time.perf_counter() - started) / steps
    stream.close()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"kind": kind, "variant": variant, "batch": batch, "ms": seconds * 1000, "samples_per_s": batch / seconds,
            "tflops": flops / seconds / 1e12, "peak_gib": peak, "flops": flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--batch-sd15", type=int, default=32)
    parser.add_argument("--batch-sdxl", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row, after 3 warm-up steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--variants", default="pea.train,tuned")
    parser.add_argument("--work", default=str(ROOT / "data" / "lake" / "bench-gpu-step"))
    parser.add_argument("--tiny", action="store_true", help="tiny UNets on the CPU, 2 timed steps: a smoke test")
    args = parser.parse_args()

    import torch

    from pea import train as pea_train

    if args.tiny:
        device, args.steps = torch.device("cpu"), 2
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        raise SystemExit("benchmarks/gpu_step.py needs a CUDA device (or --tiny for the CPU smoke test)")
    pea_train._single_process_env()
    print(f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (smoke test)'}; torch {torch.__version__}",
          flush=True)
    rows = []
    for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
        batch = args.batch_sdxl if kind == "sdxl" else args.batch_sd15
        shards = _pack(kind, max(1024, batch * (8 + args.steps)), Path(args.work), args.tiny)
        flops = None
        for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
            rows.append(run(kind, variant, batch, args.steps, shards, device, args.tiny,
                            flops if variant == "tuned" else None))
            flops = rows[-1]["flops"]
            r = rows[-1]
            print(f"{kind} {variant} batch {batch}: {r['samples_per_s']:.1f} samples/s, {r['tflops']:.1f} TFLOP/s, "
                  f"MFU {r['tflops'] / args.peak_tflops:.1%}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"| model | step | batch | ms/step | samples/s | TFLOP/s | MFU (of {args.peak_tflops:.0f}) | peak GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['variant']} | {r['batch']} | {r['ms']:.1f} | {r['samples_per_s']:.1f} | "
              f"{r['tflops']:.1f} | {r['tflops'] / args.peak_tflops:.1%} | {r['peak_gib']:.1f} |")
    tuned = [r for r in rows if r["kind"] == "sdxl" and r["variant"] == "tuned"]
    if tuned:
        print(f"sdxl_mfu_tuned={tuned[0]['tflops'] / args.peak_tflops:.3f}")


if __name__ == "__main__":
    main()
