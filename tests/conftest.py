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


def synthetic_pairs(folder: Path, spec, scenes, seed: int = 0) -> Path:
    """A raw shard of PNG bytes and a pairs table pointing at it, in the layout acquire + filter write
    (tests of later stages start here, independent of img2dataset)."""
    import hashlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pea.corpus.synthetic import ENGLISH, caption, render

    images = []
    for i, scene in enumerate(scenes):
        buffer = io.BytesIO()
        render(scene, spec.corpus.image_size, seed=seed + i).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    keys = [f"{i:07d}" for i in range(len(scenes))]
    raw = folder / f"raw-{spec.language}.parquet"
    pq.write_table(pa.table({"key": keys, "png": images}), raw)
    pairs = folder / f"pairs-{spec.language}.parquet"
    pq.write_table(pa.table({
        "key": keys, "image_sha256": [hashlib.sha256(b).hexdigest() for b in images],
        "caption_en": [caption(s, ENGLISH) for s in scenes],
        "caption": [caption(s, spec.synthetic_captions) for s in scenes],
        "width": [spec.corpus.image_size] * len(keys), "height": [spec.corpus.image_size] * len(keys),
        "raw_file": [str(raw)] * len(keys), "native": [False] * len(keys)}), pairs)
    return pairs


class Trained:
    """A tiny adapter trained on the unmodified UNet through the real embed and train stages."""

    def __init__(self, spec, lake: Path):
        from pea import embed, train
        from pea.corpus.synthetic import all_scenes

        lake.mkdir(parents=True, exist_ok=True)
        self.spec = spec
        self.pairs = synthetic_pairs(lake, spec, all_scenes() * 2)
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
