"""Shared fixtures: the offline environment, the tiny zoo (built once per session), isolated lakes."""

import os

# Before any import that reads them (huggingface_hub, wandb via img2dataset, prefect).
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
                  PREFECT_SERVER_ANALYTICS_ENABLED="false", WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1",
                  TOKENIZERS_PARALLELISM="false")
# pytest-xdist's workers (pyproject's addopts: -n 2) share the cores: each torch process and what it starts gets its
# share (pea.embed.launcher.thread_budget reads PEA_THREADS; torch reads OMP_NUM_THREADS when it is first imported), since
# two torch processes with all cores each oversubscribe the machine and both crawl.
if _workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    _share = str(max(1, len(os.sched_getaffinity(0)) // _workers))
    for _name in ("PEA_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _share)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pea.embed.launcher import DISTRIBUTED_ENV  # noqa: E402
from pea.models.embedded import prepare_zoo  # noqa: E402
from pea.spec import LanguageSpec, load_spec  # noqa: E402

# The longest files first (their times in docs/performance.md), so that xdist's two workers start on them and end
# together instead of one of them taking a 15-minute file last.
LONGEST_FIRST = ("test_fullsize.py", "test_deploy.py", "test_chaos.py", "test_flow_e2e.py", "test_registry.py",
                 "test_train.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _no_distributed_env_leaks():
    """An in-process training sets RANK, MASTER_PORT, ... in os.environ (pea.train) and keeps that port bound in
    this process; a child a later test starts (a Prefect worker, a chaos stage) must not inherit and reuse them."""
    yield
    for name in DISTRIBUTED_ENV:
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> Path:
    zoo = tmp_path_factory.mktemp("zoo")
    prepare_zoo(zoo, image_size=32)
    return zoo


@pytest.fixture(scope="session")
def zh_spec(zoo_dir) -> LanguageSpec:
    return load_spec("zh", profile="embedded", zoo_dir=zoo_dir)


class Trained:
    """A tiny adapter trained on the unmodified UNet through the real embed and train stages."""

    def __init__(self, spec, lake: Path):
        from pea import embed, train
        from pea.corpus.synthetic import all_scenes, write_pairs

        lake.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.pairs = write_pairs(lake, spec, all_scenes() * 2)
        self.embedded = embed.embed(spec, lake, self.pairs)
        self.result = train.train(spec, self.pairs, self.embedded, lake / spec.language / "runs" / "test")
        self.adapter_dir = self.result.adapter_dir


def _trained(tmp_path_factory, zoo_dir, profile: str) -> Trained:
    spec = load_spec("zh", profile, zoo_dir=zoo_dir)
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"steps": 150})})
    return Trained(spec, tmp_path_factory.mktemp(profile.replace(",", "-")))


@pytest.fixture(scope="session")
def trained_sd15(tmp_path_factory, zoo_dir) -> Trained:
    return _trained(tmp_path_factory, zoo_dir, "embedded")


@pytest.fixture(scope="session")
def trained_paper(tmp_path_factory, zoo_dir) -> Trained:
    """The paper's adapter (profile `paper`: one token per student token, KD alone), one setting away."""
    return _trained(tmp_path_factory, zoo_dir, "embedded,paper")


@pytest.fixture(scope="session")
def trained_sdxl(tmp_path_factory, zoo_dir) -> Trained:
    return _trained(tmp_path_factory, zoo_dir, "embedded,sdxl")


def quick_spec(spec: LanguageSpec) -> LanguageSpec:
    """The embedded spec with two prompts per set: every figure is still computed, on fewer prompts."""
    return spec.model_copy(update={"evaluate": spec.evaluate.model_copy(update={"prompts_per_set": 2,
                                                                                 "grid_prompts": 2})})


def evaluated_variant(trained: Trained, name: str, adapter, tmp: Path, spec: LanguageSpec | None = None) -> tuple:
    """Register-ready (spec, TrainResult, Evaluation) for another adapter (a PEAAdapter) on the same data, in run
    folder `tmp/name` (the registration key's run name), evaluated under `spec` (default: quick_spec's)."""
    import dataclasses

    from pea.evaluate import evaluate

    adapter_dir = tmp / name / "adapter"
    adapter.save_pretrained(adapter_dir)
    result = dataclasses.replace(trained.result, adapter_dir=adapter_dir, run_dir=tmp / name)
    spec = spec or quick_spec(trained.spec)
    return spec, result, evaluate(spec, trained.pairs, trained.embedded, adapter_dir, tmp / name / "evaluation")


@pytest.fixture(scope="module")
def hostile_server():
    """tests/hostile_site.py served on 127.0.0.1 for one module; yields its base URL."""
    from hostile_site import serving

    with serving() as base_url:
        yield base_url


# --- THE shared Ray cluster ------------------------------------------------------------------------------------
# One local cluster per test module that asks for it: the data stages compared through Ray (tests/test_engine.py:
# acquire now; the filter's per-shard judging through pea.corpus.engine.map_tasks goes beside it, on the same
# cluster and the same acquired lakes). Yields the EngineSpec to put in corpus.engine: engine.session finds this
# Ray initialised and uses it as it is, so every stage of the module runs on the one cluster.
@pytest.fixture(scope="module")
def ray_cluster():
    import time

    import ray

    from pea.corpus.engine import worker_env
    from pea.spec import EngineSpec

    if ray.is_initialized():
        raise RuntimeError("a Ray is already initialised in this test process; shut it down where it was started")
    # 2 CPUs whatever the machine (the tests share 2 cores); a small object store: results are paths and counts.
    start = time.perf_counter()
    context = ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=True,
                       object_store_memory=128 * 1024**2, runtime_env={"env_vars": worker_env()})
    print(f"ray_cluster: started in {time.perf_counter() - start:.1f} s")
    try:
        yield EngineSpec(kind="ray", address=context.address_info["gcs_address"])
    finally:
        ray.shutdown()
