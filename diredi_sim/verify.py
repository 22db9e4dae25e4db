"""The manufacturer's acceptance check of an updated tutor.

Before a customer's delta reaches anything the manufacturer ships, the updated tutor
``tutor + weight * delta`` is evaluated on the manufacturer's own held-out data of the presumed
classes. The update is rejected when:

- the delta itself is malformed (keys outside neck/head, unknown or missing keys, wrong shape
  or dtype, non-finite values): rejected before any evaluation;
- its norm exceeds ``max_delta_norm`` (when set);
- any critical class loses more than ``max_ap_drop`` AP (absolute, AP@0.5) against the tutor
  before the update;
- any critical class loses more than ``max_precision_drop`` precision, ``max_recall_drop``
  recall or ``max_f1_drop`` F1 (absolute) at the deployment score threshold (the operating
  point the evaluation was run with). AP only looks at the ranking within a class, so a delta
  that floods confident false positives (say, one raising every class logit) keeps AP and still
  ruins what the deployed detector reports; these checks catch it. With ``noise_z`` > 0 a
  fall fails only beyond its bound plus ``noise_z`` standard errors of the difference (see
  :func:`standard_error`): on a few dozen objects of a class, a recall of 0.5 has a standard error
  of about 0.07, and a gate on the bound alone refuses unchanged models by chance;
- the updated weights are not all finite.

A rejected update leaves the tutor untouched: ``verify_update`` never modifies the tutor it is
given; it returns the updated state dict only with an accepting verdict.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from diredi_sim.data import VOC_CLASSES
from diredi_sim.deltas import apply_delta, check_delta, compute_norm


@dataclass(frozen=True)
class VerifyConfig:
    critical_classes: tuple[str, ...] = ()  # empty: every evaluated (presumed) class is critical
    max_ap_drop: float = 0.05  # absolute AP@0.5 a critical class may lose
    max_delta_norm: float = 0.0  # 0: no bound
    max_precision_drop: float = 0.10  # absolute precision a critical class may lose at the score threshold
    max_recall_drop: float = 0.10  # absolute recall a critical class may lose at the score threshold
    max_f1_drop: float = 0.10  # absolute F1 a critical class may lose at the score threshold
    # precision / recall / F1 checks: a fall fails when it exceeds its bound + noise_z standard errors of
    # the difference (binomial, from the counts before and after; standard_error); 0: the bound alone
    noise_z: float = 0.0

    def __post_init__(self):
        unknown = [c for c in self.critical_classes if c not in VOC_CLASSES]
        if unknown:
            raise ValueError(f"verify.critical_classes: unknown class {unknown[0]!r}")
        for key in ("max_ap_drop", "max_delta_norm", "max_precision_drop", "max_recall_drop", "max_f1_drop", "noise_z"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"verify.{key} = {value!r}: must be finite and >= 0")


# The operating-point checks: (name in reasons, Verdict field stem, VerifyConfig bound).
_OPERATING_POINT_CHECKS = (("precision", "precision", "max_precision_drop"),
                           ("recall", "recall", "max_recall_drop"),
                           ("F1", "f1", "max_f1_drop"))


@dataclass
class Verdict:
    accepted: bool
    reasons: list[str]
    delta_norm: float
    ap_before: dict[str, float] = field(default_factory=dict)
    ap_after: dict[str, float] = field(default_factory=dict)
    map_before: float = math.nan
    map_after: float = math.nan
    # per class at the deployment score threshold (compute_prf's figures: undefined ratios are 0.0)
    score_threshold: float = math.nan
    precision_before: dict[str, float] = field(default_factory=dict)
    precision_after: dict[str, float] = field(default_factory=dict)
    recall_before: dict[str, float] = field(default_factory=dict)
    recall_after: dict[str, float] = field(default_factory=dict)
    f1_before: dict[str, float] = field(default_factory=dict)
    f1_after: dict[str, float] = field(default_factory=dict)


def verify_update(
    tutor: nn.Module,
    delta: Mapping[str, Tensor],
    evaluate,
    cfg: VerifyConfig = VerifyConfig(),
    *,
    weight: float = 1.0,
    before: dict | None = None,
) -> tuple[Verdict, dict[str, Tensor] | None]:
    """Check ``tutor + weight * delta``; returns the verdict and, if accepted, the new state.

    ``evaluate(model) -> dict`` evaluates a model on the held-out presumed-class data at the
    deployment score threshold and returns the full result of ``evaluate_detector`` /
    ``evaluate_detections``: AP is read from ``result["voc"]["per_class"]`` and
    ``result["voc"]["mAP"]``, precision/recall/F1 at the threshold from
    ``result["prf"]["per_class"][name]`` (with its ``"tp"``, ``"fp"``, ``"fn"`` counts) and the
    threshold itself from ``result["prf"]["score_threshold"]``. ``before`` is that result for the
    tutor as it is, when already known. A result without ``"voc"``, or whose ``"prf"`` lacks the
    ``"per_class"`` breakdown, or a ``before`` and ``after`` at different score thresholds, is a
    ValueError: no caller can skip the operating-point checks by passing AP alone.

    The critical classes are ``cfg.critical_classes`` or, when that is empty, every class with
    an AP (non-NaN) before the update. For each:

    - AP: rejected when it falls by more than ``cfg.max_ap_drop`` or is missing/NaN after; a
      class without AP before (no ground truth) is skipped.
    - precision, recall, F1 at the threshold: rejected when one of them falls by more than
      ``cfg.max_precision_drop`` / ``max_recall_drop`` / ``max_f1_drop`` (plus ``cfg.noise_z``
      standard errors of the difference, when set: :func:`standard_error`). A class without
      ground truth (``tp + fn == 0``) or without detections at the threshold before
      (``tp + fp == 0``) is skipped: its figures before are undefined, so there is nothing to
      fall from. After the update an undefined ratio counts as 0.0 (no detection any more:
      precision 0, as ``compute_prf`` reports it), and a class missing from the breakdown after
      counts as 0.0 on all three.

    Every reason names the check, the class and the numbers, e.g. ``critical class bus:
    precision at score 0.5 fell 0.412 (0.700 -> 0.288), more than 0.100``.
    """
    state = tutor.state_dict()
    problems = check_delta(delta, state)
    if problems:
        return Verdict(False, [f"malformed delta: {p}" for p in problems], math.nan), None
    norm = compute_norm(delta)
    if cfg.max_delta_norm and norm > cfg.max_delta_norm:
        return Verdict(False, [f"delta norm {norm:.4g} exceeds the bound {cfg.max_delta_norm:.4g}"], norm), None
    updated_state = apply_delta(state, delta, weight)
    candidate = copy.deepcopy(tutor)
    candidate.load_state_dict(updated_state)
    before = before if before is not None else evaluate(tutor)
    verdict = judge(before, evaluate(candidate), cfg, norm=norm, state=updated_state)
    return verdict, (updated_state if verdict.accepted else None)


def check_model_state(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> list[str]:
    """Every reason ``state`` cannot replace a model whose state is ``reference``: unknown or
    missing keys, a value that is not a tensor, wrong shape or dtype, non-finite values."""
    problems = [f"unknown key {k}" for k in sorted(set(state) - set(reference))]
    missing = sorted(set(reference) - set(state))
    if missing:
        problems.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
    for key in sorted(set(state) & set(reference)):
        value, expected = state[key], reference[key]
        if not isinstance(value, Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != expected.shape or value.dtype != expected.dtype:
            problems.append(f"{key} is {value.dtype} {tuple(value.shape)}, expected {expected.dtype} {tuple(expected.shape)}")
        elif value.is_floating_point() and not torch.isfinite(value).all():
            problems.append(f"{key} has non-finite values")
    return problems


def verify_model(current: nn.Module, candidate_state: Mapping[str, Tensor], evaluate, cfg: VerifyConfig = VerifyConfig(), *,
                 before: dict | None = None) -> tuple[Verdict, nn.Module | None]:
    """The same checks for a whole model that would replace ``current`` (an edge model distilled
    by a customer, before the manufacturer deploys it): ``candidate_state`` must match
    ``current``'s keys, shapes and dtypes and be finite (:func:`check_model_state`, before any
    evaluation), and on ``evaluate``'s held-out data no critical class may lose more AP,
    precision, recall or F1 than ``cfg`` allows (``max_delta_norm`` does not apply: this is a
    model, not a delta). The verdict's ``delta_norm`` is the norm of candidate - current over the
    floating-point tensors. Returns the verdict and the candidate model (None when malformed)."""
    reference = current.state_dict()
    problems = check_model_state(candidate_state, reference)
    if problems:
        return Verdict(False, [f"malformed model: {p}" for p in problems], math.nan), None
    norm = compute_norm({k: v - reference[k] for k, v in candidate_state.items() if v.is_floating_point()})
    candidate = copy.deepcopy(current)
    candidate.load_state_dict(candidate_state)
    before = before if before is not None else evaluate(current)
    return judge(before, evaluate(candidate), cfg, norm=norm, state=candidate_state), candidate


def judge(before: Mapping, after: Mapping, cfg: VerifyConfig, *, norm: float, state: Mapping[str, Tensor]) -> Verdict:
    """The verdict on a model evaluated ``after`` against the model it would replace, evaluated
    ``before`` (both full ``evaluate_detections`` results), and on its weights ``state``."""
    voc_before, voc_after = _voc_part(before), _voc_part(after)
    prf_before, prf_after = _prf_part(before), _prf_part(after)
    reasons = []
    critical = cfg.critical_classes or tuple(name for name, ap in voc_before["per_class"].items() if ap is not None and not math.isnan(ap))
    for name in critical:
        ap_before, ap_after = voc_before["per_class"].get(name), voc_after["per_class"].get(name)
        if ap_before is None or math.isnan(ap_before):
            continue
        if ap_after is None or math.isnan(ap_after) or ap_before - ap_after > cfg.max_ap_drop:
            reasons.append(f"critical class {name} lost {ap_before - (ap_after or 0):.3f} AP ({ap_before:.3f} -> {ap_after or 0:.3f}), "
                           f"more than {cfg.max_ap_drop:.3f}")
    threshold = math.nan
    threshold = float(prf_before.get("score_threshold", math.nan))
    if threshold != float(prf_after.get("score_threshold", threshold)):
        raise ValueError(f"before and after were evaluated at different score thresholds "
                         f"({threshold:g}, {prf_after['score_threshold']:g})")
    at = f"at score {threshold:g}" if math.isfinite(threshold) else "at the score threshold"
    for name in critical:
        counts = prf_before["per_class"].get(name)
        if counts is None or counts["tp"] + counts["fn"] == 0 or counts["tp"] + counts["fp"] == 0:
            continue  # no ground truth or no detection before: undefined, nothing to fall from
        now = prf_after["per_class"].get(name) or {}
        for label, stem, bound_key in _OPERATING_POINT_CHECKS:
            value_before, value_after, bound = counts[stem], now.get(stem, 0.0), getattr(cfg, bound_key)
            noise = cfg.noise_z * math.hypot(standard_error(counts, stem), standard_error(now, stem)) if cfg.noise_z else 0.0
            if value_before - value_after > bound + noise:
                allowed = f"{bound:.3f}" if not noise else f"{bound:.3f} + {cfg.noise_z:g} standard errors = {bound + noise:.3f}"
                reasons.append(f"critical class {name}: {label} {at} fell {value_before - value_after:.3f} "
                               f"({value_before:.3f} -> {value_after:.3f}), more than {allowed}")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        reasons.append("updated weights are not all finite")

    def figures(prf: dict, stem: str) -> dict[str, float]:
        return {name: entry[stem] for name, entry in prf["per_class"].items()}

    verdict = Verdict(not reasons, reasons, norm, dict(voc_before["per_class"]), dict(voc_after["per_class"]),
                      voc_before["mAP"], voc_after["mAP"], threshold,
                      figures(prf_before, "precision"), figures(prf_after, "precision"),
                      figures(prf_before, "recall"), figures(prf_after, "recall"),
                      figures(prf_before, "f1"), figures(prf_after, "f1"))
    return verdict


def standard_error(counts: Mapping, stem: str) -> float:
    """The binomial standard error of a class's precision, recall or F1 (``stem``) at the score
    threshold, from its ``tp`` / ``fp`` / ``fn`` counts: ``sqrt(v (1 - v) / n)`` with ``n`` = tp + fp
    (precision), tp + fn (recall) or tp + (fp + fn) / 2 (F1 = tp / (tp + (fp + fn) / 2), treated as
    a proportion: an approximation). 0.0 when ``n`` is 0 (an undefined ratio, reported as 0.0) or
    the counts are missing."""
    tp, fp, fn = (float(counts.get(k, 0)) for k in ("tp", "fp", "fn"))
    n = {"precision": tp + fp, "recall": tp + fn, "f1": tp + (fp + fn) / 2}[stem]
    if n <= 0:
        return 0.0
    value = tp / n
    return math.sqrt(value * (1 - value) / n)


def _voc_part(result: Mapping) -> Mapping:
    """The VOC AP part of an evaluation (``result["voc"]``)."""
    if "voc" not in result:
        raise ValueError('evaluate(model) must return the full evaluate_detections result, with "voc" and "prf"')
    return result["voc"]


def _prf_part(result: Mapping) -> Mapping:
    """The P/R/F1 part with its per-class breakdown."""
    prf = result.get("prf")
    if prf is None or "per_class" not in prf:
        raise ValueError('evaluate(model) must return the full evaluate_detections result, with '
                         '"prf" and its "per_class" breakdown (compute_prf with class_names)')
    return prf
