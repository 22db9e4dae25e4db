"""Uplink compression of a delta: what each method puts on the wire, what comes back, and how a
malformed payload is refused (by name)."""

import pytest
import torch

from diredi_sim.deltas import (COMPRESSIONS, compress_delta, compute_delta, count_bytes, count_state_bytes, decompress_delta,
                               select_neck_head)
from diredi_sim.models import build_detector


@pytest.fixture(scope="module")
def delta_and_shapes():
    torch.manual_seed(0)
    state = build_detector("tutor", "cpu").state_dict()
    g = torch.Generator().manual_seed(1)
    after = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    delta = compute_delta(after, state)
    return delta, {k: v.shape for k, v in select_neck_head(state).items()}


def test_every_method_rebuilds_the_original_names_shapes_and_dtype(delta_and_shapes):
    delta, shapes = delta_and_shapes
    for method in COMPRESSIONS:
        back = decompress_delta(compress_delta(delta, method, topk_fraction=0.1), shapes)
        assert set(back) == set(delta), method
        assert all(back[k].shape == delta[k].shape and back[k].dtype == torch.float32 for k in delta), method
    none = decompress_delta(compress_delta(delta, "none"), shapes)
    assert all(torch.equal(none[k], delta[k]) for k in delta)


def test_fp16_and_int8_round_trip_errors_are_bounded(delta_and_shapes):
    delta, shapes = delta_and_shapes
    fp16 = decompress_delta(compress_delta(delta, "fp16"), shapes)
    for k, v in delta.items():
        assert ((fp16[k] - v).abs() <= 1e-3 * v.abs() + 1e-7).all(), k  # fp16: 11-bit mantissa, rel err <= 2^-11
    payload = compress_delta(delta, "int8")
    int8 = decompress_delta(payload, shapes)
    for k, v in delta.items():
        scale = float(payload[f"{k}::scale"])
        assert scale == pytest.approx(float(v.abs().max()) / 127)
        assert float((int8[k] - v).abs().max()) <= scale / 2 * (1 + 1e-5), k


def test_topk_keeps_exactly_the_largest_entries():
    value = torch.tensor([[0.5, -3.0, 0.1, 2.0, -0.2], [1.0, 0.0, -4.0, 0.3, 0.05]])
    for method in ("topk", "topk-int8"):
        payload = compress_delta({"head.w": value}, method, topk_fraction=0.3)  # ceil(0.3 * 10) = 3 entries
        assert payload["head.w::index"].tolist() == [1, 3, 7] and payload["head.w::index"].dtype == torch.int32
        back = decompress_delta(payload, {"head.w": value.shape})["head.w"]
        kept = torch.zeros_like(value).view(-1)
        kept[[1, 3, 7]] = value.view(-1)[[1, 3, 7]]
        assert torch.allclose(back, kept.view_as(value), atol=4.0 / 127 / 2 + 1e-6), method
        assert (back.view(-1)[[0, 2, 4, 5, 6, 8, 9]] == 0).all()
    assert compress_delta({"head.w": value}, "topk", topk_fraction=0.01)["head.w::index"].numel() == 1  # at least one
    with pytest.raises(ValueError, match="topk_fraction"):
        compress_delta({"head.w": value}, "topk", topk_fraction=0)
    with pytest.raises(ValueError, match="unknown uplink compression 'zip'"):
        compress_delta({"head.w": value}, "zip")


def test_payload_bytes_match_each_method(delta_and_shapes):
    delta, _ = delta_and_shapes
    n, tensors, fp32 = sum(v.numel() for v in delta.values()), len(delta), count_bytes(delta)
    size = {m: count_state_bytes(compress_delta(delta, m, topk_fraction=0.1)) for m in COMPRESSIONS}
    assert size["none"] == fp32 == 4 * n
    assert size["fp16"] == 2 * n
    assert size["int8"] == n + 4 * tensors  # one float32 scale per tensor
    k = sum(max(1, -(-v.numel() // 10)) for v in delta.values())  # ceil(numel / 10), exact for 0.1 here
    assert size["topk"] == 6 * k and size["topk-int8"] == 5 * k + 4 * tensors
    assert fp32 / size["topk"] >= 6.0 and fp32 / size["topk-int8"] >= 7.5


def test_malformed_payloads_name_the_key(delta_and_shapes):
    delta, shapes = delta_and_shapes
    name = next(k for k in delta if k.startswith("head.") and delta[k].dim() == 4)

    def refused(payload, match):
        with pytest.raises(ValueError, match=match):
            decompress_delta(payload, shapes)

    int8, topk = compress_delta(delta, "int8"), compress_delta(delta, "topk-int8", topk_fraction=0.1)
    refused({k: v for k, v in int8.items() if k != name}, f"payload key {name}: missing")
    refused({k: v for k, v in int8.items() if k != f"{name}::scale"}, f"payload key {name}::scale: missing")
    refused({**int8, "backbone.body.conv1.weight": torch.zeros(3)}, "payload key backbone.body.conv1.weight: unknown parameter")
    refused({**int8, f"{name}::zip": torch.zeros(1)}, f"payload key {name}::zip: unknown suffix")
    refused({**int8, name: int8[name].reshape(-1)}, f"payload key {name}: shape")
    refused({**int8, name: int8[name].to(torch.int16)}, f"payload key {name}: dtype torch.int16")
    refused({**int8, f"{name}::scale": torch.tensor([float("nan")])}, f"payload key {name}::scale: expected one finite float")
    index = topk[f"{name}::index"].clone()
    index[0] = 10**8
    refused({**topk, f"{name}::index": index}, f"payload key {name}::index: indices outside")
    refused({**topk, f"{name}::value": topk[f"{name}::value"][1:]}, f"payload key {name}::value: shape")
    refused({k: v for k, v in topk.items() if k != f"{name}::value"}, f"payload key {name}::value: missing")


def test_the_config_switch_is_checked():
    from diredi_sim.config import ConfigError
    from diredi_sim.federation_config import SimulationConfig

    assert SimulationConfig().uplink_compression == "none"
    with pytest.raises(ConfigError, match="simulation.uplink_compression = 'zip': must be one of"):
        SimulationConfig(uplink_compression="zip")
    with pytest.raises(ConfigError, match=r"simulation.topk_fraction = 0: must be in \(0, 1\]"):
        SimulationConfig(uplink_compression="topk", topk_fraction=0)
