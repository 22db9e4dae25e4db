"""Local differential privacy on a customer's delta: L2 clipping of the whole delta, Gaussian noise
of std noise_multiplier * clip from a seeded generator, and its config switch."""

from __future__ import annotations

import pytest
import torch

from diredi_sim.config import ConfigError
from diredi_sim.deltas import compute_norm, privatize
from diredi_sim.federation_config import FederationConfig, SimulationConfig
from diredi_sim.federation import privatize_delta


def make_delta(scale: float = 1.0) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"head.a.weight": scale * torch.randn(64, 32, 3, 3, generator=generator),
            "backbone.fpn.b.bias": scale * torch.randn(64, generator=generator)}


def test_off_leaves_the_delta_unchanged():
    delta = make_delta()
    out = privatize(delta, clip=0.0, noise_multiplier=5.0)
    assert all(torch.equal(out[k], delta[k]) for k in delta)
    same = privatize_delta(FederationConfig(), 0, delta)  # the config's default: off
    assert all(torch.equal(same[k], delta[k]) for k in delta)


def test_clipping_bounds_the_whole_delta_norm_and_keeps_its_direction():
    delta = make_delta()
    norm = compute_norm(delta)
    clipped = privatize(delta, clip=0.5)
    assert compute_norm(clipped) == pytest.approx(0.5, rel=1e-5)
    for k in delta:  # one scale for the whole delta, not per tensor
        assert torch.allclose(clipped[k], delta[k] * (0.5 / norm), atol=1e-7)
    small = privatize(make_delta(1e-4), clip=0.5)  # under the bound: untouched
    assert all(torch.equal(small[k], make_delta(1e-4)[k]) for k in small)


def test_noise_has_the_configured_std_and_is_seeded():
    delta = make_delta()
    clip, z = 0.5, 0.2
    noised = privatize(delta, clip, z, seed=7)
    clipped = privatize(delta, clip)
    noise = torch.cat([(noised[k] - clipped[k]).flatten() for k in delta])
    assert noise.std().item() == pytest.approx(z * clip, rel=0.03) and abs(noise.mean().item()) < 0.01
    again = privatize(delta, clip, z, seed=7)
    other = privatize(delta, clip, z, seed=8)
    assert all(torch.equal(noised[k], again[k]) for k in delta)
    assert not torch.equal(noised["head.a.weight"], other["head.a.weight"])
    reordered = privatize(dict(reversed(list(delta.items()))), clip, z, seed=7)  # noise follows names, not order
    assert all(torch.equal(noised[k], reordered[k]) for k in delta)
    assert {k: v.shape for k, v in noised.items()} == {k: v.shape for k, v in delta.items()}


def test_dp_settings_are_validated_with_their_key():
    with pytest.raises(ConfigError, match=r"simulation.dp_clip_norm = -1.0"):
        SimulationConfig(dp_clip_norm=-1.0)
    with pytest.raises(ConfigError, match=r"simulation.dp_noise_multiplier = -0.1"):
        SimulationConfig(dp_clip_norm=1.0, dp_noise_multiplier=-0.1)
    with pytest.raises(ConfigError, match=r"simulation.dp_noise_multiplier = 1.0: needs simulation.dp_clip_norm > 0"):
        SimulationConfig(dp_noise_multiplier=1.0)
    config = FederationConfig(simulation=SimulationConfig(dp_clip_norm=0.5, dp_noise_multiplier=0.1))
    first, second = privatize_delta(config, 1, make_delta()), privatize_delta(config, 2, make_delta())
    assert not torch.equal(first["head.a.weight"], second["head.a.weight"])  # each customer its own noise
