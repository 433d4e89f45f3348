"""Shared fixtures: the offline environment, the tiny zoo (built once per session), isolated lakes."""

import os

# Before any import that reads them (huggingface_hub, wandb via img2dataset, prefect).
os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1",
                  PREFECT_SERVER_ANALYTICS_ENABLED="false", WANDB_MODE="disabled", NO_ALBUMENTATIONS_UPDATE="1",
                  TOKENIZERS_PARALLELISM="false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pea.embedded import prepare_zoo  # noqa: E402
from pea.spec import LanguageSpec, load_spec  # noqa: E402


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
def trained_sdxl(tmp_path_factory, zoo_dir) -> Trained:
    return _trained(tmp_path_factory, zoo_dir, "embedded,sdxl")


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
