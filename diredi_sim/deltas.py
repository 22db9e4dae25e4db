"""Neck+head weight deltas: selection, delta, substitution, merging, size accounting, uplink
compression.

A delta is a named float32 CPU state dict holding exactly the neck (``backbone.fpn.*``) and
head (``head.*``) parameters of a tutor: ``delta = gamma * (Tutor2 - Tutor1)``. The
manufacturer substitutes it into its tutor: ``tutor' = tutor + weight * delta`` (the paper
uses gamma = weight = 1). Nothing is matched by position, everything by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

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


def count_state_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of a state dict's or a payload's tensor data, each tensor at its own dtype (every
    value, index and scale; names and framing not counted)."""
    return sum(v.numel() * v.element_size() for v in state.values())


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


def privatize(delta: Mapping[str, Tensor], clip: float, noise_multiplier: float = 0.0,
              seed: int = 0) -> dict[str, Tensor]:
    """Local differential privacy on a customer's delta (the Gaussian mechanism): scale the whole
    delta, as one vector, to an L2 norm of at most ``clip``, then add noise of standard deviation
    ``noise_multiplier * clip`` to every value, drawn from a generator seeded with ``seed``.
    ``clip`` = 0 returns the delta unchanged. (The seed makes simulations repeatable; a real
    customer must keep it secret, or the manufacturer could draw the same noise and subtract it.)"""
    if clip <= 0:
        return dict(delta)
    clipped = clip_norm(delta, clip)
    if noise_multiplier <= 0:
        return clipped
    generator = torch.Generator().manual_seed(seed)
    std = noise_multiplier * clip
    noise = {k: std * torch.randn(clipped[k].shape, generator=generator) for k in sorted(clipped)}  # by name, not by position
    return {k: (v + noise[k].to(v.dtype)) for k, v in clipped.items()}


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


# ------------------------------------------------------------------------- uplink compression
#
# What goes on the wire for one delta, per parameter ``<name>`` (flat tensors, keyed by name):
#   none       <name>: float32 (the delta itself)
#   fp16       <name>: float16
#   int8       <name>: int8, <name>::scale: float32 [1]   (symmetric: value = q * scale, |q| <= 127)
#   topk       <name>::index: int32 [k] (flat, ascending), <name>::value: float16 [k]
#   topk-int8  <name>::index: int32 [k], <name>::value: int8 [k], <name>::scale: float32 [1]
# Top-k keeps, per tensor, the ceil(fraction * numel) entries of largest magnitude; the rest are 0.
# The payload describes itself: decompression needs only the parameter names and shapes.

COMPRESSIONS = ("none", "fp16", "int8", "topk", "topk-int8")
_SUFFIXES = ("scale", "index", "value")


def _quantize_int8(values: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-tensor int8: (q, scale) with values ~= q * scale, scale = max|values| / 127."""
    scale = values.abs().max() / 127 if values.numel() else torch.tensor(0.0)
    q = torch.round(values / scale).clamp(-127, 127) if scale > 0 else torch.zeros_like(values)
    return q.to(torch.int8), scale.reshape(1).float()


def compress_delta(delta: Mapping[str, Tensor], method: str = "none", *, topk_fraction: float = 0.1) -> dict[str, Tensor]:
    """The delta as it goes up under ``method`` (one of :data:`COMPRESSIONS`): a dict of plain
    CPU tensors, keyed as described above."""
    if method not in COMPRESSIONS:
        raise ValueError(f"unknown uplink compression {method!r}; choose one of {list(COMPRESSIONS)}")
    if not 0 < topk_fraction <= 1:
        raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
    payload = {}
    for name, value in delta.items():
        if "::" in name:
            raise ValueError(f"parameter name {name!r} contains '::'")
        flat = value.detach().float().cpu().reshape(-1)
        if method == "none":
            payload[name] = value.detach().float().cpu().contiguous()
        elif method == "fp16":
            payload[name] = value.detach().cpu().to(torch.float16).contiguous()
        elif method == "int8":
            payload[name], payload[f"{name}::scale"] = _quantize_int8(flat)
            payload[name] = payload[name].reshape(value.shape)
        else:
            k = min(flat.numel(), max(1, math.ceil(topk_fraction * flat.numel())))
            index = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            payload[f"{name}::index"] = index.to(torch.int32)
            if method == "topk":
                payload[f"{name}::value"] = flat[index].to(torch.float16)
            else:
                payload[f"{name}::value"], payload[f"{name}::scale"] = _quantize_int8(flat[index])
    return payload


def decompress_delta(payload: Mapping[str, Tensor], reference_shapes: Mapping[str, Any]) -> dict[str, Tensor]:
    """float32 tensors with exactly the names and shapes of ``reference_shapes`` (name -> shape,
    or a state dict) from a payload of :func:`compress_delta`, whatever its method. A malformed
    payload (unknown or missing key, wrong dtype, shape or length, index out of range) raises
    ValueError naming the key."""
    shapes = {k: tuple(v.shape if isinstance(v, Tensor) else v) for k, v in reference_shapes.items()}
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in payload.items():
        name, _, suffix = key.partition("::")
        if name not in shapes:
            raise ValueError(f"payload key {key}: unknown parameter {name}")
        if suffix and suffix not in _SUFFIXES:
            raise ValueError(f"payload key {key}: unknown suffix '::{suffix}' (expected one of {list(_SUFFIXES)})")
        if not isinstance(value, Tensor):
            raise ValueError(f"payload key {key}: a {type(value).__name__}, not a tensor")
        parts.setdefault(name, {})[suffix or "dense"] = value
    missing = sorted(set(shapes) - set(parts))
    if missing:
        raise ValueError(f"payload key {missing[0]}: missing ({len(missing)} parameters missing)")
    return {name: _decode_parameter(name, parts[name], shape) for name, shape in shapes.items()}


def _dequantize(name: str, key: str, value: Tensor, entries: Mapping[str, Tensor]) -> Tensor:
    """``value`` (float32/float16, or int8 times ``name::scale``) as float32."""
    if value.dtype in (torch.float32, torch.float16):
        if "scale" in entries:
            raise ValueError(f"payload key {name}::scale: a scale next to float values")
        return value.float()
    if value.dtype != torch.int8:
        raise ValueError(f"payload key {key}: dtype {value.dtype}, expected float32, float16 or int8")
    scale = entries.get("scale")
    if scale is None:
        raise ValueError(f"payload key {name}::scale: missing (needed by the int8 {key})")
    if scale.numel() != 1 or not scale.is_floating_point() or not torch.isfinite(scale).all():
        raise ValueError(f"payload key {name}::scale: expected one finite float, got {tuple(scale.shape)} {scale.dtype}")
    return value.float() * scale.float().reshape(())


def _decode_parameter(name: str, entries: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
    """One parameter's delta from its payload entries: dense (``name``) or sparse (``::index``
    and ``::value``), each possibly int8 with a ``::scale``."""
    if "dense" in entries:
        if "index" in entries or "value" in entries:
            raise ValueError(f"payload key {name}: both dense and sparse entries")
        value = entries["dense"]
        if tuple(value.shape) != shape:
            raise ValueError(f"payload key {name}: shape {tuple(value.shape)}, expected {shape}")
        return _dequantize(name, name, value, entries).contiguous()
    numel = math.prod(shape)
    index, value = entries.get("index"), entries.get("value")
    if index is None and value is None:
        raise ValueError(f"payload key {name}: missing (neither {name} nor {name}::index / ::value)")
    if index is None or value is None:
        raise ValueError(f"payload key {name}::{'index' if index is None else 'value'}: missing")
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        raise ValueError(f"payload key {name}::index: expected a 1-d int32 tensor, got {tuple(index.shape)} {index.dtype}")
    if value.shape != index.shape:
        raise ValueError(f"payload key {name}::value: shape {tuple(value.shape)}, expected {tuple(index.shape)} like its index")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise ValueError(f"payload key {name}::index: indices outside [0, {numel})")
    if index.unique().numel() != index.numel():
        raise ValueError(f"payload key {name}::index: repeated indices")
    flat = torch.zeros(numel, dtype=torch.float32)
    flat[index.long()] = _dequantize(name, f"{name}::value", value, entries)
    return flat.reshape(shape)
