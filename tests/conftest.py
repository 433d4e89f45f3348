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
