"""The training step's memory without the memory: SDXL at 1024 px (and SD 1.5 at 512 px, to calibrate) on fake
tensors, counted by torch's MemTracker (issue #33).

    python benchmarks/memory_model.py [--batches 1 2 ... 8] [--kinds sd15,sdxl] [--adapter default|paper]
                                      [--no-measure] [--measure-batch 1]

Each UNet is built from its public config (pea.models.fullsize: SD 1.5 860 M, SDXL 2,567 M parameters) under
FakeTensorMode, directly in bf16 (no bytes behind any tensor), and frozen as pea.train holds it; the adapter is
pea.train.build_adapter's for the zh spec's shapes (student 52 tokens × 1024, hidden 2048; the default's attention
mixer to the teacher's 77 tokens; SDXL adds the pooled 1280; --adapter paper: one token per student token) in
bf16, with DeepSpeed's bf16 optimizer written out beside it (fp32 master weights and gradients, AdamW's two fp32
states, made before the step as at any step after the first). The step is pea.train's: the adapter on the batch
plus the empty caption, caption dropout's swap, pea.method.distill.distill_loss with the section's weights (the
teacher pass under no_grad, the student pass with grad, block features hooked on both, the token term), backward,
AdamW; for the default, under the random LoRA of a perturbed micro-step (pea.method.perturb), switched on. MemTracker (torch.distributed._tools.mem_tracker) counts every tensor the step holds, with
and without diffusers' gradient checkpointing on the frozen UNet's blocks (recomputed in the backward pass). The
peak is what a device must hold before what the tracker does not see: the CUDA context, kernel workspaces and the
caching allocator's fragmentation (--reserve-gb keeps 4 GB of the 80 back for them).

The fake tensors are CPU tensors (a CPU build of torch cannot fake CUDA ones): attention runs the CPU's flash kernel
(aten._scaled_dot_product_flash_attention_for_cpu), which, like the GPU's flash and memory-efficient kernels, keeps
no attention matrix for the backward pass.

Calibration (not with --no-measure): the same step run for real on the CPU, SD 1.5 at 512 px, bf16, random weights,
with and without checkpointing, in a child process whose glibc returns every freed block of 64 kB or more to the
system (so its RSS follows the live tensors); after one warm-up step, the rise of the peak RSS (VmHWM, reset through
/proc/self/clear_refs) over the RSS before the step, against the tracker's peak over what it held before the step.
Last lines: sdxl_max_micro_batch_80gb= (the largest micro-batch, with or without checkpointing, whose peak fits
--gpu-gb less --reserve-gb) and estimator_error_sd15= (|estimate − measured| ÷ measured, without checkpointing).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", TRANSFORMERS_VERBOSITY="error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402
from torch.utils.hooks import RemovableHandle  # noqa: E402

from pea.spec import load_spec  # noqa: E402

GB = 1e9
STUDENT_TOKENS = load_spec("zh").student.max_length  # 52: Chinese-CLIP's trained length
KINDS = {"sd15": {"token_dim": 768, "pooled_dim": None, "size": 512},
         "sdxl": {"token_dim": 2048, "pooled_dim": 1280, "size": 1024}}


def train_section(adapter: str):
    """The zh spec's training section whose step is counted: the shipped default's (the plug-and-play adapter, #31),
    or the paper's (the profile `paper` on top)."""
    return load_spec("zh", "paper" if adapter == "paper" else None).train


def _build(kind: str, fake: bool, cfg):
    """The frozen bf16 UNet (with the step's random LoRA when `cfg` perturbs) and the bf16 adapter `cfg` asks for,
    on fake tensors or (fake=False) real random ones."""
    from diffusers import UNet2DConditionModel

    from pea.models.fullsize import SD15_UNET, SDXL_UNET
    from pea.train import build_adapter

    # Built in bf16 directly (torch's default dtype for the while): a module cast after construction swaps its fake
    # parameters, which FakeTensorMode refuses (its tensors carry weak references). Real values are the layers' own
    # random initialisation, as pea.models.fullsize's models.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with contextlib.nullcontext() if not fake else torch.device("cpu"):
            unet = UNet2DConditionModel(**(SDXL_UNET if kind == "sdxl" else SD15_UNET))
            shapes = {"student": (STUDENT_TOKENS, 1024), "teacher": (77, KINDS[kind]["token_dim"])}
            if KINDS[kind]["pooled_dim"]:
                shapes["teacher_pooled"] = (KINDS[kind]["pooled_dim"],)
            adapter = build_adapter(cfg, kind, shapes)
            if cfg.perturbation.share > 0:
                # pea.method.perturb's LoRA, switched on: the perturbed micro-step, the heavier of the two kinds (its
                # values do not matter here; RandomLoRA's draw reads norms that fake tensors do not have).
                _perturbed(unet, cfg.perturbation)
    finally:
        torch.set_default_dtype(default)
    unet.requires_grad_(False).eval()
    return unet, adapter


def _perturbed(unet, p) -> None:
    """pea.method.perturb's LoRA (rank, targets) injected into `unet` and active. Its rank-r weights are real tensors
    even in a fake UNet (a few MB at SDXL, uncounted): peft moves a new LoRA to its base layer's device by swapping the
    parameters, which fake tensors refuse (they carry weak references)."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        inject_adapter_in_model(LoraConfig(r=p.rank, lora_alpha=p.rank, target_modules=list(p.targets),
                                           init_lora_weights=False), unet, "pea-perturbation")


def _inputs(kind: str, batch: int, size: int) -> dict:

    from pea.method.distill import sdxl_time_ids

    g = torch.Generator().manual_seed(0)
    latent = size // 8
    out = {"latents": torch.randn(batch, 4, latent, latent, generator=g),
           "noise": torch.randn(batch, 4, latent, latent, generator=g),
           "timesteps": torch.randint(0, 1000, (batch,), generator=g),
           "student": torch.randn(batch, STUDENT_TOKENS, 1024, generator=g),
           "empty": torch.randn(STUDENT_TOKENS, 1024, generator=g),
           "teacher": torch.randn(batch, 77, KINDS[kind]["token_dim"], generator=g),
           "teacher_empty": torch.randn(77, KINDS[kind]["token_dim"], generator=g),
           "native": torch.zeros(batch), "drop": (torch.rand(batch, generator=g) < 0.1)[:, None, None]}
    if kind == "sdxl":
        out["pooled"] = torch.randn(batch, 1280, generator=g)
        out["time_ids"] = sdxl_time_ids(size, size, batch)
    return out


class _Loss(torch.nn.Module):
    """The adapter and the UNet under one root module: MemTracker refuses a root module called twice in a step (it
    takes that for a second iteration), and the step calls the UNet twice (teacher and student passes)."""

    def __init__(self, unet, adapter, cfg):
        super().__init__()
        self.unet, self.adapter, self.cfg = unet, adapter, cfg

    def forward(self, x: dict):
        from pea.method.distill import Conditioning, distill_loss

        noisy = x["latents"] + x["noise"]  # the scheduler's arithmetic: same shapes, not what is measured
        states = torch.cat([x["student"], x["empty"][None]]).to(torch.bfloat16)
        tokens, pooled = self.adapter(states)
        student = Conditioning(torch.where(x["drop"], tokens[-1:], tokens[:-1]),
                               None if pooled is None else pooled[:-1], x.get("time_ids"))
        teacher = Conditioning(torch.where(x["drop"], x["teacher_empty"], x["teacher"]), x.get("pooled"),
                               x.get("time_ids"))
        return distill_loss(self.unet, noisy, x["timesteps"], x["noise"], teacher, student, x["native"],
                            self.cfg.output_kd_weight, self.cfg.feature_kd_weight,
                            native_weight=self.cfg.native_loss_weight, token_weight=self.cfg.token_kd_weight).total


def _step(loss: _Loss, master, optimizer, x: dict) -> None:
    """pea.train's micro-step (its DeepSpeed bf16 optimizer written out: fp32 master, fp32 grads, AdamW)."""
    loss(x).backward()
    for fp32, p in zip(master, loss.adapter.parameters()):
        fp32.grad = p.grad.float()
        p.grad = None
    optimizer.step()
    with torch.no_grad():
        for fp32, p in zip(master, loss.adapter.parameters()):
            p.copy_(fp32)


class Model:
    """One kind's frozen UNet, adapter and optimizer, built once (fake or real) and stepped at any micro-batch."""

    def __init__(self, kind: str, fake: bool, cfg):
        self.kind, self.fake = kind, fake
        self.mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        with self.mode:
            unet, adapter = _build(kind, fake, cfg)
            self.params = sum(p.numel() for p in adapter.parameters())
            self.loss = _Loss(unet, adapter, cfg)
            self.master = [p.detach().float().requires_grad_(True) for p in adapter.parameters()]
            self.optimizer = torch.optim.AdamW(self.master, lr=1e-5, weight_decay=1e-2)
            for fp32 in self.master:  # AdamW's states exist from the first step on: make them now, as at any later step
                fp32.grad = torch.zeros_like(fp32)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def checkpointing(self, on: bool) -> None:
        (self.loss.unet.enable_gradient_checkpointing if on else self.loss.unet.disable_gradient_checkpointing)()

    def estimate(self, batch: int, size: int) -> tuple[float, float]:
        """(peak bytes of one step, bytes held before it), counted by MemTracker on fake tensors."""
        with self.mode:
            x = _inputs(self.kind, batch, size)
            tracker = MemTracker()
            # MemTracker hooks every parameter's gradient when its module runs, and a frozen parameter (the UNet's)
            # takes no hook: mark those as hooked already, with handles that remove nothing.
            for param in self.loss.unet.parameters():
                tracker._param_to_grad_hook_handles[param] = (RemovableHandle(OrderedDict()),
                                                              RemovableHandle(OrderedDict()))
            tracker.track_external(self.loss, self.optimizer, *self.master, *x.values())
            with tracker:
                before = _total(tracker.get_tracker_snapshot("current"))
                _step(self.loss, self.master, self.optimizer, x)
            return _total(tracker.get_tracker_snapshot("peak")), before

    def measure(self, batch: int, size: int) -> float:
        """The step's real peak on the CPU: peak RSS during the step over the RSS before it."""
        x = _inputs(self.kind, batch, size)
        gc.collect()
        before = _vm("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        started = time.perf_counter()
        _step(self.loss, self.master, self.optimizer, x)
        peak = _vm("VmHWM")
        print(f"  (real step: {time.perf_counter() - started:.0f} s)", flush=True)
        return peak - before


def _total(snapshot: dict) -> float:
    return sum(dev["Total"] for dev in snapshot.values())


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measured(batch: int, checkpointing: bool, adapter: str) -> float:
    """The real SD 1.5 step at 512 px, in a child process whose malloc returns every block of 64 kB or more to the
    system when it is freed (glibc's mmap threshold fixed: by default it rises to 32 MB as blocks are freed, and
    freed memory then stays resident): its RSS then follows the live tensors. One step warms up (oneDNN's
    first-call allocations), the next is measured."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, __file__, "--measure-child", str(batch), "--adapter", adapter,
                          *(["--checkpointing"] if checkpointing else [])], capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(out.stdout[-2000:] + out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--kinds", default="sd15,sdxl")
    parser.add_argument("--adapter", choices=["default", "paper"], default="default", help="the shipped default's "
                        "step (attention mixer to the teacher's tokens, token KD, a random LoRA on) or the paper's")
    parser.add_argument("--gpu-gb", type=float, default=80.0)
    parser.add_argument("--reserve-gb", type=float, default=4.0, help="kept back from --gpu-gb for what the tracker "
                        "does not see: the CUDA context, kernel workspaces, the allocator's fragmentation")
    parser.add_argument("--measure-batch", type=int, default=1, help="SD 1.5 micro-batch measured for real")
    parser.add_argument("--no-measure", action="store_true", help="skip the real SD 1.5 step (≈ 3 GB, minutes)")
    parser.add_argument("--measure-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = train_section(args.adapter)
    if args.measure_child:
        model = Model("sd15", fake=False, cfg=cfg)
        model.checkpointing(args.checkpointing)
        model.measure(args.measure_child, 512)  # warm-up
        print(model.measure(args.measure_child, 512))
        return
    fits = {}
    print("| model | px | micro-batch | checkpointing | peak GB | of which held before the step |")
    print("|---|---:|---:|---|---:|---:|")
    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        size, model = KINDS[kind]["size"], Model(kind, fake=True, cfg=cfg)
        print(f"| {kind} | {args.adapter} adapter: {model.params / 1e6:.2f} M parameters | | | | |", flush=True)
        for checkpointing in (False, True):
            model.checkpointing(checkpointing)
            for batch in args.batches:
                peak, before = model.estimate(batch, size)
                print(f"| {kind} | {size} | {batch} | {'yes' if checkpointing else 'no'} | {peak / GB:.2f} | "
                      f"{before / GB:.2f} |", flush=True)
                if kind == "sdxl" and peak <= (args.gpu_gb - args.reserve_gb) * GB:
                    fits[checkpointing] = max(fits.get(checkpointing, 0), batch)
        del model
    errors = {}
    if not args.no_measure:
        estimated = Model("sd15", fake=True, cfg=cfg)
        for checkpointing in (False, True):
            estimated.checkpointing(checkpointing)
            peak, before = estimated.estimate(args.measure_batch, 512)
            measured = _measured(args.measure_batch, checkpointing, args.adapter)
            errors[checkpointing] = abs((peak - before) - measured) / measured
            print(f"sd15 512 px micro-batch {args.measure_batch}, checkpointing {'on' if checkpointing else 'off'}, "
                  f"on the CPU: the step adds {(peak - before) / GB:.3f} GB estimated, {measured / GB:.3f} GB measured "
                  f"(error {errors[checkpointing]:.3f})", flush=True)
    if "sdxl" in args.kinds:
        best = max(fits.values(), default=0)
        print(f"sdxl fits {args.gpu_gb:.0f} GB (less {args.reserve_gb:.0f} GB reserved) up to micro-batch "
              f"{fits.get(False, 0)} without checkpointing, {fits.get(True, 0)} with")
        print(f"sdxl_max_micro_batch_80gb={best}")
    if errors:
        print(f"estimator_error_sd15={errors[False]:.3f}")

if __name__ == "__main__":
    main()
