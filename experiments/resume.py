"""``diredi-sim resume RUN_DIR``: finish a federation run that was killed (SIGKILL, power cut).
(A paper run folder is handed to :func:`experiments.paper.resume_paper`: its unfinished seeds run again.)

A run folder's ``state.json`` is written last in each round (see server/strategy.py): it names
the last completed round and the checkpoints that hold the shared tutor and every customer's
deployed edge model then. Resuming keeps everything of the completed rounds, removes what the
interrupted round had written (its round folder, its metrics.jsonl rows, its checkpoints, a torn
last line, temporary files), and runs the remaining rounds in the same folder with the config of
``config.json``. Customers' seeds depend on the run seed and partition id only, so the result is
that of an uninterrupted run (as long as every customer is sampled each round: with
``simulation.fraction_train`` < 1, Flower's sampling is random in any case).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from diredi_sim.config import ConfigError, config_from_dict
from server.engine import ENGINE_KEYS, RunConfig
from diredi_sim.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl, strip_environment
from server.ledger import STATE_FORMAT

logger = logging.getLogger(__name__)


class ResumeError(ConfigError):
    """A folder that cannot be resumed: not a federation run, or a file of it unreadable; the message names it."""


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path} is not valid JSON ({exc}); it was not written by diredi-sim") from None


def load_run_config(folder: str | Path) -> RunConfig:
    """The typed config of a federation run folder, from its config.json (a folder written before
    the engine's settings left ``simulation``: read with them under ``engine``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise ResumeError(f"{folder} is not a run folder: {path} does not exist")
    data = _read_json(path)
    if not isinstance(data, dict) or "simulation" not in data or "population" not in data:
        raise ResumeError(f"{path} is not the config of a federation run (no simulation / population section)")
    try:
        return config_from_dict(RunConfig, move_engine_keys(strip_environment(data)))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def move_engine_keys(data: dict) -> dict:
    """A config dict whose ``simulation`` section still holds the engine's keys (a run folder of
    an earlier version) with them under ``engine``."""
    simulation = dict(data.get("simulation") or {})
    moved = {key: simulation.pop(key) for key in ENGINE_KEYS if key in simulation}
    if not moved:
        return data
    return {**data, "simulation": simulation, "engine": {**moved, **(data.get("engine") or {})}}


def read_state(folder: str | Path) -> dict:
    """The state after the last completed round (state.json); round 0 when no round completed."""
    path = Path(folder) / "state.json"
    if not path.is_file():
        return {"format": STATE_FORMAT, "last_round": 0, "tutor_round": None, "edges": {}, "summary_rows": [],
                "round_reports": []}
    state = _read_json(path)
    keys = ("last_round", "tutor_round", "edges", "summary_rows", "round_reports")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or any(k not in state for k in keys):
        raise ResumeError(f"{path} is not a diredi-sim federation state (format {STATE_FORMAT!r} with keys {', '.join(keys)})")
    return state


def _round_of(name: str, pattern: str) -> int | None:
    match = re.fullmatch(pattern, name)
    return int(match.group(1)) if match else None


def clear_interrupted_round(folder: str | Path, state: dict) -> list[str]:
    """Remove what rounds after ``state["last_round"]`` wrote; returns what was removed or rewritten."""
    folder = Path(folder)
    last, done = int(state["last_round"]), []
    checkpoints = folder / "checkpoints"
    needed = [(checkpoints / f"edge_customer{p}_round{r}.pt", f"customer {p}'s deployed edge model")
              for p, r in state["edges"].items()]
    if state["tutor_round"] is not None:
        needed.append((checkpoints / f"tutor_round{state['tutor_round']}.pt", "the shared tutor"))
    for path, what in needed:  # checked before anything is removed
        if not path.is_file():
            raise ResumeError(f"{path} does not exist, but {folder / 'state.json'} names it ({what})")
    for tmp in folder.rglob(".*.tmp"):  # atomic writes cut short
        tmp.unlink()
        done.append(str(tmp.relative_to(folder)))
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        rows = read_jsonl(metrics)  # a torn last line is left out
        kept = [row for row in rows if not (isinstance(row.get("round"), int) and row["round"] > last)]
        text = "".join(json.dumps(row) + "\n" for row in kept)
        if text.encode("utf-8") != metrics.read_bytes():
            atomic_write_text(metrics, text)
            done.append(f"metrics.jsonl: {len(rows) - len(kept)} row(s) of later rounds dropped, torn line dropped if any")
    for sub in sorted(folder.glob("round*")):
        if sub.is_dir() and (_round_of(sub.name, r"round(\d+)") or 0) > last:
            shutil.rmtree(sub)
            done.append(sub.name + "/")
    if checkpoints.is_dir():
        for path in sorted(checkpoints.glob("*.pt")):
            r = _round_of(path.stem, r"(?:tutor|edge_customer\d+)_round(\d+)")
            if r is not None and r > last:
                path.unlink()
                done.append(f"checkpoints/{path.name}")
        edges = {int(p): int(r) for p, r in state["edges"].items()}
        for path in sorted(checkpoints.glob("edge_customer*.pt")):  # the latest deployed edge: as of the last round
            p = _round_of(path.stem, r"edge_customer(\d+)")
            if p is not None and p not in edges:
                path.unlink()
                done.append(f"checkpoints/{path.name}")
        for p, r in edges.items():
            source, latest = checkpoints / f"edge_customer{p}_round{r}.pt", checkpoints / f"edge_customer{p}.pt"
            if not latest.is_file() or latest.read_bytes() != source.read_bytes():
                atomic_write_bytes(latest, source.read_bytes())
                done.append(f"checkpoints/{latest.name} (from round {r})")
    if state["round_reports"]:
        atomic_write_json(folder / "rounds.json", state["round_reports"])
    elif (folder / "rounds.json").exists():
        (folder / "rounds.json").unlink()
    return done


def run_resume(folder: str | Path, verbose: bool = False):
    """Finish the run in ``folder`` (a federation run, or a paper run: :func:`experiments.paper.resume_paper`);
    returns the outcome, or None when it had already finished."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        from experiments.paper import is_paper_run, resume_paper

        data = _read_json(folder / "config.json")
        if is_paper_run(data):
            return resume_paper(folder, data)
    config = load_run_config(folder)
    state = read_state(folder)
    last, total = int(state["last_round"]), config.simulation.num_rounds
    if (folder / "summary.json").is_file() and ((folder / "summary.md").is_file() or last < total):  # written last
        print(f"diredi-sim: {folder} already finished ({total} of {total} rounds); nothing to resume")
        return None
    for line in clear_interrupted_round(folder, state):
        logger.info("resume: cleared %s", line)
    if last >= total:  # killed after the last round, before the summary was complete
        from diredi_sim.runs import Run
        from server.ledger import write_summary

        write_summary(Run(folder), state["summary_rows"], state["round_reports"], config)
        print(f"diredi-sim: {folder}: all {total} rounds were complete; summary written")
        return None
    (folder / "summary.md").unlink(missing_ok=True)
    logger.info("resuming %s after round %d of %d", folder, last, total)
    from experiments.simulate import run_simulate

    return run_simulate(config, run_folder=folder, verbose=verbose, resume=state)
