"""The paper's two experiments (docs/design.md sections 4-5, Table III) as one job: ``run_paper``.

``diredi-sim paper --experiment exp1 --seeds K`` runs the flow K times (customer seeds seed,
seed + 1, ...; one manufacturer) in one run folder. Each replicate writes to ``seed-<s>/``:
``table.json`` (every row: mAP / P / R / F1, presumed mAP, private and dropped AP, per-class AP,
knowledge gain and forgetting), ``table.md`` (the same shaped like the paper's Table III),
``verdict.json`` (the manufacturer's verification of the customer's delta), ``stages.json``
(time and peak memory per stage), ``delta.pt`` (the delta that travelled), ``config.json``,
``metrics.jsonl`` and ``checkpoints/``. The top of the folder holds the summary over seeds,
``table.json`` (``aggregate_paper_tables``: mean and std per row and measure, paired differences
with 95% intervals, the per-seed values), ``table.md`` (``format_paper_summary``) and
``results.csv`` (``paper_results``: every seed's rows as one tidy table, :mod:`diredi_sim.tidy`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


from diredi_sim.compute import configure_process
from diredi_sim.seeds import Seeds
from diredi_sim.config import ConfigError, ExperimentConfig, config_from_dict, load_config
from diredi_sim.manufacturer import manufacturer_is_cached, plan_manufacturer
from diredi_sim.pipeline import PipelineResult, plan_customer, run_pipeline
from diredi_sim.progress import Tracker, plan_units
from diredi_sim.settings import PipelineConfig
from diredi_sim.runs import (Run, atomic_write_json, atomic_write_text, require_tensorboard, strip_environment, to_jsonable,
                             write_config)
from diredi_sim.tidy import tidy_rows, write_results_csv
from experiments.stats import paired_difference, summarize

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
EXPERIMENTS = ("exp1", "exp2")
RSS_NOTE = ("peak_rss_mb: the process's peak resident set size so far (getrusage ru_maxrss) when the stage ended; "
            "peak_rss_growth_mb: how much that peak rose during the stage (0 when the stage stayed below an earlier peak). "
            "Cached stages show the figures of the run that trained them, seconds 0 and seconds_when_trained.")


def find_paper_config(experiment: str) -> Path:
    """experiments/configs/<experiment>.toml"""
    path = CONFIG_DIR / f"{experiment}.toml"
    if not path.is_file():
        raise ConfigError(f"no config for experiment {experiment!r} ({path} does not exist; experiments: {', '.join(EXPERIMENTS)})")
    return path


@dataclass(frozen=True)
class PaperConfig(ExperimentConfig):
    """A paper experiment's file: an experiment config and its ``[pipeline]`` section."""

    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def load_paper_config(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[ExperimentConfig, PipelineConfig]:
    """An experiment config and its ``[pipeline]`` section from TOML; ``overrides`` are flat
    dotted keys (``pipeline.rd.epochs``, ``seed``)."""
    return _split(load_config(path, overrides, cls=PaperConfig))


def _split(config: PaperConfig) -> tuple[ExperimentConfig, PipelineConfig]:
    return ExperimentConfig(**{f.name: getattr(config, f.name) for f in fields(ExperimentConfig)}), config.pipeline


def _run_config(experiment: str, config: ExperimentConfig, pipeline: PipelineConfig) -> dict:
    """What a paper run's config.json holds (besides its seeds), and each replicate's with its customer seed."""
    return {"experiment": experiment, **{f.name: getattr(config, f.name) for f in fields(config) if f.name != "pipeline"},
            "pipeline": pipeline}


def customer_replicates(manufacturer_seed: int, customer_seeds: list[int], where: str = "--customer-seeds") -> list[Seeds]:
    """The replicates whose customer seeds are ``customer_seeds`` (distinct, each >= the
    manufacturer's seed: replicate k has customer seed ``manufacturer_seed + k``)."""
    if not customer_seeds or len(set(customer_seeds)) != len(customer_seeds) or any(
            not isinstance(s, int) or isinstance(s, bool) or s < manufacturer_seed for s in customer_seeds):
        raise ConfigError(f"{where} {customer_seeds!r}: must be distinct customer seeds, each >= the manufacturer's seed "
                          f"{manufacturer_seed} (customer seed = manufacturer seed + replicate)")
    return [Seeds(manufacturer_seed, replicate=s - manufacturer_seed) for s in customer_seeds]


def run_paper(config: ExperimentConfig, experiment: str, pipeline: PipelineConfig | None = None, *, progress: bool = True,
              seeds: int = 1, customer_seeds: list[int] | None = None) -> Run:
    """Run the paper's flow for ``experiment`` (exp1 / exp2, or any name) into a new run folder
    and print the table. The pipeline settings are ``pipeline``, else ``config.pipeline``, else
    the defaults; an empty ``pipeline.customer`` means the split preset named ``experiment``.

    ``seeds`` K: replicates. The flow runs K times with the customer's seeds of replicates
    k = 0..K-1 (``Seeds(config.seed, replicate=k)``: customer seed ``config.seed + k``) while the manufacturer keeps ``config.seed``: its teacher, tutor and edge are
    trained once, cached and reused, so the manufacturer's rows (teacher, tutor, edge) come out
    the same in every replicate and have std 0; the replicates vary the customer's side (RD,
    Distill C, the direct and local baselines). Replicate s writes its single-seed outputs to
    ``seed-<s>/``; the top of the run folder gets the summary over seeds, ``table.json`` and
    ``table.md`` (rewritten after every replicate, so a stopped run keeps what it finished;
    ``diredi-sim resume RUN_DIR`` runs the replicates it did not finish: :func:`resume_paper`).

    ``customer_seeds``: run these customer seeds instead of the first ``seeds`` (e.g. ``[2]``, the
    third replicate alone, on another machine or another day); :func:`merge_paper_summaries`
    puts the replicates of several runs of one manufacturer into one table."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be >= 1")
    pipeline = pipeline or getattr(config, "pipeline", None) or PipelineConfig()
    if pipeline.customer == "":
        pipeline = replace(pipeline, customer=experiment)
    replicates = customer_replicates(config.seed, list(customer_seeds) if customer_seeds is not None
                                     else [config.seed + k for k in range(seeds)])
    configure_process(device=config.device, threads=config.threads)
    if config.tensorboard:
        require_tensorboard()
    with Run.create(config.runs_dir, config.name or f"paper-{experiment}",
                    {**_run_config(experiment, config, pipeline), "seeds": [r.customer for r in replicates]}) as run:
        return _run_replicates(run, experiment, config, pipeline, replicates, progress)


def _run_replicates(run: Run, experiment: str, config: ExperimentConfig, pipeline: PipelineConfig, replicates: list[Seeds],
                    progress: bool) -> Run:
    """Each replicate's flow into ``seed-<s>/`` of ``run``, the summary over every finished one after each."""
    run_config = _run_config(experiment, config, pipeline)
    say = logger.info if progress else logger.debug
    say(f"paper {experiment}: {config.preset} preset, manufacturer seed {config.seed}, customer seeds "
        f"{', '.join(str(r.customer) for r in replicates)}; run folder {run.folder}")
    # one overall progress: the manufacturer's stages (unless cached), then each seed's customer stages
    cached = manufacturer_is_cached(pipeline, config.data, preset=config.preset, seed=config.seed)
    plan = ([] if cached else plan_manufacturer(pipeline)) + plan_units([f"seed {r.customer}" for r in replicates],
                                                                        plan_customer(pipeline))
    with Tracker(f"paper {experiment}", plan, enabled=progress):
        for seeds_k in replicates:
            seed_config = {**run_config, "customer_seed": seeds_k.customer}
            replicate = Run(run.folder / f"seed-{seeds_k.customer}", tensorboard=run.tensorboard)
            replicate.folder.mkdir()
            write_config(replicate.folder, seed_config)
            say(f"paper {experiment}: customer seed {seeds_k.customer} -> {replicate.folder}")
            started = time.perf_counter()
            with replicate:  # its TensorBoard events closed when the replicate ends
                result = run_pipeline(pipeline, config.data, preset=config.preset, seed=config.seed, run=replicate,
                                      config=to_jsonable(seed_config), progress=progress, seeds=seeds_k)
            result.settings["customer_seed"] = seeds_k.customer
            print(write_paper_outputs(replicate, result, experiment, total_seconds=time.perf_counter() - started) + "\n", flush=True)
            text = summarize_paper_run(run.folder)
    print(text, flush=True)
    print(f"\nresults in {run.folder} (table.md, table.json, results.csv; each seed's outputs in seed-<s>/)", flush=True)
    return run


def is_paper_run(config: dict) -> bool:
    """Whether a run folder's config.json is that of a paper run (as :func:`run_paper` writes it)."""
    return isinstance(config, dict) and {"experiment", "seeds", "pipeline"} <= config.keys() and "simulation" not in config


def resume_paper(folder: str | Path, config: dict, *, progress: bool = True) -> Run | None:
    """Run the replicates of the paper run in ``folder`` that did not finish (no
    ``seed-<s>/table.json``, written last), with the settings of its ``config.json`` (``config``,
    read): a replicate's partial folder is removed first, the finished ones are kept as they are.
    A replicate's result depends on its seeds alone, so the table is that of an uninterrupted run.
    Returns the run, or None when every replicate had finished (the summary is rewritten)."""
    folder = Path(folder)
    settings = {k: v for k, v in strip_environment(config).items() if k not in ("experiment", "seeds")}
    try:
        experiment_config, pipeline = _split(config_from_dict(PaperConfig, settings))
    except ConfigError as exc:
        raise ConfigError(f"{folder / 'config.json'}: {exc}") from None
    seeds = config["seeds"]
    if not isinstance(seeds, list):
        raise ConfigError(f"{folder / 'config.json'}: seeds {seeds!r} are not the customer seeds of a paper run (a list)")
    replicates = customer_replicates(experiment_config.seed, seeds, where=f"{folder / 'config.json'}: seeds")
    missing = [r for r in replicates if not (folder / f"seed-{r.customer}" / "table.json").is_file()]
    if not missing:
        print(summarize_paper_run(folder), flush=True)
        print(f"diredi-sim: {folder} already finished ({len(replicates)} of {len(replicates)} seeds); summary rewritten")
        return None
    configure_process(device=experiment_config.device, threads=experiment_config.threads)
    with Run(folder, tensorboard=experiment_config.tensorboard).open_log() as run:  # the run's log.txt goes on
        for r in missing:
            if (folder / f"seed-{r.customer}").exists():
                logger.info("resume: removed the unfinished replicate %s", folder / f"seed-{r.customer}")
                shutil.rmtree(folder / f"seed-{r.customer}")
        logger.info("resuming %s: seeds %s of %s", folder, [r.customer for r in missing], seeds)
        return _run_replicates(run, config["experiment"], experiment_config, pipeline, missing, progress)


def summarize_paper_run(folder: str | Path) -> str:
    """Write ``table.json`` and ``table.md`` at the top of a paper run folder from the replicates
    it holds (``seed-<s>/table.json``, in seed order), reading nothing but those saved files and
    the folder's ``config.json``; returns the Markdown. ``run_paper`` calls it after every
    replicate; ``diredi-sim paper-summary RUN_DIR`` calls it again on a finished or stopped run."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tables = sorted(((json.loads(path.read_text(encoding="utf-8")), path.parent.name) for path in folder.glob("seed-*/table.json")),
                        key=lambda item: item[0]["settings"]["customer_seed"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{folder}: not a readable paper run folder ({exc})") from None
    if not tables:
        raise ConfigError(f"{folder}: no finished replicate (seed-<s>/table.json)")
    seeds = [table["settings"]["customer_seed"] for table, _ in tables]
    summary = aggregate_paper_tables(config["experiment"], config["preset"], config["data"]["source"], seeds,
                                     [table["rows"] for table, _ in tables])
    for entry, (table, name) in zip(summary["per_seed"], tables):
        entry.update({"folder": name, "accepted": table["verdict"]["accepted"], "training_images": table["settings"].get("training_images"),
                      "manufacturer_key": (table.get("manufacturer") or {}).get("key")})
    summary["config"] = merge_config(config)
    atomic_write_json(folder / "table.json", summary)
    write_results_csv(folder / "results.csv", [row for table, _ in tables for row in paper_results(table)])
    text = format_paper_summary(summary, manufacturer_seed=config.get("seed"))
    atomic_write_text(folder / "table.md", text + "\n")
    return text


# A paper run's config keys that say where and how fast it ran, not what it computed: runs of one
# config on two machines (other thread counts, a GPU) are replicates of one experiment.
PLACE_KEYS = ("environment", "seeds", "name", "runs_dir", "threads", "device", "tensorboard")
# The manufacturer's rows: the same models in every replicate a table may merge.
MANUFACTURER_ROWS = ("teacher", "tutor", "edge")


def merge_config(config: dict) -> dict:
    """What a paper run computes (its config.json without :data:`PLACE_KEYS`)."""
    return {k: v for k, v in config.items() if k not in PLACE_KEYS}


def merge_paper_summaries(paths: list[str | Path]) -> dict:
    """One summary over the replicates of several paper runs' summaries (``table.json`` of a run
    folder, or a committed copy; a run folder's path stands for its ``table.json``), e.g. seeds 0
    and 1 run on one machine and seed 2 on another. The inputs must be the same experiment with the
    same config (:func:`merge_config`) and the same manufacturer: its rows (teacher, tutor, edge)
    equal in every replicate, to the last bit, which a manufacturer retrained with another torch
    thread count or on a GPU is not. A customer seed may appear once. Raises ConfigError naming
    the file and what differs; returns the summary of :func:`summarize_per_seed` with the config."""
    if not paths:
        raise ConfigError("paper-merge: no summary given")
    loaded = []
    for path in map(Path, paths):
        path = path / "table.json" if path.is_dir() else path
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable paper summary ({exc})") from None
        missing = [k for k in ("experiment", "preset", "data", "config", "per_seed") if k not in summary]
        if missing:
            raise ConfigError(f"{path}: no {', '.join(missing)} (a paper summary written before `paper-merge` existed: "
                              f"rewrite it from its run folder with `diredi-sim paper-summary RUN_DIR`)")
        loaded.append((path, summary))
    first_path, first = loaded[0]
    per_seed, origin = [], {}
    reference = next(iter(first["per_seed"]), {}).get("rows", {})
    for path, summary in loaded:
        for key in ("experiment", "preset", "data", "config"):
            if summary[key] != first[key]:
                what = key if key != "config" else "config key(s) " + ", ".join(
                    sorted(k for k in set(summary[key]) | set(first[key]) if summary[key].get(k) != first[key].get(k)))
                raise ConfigError(f"{path}: its {what} differ(s) from {first_path}'s; only replicates of one experiment merge")
        for entry in summary["per_seed"]:
            if entry["seed"] in origin:
                raise ConfigError(f"{path}: customer seed {entry['seed']} is also in {origin[entry['seed']]}; a seed is merged once")
            origin[entry["seed"]] = path
            for name in MANUFACTURER_ROWS:
                ours, theirs = entry["rows"].get(name), reference.get(name)
                if ours != theirs:
                    measure = next((m for m in (ours or {}) if (ours or {}).get(m) != (theirs or {}).get(m)), "row")
                    raise ConfigError(f"{path}: seed {entry['seed']}'s {name} ({measure} {(ours or {}).get(measure)}) is not "
                                      f"{first_path}'s ({(theirs or {}).get(measure)}): another manufacturer (retrained with "
                                      f"other bits); replicates of different manufacturers are not merged")
            per_seed.append(entry)
    per_seed.sort(key=lambda entry: entry["seed"])
    merged = summarize_per_seed(first["experiment"], first["preset"], first["data"], per_seed)
    merged["config"] = first["config"]
    return merged


def write_merged_summary(paths: list[str | Path], out: str | Path) -> str:
    """:func:`merge_paper_summaries` of ``paths`` written to ``out`` (which may be one of them);
    returns its Markdown."""
    merged = merge_paper_summaries(paths)
    atomic_write_json(Path(out), merged)
    return format_paper_summary(merged, manufacturer_seed=merged["config"].get("seed"))


# A paper run's rows that are baselines, not DiReDi: the method results.csv gives them.
PAPER_ROW_METHODS = {"edge_direct": "direct", "edge_local": "local"}


def paper_results(table: dict) -> list[dict]:
    """The tidy rows (:func:`diredi_sim.tidy.tidy_rows`) of one replicate's ``table.json``: its
    customer (the experiment, partition 0) in round 1 (the paper's flow is one round), seed its
    customer seed; every row of the table under ``<row key>/`` (``edge_direct`` and
    ``edge_local`` as methods direct and local, the others as diredi), and the verdict
    (``accepted``) and the delta (``delta/norm``, ``delta/bytes_fp32``, ...) as diredi's."""
    where = dict(seed=table["settings"]["customer_seed"], round=1, customer=table["experiment"], partition_id=0)
    rows = tidy_rows({"verdict": "accepted" if table["verdict"]["accepted"] else "rejected", "delta": table.get("delta") or {}},
                     method="diredi", **where)
    for row in table["rows"]:
        rows += tidy_rows(row, method=PAPER_ROW_METHODS.get(row["key"], "diredi"), prefix=f"{row['key']}/", **where)
    return rows


def write_paper_outputs(run: Run, result: PipelineResult, experiment: str, *, total_seconds: float | None = None) -> str:
    """table.json, table.md, verdict.json and stages.json into ``run``; returns the Markdown."""
    classes = asdict(result.classes)
    verdict = {**asdict(result.verdict), "delta": result.delta_info, "delta_weight": result.settings.get("delta_weight"),
               "verify": result.settings.get("verify"), "deployed": "updated tutor" if result.verdict.accepted else "original tutor"}
    run.write_json("table.json", {"experiment": experiment, "classes": classes, "settings": result.settings,
                                  "manufacturer": result.manufacturer, "delta": result.delta_info,
                                  "verdict": {"accepted": result.verdict.accepted, "reasons": result.verdict.reasons},
                                  "rows": result.rows})
    run.write_json("verdict.json", verdict)
    total = total_seconds if total_seconds is not None else sum(s.get("seconds", 0.0) for s in result.stages)
    run.write_json("stages.json", {"note": RSS_NOTE, "total_seconds": round(total, 1), "stages": result.stages})
    table = format_paper_table(result, experiment)
    atomic_write_text(run.folder / "table.md", table + "\n")
    return table


def _pct(value) -> str:
    return "-" if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) else f"{100 * value:.1f}"


def _signed(value) -> str:
    return "-" if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) else f"{100 * value:+.1f}"


def format_paper_table(result: PipelineResult, experiment: str) -> str:
    """The results as Markdown, shaped like the paper's Table III, with per-class AP below."""
    c = result.classes
    s = result.settings
    has_dropped = bool(c.dropped)
    lines = [
        f"## {experiment}: customer classes {', '.join(c.customer)} (private: {', '.join(c.private) or '-'}; "
        f"dropped: {', '.join(c.dropped) or '-'})",
        "",
        f"{s.get('preset')} preset, seed {s.get('seed')}"
        + (f", customer seed {s['customer_seed']}" if s.get("customer_seed") not in (None, s.get("seed")) else "")
        + f"; {s.get('test_images')} test images holding the customer's or the presumed "
        f"classes. mAP@0.5, precision, recall and F1 (score >= {s.get('score_threshold')}) over the customer's classes, in %. "
        "Gain: mean AP change on the private classes; forgetting: mean AP drop on the presumed classes the customer keeps"
        + ("; dropped: mean AP drop on the presumed classes the customer removed (intended)" if has_dropped else "")
        + "; in AP points against the original tutor (tutor rows) or the original edge (edge rows).",
        "",
        "| model | mAP | P | R | F1 | gain | forgetting |" + (" dropped |" if has_dropped else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if has_dropped else ""),
    ]
    for row in result.rows:
        cells = [row["label"], _pct(row["mAP"]), _pct(row["precision"]), _pct(row["recall"]), _pct(row["f1"]),
                 _signed(row["gain"]), _signed(row["forgetting"])]
        if has_dropped:
            cells.append(_signed(row["dropped_forgetting"]))
        lines.append("| " + " | ".join(cells) + " |")
    own_rows = [r for r in result.rows if "own" in r]
    if own_rows:
        lines += ["", "Manufacturer models on the test images of their own classes (the top rows of the paper's Table III):", "",
                  "| model | classes | test images | mAP | P | R | F1 |", "|---|---|---|---|---|---|---|"]
        for row in own_rows:
            own = row["own"]
            lines.append(f"| {row['label']} | {own['classes']} | {own['test_images']} | {_pct(own['mAP'])} | {_pct(own['precision'])} | "
                         f"{_pct(own['recall'])} | {_pct(own['f1'])} |")
    v = result.verdict
    d = result.delta_info
    lines += ["", f"Verification: **{'accepted' if v.accepted else 'rejected'}** (presumed-class mAP on the manufacturer's held-out "
                  f"data {_pct(v.map_before)} -> {_pct(v.map_after)}; delta norm {d['norm']:.4g})"
                  + ("" if v.accepted else "; the original tutor stays deployed and Distill C distils from it") + "."]
    lines += [f"- {reason}" for reason in v.reasons]
    lines += ["", f"Delta (neck + head, gamma {d['gamma']}): {d['tensors']} tensors, {d['values']} values, "
                  f"{d['bytes_fp32'] / 2**20:.3f} MiB at fp32, {d['bytes_fp16'] / 2**20:.3f} MiB at fp16. "
                  f"RD alpha {s.get('alpha')}, beta {s.get('beta')}, backbone {'frozen' if s.get('freeze_backbone') else 'trained'}; "
                  f"Distill C score weight {s.get('distill_c_score_weight')}, temperature {s.get('distill_c_temperature')}."]
    lines += ["", "Per-class AP@0.5 (%):", "", "| model | " + " | ".join(c.union) + " |", "|---|" + "---|" * len(c.union)]
    for row in result.rows:
        lines.append(f"| {row['label']} | " + " | ".join(_pct(row["per_class"].get(n)) for n in c.union) + " |")
    stages = [st for st in result.stages if st["stage"] not in ("manufacturer_cache_load", "manufacturer_cache_save")]
    lines += ["", "Stages (seconds; process peak RSS so far, MiB):", "", "| stage | seconds | peak RSS |", "|---|---|---|"]
    for st in stages:
        seconds = f"{st['seconds']:.1f}" if not st.get("cached") else f"cached ({st.get('seconds_when_trained', 0):.1f} when trained)"
        peak = f"{st.get('peak_rss_mb', 0):.0f}" if not st.get("cached") else "-"
        lines.append(f"| {st['stage']} | {seconds} | {peak} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ over seeds

# The pipeline's row keys that the summary renames; every other row key is carried as it is.
PAPER_ROW_NAMES = {"teacher": "teacher", "tutor_original": "tutor", "edge_original": "edge"}
# The summary's rows in this order first (those present), then any other row in table order.
PAPER_ROW_ORDER = ("teacher", "tutor", "edge", "tutor1", "tutor2", "tutor_updated", "tutor_deployed", "edge_direct", "edge_local",
                   "edge_distill_c_public", "edge_distill_c_public_private")
# (measure in the summary, key in the pipeline's row, Markdown column)
PAPER_MEASURES = (("presumed_map", "presumed_map", "presumed mAP"), ("presumed_all_map", "presumed_all_map", "presumed mAP (all)"),
                  ("private_ap", "private_ap", "private AP"),
                  ("dropped_ap", "dropped_ap", "dropped AP"), ("map", "mAP", "mAP"), ("precision", "precision", "P"),
                  ("recall", "recall", "R"), ("f1", "f1", "F1"))
# (row, row it is compared with, measures): the paired differences over seeds.
PAPER_DIFFERENCES = (
    ("edge_distill_c_public_private", "edge_direct", ("map", "f1", "private_ap", "presumed_map")),
    ("edge_distill_c_public_private", "edge_local", ("map", "f1", "private_ap", "presumed_map")),
    ("edge_distill_c_public_private", "edge", ("map", "f1", "private_ap", "presumed_map")),
    ("edge_distill_c_public", "edge", ("map", "f1", "private_ap", "presumed_map")),
    ("tutor_updated", "tutor", ("map", "f1", "private_ap", "presumed_map")),
    ("tutor1", "edge", ("presumed_map", "map")),
    ("tutor1", "tutor", ("presumed_map", "map")),
)


def _value(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def aggregate_paper_tables(experiment: str, preset: str, data: str, seeds: list[int], rows_per_seed: list[list[dict]]) -> dict:
    """The summary over seeds of the paper's table (a pure function of the pipeline's rows).

    ``rows_per_seed[i]`` is ``PipelineResult.rows`` of the replicate with customer seed
    ``seeds[i]``. Returns ``{"experiment", "preset", "data", "seeds", "rows", "differences",
    "per_seed"}``:

    - ``rows``: ``{row: {measure: {"mean", "std"}}}``, measures ``presumed_map`` (the presumed
      classes the customer keeps), ``presumed_all_map`` (every presumed class), ``private_ap``,
      ``dropped_ap``, ``map``, ``precision``, ``recall``, ``f1`` (fractions, not %); mean and
      sample std (ddof=1, 0.0 for one seed) over the seeds where the value exists, both None where
      it never does (e.g. ``dropped_ap`` of a customer that drops no class). Row names: the
      pipeline's ``teacher`` / ``tutor_original`` / ``edge_original`` become ``teacher`` /
      ``tutor`` / ``edge``; ``tutor_updated`` is tutor + delta, as in the paper's table, whether
      or not verification accepted it (the pipeline's ``tutor_rejected_candidate`` when it did
      not), and ``tutor_deployed`` the tutor the manufacturer keeps (tutor + delta when
      accepted, the original tutor when not); any other row key (``tutor1``, ``edge_direct``,
      ``edge_local``, ...) stays as it is. A row no replicate has is left out.
    - ``differences``: ``{"A - B": {measure: paired_difference}}`` (experiments.stats): the
      differences A - B of the same seed, their mean, std, n and Student-t 95% interval, and
      whether it excludes 0, for the pairs in ``PAPER_DIFFERENCES``; a pair whose rows are
      missing is left out, and so is a measure with no seed where both values exist.
    - ``per_seed``: ``[{"seed", "rows": {row: {measure: value or None}}}]`` in ``seeds`` order.
    """
    if len(seeds) != len(rows_per_seed):
        raise ValueError(f"{len(seeds)} seeds but {len(rows_per_seed)} sets of rows")
    per_seed = []
    for seed, rows in zip(seeds, rows_per_seed):
        # The paper's "updated tutor" is tutor + delta, whatever the verification says; what the
        # manufacturer keeps is "tutor_deployed" (tutor + delta if accepted, else the tutor).
        by_key = {row["key"]: row for row in rows}
        named = {PAPER_ROW_NAMES.get(row["key"], row["key"]): row for row in rows
                 if row["key"] not in ("tutor_updated", "tutor_rejected_candidate")}
        if "tutor_updated" in by_key:
            named["tutor_updated"] = by_key.get("tutor_rejected_candidate", by_key["tutor_updated"])
            named["tutor_deployed"] = by_key["tutor_updated"]
        per_seed.append({"seed": seed, "rows": {name: {measure: _value(row.get(key)) for measure, key, _ in PAPER_MEASURES}
                                                for name, row in named.items()}})
    return summarize_per_seed(experiment, preset, data, per_seed)


def summarize_per_seed(experiment: str, preset: str, data: str, per_seed: list[dict]) -> dict:
    """The summary over seeds (``rows``, ``differences``) of ``per_seed`` entries as
    :func:`aggregate_paper_tables` makes them (``{"seed", "rows": {row: {measure: value}}}``, any
    other keys kept), in their order."""
    names = []
    for entry in per_seed:
        names += [name for name in entry["rows"] if name not in names]
    ordered = [n for n in PAPER_ROW_ORDER if n in names] + [n for n in names if n not in PAPER_ROW_ORDER]

    def values(name: str, measure: str) -> list[float | None]:
        return [entry["rows"].get(name, {}).get(measure) for entry in per_seed]

    rows_out = {}
    for name in ordered:
        rows_out[name] = {}
        for measure, _, _ in PAPER_MEASURES:
            stats = summarize(values(name, measure))
            rows_out[name][measure] = {"mean": stats["mean"], "std": stats["std"]}
    differences = {}
    for a, b, measures in PAPER_DIFFERENCES:
        if a not in rows_out or b not in rows_out:
            continue
        entry = {}
        for measure in measures:
            diff = paired_difference(values(a, measure), values(b, measure))
            if diff["n"]:
                entry[measure] = diff
        if entry:
            differences[f"{a} - {b}"] = entry
    return {"experiment": experiment, "preset": preset, "data": data, "seeds": [entry["seed"] for entry in per_seed],
            "rows": rows_out, "differences": differences, "per_seed": per_seed}


def _pp(value) -> str:
    """A difference of fractions in percentage points, signed, one decimal."""
    return _signed(value)


def format_paper_summary(summary: dict, *, manufacturer_seed: int | None = None) -> str:
    """``aggregate_paper_tables``'s summary as Markdown: mean ± std per row, then the paired
    differences with their 95% intervals."""
    seeds = summary["seeds"]
    measures_text = {"map": "mAP", "f1": "F1", "private_ap": "private AP", "presumed_map": "presumed mAP",
                     "presumed_all_map": "presumed mAP (all)", "dropped_ap": "dropped AP", "precision": "P", "recall": "R"}
    lines = [
        f"## {summary['experiment']}: {len(seeds)} seed(s), {summary['preset']} preset, {summary['data']} data",
        "",
        f"Customer seeds {', '.join(map(str, seeds))}"
        + (f"; the manufacturer's seed stays {manufacturer_seed}" if manufacturer_seed is not None else "")
        + ". Mean ± sample standard deviation over the seeds, in %. presumed mAP: mAP on the manufacturer's test images "
        "over the presumed classes the customer keeps; presumed mAP (all): over every presumed class, dropped ones included; "
        "private AP: AP on the customer's private classes; dropped AP: AP on the presumed classes the customer dropped; "
        "mAP, P, R, F1: over the customer's classes. The manufacturer's models (teacher, tutor, edge) are trained once "
        "and reused, so their std is 0; the replicates vary the customer's side.",
        "",
        "| model | " + " | ".join(label for _, _, label in PAPER_MEASURES) + " |",
        "|---|" + "---|" * len(PAPER_MEASURES),
    ]
    for name, row in summary["rows"].items():
        cells = []
        for measure, _, _ in PAPER_MEASURES:
            stats = row[measure]
            cells.append("-" if stats["mean"] is None else f"{_pct(stats['mean'])} ± {_pct(stats['std'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences over seeds (A - B of the same seed, in percentage points): mean, std, and the Student-t "
                  "95% interval of the mean; significant: the interval excludes 0 (needs 2 or more seeds).", "",
              "| A - B | measure | mean | std | 95% interval | n | significant |", "|---|---|---|---|---|---|---|"]
    for pair, entry in summary["differences"].items():
        for measure, diff in entry.items():
            lo, hi = diff["ci95"]
            interval = "-" if lo is None else f"[{_pp(lo)}, {_pp(hi)}]"
            lines.append(f"| {pair} | {measures_text.get(measure, measure)} | {_pp(diff['mean'])} | {_pct(diff['std'])} | "
                         f"{interval} | {diff['n']} | {'**yes**' if diff['significant'] else 'no'} |")
    if not summary["differences"]:
        lines.append("| - | - | - | - | - | - | - |")
    return "\n".join(lines)


__all__ = ["find_paper_config", "load_paper_config", "run_paper", "summarize_paper_run", "write_paper_outputs", "format_paper_table",
           "aggregate_paper_tables", "summarize_per_seed", "merge_paper_summaries", "write_merged_summary", "format_paper_summary",
           "EXPERIMENTS"]
