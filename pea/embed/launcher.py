"""Run a pea module on every rank of a LauncherSpec layout through the `deepspeed` launcher.

Shared by training (pea.train.launch) and the embed stage (pea.embed.launch), so both scale out the
same way: the command is `deepspeed --num_gpus N [--num_nodes M --hostfile H --launcher R]
[--master_addr A] [--master_port P] --module <module> ...`, run as a subprocess whose output is
streamed line by line (a Prefect task logs it with log_prints), credentials masked (pea.io.redact: DeepSpeed's
multi-node runners echo their command with every exported variable, MLflow tokens included). A failure raises LaunchError naming
the command, its exit code and the ranks' last lines. The environment is forwarded: the launcher's
local ranks inherit it; for several nodes the variables of spec.FORWARDED_ENV plus the layout's
`forward_env` are written (owner-only) to `<workdir>/.deepspeed_env`, which the launcher exports on
every node (it runs with `workdir` as its working directory); the file holds tokens, so it is removed when the
launch ends, whether it succeeded or failed (each node's launcher reads it when it starts).
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from pea.io.atomic import publish
from pea.io.redact import redact
from pea.spec import (
    FORWARDED_ENV,
    PACKAGE_ROOT,
    LanguageSpec,
    LauncherSpec,
    home,
    lake_root,
    load_spec,
)

# Set by the launcher for each rank; ours (from an in-process run) must not leak into the children.
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def thread_budget(runs_at_once: int | None = None) -> int:
    """Threads one run may use: $PEA_THREADS (e.g. a work pool's job variable) when set, else the cores this
    process may use divided by the runs allowed at once (a work pool's concurrency limit; None: one)."""
    value = os.environ.get("PEA_THREADS")
    if value is not None:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"PEA_THREADS={value!r} is not a positive integer; set it to the threads one run may "
                             "use (e.g. the cores divided by the runs at once), or unset it")
        return int(value)
    return max(1, len(os.sched_getaffinity(0)) // max(1, runs_at_once or 1))


def apply_thread_budget(threads: int) -> None:
    """This process and every process it starts (launcher ranks, workers) use at most `threads` threads: two torch
    jobs with all cores each on one machine oversubscribe it and both crawl (OpenMP teams spin)."""
    import torch

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)


class LaunchError(RuntimeError):
    """The deepspeed launcher (or a rank under it) failed; the message names the command and exit code."""


def forwarded_env(patterns: list[str]) -> dict[str, str]:
    """The variables of this environment that match FORWARDED_ENV or `patterns` (a trailing * is a prefix)."""
    wanted = [*FORWARDED_ENV, *patterns]
    return {k: v for k, v in os.environ.items() if any(fnmatch.fnmatchcase(k, p) for p in wanted)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_deepspeed_env(run_dir: Path, env: dict[str, str]) -> Path:
    """`<run_dir>/.deepspeed_env`: DeepSpeed's multi-node runners export each KEY=VALUE line of the
    .deepspeed_env in their working directory on every node. It may hold tokens (MLFLOW_TRACKING_TOKEN),
    so it is owner-only, in the owner-only run directory. Values spanning lines cannot be written."""
    path = Path(run_dir) / ".deepspeed_env"
    # Renamed in whole: under no_ssh every node writes it while another node's launcher may be reading it.
    with publish(path, "launch: .deepspeed_env") as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{k}={v}\n" for k, v in sorted(env.items()) if "\n" not in v))
    return path


def node_rank() -> int:
    """This node's index in the hostfile, for multinode_runner no_ssh: $PEA_NODE_RANK."""
    value = os.environ.get("PEA_NODE_RANK", "")
    if not value.isdigit():
        raise ValueError(f"multinode_runner no_ssh starts only this node's ranks and needs PEA_NODE_RANK (this node's "
                         f"line in the hostfile, from 0), got {value!r}; set it on every node, e.g. from a Kubernetes "
                         "indexed job's JOB_COMPLETION_INDEX")
    return int(value)


def deepspeed_command(layout: LauncherSpec, module: str, section: str) -> list[str]:
    """`deepspeed <layout's options> --module <module>`; `section` names the spec field in errors."""
    launcher = Path(sys.executable).with_name("deepspeed")  # the launcher of this environment's DeepSpeed
    command = [str(launcher) if launcher.is_file() else "deepspeed", "--num_gpus", str(layout.num_gpus)]
    if layout.hostfile is not None:
        hostfile = Path(layout.hostfile) if Path(layout.hostfile).is_absolute() else home() / layout.hostfile
        if not hostfile.is_file():
            raise FileNotFoundError(f"{section}.hostfile {hostfile} does not exist")
        command += ["--num_nodes", str(layout.num_nodes), "--hostfile", str(hostfile)]
        if layout.num_nodes > 1 and layout.multinode_runner == "no_ssh":
            command += ["--no_ssh", "--node_rank", str(node_rank())]
        elif layout.num_nodes > 1:
            command += ["--launcher", layout.multinode_runner]
    if layout.master_addr is not None:
        command += ["--master_addr", layout.master_addr]
    port = layout.master_port or (free_port() if layout.num_nodes == 1 else None)
    if port is not None:
        command += ["--master_port", str(port)]
    return [*command, "--module", module]


def rank_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every rank's entry point (`--module pea.train`, `--module pea.embed`) shares: which spec
    (a language with profiles, or the JSON a launch wrote), the pairs table, and the launcher's --local_rank."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--language", help="load data/languages/<language>.yaml (with --profile)")
    which.add_argument("--spec", type=Path, help="a validated spec as JSON (what a launch writes)")
    parser.add_argument("--profile")
    parser.add_argument("--pairs", type=Path, help="pairs table; default <lake>/<language>/pairs/pairs.parquet")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    return parser


def spec_from(args: argparse.Namespace) -> LanguageSpec:
    if args.spec is not None:
        return LanguageSpec.model_validate_json(args.spec.read_text())
    return load_spec(args.language, args.profile)


def run(command: list[str], layout: LauncherSpec, workdir: Path) -> None:
    """Run a launcher command in `workdir`, streaming its output; raise LaunchError unless it exits 0."""
    forwarded = {**forwarded_env(layout.forward_env), "PEA_HOME": str(home()), "PEA_LAKE": str(lake_root()),
                 "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)}
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.update(forwarded)
    env_file = write_deepspeed_env(workdir, forwarded) if layout.num_nodes > 1 else None
    try:
        _stream(command, layout, workdir, env)
    finally:
        if env_file is not None:  # it holds the forwarded tokens: gone once the launch ends, however it ends
            env_file.unlink(missing_ok=True)


def _stream(command: list[str], layout: LauncherSpec, workdir: Path, env: dict[str, str]) -> None:
    shown = redact(shlex.join(command))
    if layout.multinode_runner == "no_ssh" and layout.num_nodes > 1:  # this node's ranks only
        print(f"launching {layout.num_gpus} of {layout.world_size} processes: {shown}", flush=True)
    else:
        print(f"launching {layout.world_size} processes: {shown}", flush=True)
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as proc:
        try:
            for line in proc.stdout:  # streamed as it comes; the multi-node runners echo exported tokens
                line = redact(line)
                print(line, end="", flush=True)
                tail.append(line)
        except BaseException:  # interrupted or cancelled: do not leave the ranks running
            proc.terminate()
            raise
        code = proc.wait()
    if code != 0:
        raise LaunchError(f"{shown} exited with code {code}; its last lines:\n" + "".join(tail))
