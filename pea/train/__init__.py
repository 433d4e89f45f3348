"""Distil a PEA adapter through a DeepSpeed engine. Only the adapter is trainable: the UNet is loaded
frozen (requires_grad off, eval mode), never handed to the engine, so it is neither in the optimizer
nor in any checkpoint.

    launch(spec, pairs_path, embedded, run_dir) -> TrainResult     # what the flow's train task calls

The spec's `train.launcher` decides the layout. One process (the default) trains inside the calling
process (DeepSpeed on CPU uses gloo). More processes run under the `deepspeed` launcher as a
subprocess whose output is streamed; the spec (overrides included) goes to `<run_dir>/spec.json` and
every rank runs

    deepspeed --num_gpus N [--num_nodes M --hostfile H] [--master_addr A] --master_port P \
        --module pea.train --spec <run_dir>/spec.json --run-dir <run_dir> --pairs <pairs.parquet> \
        --stores <teacher store> <student store> <latent store> --pack <the pack launch made>

then the TrainResult is read back from `<run_dir>/train_result.json` (written by rank 0). The launch
itself is pea.embed.launcher's, shared with the embed stage: a failure raises LaunchError naming the command
and its exit code. The environment is forwarded: the
launcher's local ranks inherit it; for several nodes the variables of spec.FORWARDED_ENV plus
`train.launcher.forward_env` are written (owner-only) to `<run_dir>/.deepspeed_env`, which the
launcher exports on every node (it runs with the run directory as its working directory).

On a cluster, the same spec section, e.g. in data/languages/zh.yaml:
    train: {launcher: {num_gpus: 8, num_nodes: 2, hostfile: /etc/pea/hostfile, master_addr: node-0}}
(hostfile lines `node-0 slots=8`, passwordless ssh between nodes for DeepSpeed's default pdsh runner;
the checkout, the lake and the run directory must be at the same paths on every node, e.g. a shared
volume). By hand, without the flow (one node, or add --num_nodes/--hostfile as above):
    deepspeed --num_gpus 8 --module pea.train --language zh --run-dir data/lake/zh/runs/manual
    python -m pea.train --language zh --profile embedded --run-dir data/lake/zh/runs/manual   # one process
A run directory resumes from its latest checkpoint; batches, noise and timesteps are drawn from
generators seeded by (seed, step), so a resumed run sees the same data as an uninterrupted one, and
each rank reads its own slice of every shuffled batch sequence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pea import models
from pea.embed import EmbedResult, launcher, open_stores
from pea.embed.launcher import LaunchError, deepspeed_command, write_deepspeed_env  # noqa: F401 (part of this API)
from pea.embed.launcher import forwarded_env as _forwarded_env  # noqa: F401 (kept for callers of the old name)
from pea.embed.launcher import free_port as _free_port
from pea.io import progress
from pea.io.atomic import is_no_room, no_room, publish
from pea.method.adapter import PEAAdapter
from pea.method.distill import Conditioning, distill_loss, sdxl_time_ids, token_fit_loss
from pea.method.perturb import RandomLoRA
from pea.spec import LanguageSpec, TrainSpec, home, lake_root
from pea.train import checkpoints as checkpoints_lib
from pea.train.reader import ShardStream
from pea.train.shards import Packed, pack


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    resumed_from: int
    final_loss: float
    samples_per_s: float
    history_path: Path
    loss_curve: Path
    ds_config: dict

    def write(self, path: Path) -> None:
        """As JSON (temp file, then rename): how a launched run hands its result back."""
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        with publish(path, "train: result") as tmp:
            tmp.write_text(json.dumps(fields, indent=2))

    @classmethod
    def read(cls, path: Path) -> TrainResult:
        fields = json.loads(Path(path).read_text())
        paths = {f.name for f in dataclasses.fields(cls) if f.type in ("Path", Path)}
        return cls(**{k: Path(v) if k in paths else v for k, v in fields.items()})


RESULT_FILE = "train_result.json"


PRECISIONS = models.PRECISIONS


def ds_config(cfg: TrainSpec, world_size: int = 1) -> dict:
    """The DeepSpeed config for a spec's training section (the reference defaults live in TrainSpec)."""
    return {
        "train_batch_size": cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16"},
        "gradient_clipping": 1.0,
        # We hand DeepSpeed torch's AdamW (weight decay applied, unlike the reference) instead of
        # compiling FusedAdam; ZeRO accepts it with this flag.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _single_process_env() -> None:
    """Without the `deepspeed` launcher DeepSpeed needs the torch.distributed variables set."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def _draws(cfg: TrainSpec, micro_step: int, positions: range, latent_shape: torch.Size, timesteps: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise, timestep and caption-dropout draw of each sample, from a generator seeded by (seed,
    micro-step, position in the global batch): the same whatever the process layout or a resume."""
    noise, steps, drop = [], [], []
    for position in positions:
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + micro_step) * 65_537 + position)
        n = torch.randn(latent_shape, generator=g)
        if cfg.noise_offset:  # one draw per channel, broadcast over pixels (the SDXL reference's offset)
            n = n + cfg.noise_offset * torch.randn(latent_shape[0], 1, 1, generator=g)
        noise.append(n)
        steps.append(torch.randint(0, timesteps, (1,), generator=g))
        drop.append(torch.rand(1, generator=g) < cfg.caption_dropout)
    return torch.stack(noise), torch.cat(steps), torch.cat(drop)[:, None, None]


def build_adapter(cfg: TrainSpec, kind: str, shapes: dict[str, tuple[int, ...]]) -> PEAAdapter:
    """The adapter a training section asks for, for the stores' tensor shapes ({"student": (L, d), "teacher":
    (T, width)[, "teacher_pooled": (pooled,)]})."""
    mixer = {"student_tokens": shapes["student"][0], "output_tokens": shapes["teacher"][0]} \
        if cfg.adapter_tokens == "teacher" else {}
    if cfg.token_mixer == "attention":
        mixer["mixer_heads"] = cfg.heads_for(shapes["teacher"][-1])
    return PEAAdapter(kind=kind, student_dim=shapes["student"][-1], hidden_dim=cfg.hidden_dim,
                      token_dim=shapes["teacher"][-1], pooled_dim=shapes.get("teacher_pooled", (None,))[-1], **mixer)


def _loss_curve(history: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for name in ("loss", "output_kd", "feature_kd", "token_kd"):
        ax.plot(steps, [h.get(name, float("nan")) for h in history], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    ax.set_title("PEA distillation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _export(engine, zero_stage: int, run_dir: Path, adapter_dir: Path) -> None:
    """Write the final adapter as config + fp32 safetensors (temp dir, then rename). Under ZeRO-3 each
    rank holds a shard of every parameter, so they are gathered first (all ranks take part)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        if engine.global_rank == 0:
            state = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    if engine.global_rank != 0:
        return
    adapter = PEAAdapter.from_config(engine.module.config)
    adapter.load_state_dict(state)
    shutil.rmtree(adapter_dir, ignore_errors=True)  # a folder is renamed in only where none is
    with publish(adapter_dir, "train: adapter") as staging:
        adapter.save_pretrained(staging, safe_serialization=True)


def train(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, run_dir: Path,
          packed: Packed | None = None) -> TrainResult:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(home() / ".cache" / "torch_extensions"))
    _single_process_env()
    # DeepSpeed picks its accelerator once, at import (DS_ACCELERATOR, else whatever it detects): name the
    # kind pea.models.device() chose, so PEA_DEVICE=cpu keeps training off a GPU that is present.
    os.environ.setdefault("DS_ACCELERATOR", models.device().type)
    import deepspeed  # after the environment: it reads both at import and initialize
    from transformers import get_polynomial_decay_schedule_with_warmup

    cfg = spec.train
    run_dir = Path(run_dir)
    # DeepSpeed unpickles its own checkpoints (torch.load with weights_only=False): it only ever reads
    # them from this run directory, created owner-only and checked before anything else (pea.train.checkpoints): a run
    # directory someone else could write is refused before any work is done.
    checkpoints_lib.run_directory(run_dir)
    checkpoints_lib.check_private(run_dir)
    # A rank opens the pack its launcher made (`packed`, from --pack): nothing is scanned or packed again. Without
    # one (in-process training) the pack is made or found here, its fingerprint scanned once per process.
    shards = (packed or pack(spec, pairs_path, embedded)).train
    shapes = {name: shape for name, (shape, _) in shards.tensors.items()}
    # Under bf16/fp16 the frozen UNet is held in that precision too, as diffusers' training examples hold their
    # frozen models: it is nearly all of a step's FLOPs, and in fp32 it would run on a GPU's slowest path.
    unet = models.load_unet(spec.teacher, PRECISIONS[cfg.precision])
    noise_scheduler = models.load_noise_scheduler(spec.teacher)
    if shapes["teacher"][-1] != unet.config.cross_attention_dim:
        raise ValueError(f"teacher conditioning width {shapes['teacher'][-1]} does not match the UNet's "
                         f"cross_attention_dim {unet.config.cross_attention_dim}; re-embed with this teacher")

    torch.manual_seed(cfg.seed)  # the untrained baseline in pea.evaluate starts from this same init
    adapter = build_adapter(cfg, spec.teacher.kind, shapes)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    schedule = get_polynomial_decay_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.total_steps,
                                                         lr_end=cfg.min_lr, power=1.0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = ds_config(cfg, world)
    engine, _, _, _ = deepspeed.initialize(model=adapter, optimizer=optimizer, lr_scheduler=schedule, config=config)
    dtype = next(engine.module.parameters()).dtype
    # DeepSpeed put the adapter on this rank's accelerator; the frozen UNet joins it there. The reader keeps its
    # windows in host memory and each micro-batch is copied over.
    device = engine.device
    unet.to(device)
    # Plug-and-play training (spec train.perturbation, off by default): some steps run under a random LoRA.
    perturbation = RandomLoRA(unet, cfg.perturbation, cfg.seed) if cfg.perturbation.share > 0 else None
    empty = {name: tensor.to(device) for name, tensor in shards.empty().items()}
    # The warm start's row weights: a micro-batch (the reader's are always whole) and the empty caption, which every
    # rank adds, at 1/world each (pea.method.distill.token_fit_loss).
    fit_weight = torch.tensor([1.0] * cfg.micro_batch_size + [1.0 / world], device=device)

    checkpoints = run_dir / "checkpoints"
    history_path = run_dir / "history.jsonl"
    start = 0
    tag = checkpoints_lib.newest_intact(checkpoints) if checkpoints.is_dir() else None
    if tag is not None:
        # Our own run directory: the newest sealed, intact tag of this run or its interrupted start (not `latest`,
        # which DeepSpeed writes in place and a kill can leave empty).
        _, client = engine.load_checkpoint(str(checkpoints), tag=tag)
        start = int(client["step"])
    history = [h for h in (json.loads(line) for line in history_path.read_text().splitlines())
               if h["step"] <= start] if history_path.is_file() and start else []

    data = ShardStream(shards, cfg.micro_batch_size, cfg.seed, engine.global_rank, world, cfg.partitions_for(world),
                       cfg.data.shuffle_row_groups, cfg.data.prefetch)
    # Where this rank's rows sit in the global batch: one process with the same global batch sees the same rows
    # at the same positions, so per-position random draws match across layouts.
    positions = range(engine.global_rank * cfg.micro_batch_size, (engine.global_rank + 1) * cfg.micro_batch_size)
    if world > 1:  # what each rank reads and which settings reached it (names only: values may be secrets)
        print(f"rank {engine.global_rank}/{world}: partitions {list(data.mine)} of {data.partitions}; environment "
              f"{sorted(launcher.forwarded_env(cfg.launcher.forward_env))}", flush=True)
    size = spec.corpus.image_size
    time_ids = sdxl_time_ids(size, size, cfg.micro_batch_size).to(device) if spec.teacher.kind == "sdxl" else None
    accum = cfg.gradient_accumulation_steps
    bar = progress.bar(range(start, cfg.total_steps), desc="train adapter", unit="step", initial=start,
                       total=cfg.total_steps,
                       disable=engine.global_rank != 0)
    tick, seen = time.perf_counter(), 0
    for step in bar:
        step_started = time.perf_counter()
        for micro in range(accum):
            i = step * accum + micro
            batch = data.batch(i)
            # The adapter sees the empty caption as one extra row of the same batch.
            states = torch.cat([batch.student.to(device, torch.float32), empty["student"][None]]).to(dtype)
            tokens, pooled = engine(states)
            teacher_tokens = batch.teacher.to(device, torch.float32)
            teacher_pooled = None if batch.teacher_pooled is None else batch.teacher_pooled.to(device, torch.float32)
            if step < cfg.fitting_steps:  # the warm start: the context regressed on the teacher's, "" included; no UNet
                terms = token_fit_loss(Conditioning(tokens, None if pooled is None else pooled[:-1]),
                                       Conditioning(torch.cat([teacher_tokens, empty["teacher"][None]]), teacher_pooled),
                                       torch.cat([batch.native, torch.zeros(1, dtype=batch.native.dtype)]).to(device),
                                       fit_weight)
                engine.backward(terms.total)
                engine.step()
                seen += len(batch)
                continue
            latents = batch.latents.to(device, torch.float32)
            # Drawn on the host from seeded generators, so every device and process layout sees the same draws.
            noise, timesteps, drop = (t.to(device) for t in _draws(cfg, i, positions, latents.shape[1:],
                                                                   noise_scheduler.config.num_train_timesteps))
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            # Caption dropout swaps the token context for that of "" on both sides; the pooled vector is
            # kept (METHOD.md).
            student = Conditioning(torch.where(drop, tokens[-1:], tokens[:-1]),
                                   None if pooled is None else pooled[:-1], time_ids)
            teacher = Conditioning(torch.where(drop, empty["teacher"], teacher_tokens), teacher_pooled, time_ids)
            if perturbation is not None:  # drawn per micro-step: teacher and student passes see the same UNet
                perturbation.draw(i)
            # The diffusion loss's target is what the teacher predicts: ε (SD 1.5, SDXL) or v (v-prediction).
            target = (noise if noise_scheduler.config.prediction_type == "epsilon"
                      else noise_scheduler.get_velocity(latents, noise, timesteps))
            terms = distill_loss(unet, noisy, timesteps, target, teacher, student, batch.native.to(device),
                                 cfg.output_kd_weight, cfg.feature_kd_weight, cfg.diffusion_loss == "all",
                                 0.0 if cfg.diffusion_loss == "none" else cfg.native_loss_weight, cfg.token_kd_weight)
            engine.backward(terms.total)
            engine.step()
            seen += len(batch)
        record = {"step": step + 1, "loss": float(terms.total.detach()), **{k: v for k, v in terms.floats().items()
                  if k != "total"}, "lr": schedule.get_last_lr()[0],
                  "samples_per_s": seen * world / (time.perf_counter() - tick),
                  "step_s": time.perf_counter() - step_started}
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)  # shown at the bar's own pace
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.total_steps:
            # History first: a kill between the two leaves extra lines, which a resume drops (step > start);
            # the other order could leave a checkpoint whose steps the history lacks.
            if engine.global_rank == 0:
                with publish(history_path, "train: loss history") as tmp:
                    tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
            tag = checkpoints / f"step{step + 1:08d}"
            try:
                engine.save_checkpoint(str(checkpoints), tag=tag.name, client_state={"step": step + 1})
            except (OSError, RuntimeError) as err:  # DeepSpeed's torch.save: 'file write failed', no errno
                if is_no_room(err):  # unsealed, no resume would take it; removed so nothing partial stays
                    shutil.rmtree(tag, ignore_errors=True)
                    raise no_room("train: checkpoint", tag, err) from err
                raise
            if engine.global_rank == 0:  # save_checkpoint ended with a barrier: every rank's files are written
                checkpoints_lib.seal(tag)

    data.close()
    adapter_dir = run_dir / "adapter"
    _export(engine, cfg.zero_stage, run_dir, adapter_dir)
    if engine.global_rank == 0:
        with open(run_dir / "ds_config.json", "w") as f:
            json.dump(config, f, indent=2)
    recent = history[-20:]
    result = TrainResult(run_dir, adapter_dir, cfg.total_steps, start,
                         final_loss=sum(h["loss"] for h in recent) / len(recent),
                         samples_per_s=recent[-1]["samples_per_s"], history_path=history_path,
                         loss_curve=run_dir / "loss.png", ds_config=config)
    if engine.global_rank == 0:
        _loss_curve(history, result.loss_curve)
        result.write(run_dir / RESULT_FILE)
    return result


def launch_command(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, run_dir: Path,
                   packed: Packed | None = None) -> list[str]:
    """The `deepspeed` command line that trains `spec` with its train.launcher layout into `run_dir`; with `packed`,
    every rank opens that pack (--pack) instead of fingerprinting the pairs and looking for it."""
    return [*deepspeed_command(spec.train.launcher, "pea.train", "train.launcher"),
            "--spec", str(Path(run_dir) / "spec.json"), "--run-dir", str(run_dir), "--pairs", str(pairs_path),
            "--stores", str(embedded.teacher_store), str(embedded.student_store), str(embedded.latent_store),
            *(["--pack", str(packed.root)] if packed is not None else [])]


def launch(spec: LanguageSpec, pairs_path: Path, embedded: EmbedResult, run_dir: Path) -> TrainResult:
    """Train with the spec's process layout: in this process for one, under the deepspeed launcher otherwise."""
    layout = spec.train.launcher
    if layout.world_size == 1:
        return train(spec, pairs_path, embedded, run_dir)
    run_dir = Path(run_dir).resolve()
    checkpoints_lib.run_directory(run_dir)  # see train(): DeepSpeed unpickles what is in here
    packed = pack(spec, pairs_path, embedded)  # once, here; the ranks open it (--pack) rather than repack or rescan
    command = launch_command(spec, Path(pairs_path).resolve(), embedded, run_dir, packed)
    with publish(run_dir / "spec.json", "train: launch spec") as tmp:  # a temp name of its own: no_ssh nodes race here
        tmp.write_text(spec.model_dump_json(indent=2))
    if "--no_ssh" not in command or not launcher.node_rank():  # node 0 clears it; the others wait for it below
        (run_dir / RESULT_FILE).unlink(missing_ok=True)  # only a result this launch writes counts

    launcher.run(command, layout, run_dir)
    # Rank 0 writes the result; under no_ssh another node's launch ends as soon as its own ranks do, so it waits
    # for rank 0's file in the run directory every node shares.
    deadline = time.monotonic() + (120 if "--no_ssh" in command and launcher.node_rank() else 0)
    while not (run_dir / RESULT_FILE).is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not (run_dir / RESULT_FILE).is_file():
        raise LaunchError(f"{shlex.join(command)} exited with code 0 but wrote no {run_dir / RESULT_FILE} (under "
                          "no_ssh every node must see the same run directory, e.g. a shared volume)")
    return TrainResult.read(run_dir / RESULT_FILE)


def main(argv: list[str] | None = None) -> None:
    parser = launcher.rank_parser(__doc__)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--stores", type=Path, nargs=3, metavar=("TEACHER", "STUDENT", "LATENTS"),
                        help="embedding stores; default the spec's stores in the lake")
    parser.add_argument("--steps", type=int, help="override train.steps")
    parser.add_argument("--micro-batch-size", type=int, help="override train.micro_batch_size (per process)")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], help="override train.zero_stage")
    parser.add_argument("--checkpoint-every", type=int, help="override train.checkpoint_every")
    parser.add_argument("--pack", help="the pack the launcher made (its root): opened, not made or looked for")
    args = parser.parse_args(argv)
    spec = launcher.spec_from(args)
    overrides = {name: value for name, value in {
        "steps": args.steps, "micro_batch_size": args.micro_batch_size, "zero_stage": args.zero_stage,
        "checkpoint_every": args.checkpoint_every}.items() if value is not None}
    if overrides:  # through validation, so a bad override is refused like a bad spec
        spec = LanguageSpec.model_validate({**spec.model_dump(), "train": {**spec.train.model_dump(), **overrides}})
    lake = lake_root()
    if args.stores is not None:
        embedded = EmbedResult(*args.stores)
    else:
        stores = open_stores(spec, lake)
        embedded = EmbedResult(stores["teacher"].root, stores["student"].root, stores["latents"].root)
    pairs = args.pairs or lake / spec.language / "pairs" / "pairs.parquet"
    result = train(spec, pairs, embedded, args.run_dir, Packed.open(args.pack) if args.pack else None)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"adapter written to {result.adapter_dir} (final loss {result.final_loss:.4f})")

