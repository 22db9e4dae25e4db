"""The methods ``diredi-sim compare`` runs on the same customers, splits and seeds: one module
per method, each registering itself here. A method is a name, a one-line summary and a function
``run(config, shared) -> (rows, folder)``: ``config`` is the run's FederationConfig for one
replicate, ``shared`` a dict the methods of that replicate share (DiReDi leaves its customers'
training image counts there, ``shared["budgets"]``, for the equal-compute baselines); ``rows``
has one dict per customer (``partition_id``, ``customer``, and the measures of
:data:`experiments.compare.MEASURES` it has), ``folder`` the method's own run folder or None.

Adding a method: a module here (or anywhere imported before ``compare`` runs) that calls
:func:`register`; then name it in ``baselines.methods``. README, "Adding a method".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diredi_sim.config import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    run: Callable[..., tuple[list[dict], Path | None]]  # (config, shared) -> (rows per customer, run folder or None)
    check: Callable[..., None] | None = None  # (config) -> None, raises ConfigError: compare calls it before anything runs


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a second method of the same name replaces the first)."""
    REGISTRY[method.name] = method
    return method


def equal_compute_budgets(config, shared: dict | None) -> dict[int, int]:
    """Each customer's training images in this replicate's DiReDi run (partition id -> images),
    for a method that trains at equal compute; empty when DiReDi did not run first or
    ``pipeline.equal_compute`` is off."""
    return ((shared or {}).get("budgets") or {}) if config.pipeline.equal_compute else {}


def resolve(names) -> list[Method]:
    """The registered methods named in ``baselines.methods``, in order; ConfigError names an unknown one."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"baselines.methods: unknown method {unknown[0]!r}; registered: {sorted(REGISTRY)}")
    return [REGISTRY[n] for n in names]


# the built-in methods register themselves on import
from experiments.methods import cema, diredi, fedavg, local, sddist  # noqa: E402

__all__ = ["Method", "REGISTRY", "equal_compute_budgets", "register", "resolve", "cema", "diredi", "fedavg", "local", "sddist"]
