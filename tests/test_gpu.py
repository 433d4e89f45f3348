"""On a CUDA device the stages run there (PEA_DEVICE unset: pea.models.device() picks the GPU; that choice is
tested in test_models.py) and agree with the CPU. Skipped where torch sees no GPU, as in CI; run on a GPU machine
with `pytest tests/test_gpu.py -s`.

TF32 is switched off on both sides (NVIDIA_TF32_OVERRIDE=0 for subprocesses, the torch flags in this one), so
what is left between the devices is summation order."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pea.corpus.synthetic import all_scenes, write_pairs
from pea.embed import STORE_DTYPES, EmbedResult, embed, open_stores
from pea.spec import load_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _no_tf32():
    """Module-wide, so that it covers the module-scoped `lakes` (embedding) as well as the tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        patch.setattr(torch.backends.cudnn, "allow_tf32", False)
        yield


@pytest.fixture(scope="module")
def lakes(tmp_path_factory, zoo_dir) -> dict[str, Path]:
    """One lake per device, each embedded on that device from the same pairs."""
    lakes = {}
    for device in ("cpu", "cuda"):
        lake = tmp_path_factory.mktemp(f"lake-{device}")
        shutil.copytree(zoo_dir, lake / "zoo")
        spec = load_spec("zh", "embedded", zoo_dir=lake / "zoo")
        pairs_dir = lake / "zh" / "pairs"
        pairs_dir.mkdir(parents=True)
        pairs = write_pairs(pairs_dir, spec, all_scenes()[:96]).rename(pairs_dir / "pairs.parquet")
        os.environ["PEA_DEVICE"] = device
        try:
            embed(spec, lake, pairs)
        finally:
            del os.environ["PEA_DEVICE"]
        lakes[device] = lake
    return lakes


def test_embedding_on_the_gpu_stores_what_the_cpu_stores(lakes):
    # Each lake's spec names its own copy of the zoo (model keys hold the path), so each opens its own stores.
    stores = {d: open_stores(load_spec("zh", "embedded", zoo_dir=lake / "zoo"), lake) for d, lake in lakes.items()}
    spec = load_spec("zh", "embedded", zoo_dir=lakes["cpu"] / "zoo")
    for name in ("teacher", "student", "latents"):
        cpu, gpu = stores["cpu"][name], stores["cuda"][name]
        hashes = sorted(cpu.hashes())
        assert hashes == sorted(gpu.hashes())
        a, b = cpu.read(hashes), gpu.read(hashes)
        for key in a:
            diff = float((a[key].float() - b[key].float()).abs().max())
            # The stores keep the spec's 16-bit dtype: allow two of its units in the last place of the largest value.
            ulp = torch.finfo(STORE_DTYPES[spec.embed.dtype]).eps * float(a[key].float().abs().max())
            print(f"{name}.{key}: max |cpu - cuda| = {diff:.2e} (2 ulp = {2 * ulp:.2e})")
            assert diff <= 2 * ulp, f"{name}.{key} differs by {diff}"


def _train(lake: Path, run_dir: Path, device: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env |= {"PEA_LAKE": str(lake), "PYTHONPATH": path, "PEA_DEVICE": device, "NVIDIA_TF32_OVERRIDE": "0"}
    subprocess.run([sys.executable, "-m", "pea.train", "--language", "zh", "--profile", "embedded", "--run-dir",
                    str(run_dir), "--steps", "40"], env=env, check=True)
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_training_on_the_gpu_follows_the_cpu_and_evaluation_agrees_across_devices(lakes, tmp_path, monkeypatch):
    from pea.evaluate import evaluate

    # Both from the same stores (the CPU's), so only the device differs.
    histories = {d: _train(lakes["cpu"], tmp_path / d, d) for d in ("cpu", "cuda")}
    cpu, gpu = ([h["loss"] for h in histories[d]] for d in ("cpu", "cuda"))
    assert len(cpu) == len(gpu) == 40
    worst = max(abs(a - b) / abs(a) for a, b in zip(cpu, gpu))
    print(f"loss over 40 steps: cpu {cpu[0]:.4f} -> {cpu[-1]:.4f}, cuda {gpu[0]:.4f} -> {gpu[-1]:.4f}, "
          f"worst relative difference {worst:.2e}")
    assert worst <= 1e-2

    # The GPU-trained adapter, evaluated on each device from the same stores.
    spec = load_spec("zh", "embedded", zoo_dir=lakes["cpu"] / "zoo")
    stores = open_stores(spec, lakes["cpu"])
    embedded = EmbedResult(stores["teacher"].root, stores["student"].root, stores["latents"].root, {}, {}, 0.0)
    pairs = lakes["cpu"] / "zh" / "pairs" / "pairs.parquet"
    results = {}
    for device in ("cpu", "cuda"):
        monkeypatch.setenv("PEA_DEVICE", device)
        results[device] = evaluate(spec, pairs, embedded, tmp_path / "cuda" / "adapter", tmp_path / f"eval-{device}")
    for system, value in results["cpu"].relative_error.items():
        other = results["cuda"].relative_error[system]
        print(f"relative error {system}: cpu {value:.6f} cuda {other:.6f}")
        assert other == pytest.approx(value, rel=1e-3)
    assert results["cuda"].relative_error["trained"] < 0.5 * results["cuda"].relative_error["untrained"]  # it learned
    grids = [np.asarray(Image.open(r.grid), np.float32) / 255 for r in results.values()]
    mse = float(np.mean((grids[0] - grids[1]) ** 2))
    print(f"grid pixels, mean squared difference cpu vs cuda: {mse:.2e}")
    assert mse <= 1e-3
