"""DeepSpeed training: exact resume after kill -9, and several processes equal one with the same global batch."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pea.corpus.synthetic import all_scenes, write_pairs
from pea.embed import embed
from pea.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lake(tmp_path_factory, zoo_dir) -> Path:
    """A lake with pairs and embeddings in place, as the flow leaves it before the train stage."""
    lake = tmp_path_factory.mktemp("train-lake")
    shutil.copytree(zoo_dir, lake / "zoo")
    spec = load_spec("zh", "embedded", zoo_dir=lake / "zoo")
    pairs_dir = lake / "zh" / "pairs"
    pairs_dir.mkdir(parents=True)
    pairs = write_pairs(pairs_dir, spec, all_scenes()[:96]).rename(pairs_dir / "pairs.parquet")
    embed(spec, lake, pairs)
    return lake


def _env(lake: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PEA_LAKE": str(lake), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


STEPS = 24  # distillation steps of the runs below; the token warm start's steps come before them


def _total_steps(lake: Path) -> int:
    """Every step a run of _train_cmd takes: the warm start's and the distillation's (history and tags count both)."""
    spec = load_spec("zh", "embedded", zoo_dir=lake / "zoo")
    return spec.train.model_copy(update={"steps": STEPS}).total_steps


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "pea.train", "--language", "zh", "--profile", "embedded", "--run-dir", str(run_dir),
            "--steps", str(STEPS), "--checkpoint-every", "4", *extra]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[str]:
    """Wait for every node; as soon as one fails (its peers would wait out the 30-minute rendezvous) or the time is
    up, kill every node's process group and fail with each node's output."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = [p for p in procs if p.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            reason = "a node failed" if failed else f"not done in {timeout:.0f} s"
            pytest.fail(reason + "".join(f"\n--- node {i} (exit {p.returncode}):\n{log.read_text()[-3000:]}"
                                         for i, (p, log) in enumerate(zip(procs, logs))))
        time.sleep(0.5)
    return [log.read_text() for log in logs]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "diffusion_pytorch_model.safetensors")


# Two process layouts with the same global batch see the same rows, noise and LoRA draws; only the float reduction
# order differs, which 96 warm-start and 24 distillation steps of AdamW carry to 1.1e-5 (ZeRO-3: 2.0e-5) on one weight.
# A layout that weighs a row differently is far off: the empty caption counted once per rank moved a weight by 3.3e-2.
LAYOUT_TOLERANCE = 1e-4


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(lake, tmp_path):
    env = _env(lake)
    subprocess.run([sys.executable, *_train_cmd(tmp_path / "whole")], env=env, check=True, capture_output=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *_train_cmd(run)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while not (latest.is_file() and latest.read_text().strip() >= "step00000008"):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter").exists()  # nothing exported by the killed run
    killed_at = int(latest.read_text().strip().removeprefix("step"))
    total = _total_steps(lake)
    assert 8 <= killed_at < total

    subprocess.run([sys.executable, *_train_cmd(run)], env=env, check=True, capture_output=True)
    assert _max_diff(_adapter(run), _adapter(tmp_path / "whole")) <= 1e-6
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, total + 1))


def test_resume_skips_a_torn_latest_a_half_written_tag_and_a_corrupt_one(lake, tmp_path, capfd):
    """What a kill during DeepSpeed's save leaves (an empty `latest`, written in place; a newer tag without its
    seal, one file cut short) and what a bad disk leaves (a sealed tag whose file changed): the resume takes the
    newest intact tag, names the others, and ends equal to an uninterrupted run."""
    env = _env(lake)
    whole = tmp_path / "whole"
    subprocess.run([sys.executable, *_train_cmd(whole)], env=env, check=True, capture_output=True)
    run = tmp_path / "damaged"
    shutil.copytree(whole, run)
    shutil.rmtree(run / "adapter")
    checkpoints = run / "checkpoints"
    for tag in checkpoints.glob("step*"):  # the run as it was after step 12's save
        if int(tag.name.removeprefix("step")) > 12:
            shutil.rmtree(tag)
    half = checkpoints / "step00000016"  # the save that was killed: files copied, one cut short, never sealed
    shutil.copytree(checkpoints / "step00000012", half)
    (half / "pea-seal.json").unlink()
    biggest = max((p for p in half.rglob("*.pt")), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    corrupt = max((p for p in (checkpoints / "step00000012").rglob("*.pt")), key=lambda p: p.stat().st_size)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, wrong checksum
    corrupt.write_bytes(bytes(data))
    (checkpoints / "latest").write_text("")  # DeepSpeed's pointer, truncated by the kill

    done = subprocess.run([sys.executable, *_train_cmd(run)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "checkpoint step00000016 skipped: not sealed" in out
    assert f"checkpoint step00000012 skipped: {corrupt} does not match its checksum" in out
    assert _max_diff(_adapter(run), _adapter(whole)) <= 1e-6  # resumed from step 8, the newest intact tag
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, _total_steps(lake) + 1))


def test_two_processes_under_the_deepspeed_launcher_equal_one_with_the_same_global_batch(lake, tmp_path):
    env = _env(lake)
    launcher = Path(sys.executable).with_name("deepspeed")
    two = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "--module",
                          *_train_cmd(tmp_path / "two", "--micro-batch-size", "8", "--zero-stage", "2")[1:]],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    subprocess.run([sys.executable, *_train_cmd(tmp_path / "one", "--micro-batch-size", "16", "--zero-stage", "2")],
                   env=env, check=True, capture_output=True, timeout=600)
    import json

    config = json.loads((tmp_path / "two" / "ds_config.json").read_text())
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"]) == (16, 8)  # two ranks
    # Same rows, noise and timesteps per global-batch position; only float reduction order differs.
    assert _max_diff(_adapter(tmp_path / "two"), _adapter(tmp_path / "one")) <= LAYOUT_TOLERANCE


# --- the spec-driven launch: what the flow's train task calls -------------------------------------------------

def _spec(lake: Path, **train):
    from pea.spec import LanguageSpec

    spec = load_spec("zh", "embedded", zoo_dir=lake / "zoo")
    return LanguageSpec.model_validate({**spec.model_dump(), "train": {
        **spec.train.model_dump(), "steps": STEPS, "checkpoint_every": 12, **train}})


def _stores(spec, lake: Path):
    from pea.embed import EmbedResult, open_stores

    stores = open_stores(spec, lake)
    return EmbedResult(stores["teacher"].root, stores["student"].root, stores["latents"].root)


@pytest.fixture(scope="module")
def in_process(lake, tmp_path_factory):
    """One process, in this process (launch's path for world size 1), ZeRO-1, global batch 16."""
    from pea.train import launch

    spec = _spec(lake, micro_batch_size=16, zero_stage=1)
    result = launch(spec, lake / "zh" / "pairs" / "pairs.parquet", _stores(spec, lake),
                    tmp_path_factory.mktemp("in-process") / "run")
    return result


def _launched(lake: Path, run_dir: Path, monkeypatch, **train):
    from pea.train import launch

    monkeypatch.setenv("PEA_LAKE", str(lake))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on a small CPU
    spec = _spec(lake, micro_batch_size=8, launcher={"num_gpus": 2}, **train)
    return launch(spec, lake / "zh" / "pairs" / "pairs.parquet", _stores(spec, lake), run_dir)


def test_the_spec_launches_two_processes_that_equal_one_in_process(lake, in_process, tmp_path, monkeypatch, capsys):
    result = _launched(lake, tmp_path / "two", monkeypatch, zero_stage=2)
    out = capsys.readouterr().out
    assert "launching 2 processes: " in out and "--num_gpus 2" in out and "--module pea.train --spec" in out
    assert "adapter written to" in out  # the ranks' output was streamed through
    assert result.run_dir == (tmp_path / "two").resolve() and result.steps == _total_steps(lake) and result.resumed_from == 0
    assert (result.ds_config["train_batch_size"], result.ds_config["train_micro_batch_size_per_gpu"]) == (16, 8)
    assert result.history_path.is_file() and result.loss_curve.is_file()
    # Same tolerance as the hand-launched test above: only float reduction order differs.
    assert _max_diff(_adapter(result.run_dir), _adapter(in_process.run_dir)) <= LAYOUT_TOLERANCE


def test_zero_3_exports_the_gathered_adapter(lake, in_process, tmp_path, monkeypatch):
    """Under ZeRO-3 each of the two ranks holds half of every parameter; the export gathers them. The
    exported adapter equals the ZeRO-1 one-process run's (same seed, same global batch)."""
    import json

    result = _launched(lake, tmp_path / "zero3", monkeypatch, zero_stage=3)
    assert result.ds_config["zero_optimization"]["stage"] == 3
    config = json.loads((result.adapter_dir / "config.json").read_text())
    assert config == json.loads((in_process.adapter_dir / "config.json").read_text())
    exported, reference = _adapter(result.run_dir), _adapter(in_process.run_dir)
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in reference.items()}
    assert all(v.numel() > 0 for v in exported.values())  # a shard-only (ungathered) export would be empty
    assert _max_diff(exported, reference) <= LAYOUT_TOLERANCE


def test_a_failing_launch_names_the_command_and_its_exit_code(lake, tmp_path, monkeypatch):
    from pea.spec import LanguageSpec
    from pea.train import LaunchError, launch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = _spec(lake, micro_batch_size=8, launcher={"num_gpus": 2})
    # A missing pairs table fails before any process starts (the parent packs the shards first).
    with pytest.raises(FileNotFoundError, match="no-pairs.parquet does not exist"):
        launch(spec, tmp_path / "no-pairs.parquet", _stores(spec, lake), tmp_path / "run")
    # A teacher the ranks cannot load fails in the ranks: the launcher's exit code and their last lines.
    broken = LanguageSpec.model_validate({**spec.model_dump(), "teacher": {
        **spec.teacher.model_dump(), "id": str(tmp_path / "no-teacher")}})
    with pytest.raises(LaunchError, match=r"deepspeed --num_gpus 2 .* exited with code [1-9]") as err:
        launch(broken, lake / "zh" / "pairs" / "pairs.parquet", _stores(spec, lake), tmp_path / "run")
    assert "no-teacher" in str(err.value)  # the ranks' last lines say what went wrong


def test_multi_node_command_and_forwarded_environment(lake, tmp_path, monkeypatch):
    from pydantic import ValidationError

    from pea.train import _forwarded_env, launch_command, write_deepspeed_env

    with pytest.raises(ValidationError, match="needs a hostfile"):
        _spec(lake, launcher={"num_gpus": 8, "num_nodes": 2})
    with pytest.raises(ValidationError, match="not an environment variable name"):
        _spec(lake, launcher={"forward_env": ["NCCL_*", "BAD-NAME"]})
    with pytest.raises(ValidationError, match="num_gpus"):
        _spec(lake, launcher={"num_gpus": 0})

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=8\nnode-1 slots=8\n")
    spec = _spec(lake, launcher={"num_gpus": 8, "num_nodes": 2, "hostfile": str(hostfile), "master_addr": "node-0",
                                 "multinode_runner": "slurm", "forward_env": ["NCCL_*"]}, data={"partitions": 16})
    command = launch_command(spec, tmp_path / "pairs.parquet", _stores(spec, lake), tmp_path / "run")
    assert Path(command[0]).name == "deepspeed"
    assert command[1:13] == ["--num_gpus", "8", "--num_nodes", "2", "--hostfile", str(hostfile), "--launcher", "slurm",
                             "--master_addr", "node-0", "--module", "pea.train"]  # port: DeepSpeed's 29500
    assert spec.train.launcher.world_size == 16

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("UNRELATED", "x")
    forwarded = _forwarded_env(spec.train.launcher.forward_env)
    assert forwarded["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and forwarded["NCCL_DEBUG"] == "INFO"
    assert "UNRELATED" not in forwarded
    path = write_deepspeed_env(tmp_path, {**forwarded, "MULTI": "a\nb"})
    lines = path.read_text().splitlines()
    assert "MLFLOW_TRACKING_URI=http://mlflow:5000" in lines and "NCCL_DEBUG=INFO" in lines
    assert not any(line.startswith("MULTI=") for line in lines)
    assert path.stat().st_mode & 0o777 == 0o600


def test_two_nodes_on_loopback_launched_without_ssh_equal_one_process(lake, in_process, tmp_path):
    """Two "nodes" as a cluster starts them with DeepSpeed's --no_ssh: each runs the same launch (pea.train.launch)
    with its own PEA_NODE_RANK, against a hostfile naming this machine twice, one CPU rank each. They train the
    adapter of one process with the same global batch; the forwarded environment reaches both; each node's rank
    reads its own partition of the shards."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names: DeepSpeed keys nodes by name
    spec = _spec(lake, micro_batch_size=8, zero_stage=1, launcher={
        "num_gpus": 1, "num_nodes": 2, "hostfile": str(hostfile), "multinode_runner": "no_ssh",
        "master_addr": "127.0.0.1", "master_port": _free_port(), "forward_env": ["PEA_REHEARSAL_*"]})
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    stores = _stores(spec, lake)
    node = ("import sys; from pathlib import Path; from pea.embed import EmbedResult; from pea.spec import LanguageSpec; "
            "from pea.train import launch; spec = LanguageSpec.model_validate_json(Path(sys.argv[1]).read_text()); "
            "print('RESULT', launch(spec, Path(sys.argv[2]), EmbedResult(*map(Path, sys.argv[3:6])), Path(sys.argv[6]))"
            ".adapter_dir)")
    args = [str(tmp_path / "spec.json"), str(lake / "zh" / "pairs" / "pairs.parquet"), str(stores.teacher_store),
            str(stores.student_store), str(stores.latent_store), str(tmp_path / "run")]
    env = {**_env(lake), "PEA_REHEARSAL_SETTING": "reaches-every-node"}
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with log.open("w") as out:  # a file, not a pipe: read back whole when a node fails
            nodes.append(subprocess.Popen([sys.executable, "-c", node, *args], env={**env, "PEA_NODE_RANK": str(rank)},
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    outputs = _wait_all(nodes, logs, timeout=420)
    for rank, (proc, out) in enumerate(zip(nodes, outputs)):
        assert proc.returncode == 0, out[-3000:]
        assert f"--no_ssh --node_rank {rank}" in out and "RESULT " in out
        line = next(line for line in out.splitlines() if line.startswith(f"rank {rank}/2:"))
        assert f"partitions [{rank}] of 2" in line and "PEA_REHEARSAL_SETTING" in line
    assert _max_diff(_adapter(tmp_path / "run"), _adapter(in_process.run_dir)) <= LAYOUT_TOLERANCE
