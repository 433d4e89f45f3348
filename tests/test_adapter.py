import json

import pytest
import torch

from pea.adapter import PEAAdapter


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
