"""FedAvg, FedProx and Flower's other strategies by name on the edge model, with Flower's own strategies (``server/baseline_app.py``,
``clients/baseline_app.py``, served by the one ClientApp), for ``baselines.rounds`` rounds; each customer's row is the global
edge model's after the last round, evaluated at the customer."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

from diredi_sim.population import build_population
from diredi_sim.federation_config import FederationConfig
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


def check_strategy(config: FederationConfig, *, method: str) -> None:
    """The strategy's parameters (baselines.strategy_args) are ones its constructor takes."""
    from server.baseline_app import build_strategy

    build_strategy(config, method, 1)


SUMMARIES = {
    "fedavg": "FedAvg: the whole edge model fine-tuned at each customer and averaged",
    "fedprox": "FedProx: FedAvg with a proximal term (baselines.proximal_mu)",
    "fedavgm": "FedAvgM: FedAvg with server momentum",
    "fedadam": "FedAdam: Adam on the server over the averaged update",
    "fedyogi": "FedYogi: Yogi on the server over the averaged update",
    "fedadagrad": "FedAdagrad: Adagrad on the server over the averaged update",
    "fedmedian": "FedMedian: the coordinate-wise median of the customers' models",
    "fedtrimmedavg": "FedTrimmedAvg: the coordinate-wise trimmed mean (beta)",
    "krum": "Krum: the one model closest to its n - f - 2 neighbours",
    "multikrum": "MultiKrum: the mean of the models Krum selects",
    "bulyan": "Bulyan: MultiKrum selection, then a trimmed mean",
}
for _name, _summary in SUMMARIES.items():  # Flower's strategies by name (server/baseline_app.py STRATEGIES)
    register(Method(_name, _summary, partial(run_flower_baseline, method=_name), check=partial(check_strategy, method=_name)))
