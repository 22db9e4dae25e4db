"""The paper's two experiments (DESIGN.md section 4, Table III) as one job: ``run_paper``.

Writes to a new run folder: ``table.json`` (every row: mAP / P / R / F1, per-class AP, knowledge
gain and forgetting), ``table.md`` (the same shaped like the paper's Table III), ``verdict.json``
(the manufacturer's verification of the customer's delta), ``stages.json`` (time and peak memory
per stage), ``delta.pt`` (the delta that travelled), plus the usual ``config.json``,
``metrics.jsonl`` and ``checkpoints/``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch

from diredi_sim.config import ConfigError, ExperimentConfig, config_from_dict, read_toml
from diredi_sim.pipeline import PipelineConfig, PipelineResult, load_pipeline_config, run_pipeline
from diredi_sim.runs import Run, atomic_write_text, to_jsonable

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


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *sections, last = dotted.split(".")
    for section in sections:
        data = data.setdefault(section, {})
    data[last] = value


def load_paper_config(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[ExperimentConfig, PipelineConfig]:
    """An experiment config and its ``[pipeline]`` section from TOML; ``overrides`` are flat
    dotted keys (``pipeline.rd.epochs``, ``seed``). Works whether or not ExperimentConfig has a
    ``pipeline`` field: if it has, the section is set on it too."""
    path = Path(path)
    data = read_toml(path)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key.replace("-", "_"), value)
    table = data.pop("pipeline", {})
    try:
        if not isinstance(table, dict):
            raise ConfigError(f"pipeline: expected a table (section), got {table!r}")
        pipeline = load_pipeline_config(table)
        config = config_from_dict(ExperimentConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if "pipeline" in {f.name for f in fields(ExperimentConfig)}:
        config = replace(config, pipeline=pipeline)
    return config, pipeline


def run_paper(config: ExperimentConfig, experiment: str, pipeline: PipelineConfig | None = None, *, progress: bool = True) -> Run:
    """Run the paper's flow for ``experiment`` (exp1 / exp2, or any name) into a new run folder
    and print the table. The pipeline settings are ``pipeline``, else ``config.pipeline``, else
    the defaults; an empty ``pipeline.customer`` means the split preset named ``experiment``."""
    pipeline = pipeline or getattr(config, "pipeline", None) or PipelineConfig()
    if pipeline.customer == "":
        pipeline = replace(pipeline, customer=experiment)
    if config.threads:
        torch.set_num_threads(config.threads)
    run_config = {"experiment": experiment, **{f.name: getattr(config, f.name) for f in fields(config) if f.name != "pipeline"},
                  "pipeline": pipeline}
    run = Run.create(config.runs_dir, config.name or f"paper-{experiment}", run_config)
    if progress:
        print(f"paper {experiment}: {config.preset} preset, seed {config.seed}; run folder {run.folder}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = run_pipeline(pipeline, config.data, preset=config.preset, seed=config.seed, run=run, config=to_jsonable(run_config),
                          progress=progress)
    table = write_paper_outputs(run, result, experiment, total_seconds=time.perf_counter() - started)
    print(table, flush=True)
    print(f"\nresults in {run.folder} (table.md, table.json, verdict.json, stages.json)", flush=True)
    return run


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
        f"{s.get('preset')} preset, seed {s.get('seed')}; {s.get('test_images')} test images holding the customer's or the presumed "
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


__all__ = ["find_paper_config", "load_paper_config", "run_paper", "write_paper_outputs", "format_paper_table", "EXPERIMENTS"]
