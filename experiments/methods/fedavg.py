"""FedAvg and FedProx on the edge model, with Flower's own strategies (``server/baseline_app.py``,
``clients/baseline_app.py``, served by the one ClientApp), for ``baselines.rounds`` rounds; each customer's row is the global
edge model's after the last round, evaluated at the customer."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

from diredi_sim.federation import FederationConfig, build_population
from experiments.methods import Method, register


def run_flower_baseline(config: FederationConfig, shared: dict | None = None, *, method: str = "fedavg") -> tuple[list[dict], Path]:
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from experiments.simulate import build_backend_config
    from server.baseline_app import make_baseline_app
    from server.server_app import FederationOutcome

    outcome = FederationOutcome()
    population = build_population(config.population, config.pipeline.presumed_split)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        run_simulation(server_app=make_baseline_app(config, method, outcome), client_app=client_app,
                       num_supernodes=len(population), backend_config=build_backend_config(config))
    if outcome.folder is None or not outcome.summary:
        raise RuntimeError(f"{method}: the simulation ended without results (run folder: {outcome.folder})")
    return outcome.summary, outcome.folder


register(Method("fedavg", "FedAvg: the whole edge model fine-tuned at each customer and averaged", partial(run_flower_baseline, method="fedavg")))
register(Method("fedprox", "FedProx: FedAvg with a proximal term (baselines.proximal_mu)", partial(run_flower_baseline, method="fedprox")))
