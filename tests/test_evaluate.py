"""The evaluation harness on a really trained tiny adapter: every system in one table, real figures."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pea import evaluate as ev
from pea.evaluate.baselines import LinearMap
from pea.spec import ModelRef, available_languages
from pea.train.shards import pack
from pea.train.table import load_table


@pytest.fixture(scope="session")
def evaluation(trained_sd15, tmp_path_factory):
    t = trained_sd15
    return ev.evaluate(t.spec, t.pairs, t.embedded, t.adapter_dir, tmp_path_factory.mktemp("evaluation"))


def test_training_beats_the_untrained_adapter_and_the_teacher_is_the_reference(evaluation):
    rel = evaluation.relative_error
    assert set(rel) == {"trained", "untrained", "linear_map"}
    assert 0 < rel["trained"] < rel["untrained"]
    assert evaluation.improvement == pytest.approx(1 - rel["trained"] / rel["untrained"])
    rows = {r["system"]: r for r in evaluation.rows()}
    assert list(rows) == list(ev.SYSTEMS)
    assert rows["teacher_en"]["rel_error"] == 0.0 and rows["teacher_en"]["image_mse"] == 0.0
    assert all(0 < evaluation.image_mse[s] < 1 for s in ("trained", "untrained", "linear_map"))


def test_the_papers_adapter_is_one_profile_away_and_trains_and_evaluates(trained_paper, trained_sd15, tmp_path):
    paper = ev.PEAAdapter.from_pretrained(trained_paper.adapter_dir)
    default = ev.PEAAdapter.from_pretrained(trained_sd15.adapter_dir)
    # The paper's: one output token per student token, no token mixer; the default maps to the teacher's 77.
    assert (paper.config.output_tokens, paper.mix, paper.attend) == (None, None, None)
    assert default.config.output_tokens == 77 and default.attend is not None
    t = trained_paper
    result = ev.evaluate(t.spec, t.pairs, t.embedded, t.adapter_dir, tmp_path / "evaluation")
    assert 0 < result.relative_error["trained"] < result.relative_error["untrained"]
    assert result.table.is_file() and "trained" in ev.format_table(result)


def test_clipscore_for_every_prompt_set_and_system_through_torchmetrics(evaluation, trained_sd15):
    spec = trained_sd15.spec
    assert set(evaluation.clip_score) == set(spec.evaluate.prompt_sets) == {"general", "culture"}
    for scores in evaluation.clip_score.values():
        assert set(scores) == set(ev.SYSTEMS)
        assert all(0.0 <= v <= 100.0 for v in scores.values())
    # The helper is torchmetrics' functional CLIPScore on the same model, not a hand-made cosine.
    from torchmetrics.functional.multimodal import clip_score

    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    texts = ["左边有一个红色的圆形", "右边有两个蓝色的正方形"]
    ref = spec.evaluate.clip_model, spec.evaluate.clip_revision
    pixels = [torch.from_numpy(np.asarray(i)).permute(2, 0, 1) for i in images]
    expected = clip_score(pixels, texts, model_name_or_path=lambda: ev._clip(*ref)).item()
    got = ev.clip_scores(ModelRef(id=ref[0], revision=ref[1]), images, texts)
    assert got == pytest.approx(expected, rel=1e-5)


def test_outputs_table_report_and_grids_with_both_languages(evaluation, trained_sd15):
    with open(evaluation.table, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["system"] for r in rows] == list(ev.SYSTEMS)
    assert {"rel_error", "image_mse", "clip_general", "clip_culture"} <= set(rows[0])
    report = json.loads(evaluation.report.read_text(encoding="utf-8"))
    assert report["rel_error_trained"] == evaluation.relative_error["trained"]
    assert all(set(c) == {"en", "zh"} and c["en"] and c["zh"] for c in report["grid_captions"])
    assert report["prompt_sets"]["culture"][0]["zh"] == ev.load_prompts("zh", "culture")[0][0]
    n = trained_sd15.spec.evaluate.grid_prompts
    for grid in [evaluation.grid, *evaluation.grids.values()]:
        image = Image.open(grid)
        assert image.width == 128 * len(ev.SYSTEMS) and image.height >= n * 128
    assert not list(evaluation.grid.parent.glob(".*tmp*"))  # written under temp names, then renamed
    assert "linear_map" in ev.format_table(evaluation)


def test_agreement_is_measured_with_the_same_noise_every_time(trained_sd15):
    t = trained_sd15
    full = load_table(t.spec, t.pairs, t.embedded, "heldout")
    table = dataclasses.replace(full, captions=full.captions[:8], teacher=full.teacher[:8], student=full.student[:8],
                                latents=full.latents[:8])
    adapter = ev.PEAAdapter.from_pretrained(t.adapter_dir).eval()
    first = ev.relative_errors(t.spec, table, {"a": adapter})
    again = ev.relative_errors(t.spec, table, {"b": adapter})
    assert first["a"] == again["b"]


def test_linear_map_is_ridge_regression_from_the_whole_student_grid_on_a_bounded_sample(trained_sd15):
    t = trained_sd15
    shards = pack(t.spec, t.pairs, t.embedded).train
    sample = LinearMap.sample(shards, max_rows=40, seed=0)
    assert len(sample["student"]) == len(sample["teacher"]) == 40 < shards.rows  # a sample, not the split
    linear = LinearMap.fit(shards, max_rows=40, seed=0)
    assert linear.penalty in LinearMap.LAMBDAS
    # The dual form it keeps equals the primal ridge solution at the penalty leave-one-out chose.
    x, y = sample["student"].double(), sample["teacher"].double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    penalty = linear.penalty * float((xc @ xc.T).diagonal().mean())
    w = torch.linalg.solve(xc.T @ xc + penalty * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)
    student_shape, _ = shards.tensors["student"]
    teacher_shape, _ = shards.tensors["teacher"]
    states = sample["student"][:3].reshape(3, *student_shape)
    tokens, pooled = linear(states)
    expected = ((x[:3] - x.mean(0)) @ w + y.mean(0)).reshape(3, *teacher_shape)
    # (float32 storage against a float64 solve: within 1 % in norm even at a small penalty)
    assert float((tokens.double() - expected).norm() / expected.norm()) < 1e-2 and pooled is None
    # The teacher's whole context comes out (its 77 tokens), not one token per student token.
    assert tokens.shape == (3, *teacher_shape) and teacher_shape[0] != student_shape[0]


def test_every_shipped_language_has_both_prompt_sets_with_english_references():
    for language in available_languages():
        for name in ("general", "culture"):
            prompts = ev.load_prompts(language, name)
            assert len(prompts) >= 10
            assert all(t != e for t, e in prompts), f"{language}/{name}: a target prompt equals its English reference"


def test_a_malformed_prompt_line_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PEA_HOME", str(tmp_path))
    folder = tmp_path / "data" / "prompts" / "zh"
    folder.mkdir(parents=True)
    (folder / "general.txt").write_text("# comment\n红色的圆形\ta red circle\n没有英文\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"general.txt:3: expected `target<TAB>english`"):
        ev.load_prompts("zh", "general")
    with pytest.raises(FileNotFoundError, match="culture.txt does not exist"):
        ev.load_prompts("zh", "culture")
