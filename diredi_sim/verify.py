"""The manufacturer's acceptance check of an updated tutor.

Before a customer's delta reaches anything the manufacturer ships, the updated tutor
``tutor + weight * delta`` is evaluated on the manufacturer's own held-out data of the presumed
classes. The update is rejected when:

- the delta itself is malformed (keys outside neck/head, unknown or missing keys, wrong shape
  or dtype, non-finite values): rejected before any evaluation;
- its norm exceeds ``max_delta_norm`` (when set);
- any critical class loses more than ``max_ap_drop`` AP (absolute, AP@0.5) against the tutor
  before the update.

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

    def __post_init__(self):
        unknown = [c for c in self.critical_classes if c not in VOC_CLASSES]
        if unknown:
            raise ValueError(f"verify.critical_classes: unknown class {unknown[0]!r}")
        if self.max_ap_drop < 0:
            raise ValueError(f"verify.max_ap_drop = {self.max_ap_drop!r}: must be >= 0")
        if self.max_delta_norm < 0:
            raise ValueError(f"verify.max_delta_norm = {self.max_delta_norm!r}: must be >= 0")


@dataclass
class Verdict:
    accepted: bool
    reasons: list[str]
    delta_norm: float
    ap_before: dict[str, float] = field(default_factory=dict)
    ap_after: dict[str, float] = field(default_factory=dict)
    map_before: float = math.nan
    map_after: float = math.nan


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

    ``evaluate(model) -> dict`` evaluates a model on the held-out presumed-class data and
    returns ``{"per_class": {name: AP}, "mAP": float}`` (e.g. the ``"voc"`` part of
    ``evaluate_detector``). ``before`` is that result for the tutor as it is, when already known.
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
    after = evaluate(candidate)
    reasons = []
    critical = cfg.critical_classes or tuple(name for name, ap in before["per_class"].items() if ap is not None and not math.isnan(ap))
    for name in critical:
        ap_before, ap_after = before["per_class"].get(name), after["per_class"].get(name)
        if ap_before is None or math.isnan(ap_before):
            continue
        if ap_after is None or math.isnan(ap_after) or ap_before - ap_after > cfg.max_ap_drop:
            reasons.append(f"critical class {name} lost {ap_before - (ap_after or 0):.3f} AP ({ap_before:.3f} -> {ap_after or 0:.3f}), "
                           f"more than {cfg.max_ap_drop:.3f}")
    if not all(torch.isfinite(v).all() for v in updated_state.values() if v.is_floating_point()):
        reasons.append("updated weights are not all finite")
    verdict = Verdict(not reasons, reasons, norm, dict(before["per_class"]), dict(after["per_class"]), before["mAP"], after["mAP"])
    return verdict, (updated_state if verdict.accepted else None)
