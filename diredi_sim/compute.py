"""Where and how a process computes: its device and torch threads, and models moved there for
the duration of one piece of work.

Models rest on the CPU in float32 and contiguous memory, always: checkpoints, state dicts, deltas
and Flower messages are device-independent. A training run or an evaluation moves the modules it
uses to the process's device (and to channels_last memory when asked) for its duration and back
afterwards (:func:`on_device`); batches follow with :func:`to_device`. On the CPU with
channels_last off every move is a no-op, so results stay bit-exact.

The device is a per-process setting (``device`` in a config, ``--device`` on the command line):
``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first CUDA GPU this process sees, else the CPU).
A Ray actor given a GPU (the run's engine settings, ``server.engine``) sees the one Ray assigned it (Ray sets
``CUDA_VISIBLE_DEVICES``), so ``auto`` and ``cuda`` use that one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

DEVICE_CHOICES = "'cpu', 'cuda', 'cuda:N' or 'auto'"

_device = torch.device("cpu")


class DeviceError(ValueError):
    """A device that is malformed or not present on this machine; the message names it."""


def check_device_name(name: str) -> None:
    """Raise :class:`DeviceError` when ``name`` is not one of the accepted spellings."""
    if name in ("cpu", "cuda", "auto"):
        return
    if name.startswith("cuda:") and name[5:].isdigit():
        return
    raise DeviceError(f"device = {name!r}: must be {DEVICE_CHOICES}")


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` means on this machine; a CUDA device that does not exist here
    raises :class:`DeviceError` saying what this process sees."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible to this process"
        raise DeviceError(f"device = {name!r}: {built} (torch {torch.__version__}); use 'cpu' or 'auto'")
    index = int(name[5:]) if ":" in name else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device = {name!r}: this process sees {torch.cuda.device_count()} CUDA device(s) (0..{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def configure_process(*, device: str = "cpu", threads: int = 0) -> torch.device:
    """Set this process's device (for :func:`on_device`) and, when ``threads`` > 0, its torch
    threads. Returns the device."""
    global _device
    _device = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    return _device


def current_device() -> torch.device:
    return _device


def _is_channels_last(module: nn.Module) -> bool:
    weights = [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] * p.shape[-2] > 1]
    return bool(weights) and weights[0].is_contiguous(memory_format=torch.channels_last)


def _device_of(module: nn.Module) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def on_device(modules: nn.Module | Sequence[nn.Module], *, channels_last: bool = False) -> Iterator[torch.device]:
    """Move ``modules`` to this process's device (channels_last memory when asked) for the block,
    then back to the CPU in contiguous memory, also when the block raises. Yields the device.

    Nested blocks are free: a module already on the device (or already channels_last) is left
    as it is, and only what this block moved is moved back."""
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    device = _device
    moved = [m for m in modules if _device_of(m) != device]
    reformatted = [m for m in modules if channels_last and not _is_channels_last(m)]
    for module in moved:
        module.to(device)
    for module in reformatted:  # nn.Module.to(memory_format=...) converts every 4-d parameter and buffer
        module.to(memory_format=torch.channels_last)
    try:
        yield device
    finally:
        for module in reformatted:
            module.to(memory_format=torch.contiguous_format)
        for module in moved:
            module.to("cpu")


def to_device(images: Sequence[Tensor], targets: Sequence[dict] | None = None, device: torch.device | None = None):
    """A batch (images and, when given, their targets' tensors) on ``device`` (default: this
    process's). On the CPU the batch is returned as it is."""
    device = device or _device
    if device.type == "cpu":
        return (list(images), None if targets is None else list(targets))
    images = [image.to(device, non_blocking=True) for image in images]
    if targets is not None:
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets
