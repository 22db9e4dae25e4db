"""The DiReDi manufacturer as a Flower ServerApp.

``app`` (``flwr run .``) reads three run_config keys (pyproject.toml's [tool.flwr.app.config],
overridden with ``--run-config``): ``config-file``, the same federation TOML file that
``diredi-sim simulate CONFIG`` takes; ``set``, overrides in the same ``KEY=VALUE`` form as
``--set``; ``method``, ``diredi`` or a Flower strategy (``fedavg``, ``fedprox``, ``fedadam``...:
``server.baseline_app.STRATEGIES``). Both paths read the file and the overrides with the same
function, so every key means the same under both.
``make_server_app`` binds a typed config directly (``diredi-sim simulate``, ``resume``). DiReDi
runs :func:`run_federation`: the manufacturer's models (cached), the population, the DiReDi
strategy for the configured rounds, and the per-customer summary in the run folder. Given a
run's saved state (``diredi-sim resume``), it continues that run in its folder after its last
completed round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from diredi_sim.compute import configure_process
from diredi_sim.config import ConfigError, load_config, parse_pairs
from diredi_sim.population import build_population
from diredi_sim.federation_config import FederationConfig
from diredi_sim.logs import ensure_logging
from diredi_sim.manufacturer import prepare_manufacturer
from diredi_sim.runs import Run, to_jsonable, write_config
from server.engine import EngineConfig, RunConfig, customer_settings, engine_of
from server.ledger import write_summary
from server.strategy import DiReDiStrategy

logger = logging.getLogger(__name__)


@dataclass
class FederationOutcome:
    folder: Path | None = None
    summary: list[dict] = field(default_factory=list)


def run_federation(grid: Grid, config: FederationConfig, outcome: FederationOutcome | None = None,
                   run_folder: str | Path | None = None, resume: dict | None = None) -> FederationOutcome:
    """The whole federation on ``grid``; results go to ``run_folder`` (a new run folder under
    ``config.runs_dir`` when None). ``resume``: the state.json of the run in ``run_folder``, whose
    rounds after ``resume["last_round"]`` are run here (the folder already cleared of them)."""
    outcome = outcome or FederationOutcome()
    configure_process(device=config.device, threads=config.threads)
    if resume is not None:
        run = Run(run_folder, tensorboard=config.tensorboard).open_log()  # the log file goes on
    else:
        run = Run.create(config.runs_dir, config.name, config) if run_folder is None else _open_run(run_folder, config)
    outcome.folder = run.folder
    with run:
        logger.info("federation run folder %s", run.folder)
        _run_rounds(grid, config, outcome, run, resume)
    return outcome


def _run_rounds(grid: Grid, config: FederationConfig, outcome: FederationOutcome, run: Run, resume: dict | None) -> None:
    population = build_population(config.population, config.pipeline.presumed_split)
    run.write_json("customers.json", to_jsonable([{**vars(c), "private": c.class_sets(config.pipeline).private,
                                                    "dropped": c.class_sets(config.pipeline).dropped} for c in population]))
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed)
    edge_state = {k: v.detach().clone() for k, v in maker.edge.state_dict().items()}
    tutor_state = maker.tutor.state_dict()
    del maker  # the teacher is not needed in a federation round: not kept in memory for the run
    strategy = DiReDiStrategy(config, population, edge_state, run)
    if resume is not None:
        tutor_state = strategy.restore(resume) or tutor_state
        logger.info("resuming after round %d of %d", strategy.round_offset, config.simulation.num_rounds)
    try:
        strategy.start(grid, initial_arrays=ArrayRecord(tutor_state), num_rounds=config.simulation.num_rounds - strategy.round_offset,
                       timeout=engine_of(config).round_timeout, train_config=ConfigRecord(customer_settings(config)))
    finally:
        strategy.close()
    outcome.summary = strategy.ledger.summary_rows
    write_summary(run, strategy.ledger.summary_rows, strategy.ledger.round_reports, config)


def _open_run(folder: str | Path, config: FederationConfig) -> Run:
    run = Run(folder, tensorboard=config.tensorboard)
    run.folder.mkdir(parents=True, exist_ok=True)
    write_config(run.folder, config)
    return run.open_log()


def make_server_app(config: FederationConfig, outcome: FederationOutcome | None = None,
                    run_folder: str | Path | None = None, resume: dict | None = None) -> ServerApp:
    """A ServerApp bound to ``config`` (run_config is ignored); ``outcome`` receives the results."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, outcome, run_folder, resume)

    return server_app


# Where ``flwr run`` looks for a relative ``config-file``: the app's folder (the project, or the
# installed FAB, which carries experiments/configs/).
APP_ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIG_KEYS = ("config-file", "set", "method")
# engine.* keys that Flower's own federation settings decide under ``flwr run``
# (``options.*`` of the SuperLink connection in $FLWR_HOME/config.toml), not the config file.
RAY_ONLY_KEYS = ("client_cpus", "client_gpus", "num_cpus", "ray_address")


def read_run_config(run_config: Mapping) -> tuple[RunConfig, str]:
    """The federation config and method of a ``flwr run``: ``config-file`` (relative to the app's
    folder unless absolute) with the ``set`` overrides applied, read exactly as ``diredi-sim
    simulate CONFIG --set ...`` reads them. Any mistake is a ConfigError naming the key."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"run_config: unknown key(s) {unknown}; the keys are {list(RUN_CONFIG_KEYS)} "
                          "(every setting lives in the config file, or in set=\"KEY=VALUE ...\")")
    from server.baseline_app import STRATEGIES  # it imports this module

    method = str(run_config.get("method", "diredi"))
    if method != "diredi" and method not in STRATEGIES:
        raise ConfigError(f"run_config method = {method!r}: must be 'diredi' or a Flower strategy, one of {sorted(STRATEGIES)} "
                          "(local fine-tuning and direct training are not federated: `diredi-sim compare` runs them)")
    name = str(run_config.get("config-file", "")).strip()
    if not name:
        raise ConfigError("run_config config-file is empty: name a federation config, e.g. "
                          "config-file='experiments/configs/federation.toml'")
    path = Path(name).expanduser()
    path = path if path.is_absolute() else APP_ROOT / path
    if not path.is_file():
        raise ConfigError(f"run_config config-file = {name!r}: {path} is not a file (a relative path is read "
                          f"from the app's folder, {APP_ROOT})")
    overrides = parse_pairs(str(run_config.get("set", "")), source="run_config set")
    return load_config(path, overrides, overrides_source="run_config set", cls=RunConfig), method


def warn_ray_only_settings(config: FederationConfig) -> list[str]:
    """Log (and return) the config's Ray settings that ``flwr run`` does not use, changed from
    their defaults: Flower's federation settings decide the resources and the cluster there."""
    engine, default = engine_of(config), EngineConfig()
    ignored = [f"engine.{key} = {getattr(engine, key)!r}" for key in RAY_ONLY_KEYS if getattr(engine, key) != getattr(default, key)]
    for setting in ignored:
        logger.warning("%s has no effect under flwr run: the SuperLink's options (options.backend.client-resources, "
                       "options.num-supernodes in $FLWR_HOME/config.toml) decide; `diredi-sim simulate` uses it", setting)
    return ignored


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run .``: the config file and overrides that the run_config names, then the method."""
    ensure_logging()  # a process of Flower's: INFO to stderr and log.txt, unless logging was set up already
    config, method = read_run_config(context.run_config)
    warn_ray_only_settings(config)
    if method == "diredi":
        run_federation(grid, config)
    else:
        from server.baseline_app import run_baseline  # it imports this module

        run_baseline(grid, config, method)
