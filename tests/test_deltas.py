import pytest
import torch

from diredi_sim.deltas import (apply_delta, check_delta, clip_norm, compute_delta, compute_norm, count_bytes, merge_deltas,
                               select_neck_head)
from diredi_sim.models import build_detector, part_of


def _perturbed(state, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def tutor_state():
    torch.manual_seed(0)
    return build_detector("tutor", "cpu").state_dict()


def test_delta_holds_exactly_neck_and_head(tutor_state):
    tutor2 = _perturbed(tutor_state, 0.01, 1)
    delta = compute_delta(tutor2, tutor_state)
    assert delta and {part_of(k) for k in delta} == {"neck", "head"}
    assert set(delta) == set(select_neck_head(tutor_state))
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in delta.values())
    assert not any(k.startswith("backbone.body.") for k in delta)


def test_substitution_recovers_tutor2_on_neck_and_head_and_keeps_backbone(tutor_state):
    tutor2 = _perturbed(tutor_state, 0.01, 1)
    delta = compute_delta(tutor2, tutor_state, gamma=1.0)
    updated = apply_delta(tutor_state, delta, weight=1.0)
    for k, v in updated.items():
        if k in delta:
            assert torch.allclose(v, tutor2[k], atol=1e-6), k
        else:
            assert torch.equal(v, tutor_state[k]), k
    # gamma and weight scale linearly; the input state is not modified
    half = apply_delta(tutor_state, compute_delta(tutor2, tutor_state, gamma=0.5), weight=1.0)
    key = next(iter(delta))
    assert torch.allclose(half[key] - tutor_state[key], 0.5 * delta[key], atol=1e-6)
    assert not torch.equal(updated[key], tutor_state[key])


def test_bytes_fp32_and_fp16(tutor_state):
    delta = compute_delta(_perturbed(tutor_state, 0.01, 1), tutor_state)
    n = sum(v.numel() for v in delta.values())
    assert count_bytes(delta) == 4 * n and count_bytes(delta, torch.float16) == 2 * n


def test_check_delta_names_every_problem(tutor_state):
    delta = compute_delta(_perturbed(tutor_state, 0.01, 1), tutor_state)
    key = next(k for k in delta if k.startswith("head."))
    bad = dict(delta)
    bad[key] = bad[key].clone()
    bad[key].view(-1)[0] = float("nan")
    bad["backbone.body.conv1.weight"] = torch.zeros_like(tutor_state["backbone.body.conv1.weight"])
    bad["head.not_a_layer.weight"] = torch.zeros(3)
    neck_key = next(k for k in delta if k.startswith("backbone.fpn."))
    bad[neck_key] = torch.zeros(2, 2)
    problems = " | ".join(check_delta(bad, tutor_state))
    assert f"{key} has non-finite values" in problems
    assert "backbone.body.conv1.weight is in the backbone" in problems
    assert "unknown key head.not_a_layer.weight" in problems
    assert f"{neck_key} has shape (2, 2)" in problems
    del bad[neck_key]
    assert "neck/head keys missing" in " ".join(check_delta(bad, tutor_state))
    with pytest.raises(ValueError, match="cannot apply delta"):
        apply_delta(tutor_state, bad)
    assert check_delta(delta, tutor_state) == []


def test_merge_rules():
    a = {"head.w": torch.tensor([1.0, 2.0])}
    b = {"head.w": torch.tensor([3.0, 6.0])}
    c = {"head.w": torch.tensor([100.0, -100.0])}
    assert torch.equal(merge_deltas([a, b], "sum")["head.w"], torch.tensor([4.0, 8.0]))
    assert torch.equal(merge_deltas([a, b], "mean")["head.w"], torch.tensor([2.0, 4.0]))
    assert torch.allclose(merge_deltas([a, b], "mean", weights=[3, 1])["head.w"], torch.tensor([1.5, 3.0]))
    # one outlier among three: the median ignores it, the mean does not
    assert torch.equal(merge_deltas([a, b, c], "median")["head.w"], torch.tensor([3.0, 2.0]))
    # column 0 sorted [1, 1, 3, 3, 100] -> [1, 3, 3]; column 1 [-100, 2, 2, 6, 6] -> [2, 2, 6]
    assert torch.allclose(merge_deltas([a, b, c, a, b], "trimmed_mean", trim_fraction=0.2)["head.w"], torch.tensor([7 / 3, 10 / 3]))
    clipped = merge_deltas([c], "sum", max_norm=1.0)
    assert compute_norm(clipped) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown merge rule 'vote'"):
        merge_deltas([a], "vote")
    with pytest.raises(KeyError):
        merge_deltas([a, {"head.v": torch.zeros(2)}])


def test_clip_norm_leaves_small_deltas_alone():
    d = {"head.w": torch.tensor([0.3, 0.4])}
    assert torch.equal(clip_norm(d, 1.0)["head.w"], d["head.w"])
    assert compute_norm(clip_norm(d, 0.1)) == pytest.approx(0.1)
