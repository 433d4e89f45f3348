"""The full-size rehearsal on the CPU (issues #17, #33): the pea flow's stages with the real architectures.

Builds once (pea.models.fullsize, random weights, fp16 files in `--models-dir`, default <lake>/zoo/full) the SD 1.5
pipeline and the language's student at full size, then runs the stages the `pea` flow runs, in this process,
on the profile `fullsize` merged on the language spec (data/profiles/fullsize.yaml) in a fresh temporary lake:
acquire (the synthetic corpus over 127.0.0.1, image_size 512), filter, embed, pack, train (DeepSpeed, the spec's
bf16 on the CPU, or fp32 on a CPU without fast bf16: `bf16_is_fast`), evaluate (held-out pairs, one grid row), register (MLflow on SQLite in the temp dir), and
`pea generate` of one image. Prints seconds and peak RSS (this process and its children, sampled) per stage and
the bytes per pair of each store; LAST line `full_size_ok=<models> peak_rss_gb=<x>` (aim for sd15,sdxl: ≤ 22).

    python benchmarks/full_size.py [--language zh] [--models sd15[,sdxl]] [--pairs 12] [--steps 2]
                                   [--sdxl-image-size 512]
    python benchmarks/full_size.py --tiny --models sd15,sdxl        # every path with the embedded zoo (a smoke test)

`sdxl` stacks data/profiles/fullsize-sdxl.yaml: SDXL base's real architecture, weight shapes and both tokenizers
(random values, ≈ 7 GB of fp16 files to build, ≈ 14 GB of RSS while building) in the spec's bf16, at
--sdxl-image-size (default 512 px: 64×64 latents; SDXL's own 1024 px did not fit this machine's memory and time
beside other work; benchmarks/memory_model.py sizes it for a GPU). `--tiny` runs the same stages on the embedded
profile's tiny models ("embedded", "embedded,sdxl"): what the script does, not what full size costs.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

for _name, _value in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
                          PREFECT_SERVER_ANALYTICS_ENABLED="false", WANDB_MODE="disabled",
                          NO_ALBUMENTATIONS_UPDATE="1", TOKENIZERS_PARALLELISM="false",
                          TRANSFORMERS_VERBOSITY="error").items():
    os.environ.setdefault(_name, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

GB = 1024 ** 3


class Meter:
    """Seconds and peak RSS (this process + its children, sampled every 0.1 s) of each stage."""

    def __init__(self):
        self.stages: dict[str, tuple[float, float]] = {}
        self._peak = 0

    def _rss(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    @contextmanager
    def stage(self, name: str):
        self._peak, done = self._rss(), threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                self._peak = max(self._peak, self._rss())
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            self.stages[name] = (time.perf_counter() - start, max(self._peak, self._rss()) / GB)
            print(f"{name:10} {self.stages[name][0]:8.1f} s   peak RSS {self.stages[name][1]:6.2f} GB", flush=True)

    @property
    def peak_gb(self) -> float:
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # KiB on Linux
        return max([lifetime, *(rss for _, rss in self.stages.values())])


def store_report(embedded) -> dict[str, dict]:
    """Per store: rows, bytes per row on disk and each tensor's shape (read back from one row)."""
    from pea.embed.store import TensorStore

    report = {}
    for name, root in (("teacher", embedded.teacher_store), ("student", embedded.student_store),
                       ("latents", embedded.latent_store)):
        store = TensorStore.open(root)
        hashes = sorted(store.hashes())
        size = sum(Path(p).stat().st_size for p in store.parts())
        shapes = {k: tuple(v.shape[1:]) for k, v in store.read(hashes[:1]).items()}
        report[name] = {"rows": len(hashes), "bytes_per_row": size / max(len(hashes), 1), "shapes": shapes,
                        "dtype": store.dtype}
    return report


def bf16_is_fast() -> bool:
    """bf16 runs on a fast path here: a GPU, or a CPU whose oneDNN has bf16 kernels (AVX-512 BF16/AMX or emulated)."""
    import torch

    from pea.models import cpu_bf16_is_fast

    return torch.cuda.is_available() or cpu_bf16_is_fast()


def rehearse(language: str = "zh", kind: str = "sd15", pairs: int = 12, steps: int = 2, work: Path | None = None,
             models_dir: Path | None = None, meter: Meter | None = None, evaluate: dict | None = None,
             image_size: int | None = None, tiny: bool = False) -> dict:
    """Every stage once on full-size models; returns shapes, figures and the generated image's path. `evaluate`:
    fields over the profile's evaluate section (the test draws without guidance, see tests/test_fullsize.py);
    `image_size` overrides the profile's resolution; `tiny` takes the embedded zoo's models instead."""
    from pea.models import fullsize
    from pea.ops import with_overrides
    from pea.spec import SyntheticCorpus, load_spec

    meter = meter or Meter()
    work = Path(work or tempfile.mkdtemp(prefix="pea-fullsize-"))
    models_dir = Path(models_dir or fullsize.root())
    if tiny:
        profile = "embedded" + (",sdxl" if kind == "sdxl" else "")
        spec = load_spec(language, profile, zoo_dir=models_dir)
    else:
        profile = "fullsize" + (",fullsize-sdxl" if kind == "sdxl" else "")
        spec = load_spec(language, profile, zoo_dir=models_dir.parent)
    train_overrides: dict = {"steps": steps}
    if tiny:  # the fullsize profile's small-run settings over the embedded profile's
        train_overrides |= {"warmup_steps": 0, "checkpoint_every": 1000, "micro_batch_size": 2,
                            "data": {"row_group_rows": 4, "partitions": 1, "shuffle_row_groups": 2}}
        evaluate = {"heldout_percent": 25, "heldout_rows": 2, "timesteps": [500], "grid_prompts": 1,
                    "inference_steps": 2, "linear_map_rows": 16, "prompt_sets": [], **(evaluate or {})}
    if spec.train.precision == "bf16" and not bf16_is_fast():
        # A CPU without AVX-512 runs bf16 matmuls and convolutions on a slow fallback: one SD 1.5 UNet forward at
        # 512 px did not finish in 10 min on an AMD EPYC with AVX2 only, against 27 s in fp32. Rehearse in fp32
        # there (the GPU run keeps the spec's bf16) and say so.
        train_overrides["precision"] = "fp32"
        print("full_size: this CPU has no fast bf16 (no AVX-512): training in fp32 instead of the spec's bf16")
    corpus = {"synthetic": SyntheticCorpus(size=pairs, seed=0), **({"image_size": image_size} if image_size else {})}
    spec = with_overrides(spec, corpus=corpus, train=train_overrides, evaluate=evaluate or {})
    lake = work / "lake"
    (work / "tracking").mkdir(parents=True, exist_ok=True)
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "PEA_LAKE")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/tracking/mlflow.db"
    try:
        return _stages(spec, profile, lake, models_dir, meter, work)
    finally:  # the caller's environment as it was (the test shares its process with other tests)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _stages(spec, profile: str, lake: Path, models_dir: Path, meter: Meter, work: Path) -> dict:
    import pyarrow.parquet as pq

    from pea import embed, registry, train
    from pea import evaluate as evaluate_stage
    from pea.cli import main as pea_cli
    from pea.corpus import acquire
    from pea.corpus import filter as filter_stage
    from pea.models import fullsize
    from pea.train import shards

    language = spec.language

    with meter.stage("build"):
        if "embedded" in profile:
            from pea.models.embedded import prepare_zoo

            prepare_zoo(models_dir, image_size=spec.corpus.image_size)
        else:
            fullsize.build([Path(spec.teacher.id).name, Path(spec.student.id).name], models_dir)
    with meter.stage("acquire"):
        acquired = acquire.acquire(spec, lake)
    with meter.stage("filter"):
        filtered = filter_stage.filter_pairs(spec, lake)
    with meter.stage("embed"):
        embedded = embed.launch(spec, lake, filtered.pairs_path)
    with meter.stage("pack"):
        packed = shards.pack(spec, filtered.pairs_path, embedded)
    with meter.stage("train"):
        trained = train.launch(spec, filtered.pairs_path, embedded, lake / language / "runs" / "rehearsal")
    with meter.stage("evaluate"):
        evaluation = evaluate_stage.evaluate(spec, filtered.pairs_path, embedded, trained.adapter_dir,
                                             trained.run_dir / "evaluation")
    with meter.stage("register"):
        registered = registry.register(spec, trained, evaluation, [filtered.report_path], filtered.pairs_path)
    image = work / "generated.png"
    prompt = pq.read_table(filtered.pairs_path, columns=["caption"]).column("caption")[0].as_py()
    with meter.stage("generate"):
        os.environ["PEA_LAKE"] = str(lake)  # the version records its models and settings (pea.registry.record); --size wins
        pea_cli(["generate", "--language", language, "--profile", profile, "--model-uri", registered.model_uri,
                 "--prompt", prompt, "--steps", "2", "--size", str(spec.corpus.image_size), "--out", str(image)])
    return {"spec": spec, "acquired": acquired, "filtered": filtered, "embedded": embedded, "packed": packed,
            "trained": trained, "evaluation": evaluation, "registered": registered, "image": image,
            "stores": store_report(embedded), "meter": meter, "work": work}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--language", default="zh")
    parser.add_argument("--models", default="sd15", help="comma-separated: sd15, sdxl")
    parser.add_argument("--pairs", type=int, default=12, help="good synthetic pairs, at least 10 (a few are held out)")
    parser.add_argument("--steps", type=int, default=2, help="training steps")
    parser.add_argument("--models-dir", type=Path, help="default: <lake>/zoo/full (with --tiny: a temp zoo)")
    parser.add_argument("--sdxl-image-size", type=int, default=512, help="SDXL's resolution here (its own: 1024)")
    parser.add_argument("--tiny", action="store_true", help="the embedded zoo's tiny models: a smoke test")
    args = parser.parse_args()

    import torch

    ran, meter = [], Meter()
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        print(f"--- {kind} + student-{args.language}, {args.pairs} pairs, {args.steps} steps, "
              f"torch threads {torch.get_num_threads()}", flush=True)
        with tempfile.TemporaryDirectory(prefix="pea-fullsize-") as work:
            models_dir = args.models_dir or (Path(work) / "zoo" if args.tiny else None)
            out = rehearse(args.language, kind, args.pairs, args.steps, Path(work), models_dir, meter,
                           image_size=args.sdxl_image_size if kind == "sdxl" and not args.tiny else None,
                           tiny=args.tiny)
            for name, store in out["stores"].items():
                print(f"store {name:8} {store['rows']:3} rows  {store['bytes_per_row']:10,.0f} B/row on disk "
                      f"({store['dtype']})  {store['shapes']}")
            t = out["trained"]
            print(f"train: {t.steps} steps, final loss {t.final_loss:.5f}, {t.samples_per_s:.3f} samples/s")
            print(f"evaluate: {out['evaluation'].metrics()}")
            print(f"registered {out['registered'].model_uri}; generated {out['image']}")
        ran.append(kind)
    print(f"full_size_ok={','.join(ran)} peak_rss_gb={meter.peak_gb:.2f}")


if __name__ == "__main__":
    main()
