"""Run folders: config, metrics as JSON lines, checkpoints that describe themselves.

Every file is written atomically (a temporary file in the same folder, fsync, ``os.replace``),
so a crash leaves either the old file or the new one, never a torn one. ``metrics.jsonl`` is
append-only; a torn last line (a crash mid-append) is skipped with a warning when read.

Layout of a run folder::

    RUN/config.json        the full config of the run, and under "environment" the library
                           versions, the device and the git commit that produced it
    RUN/log.txt            the log records of the run's process (and its worker processes)
    RUN/metrics.jsonl      one JSON object per line (epoch / round / stage rows)
    RUN/checkpoints/*.pt   {"format", "role", "preset", "spec", "config", "state_dict", ...}
    RUN/*.json             results (per-class AP, tables)
    RUN/results.csv        the results as one tidy table (diredi_sim.tidy), where the command has results
    RUN/tensorboard/       the metrics rows as TensorBoard scalars (with `tensorboard = true`)
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
    it ends: :func:`close_runs`). With ``tensorboard`` on, every metrics row that :meth:`log`
    appends is also written as TensorBoard scalars to ``tensorboard/`` (:class:`ScalarWriter`)."""

    def __init__(self, folder: str | Path, *, tensorboard: bool = False):
        self.folder = Path(folder)
        self.tensorboard = bool(tensorboard)
        self._writer: ScalarWriter | None = None
        self._log_handler = None

    @classmethod
    def create(cls, root: str | Path, name: str, config: Any) -> "Run":
        """A new folder ``<root>/<time>-<name>`` with ``config.json`` (the config and, under
        ``environment``, the library versions, device and git commit); its log file attached.
        ``config``'s ``tensorboard`` setting (a field or key) turns the TensorBoard writer on."""
        tensorboard = wants_tensorboard(config)
        if tensorboard:
            require_tensorboard()  # before the folder exists
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(root) / f"{stamp}-{name}"
        suffix = 1
        while folder.exists():
            suffix += 1
            folder = Path(root) / f"{stamp}-{name}-{suffix}"
        folder.mkdir(parents=True)
        run = cls(folder, tensorboard=tensorboard)
        write_config(run.folder, config)
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
        """Stop writing the log file and TensorBoard events (the files stay)."""
        if self._log_handler is not None:
            detach_log_file(self._log_handler)
            self._log_handler = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
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
        if self.tensorboard:
            if self._writer is None:
                self._writer = ScalarWriter(self.folder / "tensorboard")
            self._writer.write(row)

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


# ------------------------------------------------------------------------------ config.json


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git(folder: Path, *args: str) -> str | None:
    """The output of ``git args`` in ``folder``; None when git is missing, fails or takes too long."""
    import subprocess

    try:
        result = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def read_git_commit(folder: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of ``folder`` (default: this project's folder) when it is a git
    checkout; None when it is not, or git is missing or fails."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parents[1]
    commit = (_git(folder, "rev-parse", "HEAD") or "").strip()
    return commit or None


def read_git_dirty(folder: str | Path | None = None) -> bool | None:
    """Whether tracked files of the checkout differ from its commit (None: not a git checkout)."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parents[1]
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status.strip())


def describe_environment() -> dict:
    """What produced a run: Python and library versions (None for one not installed), this
    process's device (:func:`diredi_sim.compute.current_device`), the project's git commit
    (None outside a git checkout) and whether tracked files differed from it, the command line."""
    import platform
    import sys

    from diredi_sim import __version__
    from diredi_sim.compute import current_device

    device = current_device()
    versions = {"python": platform.python_version(), "diredi-sim": __version__, "torch": torch.__version__,
                **{name: _package_version(name) for name in ("torchvision", "flwr", "ray", "numpy")}}
    return {"versions": versions, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "platform": platform.platform(), "git_commit": read_git_commit(), "git_dirty": read_git_dirty(),
            "argv": list(sys.argv)}


def write_config(folder: str | Path, config: Any) -> Path:
    """``config.json``: the config's fields and ``environment`` (:func:`describe_environment`)."""
    data = to_jsonable(config)
    if isinstance(data, dict):
        data = {**data, "environment": describe_environment()}
    return atomic_write_json(Path(folder) / "config.json", data)


def strip_environment(data: dict) -> dict:
    """A config.json's fields without its ``environment`` record (to rebuild the typed config)."""
    return {k: v for k, v in data.items() if k != "environment"}


# ------------------------------------------------------------------------------ TensorBoard

TENSORBOARD_SETTING = "tensorboard"
# Keys of a metrics row that say where it belongs rather than what was measured.
_ROW_KEYS = ("time", "epoch", "round", "partition_id", "replicate", "seed", "server-round", "node")


def wants_tensorboard(config: Any) -> bool:
    """The config's ``tensorboard`` setting (a dataclass field or a dict key; False when absent)."""
    if isinstance(config, Mapping):
        return bool(config.get(TENSORBOARD_SETTING, False))
    return bool(getattr(config, TENSORBOARD_SETTING, False))


def require_tensorboard() -> None:
    """ImportError naming the setting when ``tensorboard = true`` but the package is missing."""
    import importlib

    try:
        importlib.import_module("torch.utils.tensorboard")  # imports the tensorboard package
    except ImportError as exc:
        from diredi_sim.config import ConfigError

        raise ConfigError(f"{TENSORBOARD_SETTING} = true needs the tensorboard package, which torch.utils.tensorboard "
                          f"could not import ({exc}); install it (`uv pip install tensorboard`) or set "
                          f"{TENSORBOARD_SETTING} = false") from None


def _scalars(row: Mapping, prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row, nested mappings flattened with '/' (per_class/cat)."""
    out = {}
    for key, value in row.items():
        if not prefix and key in _ROW_KEYS:
            continue
        if isinstance(value, Mapping):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (bool, int, float, np.number)) and math.isfinite(float(value)):
            out[f"{prefix}{key}"] = float(value)
    return out


class ScalarWriter:
    """Metrics rows as TensorBoard scalars (torch.utils.tensorboard.SummaryWriter): tag
    ``<stage or event>[/customer<p>]/<measure>``, step the row's epoch or round."""

    def __init__(self, folder: str | Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, row: Mapping) -> None:
        group = str(row.get("stage") or row.get("pipeline_stage") or row.get("event") or "run")
        if row.get("partition_id") is not None:
            group += f"/customer{row['partition_id']}"
        step = int(row.get("epoch") or row.get("round") or 0)
        for key, value in _scalars(row).items():
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
