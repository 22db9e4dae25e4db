"""The DiReDi manufacturer as a Flower ServerApp.

``app`` reads the run's settings from Flower's run_config (``flwr run .``: the defaults in
pyproject.toml's [tool.flwr.app.config] plus ``--run-config`` overrides); ``make_server_app``
binds a typed config directly (``diredi-sim simulate CONFIG``). Both run :func:`run_federation`:
the manufacturer's models (cached), the population, the DiReDi strategy for the configured
rounds, and the per-customer summary in the run folder. Given a run's saved state
(``diredi-sim resume``), it continues that run in its folder after its last completed round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from diredi_sim.compute import configure_process
from diredi_sim.federation import FederationConfig, build_population, federation_from_flat, federation_to_flat
from diredi_sim.logs import ensure_logging
from diredi_sim.manufacturer import prepare_manufacturer
from diredi_sim.runs import Run, to_jsonable, write_config
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
                       timeout=config.simulation.round_timeout, train_config=ConfigRecord(federation_to_flat(config)))
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


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """``flwr run .``: the settings come from the run_config (flat keys, as pyproject.toml lists them)."""
    ensure_logging()  # a process of Flower's: INFO to stderr and log.txt, unless logging was set up already
    run_federation(grid, federation_from_flat(dict(context.run_config), source="run_config"))
