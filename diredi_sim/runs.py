"""Run folders: config, metrics as JSON lines, checkpoints that describe themselves.

Every file is written atomically (a temporary file in the same folder, fsync, ``os.replace``),
so a crash leaves either the old file or the new one, never a torn one. ``metrics.jsonl`` is
append-only; a torn last line (a crash mid-append) is skipped with a warning when read.

Layout of a run folder::

    RUN/config.json        the full config of the run
    RUN/log.txt            the log records of the run's process (and its worker processes)
    RUN/metrics.jsonl      one JSON object per line (epoch / round / stage rows)
    RUN/checkpoints/*.pt   {"format", "role", "preset", "spec", "config", "state_dict", ...}
    RUN/*.json             results (per-class AP, tables)
    RUN/results.csv        the results as one tidy table (diredi_sim.tidy), where the command has results
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, is_dataclass
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diredi_sim.logs import attach_log_file, detach_log_file

CHECKPOINT_FORMAT = "diredi-sim-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, not ours, or for another architecture."""


def release_memory() -> bool:
    """Give the heap that freed tensors leave behind back to the operating system (glibc's
    ``malloc_trim``), so that a long-lived process (a Flower actor, a manufacturer's worker)
    does not hold its training peak while it waits. Returns False where there is no glibc."""
    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths, tensors, numpy scalars and NaN (-> None) made JSON-serialisable."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line and fsync it: a finished append survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable(row)) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """All complete rows; a torn last line (crash mid-append) is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)  # a torn line may cut a character
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines) and not line.endswith("\n"):
                warnings.warn(f"{path}: skipping torn last line {number}")
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON: {exc}") from exc
    return rows


def save_checkpoint(path: str | Path, detector: torch.nn.Module, *, config: Any = None, **extra: Any) -> Path:
    """Weights plus everything needed to rebuild the model: role, preset, spec, the run config."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "role": getattr(detector, "role", None),
        "preset": getattr(detector, "preset", None),
        "spec": to_jsonable(getattr(detector, "spec", None)),
        "config": to_jsonable(config),
        "state_dict": {k: v.detach().cpu() for k, v in detector.state_dict().items()},
        "saved_at": time.time(),
        **extra,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by save_checkpoint; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a diredi-sim checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return payload


def load_detector_weights(detector: torch.nn.Module, path: str | Path) -> dict:
    """Load a checkpoint into ``detector``; another architecture is an error naming the keys at fault."""
    payload = load_checkpoint(path)
    state = payload["state_dict"]
    own = detector.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            k = wrong_shape[0]
            details.append(f"{len(wrong_shape)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(
            f"checkpoint {path} (role {payload.get('role')}, preset {payload.get('preset')}, spec {payload.get('spec')}) "
            f"does not fit this {getattr(detector, 'role', 'model')} ({getattr(detector, 'spec', '')}): " + "; ".join(details)
        )
    detector.load_state_dict(state)
    return payload


class Run:
    """A run folder. ``Run.create`` makes a new one; ``Run(path)`` opens an existing one.

    A run created by ``Run.create`` (or opened with :meth:`open_log`, which appends) writes the
    log records of its process to ``log.txt`` until :meth:`close` (a command closes its runs when
    it ends: :func:`close_runs`)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._log_handler = None

    @classmethod
    def create(cls, root: str | Path, name: str, config: Any) -> "Run":
        """A new folder ``<root>/<time>-<name>`` with ``config.json``; its log file attached."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(root) / f"{stamp}-{name}"
        suffix = 1
        while folder.exists():
            suffix += 1
            folder = Path(root) / f"{stamp}-{name}-{suffix}"
        folder.mkdir(parents=True)
        run = cls(folder)
        atomic_write_json(run.folder / "config.json", config)
        run.open_log()
        return run

    @property
    def log_path(self) -> Path:
        return self.folder / "log.txt"

    def open_log(self) -> "Run":
        """Append this process's log records to ``log.txt`` (a resumed run continues its file)."""
        if self._log_handler is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._log_handler = attach_log_file(self.log_path)
            _open_runs.append(self)
        return self

    @property
    def logging_to_file(self) -> bool:
        return self._log_handler is not None

    def close(self) -> None:
        """Stop writing the log file (it stays)."""
        if self._log_handler is not None:
            detach_log_file(self._log_handler)
            self._log_handler = None
        if self in _open_runs:
            _open_runs.remove(self)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.jsonl"

    def log(self, row: dict) -> None:
        append_jsonl(self.metrics_path, {"time": round(time.time(), 3), **row})

    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def checkpoint_path(self, name: str) -> Path:
        return self.folder / "checkpoints" / f"{name}.pt"

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.folder / name, obj)


_open_runs: list[Run] = []


def close_runs() -> None:
    """Close every run this process still writes a log file for (the end of a command)."""
    for run in list(_open_runs):
        run.close()
