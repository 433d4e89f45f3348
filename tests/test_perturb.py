"""Distillation under random LoRAs (pea.method.perturb, spec train.perturbation): the draws are what the spec says,
seeded by the micro-step, invisible when off, never trained, and a perturbed training run resumes exactly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pea import models, ops, train
from pea.corpus.synthetic import all_scenes, write_pairs
from pea.embed import embed
from pea.method.perturb import ADAPTER_NAME, RandomLoRA
from pea.spec import PerturbationSpec, SpecError, load_spec


def _inputs(unet):
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    return (torch.randn(2, unet.config.in_channels, size, size, generator=g), torch.tensor([50, 700]),
            torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))


def _out(unet, inputs):
    latents, t, context = inputs
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=context).sample


def _updates(unet) -> list[float]:
    """‖B·A‖ / ‖W‖ of every perturbed projection."""
    ratios = []
    for module in unet.modules():
        if hasattr(module, "lora_A") and ADAPTER_NAME in module.lora_A:
            update = module.lora_B[ADAPTER_NAME].weight.float() @ module.lora_A[ADAPTER_NAME].weight.float()
            ratios.append(float(update.norm() / module.base_layer.weight.float().norm()))
    return ratios


def test_draws_follow_the_spec_and_the_step_and_leave_the_unet_as_loaded(zh_spec):
    unet = models.load_unet(zh_spec.teacher)
    inputs = _inputs(unet)
    plain = _out(unet, inputs)
    cfg = PerturbationSpec(share=0.5, relative_norm=0.4)
    lora = RandomLoRA(unet, cfg, seed=3)
    assert len(lora.layers) == len(_updates(unet)) > 0
    torch.testing.assert_close(_out(unet, inputs), plain, rtol=0, atol=0)  # added, off

    sizes = [lora.draw(step) for step in range(200)]
    on = [s for s in sizes if s > 0]
    assert 70 <= len(on) <= 130 and max(on) <= 0.4 and min(on) < 0.1  # share 0.5, sizes uniform up to 0.4
    assert not any(p.requires_grad for p in unet.parameters())  # peft switches adapters to trainable; not here

    step = next(i for i, s in enumerate(sizes) if s > 0)
    assert lora.draw(step) == sizes[step]
    torch.testing.assert_close(torch.tensor(_updates(unet)), torch.full((len(lora.layers),), sizes[step]))
    perturbed = _out(unet, inputs)
    assert (perturbed - plain).abs().max() > 1e-4

    other = models.load_unet(zh_spec.teacher)  # another process, same seed and step: the same perturbed UNet
    RandomLoRA(other, cfg, seed=3).draw(step)
    torch.testing.assert_close(_out(other, inputs), perturbed, rtol=0, atol=0)
    seed_4 = RandomLoRA(models.load_unet(zh_spec.teacher), cfg, seed=4)
    assert [seed_4.draw(i) for i in range(200)] != sizes  # another seed, other draws
    off = next(i for i, s in enumerate(sizes) if s == 0)
    assert lora.draw(off) == 0.0
    torch.testing.assert_close(_out(unet, inputs), plain, rtol=0, atol=0)
    lora.draw(step)
    lora.remove()
    torch.testing.assert_close(_out(unet, inputs), plain, rtol=0, atol=0)


def test_targets_that_match_nothing_are_refused(zh_spec):
    with pytest.raises(ValueError, match="train.perturbation.targets.*match no layer"):
        RandomLoRA(models.load_unet(zh_spec.teacher), PerturbationSpec(share=1, targets=["to_nothing"]), seed=0)
    with pytest.raises(SpecError, match="share"):
        ops.with_overrides(zh_spec, train={"perturbation": {"share": 1.5}})


def test_a_perturbed_run_resumes_exactly_and_differs_from_a_plain_one(tmp_path, zoo_dir):
    spec = ops.with_overrides(load_spec("zh", "embedded", zoo_dir=zoo_dir),
                              train={"steps": 6, "checkpoint_every": 3, "warmup_steps": 1, "token_warmup": 1.0,
                                     "perturbation": {"share": 1.0, "relative_norm": 1.0}})
    pairs = write_pairs(tmp_path, spec, all_scenes()[:48])
    embedded = embed(spec, tmp_path, pairs)
    whole = train.train(spec, pairs, embedded, tmp_path / "whole")
    # 6 steps of the token warm start (token_warmup 1), then 6 perturbed ones: resumed mid-warm-start
    assert whole.steps == 12
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoints", resumed_dir / "checkpoints",
                    ignore=lambda folder, names: [n for n in names if n.startswith("step") and n != "step00000003"])
    shutil.copy(tmp_path / "whole" / "history.jsonl", resumed_dir / "history.jsonl")
    resumed = train.train(spec, pairs, embedded, resumed_dir)
    assert resumed.resumed_from == 3
    a, b = (load_file(r.adapter_dir / "diffusion_pytorch_model.safetensors") for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = train.train(ops.with_overrides(spec, train={"perturbation": {"share": 0.0}}), pairs, embedded,
                        tmp_path / "plain")
    c = load_file(plain.adapter_dir / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(("mixer", "heads"), [("linear", None), ("attention", None), ("attention", 8)])
def test_an_aligned_adapter_trains_to_the_teachers_token_count_and_draws_through_the_stock_pipeline(mixer, heads,
                                                                                                   tmp_path, zoo_dir):
    from pea import models
    from pea.method.adapter import PEAAdapter
    from pea.models.pipeline import generate

    spec = ops.with_overrides(load_spec("zh", "embedded", zoo_dir=zoo_dir),
                              train={"steps": 4, "warmup_steps": 1, "adapter_tokens": "teacher", "token_kd_weight": 1.0,
                                     "token_mixer": mixer, "mixer_heads": heads})
    pairs = write_pairs(tmp_path, spec, all_scenes()[:48])
    embedded = embed(spec, tmp_path, pairs)
    if heads:  # the teacher's width (32) must split into the heads asked for
        with pytest.raises(ValueError, match="mixer_heads 7 does not divide the teacher's width 32"):
            train.train(ops.with_overrides(spec, train={"mixer_heads": 7}), pairs, embedded, tmp_path / "bad")
    result = train.train(spec, pairs, embedded, tmp_path / "run")
    history = [json.loads(line) for line in result.history_path.read_text().splitlines()]
    assert all(h["token_kd"] > 0 for h in history)
    adapter = PEAAdapter.from_pretrained(result.adapter_dir)
    assert (adapter.config.student_tokens, adapter.config.output_tokens) == (spec.student.max_length, 77)
    assert (adapter.attend is not None) == (mixer == "attention")
    assert adapter.config.mixer_heads == (None if mixer == "linear" else heads or 8)  # 32 wide: at least 8 heads
    pipe = models.load_pipeline(spec.teacher)
    images = generate(pipe, adapter, models.load_student(spec.student), ["一个红色的圆"], [0], num_inference_steps=2,
                      height=32, width=32)
    assert images[0].size == (32, 32)


def test_the_token_warm_start_fits_the_context_without_the_unet_then_distils(tmp_path, zoo_dir):
    from pea.method.adapter import PEAAdapter
    from pea.train.table import load_table

    spec = ops.with_overrides(load_spec("zh", "embedded", zoo_dir=zoo_dir),
                              train={"steps": 20, "warmup_steps": 1, "token_warmup": 1.0, "perturbation": {"share": 0}})
    pairs = write_pairs(tmp_path, spec, all_scenes()[:48])
    embedded = embed(spec, tmp_path, pairs)
    result = train.train(spec, pairs, embedded, tmp_path / "run")
    history = [json.loads(line) for line in result.history_path.read_text().splitlines()]
    fitting, distilling = history[:20], history[20:]
    assert len(distilling) == 20 and result.steps == 40  # the warm start's steps come before train.steps
    # The first 20 steps regress the context only: no UNet pass, so no output or feature KD is measured.
    assert all(h["output_kd"] != h["output_kd"] and h["token_kd"] == h["token_kd"] for h in fitting)
    assert all(h["output_kd"] == h["output_kd"] for h in distilling)
    assert fitting[-1]["token_kd"] < 0.5 * fitting[0]["token_kd"]
    # What the warm start bought: the context is closer to the teacher's than the same init trained without it.
    cold = train.train(ops.with_overrides(spec, train={"token_warmup": 0.0}), pairs, embedded, tmp_path / "cold")
    heldout = load_table(spec, pairs, embedded, "heldout")

    def context_error(run) -> float:
        adapter = PEAAdapter.from_pretrained(run.adapter_dir).eval()
        with torch.no_grad():
            tokens, _ = adapter(heldout.student.float())
        return float((tokens - heldout.teacher.float()).pow(2).sum() / heldout.teacher.float().pow(2).sum())

    assert context_error(result) < context_error(cold)
    with pytest.raises(SpecError, match="token_warmup.*adapter_tokens: teacher"):
        ops.with_overrides(spec, train={"adapter_tokens": "student", "token_mixer": "linear", "mixer_heads": None,
                                        "token_kd_weight": 0})
