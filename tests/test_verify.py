"""The manufacturer's verification gate at the operating point, on small real computations: a
tiny edge FCOS trained on 16 synthetic images, a delta built by parameter name, and the real
evaluation (``evaluate_detector``) before and after."""
import copy
import math
import re

import numpy as np
import pytest
import torch

from diredi_sim.config import TrainConfig
from diredi_sim.data.synthetic import SyntheticConfig, ensure_synthetic
from diredi_sim.data.voc import load_annotations
from diredi_sim.deltas import compute_delta
from diredi_sim.evaluate import compute_prf
from diredi_sim.models import build_detector
from diredi_sim.train import Reporting, evaluate_detector, train_detector
from diredi_sim.verify import VerifyConfig, judge, standard_error, verify_update

TINY = SyntheticConfig(seed=3, num_train=16, num_val=8, num_test=8, min_objects=1, max_objects=2, min_object_size=40)
SCORE_THRESHOLD = 0.5
BIAS_KEY = "head.classification_head.cls_logits.bias"
LOOSE = dict(max_precision_drop=1.0, max_recall_drop=1.0, max_f1_drop=1.0)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """An edge model trained on 16 tiny images (80 AdamW steps, ~10 s on one thread), its
    training images as the held-out set (it fits them: mAP ~0.7) and the evaluation closure."""
    folder = ensure_synthetic(tmp_path_factory.mktemp("cache"), TINY, workers=1)
    records = load_annotations(folder, "train")
    torch.manual_seed(1)
    edge = build_detector("edge", "cpu")
    cfg = TrainConfig(epochs=20, batch_size=4, lr=0.004, optimizer="adamw", warmup_steps=5, eval_every=1000, hflip_prob=0.0)
    train_detector(edge, records, records, cfg, class_indices=list(range(20)), report=Reporting(progress=False))
    classes = sorted({int(label) for record in records for label in record.labels})

    def evaluate(model):
        return evaluate_detector(model, records, classes, batch_size=16, score_threshold=SCORE_THRESHOLD)

    return edge, evaluate, evaluate(edge)


def bias_delta(edge, shift: float) -> dict[str, torch.Tensor]:
    """A neck+head delta, keyed by name, that adds ``shift`` to every class logit's bias (all else 0)."""
    state = edge.state_dict()
    delta = {k: torch.zeros_like(v) for k, v in compute_delta(state, state).items()}
    delta[BIAS_KEY] = torch.full_like(delta[BIAS_KEY], shift)
    return delta


def test_a_false_positive_flood_keeps_ap_but_is_rejected_at_the_operating_point(setting):
    edge, evaluate, before = setting
    assert before["voc"]["mAP"] > 0.5
    state_before = {k: v.clone() for k, v in edge.state_dict().items()}
    cfg = VerifyConfig(max_ap_drop=0.05)
    # Raising every class logit shifts all scores up: within a class the ranking barely moves (the
    # score is sqrt(sigmoid(cls) * sigmoid(centerness)), so only near-ties with different
    # centerness can swap), while many poor detections pass the 0.5 threshold. Take the first
    # shift that keeps every class's AP within max_ap_drop (0.5 does on this machine).
    for shift in (0.5, 0.25, 0.75):
        delta = bias_delta(edge, shift)
        loose, loose_state = verify_update(edge, delta, evaluate, VerifyConfig(max_ap_drop=0.05, **LOOSE), before=before)
        if loose.accepted:
            break
    else:
        pytest.fail(f"no bias shift kept AP within 0.05: {loose.reasons}")
    # the AP gate alone passes: no critical class lost more than max_ap_drop (measured)
    drops = {name: ap - loose.ap_after[name] for name, ap in loose.ap_before.items() if not math.isnan(ap)}
    assert drops and max(drops.values()) <= cfg.max_ap_drop, drops
    assert loose_state is not None and torch.equal(loose_state[BIAS_KEY], state_before[BIAS_KEY] + shift)

    # with the default operating-point bounds the same delta is rejected, naming precision/F1
    verdict, state = verify_update(edge, delta, evaluate, cfg, before=before)
    assert not verdict.accepted and state is None
    assert verdict.ap_before == loose.ap_before and verdict.ap_after == loose.ap_after
    assert not any(" AP (" in r for r in verdict.reasons), verdict.reasons  # no AP reason: only the operating point
    pattern = re.compile(r"critical class (\w+): (precision|recall|F1) at score 0\.5 fell (\d\.\d{3}) "
                         r"\((\d\.\d{3}) -> (\d\.\d{3})\), more than 0\.100")
    parsed = [pattern.fullmatch(r) for r in verdict.reasons]
    assert all(parsed), verdict.reasons
    precision_reasons = [m for m in parsed if m.group(2) == "precision"]
    assert precision_reasons, verdict.reasons
    flooded = copy.deepcopy(edge)
    flooded.load_state_dict(loose_state)
    after = evaluate(flooded)
    assert after["voc"]["per_class"] == verdict.ap_after  # the verdict reports what was measured
    for m in precision_reasons:
        name = m.group(1)
        p_before, p_after = verdict.precision_before[name], verdict.precision_after[name]
        assert float(m.group(4)) == pytest.approx(p_before, abs=5e-4) and float(m.group(5)) == pytest.approx(p_after, abs=5e-4)
        assert p_before - p_after > 0.1
        # more false positives at the threshold, same or more true positives: a flood, not a loss
        counts_before, counts_after = before["prf"]["per_class"][name], after["prf"]["per_class"][name]
        assert counts_after["fp"] > counts_before["fp"] and counts_after["tp"] >= counts_before["tp"]
    assert verdict.score_threshold == SCORE_THRESHOLD
    # classes without a detection at the threshold before are skipped (undefined precision)
    skipped = {n for n, c in before["prf"]["per_class"].items() if c["tp"] + c["fp"] == 0}
    assert skipped and not {m.group(1) for m in parsed} & skipped
    # the tutor is untouched
    assert all(torch.equal(v, state_before[k]) for k, v in edge.state_dict().items())
    print(f"\nbias shift {shift}: mAP {verdict.map_before:.3f} -> {verdict.map_after:.3f}; max AP drop "
          f"{max(drops.values()):.3f}; reasons:\n  " + "\n  ".join(verdict.reasons))


def test_a_result_without_the_operating_point_is_refused(setting):
    """AP alone cannot pass the gate: the P/R/F1 checks are not optional."""
    edge, evaluate, before = setting
    delta = bias_delta(edge, 0.5)
    with pytest.raises(ValueError, match='"voc" and "prf"'):
        verify_update(edge, delta, lambda m: evaluate(m)["voc"], VerifyConfig(max_ap_drop=1.0), before=before["voc"])
    with pytest.raises(ValueError, match="per_class"):
        stripped = {**before, "prf": {k: v for k, v in before["prf"].items() if k != "per_class"}}
        verify_update(edge, delta, evaluate, before=stripped)


@pytest.mark.parametrize("key", ["max_ap_drop", "max_delta_norm", "max_precision_drop", "max_recall_drop", "max_f1_drop", "noise_z"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.01])
def test_config_rejects_non_finite_and_negative_bounds(key, value):
    with pytest.raises(ValueError, match=rf"^verify\.{key} = {re.escape(repr(value))}: must be finite and >= 0$"):
        VerifyConfig(**{key: value})


def test_config_defaults_and_zero_bounds():
    cfg = VerifyConfig()
    assert (cfg.max_precision_drop, cfg.max_recall_drop, cfg.max_f1_drop) == (0.10, 0.10, 0.10)
    VerifyConfig(max_ap_drop=0.0, max_delta_norm=0.0, max_precision_drop=0.0, max_recall_drop=0.0, max_f1_drop=0.0)


def counted(tp: int, fp: int, fn: int, ap: float = 0.5) -> dict:
    """An evaluation result of one class ("cat") at score 0.5 with these counts (compute_prf's figures)."""
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    entry = {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
             "f1": 2 * precision * recall / (precision + recall)}
    return {"voc": {"mAP": ap, "per_class": {"cat": ap}}, "prf": {"score_threshold": 0.5, "per_class": {"cat": entry}}}


def test_noise_z_lets_a_fall_within_the_counts_noise_pass_and_still_rejects_a_collapse():
    """The demo's case (exp1, 2026-12-02): an edge model's aeroplane recall at 0.5 fell from 25 to 19
    of 45 objects (0.133, over the 0.10 bound) while its AP rose. On 45 objects each recall has a
    binomial standard error of about 0.074; 2 standard errors of the difference allow 0.309."""
    state = {"w": torch.zeros(1)}
    before, after = counted(25, 33, 20), counted(19, 28, 26, ap=0.55)
    assert standard_error(before["prf"]["per_class"]["cat"], "recall") == pytest.approx(math.sqrt(25 / 45 * 20 / 45 / 45))
    plain = judge(before, after, VerifyConfig(), norm=0.0, state=state)
    assert not plain.accepted and plain.reasons == [
        "critical class cat: recall at score 0.5 fell 0.133 (0.556 -> 0.422), more than 0.100"]
    noisy = judge(before, after, VerifyConfig(noise_z=2.0), norm=0.0, state=state)
    assert noisy.accepted, noisy.reasons
    # a collapse to 5 of 45 is beyond the bound and the noise: rejected, the allowance named
    collapse = judge(before, counted(5, 30, 40), VerifyConfig(noise_z=2.0), norm=0.0, state=state)
    assert not collapse.accepted
    recall_reason = [r for r in collapse.reasons if ": recall " in r]
    assert recall_reason == ["critical class cat: recall at score 0.5 fell 0.444 (0.556 -> 0.111), "
                             "more than 0.100 + 2 standard errors = 0.275"]
    # the same fall measured on a hundred times the objects is no longer noise (allowed 0.121)
    big = judge(counted(2500, 3300, 2000), counted(1900, 2800, 2600, ap=0.55), VerifyConfig(noise_z=2.0), norm=0.0, state=state)
    assert any(": recall " in r for r in big.reasons), big.reasons


def test_prf_per_class_breakdown_known_counts():
    # class a: two objects; dets: one TP (0.9), a duplicate (0.8, FP), a far box (0.7, FP), the
    # second object at 0.3 (below the threshold). class b: one TP. class c: no ground truth, no det.
    a1, a2, far = [10, 10, 50, 50], [60, 60, 100, 100], [200, 200, 240, 240]
    gt = {"i1": {"boxes": np.array([a1, a2], float), "labels": np.array([0, 0])},
          "i2": {"boxes": np.array([a1], float), "labels": np.array([1])}}
    det = {"i1": {"boxes": np.array([a1, a1, far, a2], float), "scores": np.array([0.9, 0.8, 0.7, 0.3]),
                  "labels": np.array([0, 0, 0, 0])},
           "i2": {"boxes": np.array([a1], float), "scores": np.array([0.95]), "labels": np.array([1])}}
    plain = compute_prf(det, gt, score_threshold=0.5)
    named = compute_prf(det, gt, score_threshold=0.5, class_names=["a", "b", "c"])
    assert {k: named[k] for k in plain} == plain and set(named) == set(plain) | {"per_class", "score_threshold"}
    assert named["score_threshold"] == 0.5
    assert named["per_class"]["a"] == {"precision": pytest.approx(1 / 3), "recall": 0.5, "f1": pytest.approx(0.4),
                                       "tp": 1, "fp": 2, "fn": 1}
    assert named["per_class"]["b"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 1, "fp": 0, "fn": 0}
    assert named["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}
    for key in ("tp", "fp", "fn"):
        assert sum(entry[key] for entry in named["per_class"].values()) == plain[key]
    only_b = compute_prf(det, gt, score_threshold=0.5, class_indices=[1], class_names=["a", "b", "c"])
    assert set(only_b["per_class"]) == {"b"} and only_b["tp"] == 1 and only_b["fp"] == 0
