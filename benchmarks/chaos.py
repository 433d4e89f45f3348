"""Chaos across the pipeline (issue #18): faults at random moments, N trials each, every outcome checked.

    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --trials 5              # the table in docs/reliability.md
    PYTHONPATH=. .venv/bin/python benchmarks/chaos.py --trials 1 --faults kill:embed,disk:pack

Each stage of the `pea` flow runs in a child process (`--child STAGE`) on the embedded default (zh; 60 training
steps, a checkpoint every 20, two prompts per set) in one trial folder whose path never changes, so the stage
results each child writes (pea.io.results' JSON) and MLflow's SQLite paths stay valid when a snapshot is copied
in. First an undisturbed reference run, snapshotted after every stage; then each trial copies in the snapshot
taken before its stage, does its fault, reruns the stage undisturbed, and compares with the reference:

- `kill:<stage>`: SIGKILL to the child's process group at a uniformly random moment of the stage's reference
  duration (acquire, filter, embed, pack, train, evaluate, register);
- `disk:<embed|pack|train>`: the child under a file-size limit (RLIMIT_FSIZE, as a full disk: EFBIG) too small
  for a store part, a training shard or a checkpoint: the error must say "no room" and name it;
- `corrupt:store`: one byte flipped in a teacher store part, then pack: refused by name, the part set aside,
  the rerun (embed, pack) recomputes it; `corrupt:checkpoint`: one byte flipped in the newest checkpoint of a
  finished run, whose adapter is removed: the rerun must say it skipped that tag for its checksum and resume from
  the sealed one before (its TrainResult's resumed_from), else the corruption went unseen;
- `shared:teacher`: zh and ja embed at once into the shared English teacher store (landed: both were running).

Outcomes per trial: whether the fault landed (the kill hit a running stage, the error was raised, the corruption
was detected, the embeds overlapped; a trial whose fault did not land does not pass), whether the rerun finished, whether
the result equals the reference (stores, kept rows byte for byte, shards too but their fp16 tensors within one fp16
step, chaos_checks.TENSOR_TOLERANCE; adapter and metrics within 1e-6),
partial files visible under final names, duplicate rows or model versions, temps left behind, and the error's
last line. LAST line: `chaos_ok=<trials passed>/<trials>`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

for _name, _value in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
                          PREFECT_SERVER_ANALYTICS_ENABLED="false", WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1",
                          TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
                          MLFLOW_DISABLE_TELEMETRY="true").items():
    os.environ.setdefault(_name, _value)
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

from chaos_checks import digest, inspect, same  # noqa: E402  (benchmarks/chaos_checks.py)

from pea.embed.launcher import DISTRIBUTED_ENV  # noqa: E402

STAGES = ("acquire", "filter", "embed", "pack", "train", "evaluate", "register")
FAULTS = (*(f"kill:{s}" for s in STAGES), "disk:embed", "disk:pack", "disk:train", "corrupt:store",
          "corrupt:checkpoint", "shared:teacher")
# 20 warm-start steps then 60 distillation steps: tags 20 (inside the warm start) to 80, each fault trial short.
OVERRIDES = {"train": {"steps": 60, "token_warmup": 1 / 3, "checkpoint_every": 20},
             "evaluate": {"prompts_per_set": 2, "grid_prompts": 2, "diffusion_only_baseline": False}}
FILE_LIMIT = 16 * 1024  # bytes: above every small JSON a stage writes, below a store part, a shard, a checkpoint
MARK = "chaos: start "


# --- the child: one stage --------------------------------------------------------------------------------------

def _spec(language: str, work: Path):
    from pea import ops
    from pea.spec import load_spec

    steps = int(os.environ.get("CHAOS_TRAIN_STEPS", OVERRIDES["train"]["steps"]))  # benchmarks/two_runs.py
    return ops.with_overrides(load_spec(language, "embedded", zoo_dir=work / "zoo"),
                              **{**OVERRIDES, "train": {**OVERRIDES["train"], "steps": steps}})


def run_stage(stage: str, language: str, work: Path) -> None:
    """Run one stage on the trial folder, reading the earlier stages' results and writing this one's."""
    from pea import embed, registry, train
    from pea import evaluate as evaluation
    from pea.corpus import acquire
    from pea.corpus import filter as filtering
    from pea.io import results
    from pea.io.atomic import publish
    from pea.train import shards

    spec, lake = _spec(language, work), work / "trial" / "lake"
    folder = work / "trial" / "results" / language
    folder.mkdir(parents=True, exist_ok=True)

    def load(name: str):
        return results.decode(json.loads((folder / f"{name}.json").read_text()))

    print(MARK + stage, flush=True)
    go = os.environ.get("CHAOS_GO")  # shared:teacher: begin only once every child is ready, so that their work overlaps
    while go and not Path(go).exists():
        time.sleep(0.01)
    print(f"chaos: began {time.time():.3f}", flush=True)
    if stage == "acquire":
        out = acquire.acquire(spec, lake)
    elif stage == "filter":
        out = filtering.filter_pairs(spec, lake)
    elif stage == "embed":
        out = embed.launch(spec, lake, load("filter").pairs_path)
    elif stage == "pack":
        out = shards.pack(spec, load("filter").pairs_path, load("embed"))
    elif stage == "train":
        out = train.launch(spec, load("filter").pairs_path, load("embed"), lake / language / "runs" / "chaos")
    elif stage == "evaluate":
        trained = load("train")
        out = evaluation.evaluate(spec, load("filter").pairs_path, load("embed"), trained.adapter_dir,
                                  trained.run_dir / "evaluation")
    else:
        filtered = load("filter")
        out = registry.register(spec, load("train"), load("evaluate"), [filtered.report_path], filtered.pairs_path)
    with publish(folder / f"{stage}.json", f"chaos: {stage} result") as tmp:
        tmp.write_text(json.dumps(results.encode(out)))
    print(f"chaos: ended {time.time():.3f}", flush=True)


def _span(output: str) -> tuple[float, float] | None:
    """When a child's stage began and ended (wall clock, its own lines), None if it did not end."""
    marks = dict(line.split()[1:3] for line in output.splitlines() if line.startswith(("chaos: began", "chaos: ended")))
    return (float(marks["began"]), float(marks["ended"])) if {"began", "ended"} <= set(marks) else None


# --- the parent: trials ----------------------------------------------------------------------------------------

class Child:
    """A stage in its own process group (img2dataset, DeepSpeed and DuckDB start helpers that die with it)."""

    def __init__(self, stage: str, work: Path, language: str = "zh", file_limit: int | None = None,
                 env: dict[str, str] | None = None):
        # Not the parent's torch.distributed variables: a process that trained in-process (pea.train sets RANK and
        # MASTER_PORT for its single-process group) would send the child to a port it still holds.
        inherited = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        env = {"OMP_NUM_THREADS": "1", **inherited, "PYTHONPATH": str(ROOT), "PEA_LAKE": str(work / "trial" / "lake"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'trial' / 'tracking' / 'mlflow.db'}", **(env or {})}

        def limit() -> None:  # in the child, before exec: its writes beyond the limit fail with EFBIG
            if file_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
        self.log = open(work / f"child-{stage}-{language}.log", "w")
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", stage, "--language", language,
                                      "--work", str(work)], env=env, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, start_new_session=True, preexec_fn=limit)
        self.stage, self.path = stage, Path(self.log.name)

    def started(self, timeout: float = 300) -> float:
        """Wait for the stage to begin (imports and spec done); the moment it did."""
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if line.startswith(MARK + self.stage):
                return time.monotonic()
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"{self.stage} never started: {self.tail()}")

    def kill(self) -> bool:
        """SIGKILL the whole group; True if the stage was still running (the kill landed)."""
        alive = self.proc.poll() is None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        return alive

    def finish(self) -> int:
        self.output = self.proc.stdout.read()  # what the stage printed after it began (a resume says why here)
        code = self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # helpers it left behind
        except ProcessLookupError:
            pass
        self.log.close()
        return code

    def tail(self) -> str:
        if not self.log.closed:
            self.log.flush()
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:1000] if lines else ""


def run(stage: str, work: Path, language: str = "zh", file_limit: int | None = None) -> tuple[int, float, str]:
    child = Child(stage, work, language, file_limit)
    start = child.started()
    code = child.finish()
    return code, time.monotonic() - start, child.tail()


def _trial_dir(work: Path) -> Path:
    return work / "trial"


def restore(work: Path, snapshot: str) -> None:
    shutil.rmtree(_trial_dir(work), ignore_errors=True)
    shutil.copytree(work / "snapshots" / snapshot, _trial_dir(work), symlinks=True)


def snapshot(work: Path, name: str) -> None:
    shutil.rmtree(work / "snapshots" / name, ignore_errors=True)
    shutil.copytree(_trial_dir(work), work / "snapshots" / name, symlinks=True)


def reference(work: Path) -> dict:
    """The undisturbed run: durations and digests per stage, a snapshot before each stage (and zh's and ja's
    corpora for the shared-store trial)."""
    from pea.models.embedded import prepare_zoo

    prepare_zoo(work / "zoo", image_size=32)
    shutil.rmtree(_trial_dir(work), ignore_errors=True)
    (_trial_dir(work) / "lake").mkdir(parents=True)
    ref = {"seconds": {}, "digest": {}}
    for stage in STAGES:
        snapshot(work, f"before-{stage}")
        code, seconds, tail = run(stage, work)
        if code:
            raise SystemExit(f"the reference run failed in {stage}: {tail} (log: {work}/child-{stage}-zh.log)")
        ref["seconds"][stage], ref["digest"][stage] = seconds, digest(stage, work)
        print(f"reference {stage}: {seconds:.1f} s")
    snapshot(work, "done")
    restore(work, "before-embed")
    for stage in ("acquire", "filter"):
        code, _, tail = run(stage, work, "ja")
        if code:
            raise SystemExit(f"the reference run failed in ja {stage}: {tail}")
    snapshot(work, "before-embed-zh-ja")
    return ref


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def trial(fault: str, work: Path, ref: dict, rng: random.Random) -> dict:
    kind, target = fault.split(":")
    out = {"fault": fault, "landed": True, "message": "", "rerun": False}
    if kind == "kill":
        for attempt in range(1, 6):  # a kill drawn after the stage ended did not happen: draw again
            restore(work, f"before-{target}")
            child = Child(target, work)
            begun = child.started()
            delay = rng.uniform(0, ref["seconds"][target])
            time.sleep(max(0.0, begun + delay - time.monotonic()))
            out |= {"landed": child.kill(), "at_s": round(delay, 2), "attempts": attempt}
            child.finish()
            if out["landed"]:
                break
        check = target
    elif kind == "disk":
        restore(work, f"before-{target}")
        code, _, tail = run(target, work, file_limit=FILE_LIMIT)
        named = {"embed": "store", "pack": "training shards", "train": "checkpoint"}[target]
        out["landed"] = code != 0
        out["message"] = tail
        out["clear_error"] = "no room to write" in tail and named in tail
        out["partial"] = inspect(work)["visible_partial"]
        check = target
    elif kind == "corrupt" and target == "store":
        restore(work, "before-pack")
        part = max((work / "trial" / "lake").glob("embeddings/teacher/*/part-*.parquet"), key=lambda p: p.stat().st_size)
        _flip_byte(part)
        code, _, tail = run("pack", work)
        out["landed"] = code != 0
        out["message"] = tail
        out["clear_error"] = part.name in tail and "moved aside" in tail
        code, _, tail = run("embed", work)
        if code:
            out["message"] += f" | rerun embed: {tail}"
        check = "pack"
    elif kind == "corrupt" and target == "checkpoint":
        restore(work, "before-evaluate")
        run_dir = work / "trial" / "lake" / "zh" / "runs" / "chaos"
        *earlier, newest = sorted((run_dir / "checkpoints").glob("step*"))
        _flip_byte(max((p for p in newest.rglob("*") if p.is_file() and "seal" not in p.name),
                       key=lambda p: p.stat().st_size))
        shutil.rmtree(run_dir / "adapter")
        (work / "trial" / "results" / "zh" / "train.json").unlink()
        # The corruption counts as caught only if the rerun skipped that tag, said why, and resumed from the one before.
        child = Child("train", work)
        child.started()
        code = child.finish()
        out["rerun"] = code == 0
        if code:
            out["message"] = f"rerun: {child.tail()}"
        said = [line.strip() for line in child.output.splitlines()
                if line.startswith(f"checkpoint {newest.name} skipped:") and "does not match its checksum" in line]
        resumed = _resumed_from(work) if code == 0 else None
        expected = int(earlier[-1].name.removeprefix("step")) if earlier else 0
        out |= {"landed": bool(said) and resumed == expected, "clear_error": bool(said), "resumed_from": resumed,
                "skipped": newest.name, "message": said[0] if said else out["message"]}
        facts = inspect(work)
        out["identical"] = code == 0 and same(digest("train", work), ref["digest"]["train"])
        out |= {"partial": facts["visible_partial"], "duplicates": facts["store_duplicates"] + facts["extra_versions"],
                "temps": facts["temps"]}
        return out
    else:  # shared:teacher
        restore(work, "before-embed-zh-ja")
        go = work / "go"
        go.unlink(missing_ok=True)
        children = [Child("embed", work, language, env={"CHAOS_GO": str(go)}) for language in ("zh", "ja")]
        for c in children:
            c.started()
        go.touch()  # both are loaded and waiting: they begin together, however slowly either started
        codes = [c.finish() for c in children]
        # It landed if both were embedding at once: each began before the other ended, by their own clocks' lines.
        spans = [_span(c.output) for c in children]
        out["landed"] = all(spans) and max(b for b, _ in spans) < min(e for _, e in spans)
        out["message"] = " | ".join(c.tail() for c in children if c.proc.returncode)
        out["rerun"] = all(code == 0 for code in codes)
        facts = inspect(work)
        out |= {"partial": facts["visible_partial"], "duplicates": facts["store_duplicates"],
                "temps": facts["temps"]}
        code, _, tail = run("pack", work)
        out["identical"] = code == 0 and same(digest("pack", work), ref["digest"]["pack"])
        return out
    code, _, tail = run(check, work)
    out["rerun"] = code == 0
    if code:
        out["message"] += f" | rerun: {tail}"
    facts = inspect(work)
    out["identical"] = code == 0 and same(digest(check, work), ref["digest"][check])
    out.setdefault("partial", facts["visible_partial"])
    out |= {"duplicates": facts["store_duplicates"] + facts["extra_versions"], "temps": facts["temps"]}
    return out


def _resumed_from(work: Path) -> int | None:
    """The step the last train stage resumed from (its TrainResult), None when it wrote none."""
    from pea.io import results

    path = work / "trial" / "results" / "zh" / "train.json"
    return results.decode(json.loads(path.read_text())).resumed_from if path.is_file() else None


def passed(o: dict) -> bool:
    """A trial counts only when its fault landed (a kill hit the running stage, the error was raised, the
    corruption was caught, the two embeds overlapped) and everything after it was right."""
    return (o["landed"] and o["rerun"] and o.get("identical", False) and not o.get("partial")
            and not o.get("duplicates") and o.get("clear_error", True))


def campaign(faults: list[str], trials: int, work: Path, seed: int = 0) -> list[dict]:
    """The reference run, then `trials` trials of each fault; every outcome (also printed as a JSON line)."""
    if unknown := [f for f in faults if f not in FAULTS]:
        raise ValueError(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}")
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    ref = reference(work)
    outcomes = []
    for fault in faults:
        for _ in range(trials):
            outcomes.append(trial(fault, work, ref, rng))
            print(json.dumps(outcomes[-1], ensure_ascii=False), flush=True)
    (work / "outcomes.json").write_text(json.dumps(outcomes, indent=1, ensure_ascii=False))
    return outcomes


def table(outcomes: list[dict]) -> str:
    lines = ["| fault | trials | fault landed | rerun finished | identical | partial visible | "
             "duplicates | clear error | temps left |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fault in dict.fromkeys(o["fault"] for o in outcomes):
        rows = [o for o in outcomes if o["fault"] == fault]
        count = lambda key: sum(bool(o.get(key)) for o in rows)  # noqa: E731
        clear = f"{count('clear_error')}/{len(rows)}" if any("clear_error" in o for o in rows) else "–"
        lines.append(f"| {fault} | {len(rows)} | {count('landed')} | {count('rerun')} | {count('identical')} | "
                     f"{count('partial')} | {count('duplicates')} | {clear} | {sum(o.get('temps', 0) for o in rows)} |")
    for o in outcomes:  # what detection looked like: the tag skipped, the step resumed from, the reason given
        if o["fault"] == "corrupt:checkpoint":
            lines.append(f"\ncorrupt:checkpoint: {o.get('skipped')} skipped, resumed from step {o.get('resumed_from')}: "
                         f"{o['message']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="trials per fault")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="default: a fresh folder under /tmp")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--language", default="zh", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_stage(args.child, args.language, args.work)
    started = time.perf_counter()
    work = args.work or Path(f"/tmp/pea-chaos-{os.getpid()}")
    outcomes = campaign(args.faults.split(","), args.trials, work, args.seed)
    print("\n" + table(outcomes))
    print(f"\n{(time.perf_counter() - started) / 60:.1f} min; work folder {work}")
    print(f"chaos_ok={sum(passed(o) for o in outcomes)}/{len(outcomes)}")


if __name__ == "__main__":
    main()
