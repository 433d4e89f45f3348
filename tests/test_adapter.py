import json

import pytest
import torch

from pea.method.adapter import PEAAdapter


def test_reference_sdxl_adapter_has_the_papers_parameter_count():
    assert sum(p.numel() for p in PEAAdapter(kind="sdxl", student_dim=1024, hidden_dim=1024).parameters()) == 6_033_408
    assert sum(p.numel() for p in PEAAdapter(kind="sdxl", student_dim=1024, hidden_dim=2048).parameters()) == 11_538_432


def test_shapes_per_kind():
    tokens, pooled = PEAAdapter(kind="sdxl", student_dim=64, hidden_dim=32)(torch.randn(2, 52, 64))
    assert tokens.shape == (2, 52, 2048) and pooled.shape == (2, 1280)
    tokens, pooled = PEAAdapter(kind="sd15", student_dim=64, hidden_dim=32)(torch.randn(2, 77, 64))
    assert tokens.shape == (2, 77, 768) and pooled is None


def test_sdxl_pooled_is_the_token_mean_before_the_gelu():
    adapter = PEAAdapter(kind="sdxl", student_dim=16, hidden_dim=8, token_dim=12, pooled_dim=10)
    states = torch.randn(3, 5, 16)
    _, pooled = adapter(states)
    torch.testing.assert_close(pooled, adapter.mlp(states).mean(dim=1))


def test_save_and_load_round_trip_through_safetensors_with_the_config(tmp_path):
    adapter = PEAAdapter(kind="sd15", student_dim=64, hidden_dim=48, token_dim=32)
    adapter.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["hidden_dim"] == 48
    loaded = PEAAdapter.from_pretrained(tmp_path)
    states = torch.randn(2, 7, 64)
    torch.testing.assert_close(loaded(states)[0], adapter(states)[0], rtol=0, atol=0)


def test_a_student_of_the_wrong_width_is_refused_naming_both_sizes():
    with pytest.raises(ValueError, match="student hidden size 32 does not match the adapter's student_dim 64"):
        PEAAdapter(kind="sd15", student_dim=64, hidden_dim=8)(torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="kind 'sd3'"):
        PEAAdapter(kind="sd3")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_the_token_mixer_gives_the_teachers_count_and_starts_as_the_per_token_adapter(kind, tmp_path):
    plain = PEAAdapter(kind=kind, student_dim=16, hidden_dim=8, token_dim=12, pooled_dim=10)
    mixed = PEAAdapter(kind=kind, student_dim=16, hidden_dim=8, token_dim=12, pooled_dim=10, student_tokens=5,
                       output_tokens=9)
    mixed.load_state_dict(plain.state_dict(), strict=False)  # the same MLP
    states = torch.randn(3, 5, 16)
    (tokens, pooled), (per_token, plain_pooled) = mixed(states), plain(states)
    assert tokens.shape == (3, 9, 12)
    torch.testing.assert_close(tokens[:, :5], per_token)  # copied, the positions' vectors start at zero
    torch.testing.assert_close(tokens[:, 5:], per_token.mean(dim=1, keepdim=True).expand(3, 4, 12))
    if kind == "sdxl":
        torch.testing.assert_close(pooled, plain_pooled)  # pooled from the student's tokens, not the mixed ones
    mixed.save_pretrained(tmp_path)
    torch.testing.assert_close(PEAAdapter.from_pretrained(tmp_path)(states)[0], tokens, rtol=0, atol=0)
    with pytest.raises(ValueError, match="6 student tokens, but the adapter's token mixer takes 5"):
        mixed(torch.randn(1, 6, 16))
    with pytest.raises(ValueError, match="go together"):
        PEAAdapter(kind=kind, student_dim=16, student_tokens=5)


def test_the_attention_mixer_starts_as_the_fixed_mix_and_then_depends_on_the_content(tmp_path):
    fixed = PEAAdapter(kind="sd15", student_dim=16, hidden_dim=8, token_dim=12, student_tokens=5, output_tokens=9)
    attending = PEAAdapter(kind="sd15", student_dim=16, hidden_dim=8, token_dim=12, student_tokens=5,
                           output_tokens=9, mixer_heads=3)
    attending.load_state_dict(fixed.state_dict(), strict=False)  # the same MLP and mix
    states = torch.randn(3, 5, 16)
    torch.testing.assert_close(attending(states)[0], fixed(states)[0])  # output projection starts at zero
    with torch.no_grad():
        attending.attend.out_proj.weight.normal_()
    moved = attending(states)[0]
    assert (moved - fixed(states)[0]).abs().max() > 1e-3
    attending.save_pretrained(tmp_path)
    torch.testing.assert_close(PEAAdapter.from_pretrained(tmp_path)(states)[0], moved, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mixer_heads needs output_tokens"):
        PEAAdapter(kind="sd15", student_dim=16, mixer_heads=2)
