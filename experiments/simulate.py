"""``diredi-sim simulate CONFIG``: the federation on Flower's simulation engine (Ray backend).

One SuperNode per customer; Ray runs one customer actor per ``engine.client_cpus`` CPUs
(one per core by default), bound to 127.0.0.1, or joins an existing cluster
(``engine.ray_address``; :mod:`server.engine`). The ServerApp is bound to the typed config directly; ``flwr run .``
runs the same apps with the settings from pyproject.toml's [tool.flwr.app.config].
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

from diredi_sim.compute import configure_process
from diredi_sim.population import build_population
from diredi_sim.federation_config import FederationConfig
from diredi_sim.datasets import DataSets
from diredi_sim.manufacturer import manufacturer_is_cached, prepare_manufacturer
from diredi_sim.runs import require_tensorboard


def build_backend_config(config: FederationConfig) -> dict:
    """Flower's Ray backend settings: resources per customer actor, and where Ray runs: the
    cluster at ``engine.ray_address`` or, when that is empty, at ``$RAY_ADDRESS``; else a local
    Ray bound to 127.0.0.1. On a cluster every node needs this project installed (its workers
    import ``clients`` and ``diredi_sim``) and the data and model caches at the same paths."""
    from server.engine import engine_of

    engine = engine_of(config)
    address = engine.ray_address or os.environ.get("RAY_ADDRESS", "")  # the setting, else Ray's own variable
    if address:
        init_args = {"address": address}
    else:
        # "local": always a new instance; with no address Ray would join the cluster a `ray start`
        # on this machine left in /tmp/ray/ray_current_cluster (another run's, a test's)
        init_args = {"address": "local", "num_cpus": engine.num_cpus or os.cpu_count() or 1, "_node_ip_address": "127.0.0.1",
                     "include_dashboard": False, "log_to_driver": True}  # customers' progress lines reach this terminal
    return {"client_resources": {"num_cpus": engine.client_cpus, "num_gpus": engine.client_gpus}, "init_args": init_args}


def start_ray(backend_config: dict, attempts: int = 3) -> None:
    """Start (or join) Ray here, with Flower's backend's own arguments, before Flower would: its
    backend skips ``ray.init`` when Ray is up, and stops it at the end (``ray.shutdown``). Ray waits
    a fixed 30 s for a new raylet to register (``ray/_private/node.py``), which a machine loaded by
    other work can miss (seen on CI's 2 cores); such a start is retried, after stopping the
    processes the failed one left behind."""
    import signal

    import ray

    from experiments.processes import descendants, send

    init_args = {"include_dashboard": False, **backend_config["init_args"]}
    pythonpath = os.pathsep.join(sys.path + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    os.environ["PYTHONPATH"] = pythonpath  # as Flower's backend sets it: Ray's workers import clients/ and diredi_sim/
    for attempt in range(1, attempts + 1):
        before = descendants(os.getpid())
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            return
        except Exception as exc:  # noqa: BLE001 -- Ray raises a bare Exception for this time-out
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            logging.getLogger("flwr").warning("Ray did not start (attempt %d of %d): %s; retrying", attempt, attempts, exc)
            ray.shutdown()
            for pid in descendants(os.getpid()) - before:
                send(pid, signal.SIGKILL)


def run_simulate(config: FederationConfig, run_folder: str | Path | None = None, verbose: bool = False,
                 resume: dict | None = None, faults: str = ""):
    """Run the federation; returns the outcome (run folder, per-customer summary). ``resume``: the
    saved state of the run in ``run_folder``, continued after its last completed round.
    ``faults`` (tests only): customers made to fail (:mod:`experiments.faults`)."""
    from flwr.simulation import run_simulation

    from clients.client_app import app as production_app
    from experiments.faults import faulty_client_app
    from server.ledger import format_summary
    from server.engine import engine_of
    from server.server_app import FederationOutcome, make_server_app

    configure_process(device=config.device, threads=config.threads)  # an absent GPU fails here, before Ray starts
    if config.tensorboard:
        require_tensorboard()  # and a missing package here
    population = build_population(config.population, config.pipeline.presumed_split)
    DataSets(config.data)  # generate the synthetic data here, once, before any actor needs it
    # The manufacturer's models, trained into the cache here when missing, before Ray and Flower
    # start (the ServerApp then loads them): a bad setting fails before any actor exists, and the
    # training does not share the cores with Ray's start-up (measured in the ServerApp: the
    # teacher's first epoch at 19.4 img/s, the next ones at 23.8). When cached, only the
    # ServerApp loads them.
    if not manufacturer_is_cached(config.pipeline, config.data, preset=config.preset, seed=config.seed):
        prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed)
    client_app = faulty_client_app(faults, hang_seconds=engine_of(config).round_timeout + 15) if faults else production_app
    outcome = FederationOutcome()
    start = time.perf_counter()
    backend_config = build_backend_config(config)
    start_ray(backend_config)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
            run_simulation(server_app=make_server_app(config, outcome, run_folder, resume), client_app=client_app,
                           num_supernodes=len(population), backend_config=backend_config, verbose_logging=verbose)
    finally:
        import ray

        ray.shutdown()  # Flower's backend stops it too; not when the run crashed before its backend started
    seconds = time.perf_counter() - start
    if outcome.folder is None or not (outcome.folder / "summary.json").is_file():
        raise RuntimeError(f"the simulation ended without results (run folder: {outcome.folder}); see the log above")
    print(format_summary(outcome.summary))
    print(f"\n{len(population)} customers, {config.simulation.num_rounds} round(s) in {seconds:.0f} s; "
          f"results in {outcome.folder} (summary.md, summary.json, results.csv, round*/customer*.json, checkpoints/, log.txt)")
    logging.getLogger("flwr").info("done")
    sys.stdout.flush()
    return outcome
