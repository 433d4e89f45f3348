import pytest
import torch

from pea import models
from pea.method.distill import Conditioning, distill_loss, token_fit_loss, unet_features


def _batch(unet, tokens: int = 77):
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(3, 4, size, size, generator=g)
    teacher = torch.randn(3, tokens, unet.config.cross_attention_dim, generator=g)
    return latents, torch.randn(latents.shape, generator=g), torch.tensor([10, 500, 990]), teacher


def test_hooks_read_every_block_once_and_are_removed(zh_spec):
    unet = models.load_unet(zh_spec.teacher)
    latents, _, t, teacher = _batch(unet)
    with unet_features(unet) as maps:
        unet(latents, t, encoder_hidden_states=teacher)
    blocks = len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert len(maps) == blocks == 5
    assert maps[0].shape[1] == unet.config.block_out_channels[0]  # a down block's hidden state, not its skips
    assert all(not block._forward_hooks for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks])


def test_loss_is_zero_when_the_student_matches_the_teacher_and_grows_otherwise(zh_spec):
    unet = models.load_unet(zh_spec.teacher)
    latents, noise, t, teacher = _batch(unet)
    kd = torch.zeros(3)
    same = distill_loss(unet, latents, t, noise, Conditioning(teacher), Conditioning(teacher.clone().requires_grad_()), kd)
    assert same.output_kd.item() == 0 and same.feature_kd.item() == 0 and same.total.item() == 0
    student = (teacher + torch.randn_like(teacher)).requires_grad_()
    off = distill_loss(unet, latents, t, noise, Conditioning(teacher), Conditioning(student), kd, feature_weight=0.1)
    torch.testing.assert_close(off.total, off.output_kd + 0.1 * off.feature_kd)
    off.total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())  # the UNet is frozen


def test_native_captions_use_the_diffusion_loss_only(zh_spec):
    unet = models.load_unet(zh_spec.teacher)
    latents, noise, t, teacher = _batch(unet)
    student = teacher + torch.randn_like(teacher)
    teacher, student = Conditioning(teacher), Conditioning(student)
    native = distill_loss(unet, latents, t, noise, teacher, student, torch.ones(3))
    torch.testing.assert_close(native.total, native.diffusion)
    assert native.output_kd.isnan() and native.feature_kd.isnan()  # no parallel row for the KD terms to cover
    mixed = distill_loss(unet, latents, t, noise, teacher, student, torch.tensor([1.0, 0.0, 0.0]))
    assert native.total != mixed.total
    # Each reported term is its mean over the rows it is trained on: one native row, two parallel ones.
    torch.testing.assert_close(mixed.total, (mixed.diffusion + 2 * (mixed.output_kd + 0.1 * mixed.feature_kd)) / 3)
    everywhere = distill_loss(unet, latents, t, noise, teacher, student, torch.zeros(3), diffusion_everywhere=True)
    torch.testing.assert_close(everywhere.total, native.total)


def test_loss_weights_come_from_the_caller(zh_spec):
    unet = models.load_unet(zh_spec.teacher)
    latents, noise, t, teacher = _batch(unet)
    teacher, student = Conditioning(teacher), Conditioning(teacher + 1)
    output_only = distill_loss(unet, latents, t, noise, teacher, student, torch.zeros(3), 1.0, 0.0)
    feature_only = distill_loss(unet, latents, t, noise, teacher, student, torch.zeros(3), 0.0, 1.0)
    torch.testing.assert_close(output_only.total, output_only.output_kd)
    torch.testing.assert_close(feature_only.total, feature_only.feature_kd)


def test_sdxl_teacher_hooks_every_block_and_the_pooled_vector_reaches_the_unet(zoo_dir):
    from pea.method.distill import sdxl_time_ids
    from pea.spec import load_spec

    spec = load_spec("zh", "embedded,sdxl", zoo_dir=zoo_dir)
    unet = models.load_unet(spec.teacher)
    latents, noise, t, _ = _batch(unet)
    cond = Conditioning(torch.randn(3, 77, 64), torch.randn(3, 32), sdxl_time_ids(32, 32, 3))
    with unet_features(unet) as maps:
        unet(latents, t, **cond.unet_kwargs(unet.dtype))
    assert len(maps) == len(unet.down_blocks) + 1 + len(unet.up_blocks) == 5
    terms = distill_loss(unet, latents, t, noise, cond, Conditioning(cond.tokens, cond.pooled + 1, cond.time_ids),
                         torch.zeros(3))
    assert terms.output_kd > 0  # the pooled vector reaches the UNet through added_cond_kwargs


def test_the_token_term_compares_contexts_token_by_token_on_parallel_rows_only(zh_spec):
    unet = models.load_unet(zh_spec.teacher)
    latents, noise, t, teacher = _batch(unet)
    student = teacher + 0.5 * torch.randn_like(teacher)
    parallel = torch.tensor([1.0, 0.0, 0.0])
    base = distill_loss(unet, latents, t, noise, Conditioning(teacher), Conditioning(student), parallel)
    aligned = distill_loss(unet, latents, t, noise, Conditioning(teacher), Conditioning(student), parallel,
                           token_weight=2.0)
    per_sample = (student - teacher).pow(2).flatten(1).mean(dim=1)
    torch.testing.assert_close(aligned.token_kd, per_sample[1:].mean())  # reported over the parallel rows it trains
    torch.testing.assert_close(aligned.total, base.total + 2.0 * per_sample[1:].sum() / 3)
    with pytest.raises(ValueError, match="token by token.*adapter_tokens: teacher"):
        distill_loss(unet, latents, t, noise, Conditioning(teacher), Conditioning(student[:, :16]), parallel,
                     token_weight=1.0)


def test_the_warm_starts_regression_fits_contexts_and_pooled_vectors_on_parallel_rows_only():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 77, 32, generator=g)
    student = teacher + torch.randn(teacher.shape, generator=g)
    native = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert float(token_fit_loss(Conditioning(teacher), Conditioning(teacher), native).total) == 0.0
    terms = token_fit_loss(Conditioning(student), Conditioning(teacher), native)
    per_sample = (student - teacher).pow(2).flatten(1).mean(dim=1)
    torch.testing.assert_close(terms.total, (per_sample * (1 - native)).mean())  # the native row takes no part
    torch.testing.assert_close(terms.token_kd, per_sample[[0, 2, 3]].mean())
    assert all(v != v for v in (terms.output_kd, terms.feature_kd, terms.diffusion))  # no UNet pass: not measured
    # SDXL: pooled vectors for the rows that have one (the pack keeps none for the empty caption, the last row)
    pooled_t, pooled_s = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    with_pooled = token_fit_loss(Conditioning(student, pooled_s), Conditioning(teacher, pooled_t), native)
    pooled = torch.nn.functional.pad((pooled_s - pooled_t).pow(2).mean(dim=1), (0, 1))
    torch.testing.assert_close(with_pooled.total, ((per_sample + pooled) * (1 - native)).mean())
    with pytest.raises(ValueError, match="token by token.*adapter_tokens: teacher"):
        token_fit_loss(Conditioning(student[:, :16]), Conditioning(teacher), native)
