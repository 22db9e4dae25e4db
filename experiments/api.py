"""The Python API: the commands ``simulate``, ``compare`` and ``paper`` as functions.

Each function takes a config (a TOML path, or a config object already loaded) and flat dotted
``overrides`` (what ``--set`` gives on the command line), runs the same job the command runs,
and returns a :class:`RunResult`: the run folder, the table the command prints (as dicts), and
the run's tidy ``results.csv`` as rows or as a pandas DataFrame. :func:`load` opens a run folder
written earlier. ``experiments.cli`` loads its configs through :func:`load_federation` and
:func:`load_paper_job`, so a command and its function read the same settings.

Example::

    from experiments import api

    result = api.compare("experiments/configs/demo.toml", overrides={"simulation.num_rounds": 1})
    frame = result.to_dataframe()  # one row per method x seed x round x customer x class x metric
    frame[frame.metric == "AP"].pivot_table(index="class", columns="method", values="value")

The functions import Flower and Ray only when they run a federation; this module, like the
core package, can be imported without them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diredi_sim.config import ConfigError, ExperimentConfig, from_flat, load_config, to_flat
from diredi_sim.federation_config import FederationConfig
from server.engine import RunConfig
from diredi_sim.settings import PipelineConfig
from diredi_sim.tidy import read_results_csv
from experiments.offline import stay_offline

stay_offline()  # as the CLI: no outbound traffic from Flower or Ray

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class RunResult:
    """One run folder and what its command printed.

    Attributes:
        folder: the run folder (``config.json``, ``results.csv``, ``log.txt`` and the command's
            own files).
        kind: ``"simulate"``, ``"compare"`` or ``"paper"``.
        summary: the command's table as a list of dicts, one per printed line: per customer and
            round (simulate), per method and customer with ``<measure>`` and ``<measure>_std``
            (compare), per row of the paper's table with ``<measure>`` and ``<measure>_std``
            (paper).
    """

    folder: Path
    kind: str
    summary: list[dict] = field(default_factory=list)

    @property
    def results_csv(self) -> Path:
        """The run's tidy table (:mod:`diredi_sim.tidy`)."""
        return self.folder / "results.csv"

    def rows(self) -> list[dict]:
        """The tidy rows of ``results.csv`` as dicts (numbers as numbers, empty cells as None),
        without pandas."""
        return read_results_csv(self.results_csv)

    def to_dataframe(self):
        """``results.csv`` as a pandas DataFrame: columns method, seed, round, customer,
        partition_id, class, metric, value (one row per method x seed x round x customer x class
        x metric).

        Raises:
            ImportError: pandas is not installed.
        """
        try:
            import pandas
        except ImportError as exc:
            raise ImportError("RunResult.to_dataframe() needs pandas: pip install pandas "
                              "(or use RunResult.rows(), which does not)") from exc
        return pandas.read_csv(self.results_csv)


# ---------------------------------------------------------------------------------- configs


def load_federation(config: str | Path | FederationConfig, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A federation config and its engine (``simulate``, ``compare``, ``demo``: a
    :class:`server.engine.RunConfig`) with ``overrides`` applied.

    Args:
        config: a TOML file, or a FederationConfig (the default engine) or RunConfig.
        overrides: flat dotted keys, ``_`` or ``-`` alike (``{"simulation.num_rounds": 2}``).

    Raises:
        ConfigError: an unknown key or a wrong type, named.
    """
    if isinstance(config, FederationConfig):
        flat = {**to_flat(config), **{k.replace("_", "-"): v for k, v in (overrides or {}).items()}}
        return from_flat(flat, RunConfig, source="overrides")
    return load_config(config, overrides, cls=RunConfig)


def load_paper_job(experiment: str, config: str | Path | ExperimentConfig | None = None,
                   overrides: dict[str, Any] | None = None,
                   pipeline: PipelineConfig | None = None) -> tuple[ExperimentConfig, PipelineConfig]:
    """The config and pipeline settings of a ``paper`` run, with ``overrides`` applied.

    Args:
        experiment: ``exp1`` or ``exp2``; its config ``experiments/configs/<experiment>.toml`` is
            read when ``config`` is None.
        config: a TOML file, or an ExperimentConfig (with ``pipeline``, or the defaults).
        overrides: flat dotted keys (``seed``, ``preset``, ``data.source``, ``pipeline.rd.epochs``).
        pipeline: the pipeline settings that go with an ExperimentConfig ``config``.

    Raises:
        ConfigError: an unknown experiment without a config, an unknown key or a wrong type.
    """
    from experiments.paper import find_paper_config, load_paper_config

    if not isinstance(config, ExperimentConfig):
        if pipeline is not None:
            raise ConfigError("pipeline: give it with an ExperimentConfig, not with a config file (its [pipeline] section)")
        return load_paper_config(config or find_paper_config(experiment), overrides)
    ours = {k.replace("_", "-"): v for k, v in (overrides or {}).items() if not k.startswith("pipeline.")}
    theirs = {k.removeprefix("pipeline.").replace("_", "-"): v for k, v in (overrides or {}).items() if k.startswith("pipeline.")}
    config = from_flat({**to_flat(config), **ours}, ExperimentConfig)
    pipeline = from_flat({**to_flat(pipeline or PipelineConfig()), **theirs}, PipelineConfig)
    return config, pipeline


# ---------------------------------------------------------------------------------- commands


def simulate(config: str | Path | FederationConfig = CONFIG_DIR / "federation.toml",
             overrides: dict[str, Any] | None = None, *, verbose: bool = False, log_level: str | None = "INFO") -> RunResult:
    """The federation on Flower's simulation engine (``diredi-sim simulate``).

    Args:
        config: a TOML file (default ``experiments/configs/federation.toml``) or a FederationConfig.
        overrides: flat dotted keys, as ``--set`` (``{"simulation.num_rounds": 2}``).
        verbose: Flower's debug log.
        log_level: as ``--log-level``: the least severe records shown on stderr (the run folder's
            ``log.txt`` gets INFO and above); None leaves logging as the caller set it up.

    Returns:
        The run folder; ``summary``: one dict per customer and round (the printed table).
    """
    from experiments.simulate import run_simulate

    with _command(log_level):
        outcome = run_simulate(load_federation(config, overrides), verbose=verbose)
    return RunResult(Path(outcome.folder), "simulate", list(outcome.summary))


def compare(config: str | Path | FederationConfig = CONFIG_DIR / "federation.toml", seeds: int = 1,
            overrides: dict[str, Any] | None = None, *, log_level: str | None = "INFO") -> RunResult:
    """DiReDi against the baselines of ``baselines.methods`` (``diredi-sim compare``).

    Args:
        config: a TOML file (default ``experiments/configs/federation.toml``; the demo's is
            ``experiments/configs/demo.toml``) or a FederationConfig.
        seeds: replicates (the customers' seeds change).
        overrides: flat dotted keys, as ``--set``.
        log_level: as ``--log-level`` (:func:`simulate`).

    Returns:
        The run folder; ``summary``: one dict per method and customer (``customer`` "all":
        over customers) with each measure's mean and ``<measure>_std`` over seeds.
    """
    from experiments.compare import run_compare

    with _command(log_level):
        folder = run_compare(load_federation(config, overrides), seeds=seeds)
    return load(folder)


def paper(experiment: str, seeds: int = 1, config: str | Path | ExperimentConfig | None = None,
          overrides: dict[str, Any] | None = None, *, pipeline: PipelineConfig | None = None,
          log_level: str | None = "INFO") -> RunResult:
    """The paper's Exp 1 / Exp 2 in one process, without Flower (``diredi-sim paper``).

    Args:
        experiment: ``exp1`` or ``exp2``.
        seeds: replicates (customer seeds ``seed``, ``seed + 1``, ...).
        config: a TOML file (default ``experiments/configs/<experiment>.toml``) or an
            ExperimentConfig.
        overrides: flat dotted keys, as ``--set`` (``--data``, ``--preset``, ``--seed`` are
            ``data.source``, ``preset``, ``seed``).
        pipeline: the pipeline settings of an ExperimentConfig ``config``.
        log_level: as ``--log-level`` (:func:`simulate`).

    Returns:
        The run folder; ``summary``: one dict per row of the table (``row``: teacher, tutor,
        edge, ...) with each measure's mean and ``<measure>_std`` over seeds.
    """
    from experiments.paper import run_paper

    config, pipeline = load_paper_job(experiment, config, overrides, pipeline)
    with _command(log_level):
        run = run_paper(config, experiment, pipeline, seeds=seeds)
    return load(run.folder)


def load(folder: str | Path) -> RunResult:
    """A run folder written earlier (by a command or a function of this module) as a RunResult.

    Raises:
        FileNotFoundError: the folder holds none of summary.json, compare.json, table.json.
    """
    folder = Path(folder)
    if (folder / "compare.json").is_file():
        return RunResult(folder, "compare", _read_json(folder / "compare.json")["summary"])
    if (folder / "table.json").is_file():
        rows = _read_json(folder / "table.json")["rows"]
        summary = [{"row": name, **{k: v for measure, stats in measures.items()
                                    for k, v in ((measure, stats["mean"]), (f"{measure}_std", stats["std"]))}}
                   for name, measures in rows.items()]
        return RunResult(folder, "paper", summary)
    if (folder / "summary.json").is_file():
        return RunResult(folder, "simulate", _read_json(folder / "summary.json")["customers"])
    raise FileNotFoundError(f"{folder}: not a finished run folder (no compare.json, table.json or summary.json)")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


class _command:
    """A command's start and end, as the CLI's: logging at ``log_level`` (unless None), and the
    run folders' log files closed at the end."""

    def __init__(self, log_level: str | None):
        self.log_level = log_level

    def __enter__(self):
        from diredi_sim.logs import configure_logging

        if self.log_level is not None:
            configure_logging(self.log_level)
        return self

    def __exit__(self, *exc) -> None:
        from diredi_sim.runs import close_runs

        close_runs()


__all__ = ["RunResult", "simulate", "compare", "paper", "load", "load_federation", "load_paper_job"]
