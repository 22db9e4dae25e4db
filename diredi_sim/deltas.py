"""Neck+head weight deltas: selection, delta, substitution, merging, size accounting.

A delta is a named float32 CPU state dict holding exactly the neck (``backbone.fpn.*``) and
head (``head.*``) parameters of a tutor: ``delta = gamma * (Tutor2 - Tutor1)``. The
manufacturer substitutes it into its tutor: ``tutor' = tutor + weight * delta`` (the paper
uses gamma = weight = 1). Nothing is matched by position, everything by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from diredi_sim.models import part_of

TRAVELLING_PARTS = ("neck", "head")
MERGE_RULES = ("sum", "mean", "median", "trimmed_mean")


def select_neck_head(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The neck and head entries of a state dict (floating-point tensors only)."""
    return {k: v for k, v in state.items() if part_of(k) in TRAVELLING_PARTS and v.is_floating_point()}


def compute_delta(tutor2: Mapping[str, Tensor], tutor1: Mapping[str, Tensor], gamma: float = 1.0) -> dict[str, Tensor]:
    """gamma * (Tutor2 - Tutor1) over neck+head, as float32 CPU tensors keyed by name."""
    after, before = select_neck_head(tutor2), select_neck_head(tutor1)
    if set(after) != set(before):
        raise KeyError(f"Tutor1 and Tutor2 differ in neck/head keys: {sorted(set(after) ^ set(before))[:3]}")
    return {k: (gamma * (after[k].detach().float().cpu() - before[k].detach().float().cpu())) for k in after}


def apply_delta(state: Mapping[str, Tensor], delta: Mapping[str, Tensor], weight: float = 1.0) -> dict[str, Tensor]:
    """A new state dict ``state + weight * delta``; ``state`` is left untouched."""
    problems = check_delta(delta, state)
    if problems:
        raise ValueError("cannot apply delta: " + "; ".join(problems))
    updated = {k: v.clone() for k, v in state.items()}
    for k, d in delta.items():
        updated[k] = (updated[k].float() + weight * d.to(updated[k].device).float()).to(updated[k].dtype)
    return updated


def compute_norm(delta: Mapping[str, Tensor]) -> float:
    """The L2 norm of the whole delta, as one vector."""
    if not delta:
        return 0.0
    return float(torch.sqrt(sum((v.float() ** 2).sum() for v in delta.values())))


def count_bytes(delta: Mapping[str, Tensor], dtype: torch.dtype = torch.float32) -> int:
    """Payload bytes of the delta's values at ``dtype`` (names and framing not counted)."""
    item = torch.empty((), dtype=dtype).element_size()
    return sum(v.numel() for v in delta.values()) * item


def check_delta(delta: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> list[str]:
    """Every reason ``delta`` cannot be substituted into a model with state ``reference``:
    keys outside neck/head, unknown or missing keys, wrong shape or dtype, non-finite values."""
    problems = []
    expected = select_neck_head(reference)
    for key in sorted(delta):
        try:
            part = part_of(key)
        except KeyError:
            problems.append(f"unknown key {key}")
            continue
        if part not in TRAVELLING_PARTS:
            problems.append(f"key {key} is in the {part}, outside neck and head")
        elif key not in expected:
            problems.append(f"unknown key {key}")
        else:
            value = delta[key]
            if not isinstance(value, Tensor):
                problems.append(f"{key} is a {type(value).__name__}, not a tensor")
            elif value.shape != expected[key].shape:
                problems.append(f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
            elif value.dtype != torch.float32:
                problems.append(f"{key} has dtype {value.dtype}, expected torch.float32")
            elif not torch.isfinite(value).all():
                problems.append(f"{key} has non-finite values")
    missing = sorted(set(expected) - set(delta))
    if missing:
        problems.append(f"{len(missing)} neck/head keys missing (e.g. {missing[0]})")
    return problems


def clip_norm(delta: Mapping[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """Scale the delta down so that its norm is at most ``max_norm``."""
    norm = compute_norm(delta)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in delta.items()}


def merge_deltas(
    deltas: Sequence[Mapping[str, Tensor]],
    rule: str = "mean",
    *,
    weights: Sequence[float] | None = None,
    max_norm: float | None = None,
    trim_fraction: float = 0.2,
) -> dict[str, Tensor]:
    """Merge several customers' deltas into one, for one shared tutor.

    ``sum`` and ``mean`` (weighted by ``weights``, e.g. example counts, when given); robust
    rules: ``median`` (coordinate-wise) and ``trimmed_mean`` (coordinate-wise, dropping
    ``trim_fraction`` of the values at each end). ``max_norm`` clips each delta first.
    """
    if rule not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {rule!r}; choose one of {list(MERGE_RULES)}")
    if not deltas:
        raise ValueError("no deltas to merge")
    keys = set(deltas[0])
    for i, d in enumerate(deltas[1:], 1):
        if set(d) != keys:
            raise KeyError(f"delta {i} has other keys than delta 0: {sorted(set(d) ^ keys)[:3]}")
    if max_norm is not None:
        deltas = [clip_norm(d, max_norm) for d in deltas]
    merged = {}
    for key in deltas[0]:
        stack = torch.stack([d[key].float() for d in deltas])
        if rule == "sum":
            merged[key] = stack.sum(0)
        elif rule == "mean":
            if weights is None:
                merged[key] = stack.mean(0)
            else:
                w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * (stack.dim() - 1)))
                merged[key] = (stack * w).sum(0) / w.sum()
        elif rule == "median":
            merged[key] = stack.median(0).values if len(deltas) % 2 else stack.quantile(0.5, dim=0)
        else:
            k = int(len(deltas) * trim_fraction)
            ordered = stack.sort(0).values
            merged[key] = ordered[k: len(deltas) - k].mean(0)
    return merged
