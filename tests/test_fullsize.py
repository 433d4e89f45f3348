"""The full-size rehearsal (issue #17): every stage on SD 1.5 and the zh student at their real sizes (random
weights, real tokenizers) at 512 px on the CPU. Builds the models once into <lake>/zoo/full (≈ 4 GB of fp16
files, about a minute), then a few minutes of stages; `-m "not fullsize"` leaves it out."""

import math

import bench
import pytest
from PIL import Image

pytestmark = pytest.mark.fullsize



def _benchmark():
    return bench.load("full_size")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    # MLflow and the lake in a temp dir (rehearse restores the environment); the models in <lake>/zoo/full.
    # The evaluation grid draws without classifier-free guidance: half its UNet calls, which are most of this file's
    # time on one thread (a two-worker suite), with the same shapes; the benchmark keeps the spec's guidance and so
    # the doubled batch's memory.
    return _benchmark().rehearse("zh", "sd15", pairs=10, steps=1, work=tmp_path_factory.mktemp("fullsize"),
                                 evaluate={"guidance_scale": 1.0})


def test_stores_hold_the_real_shapes(rehearsal):
    stores = rehearsal["stores"]
    assert stores["teacher"]["shapes"] == {"tokens": (77, 768)}
    assert stores["student"]["shapes"] == {"states": (52, 1024)}  # RoBERTa-wwm-ext-large at Chinese-CLIP's 52
    assert stores["latents"]["shapes"] == {"latents": (4, 64, 64)}
    assert stores["latents"]["rows"] == 10
    assert stores["teacher"]["bytes_per_row"] > 77 * 768 * 2 * 0.5  # 16-bit, incompressible noise-like values


def test_training_gives_a_finite_loss_and_a_registered_version(rehearsal):
    # the spec's bf16 where this CPU runs bf16 fast, else fp32 (benchmarks/full_size.py: bf16_is_fast)
    assert rehearsal["spec"].train.precision == ("bf16" if _benchmark().bf16_is_fast() else "fp32")
    assert math.isfinite(rehearsal["trained"].final_loss)
    assert rehearsal["registered"].version == "1"
    assert all(math.isfinite(v) for v in rehearsal["evaluation"].relative_error.values())


def test_generate_draws_a_512_image(rehearsal):
    with Image.open(rehearsal["image"]) as image:
        assert image.size == (512, 512)
