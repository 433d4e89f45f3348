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


def _train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "pea.train", "--language", "zh", "--profile", "embedded", "--run-dir", str(run_dir),
            "--steps", "24", "--checkpoint-every", "4", *extra]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "diffusion_pytorch_model.safetensors")


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
    assert 8 <= killed_at < 24

    subprocess.run([sys.executable, *_train_cmd(run)], env=env, check=True, capture_output=True)
    assert _max_diff(_adapter(run), _adapter(tmp_path / "whole")) <= 1e-6
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))


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
    assert _max_diff(_adapter(tmp_path / "two"), _adapter(tmp_path / "one")) <= 1e-5
