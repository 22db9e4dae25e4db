"""Where the federation runs: Ray's resources, the customer actors' threads, the manufacturer's
worker processes and how long the server waits for a round. Settings of a run, not of the
algorithm: ``diredi_sim`` never reads them (its :class:`~diredi_sim.federation_config.FederationConfig`
has no such keys), the ServerApp, the strategy and ``experiments.simulate`` do.

A config file gives them in its ``[engine]`` section; :class:`RunConfig` is the root that
``diredi-sim simulate``, ``compare``, ``make demo`` and ``flwr run`` load. A customer does not get
the engine's settings: its messages carry the algorithm's config (:func:`customer_settings`) and
the threads it may use (the round key ``client-threads``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from diredi_sim.config import MOVED_KEYS, _check, to_flat
from diredi_sim.federation_config import FederationConfig


@dataclass(frozen=True)
class EngineConfig:
    client_cpus: float = 1.0  # Ray resources per customer actor
    client_gpus: float = 0.0
    client_threads: int = 1  # torch threads inside a customer actor
    num_cpus: int = 0  # CPUs Ray may use (0: all of this machine's)
    ray_address: str = ""  # an existing Ray cluster ("auto" or host:port); "" = a local Ray bound to 127.0.0.1
    server_workers: int = 0  # processes for the manufacturer's per-customer steps (0: min(customers, CPUs))
    round_timeout: float = 86400.0  # seconds the server waits for a round's replies

    def __post_init__(self):
        _check(self.client_cpus > 0, "engine.client_cpus", self.client_cpus, "must be > 0")
        _check(self.client_gpus >= 0, "engine.client_gpus", self.client_gpus, "must be >= 0")
        _check(self.client_threads >= 1, "engine.client_threads", self.client_threads, "must be >= 1")
        _check(self.num_cpus >= 0, "engine.num_cpus", self.num_cpus, "must be >= 0")
        _check(self.server_workers >= 0, "engine.server_workers", self.server_workers, "must be >= 0")
        _check(self.round_timeout > 0, "engine.round_timeout", self.round_timeout, "must be > 0")


ENGINE_KEYS = tuple(f.name for f in fields(EngineConfig))
MOVED_KEYS.update({f"simulation.{key}": f"engine.{key}" for key in ENGINE_KEYS})  # their place until 2026-12


@dataclass(frozen=True)
class RunConfig(FederationConfig):
    """A federation config and the engine it runs on."""

    engine: EngineConfig = field(default_factory=EngineConfig)


def engine_of(config: FederationConfig) -> EngineConfig:
    """The engine settings of ``config``: its own for a :class:`RunConfig`, the defaults for a plain
    :class:`FederationConfig` (one built in code, e.g. by a test that does not care where it runs)."""
    return config.engine if isinstance(config, RunConfig) else EngineConfig()


def algorithm_config(config: FederationConfig) -> FederationConfig:
    """``config`` without its engine: what a customer is told."""
    return FederationConfig(**{f.name: getattr(config, f.name) for f in fields(FederationConfig)})


def customer_settings(config: FederationConfig) -> dict:
    """The flat settings a customer's messages carry: the algorithm's config and ``client-threads``."""
    return {**to_flat(algorithm_config(config)), "client-threads": engine_of(config).client_threads}
