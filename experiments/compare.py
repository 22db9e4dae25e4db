"""``diredi-sim compare CONFIG [--seeds K]``: DiReDi against FedAvg, FedProx, direct training and
local fine-tuning, on the same customers, splits and seeds.

Per method and customer: mAP, precision, recall and F1 on the customer's classes, gain on its
private classes and forgetting on its presumed classes (against the original edge model), bytes
up and down, wall time. With K seeds (replicates: the customers' seeds change, the manufacturer's
models stay), the mean and standard deviation over seeds. DiReDi's paired differences against
each other method on mAP, F1, gain and forgetting (pairs matched by seed and customer) with
Student-t 95% intervals (``compare_differences``). Writes ``compare.json`` (``results``,
``summary``, ``differences``, ``runs``) and ``compare.md`` to a new run folder; every method's
own run folder is listed there.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from diredi_sim.config import ConfigError
from diredi_sim.federation import (FederationConfig, build_population, effective_pipeline, evaluate_for_customer, load_model,
                                   pick_share)
from diredi_sim.datasets import DataSets
from diredi_sim.flow import train_baseline
from diredi_sim.manufacturer import prepare_manufacturer
from diredi_sim.runs import Run, atomic_write_text, to_jsonable
from experiments.stats import paired_difference

MEASURES = ("mAP", "precision", "recall", "f1", "gain", "forgetting", "uplink_bytes", "downlink_bytes", "seconds")
DIFFERENCE_MEASURES = ("mAP", "f1", "gain", "forgetting")
REFERENCE_METHOD = "diredi"


def run_flower_baseline(config: FederationConfig, method: str) -> tuple[list[dict], Path]:
    from flwr.simulation import run_simulation

    from clients.baseline_app import app as baseline_client
    from experiments.simulate import build_backend_config
    from server.baseline_app import make_baseline_app
    from server.server_app import FederationOutcome

    outcome = FederationOutcome()
    population = build_population(config.population, config.pipeline.presumed_split)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        run_simulation(server_app=make_baseline_app(config, method, outcome), client_app=baseline_client,
                       num_supernodes=len(population), backend_config=build_backend_config(config))
    if outcome.folder is None or not outcome.summary:
        raise RuntimeError(f"{method}: the simulation ended without results (run folder: {outcome.folder})")
    return outcome.summary, outcome.folder


def run_diredi(config: FederationConfig) -> tuple[list[dict], Path]:
    """The DiReDi federation; per customer the deployed edge model's row of the last round."""
    import json

    from experiments.simulate import run_simulate

    outcome = run_simulate(config)
    rounds = config.simulation.num_rounds
    mode_key = "edge_distill_c_" + config.simulation.deploy_mode.replace("+", "_")
    rows = []
    for summary in outcome.summary:
        if summary["round"] != rounds:
            continue
        detail = json.loads((outcome.folder / f"round{rounds}" / f"customer{summary['partition_id']}.json").read_text())
        by_key = {r["key"]: r for r in detail["rows"]}
        deployed = by_key[mode_key] if summary["edge"] == "deployed" else by_key["edge_original"]
        images = uplink = downlink = 0  # over every round: training images (RD B + RD A + its Distill C), traffic
        for r in range(1, rounds + 1):
            record = json.loads((outcome.folder / f"round{r}" / f"customer{summary['partition_id']}.json").read_text())
            uplink, downlink = uplink + record["uplink_bytes"], downlink + record["downlink_bytes"]
            counts = record.get("train_images", {})
            images += counts.get("rd_b", 0) + counts.get("rd_a", 0) + counts.get(mode_key.replace("edge_", "", 1), 0)
        rows.append({"partition_id": summary["partition_id"], "customer": summary["customer"], "verdict": summary["verdict"],
                     **{k: deployed.get(k) for k in ("mAP", "precision", "recall", "f1", "gain", "forgetting", "per_class", "change")},
                     "uplink_bytes": uplink, "downlink_bytes": downlink,
                     "train_images": images})
    return rows, outcome.folder


def local_customer_work(config: FederationConfig, method: str, partition_id: int, edge_state: dict, threads: int = 0,
                        budget_images: int | None = None) -> dict:
    """One customer's ``direct`` or ``local`` model and its row; plain arguments, for a worker process.
    The model is trained by the pipeline's own baseline step (``train_baseline``), on
    ``budget_images`` images when given (the DiReDi customer's count), else for its epochs."""
    if threads:
        torch.set_num_threads(threads)
    population = build_population(config.population, config.pipeline.presumed_split)
    customer = population[partition_id]
    datasets = DataSets(config.data)
    original = load_model("edge", config.preset, edge_state)
    reference = evaluate_for_customer(config, customer, original, datasets=datasets)["per_class"]
    edge, images = train_baseline(method, original, effective_pipeline(config, customer), datasets, customer.classes,
                                  seeds=config.seeds(customer.partition_id), preset=config.preset, budget_images=budget_images,
                                  records=pick_share(config.population, customer.partition_id, len(population)), progress=False)
    row = evaluate_for_customer(config, customer, edge, reference, datasets)
    return {"partition_id": customer.partition_id, "customer": customer.name, "uplink_bytes": 0, "downlink_bytes": 0,
            "train_images": images, **{k: row.get(k) for k in ("mAP", "precision", "recall", "f1", "gain", "forgetting", "per_class", "change")}}


def run_local(config: FederationConfig, method: str, budgets: dict[int, int] | None = None) -> list[dict]:
    """``direct``: a fresh edge model trained on the customer's data (pipeline.direct);
    ``local``: the deployed edge fine-tuned on it (pipeline.local). ``budgets`` (partition id ->
    images) gives each customer the DiReDi customer's image count (equal compute); without it
    each trains for its configured epochs. The customers run in parallel processes, one torch
    thread each, as many as there are cores."""
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed, progress=False)
    population = build_population(config.population, config.pipeline.presumed_split)
    edge_state = {k: v.detach().clone() for k, v in maker.edge.state_dict().items()}
    budgets = budgets or {}
    workers = min(len(population), os.cpu_count() or 1)
    if workers <= 1:
        return [local_customer_work(config, method, c.partition_id, edge_state, budget_images=budgets.get(c.partition_id))
                for c in population]
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(local_customer_work, config, method, c.partition_id, edge_state, threads, budgets.get(c.partition_id))
                   for c in population]
        return [future.result() for future in futures]


def summarize(results: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of every measure, per method and customer, and
    per method over customers (``customer = "all"``)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in results:
        groups.setdefault((row["method"], row["customer"]), []).append(row)
        groups.setdefault((row["method"], "all"), []).append(row)
    out = []
    for (method, customer), rows in groups.items():
        entry = {"method": method, "customer": customer, "n": len(rows)}
        for measure in MEASURES:
            values = [float(r[measure]) for r in rows if r.get(measure) is not None and math.isfinite(float(r[measure]))]
            entry[measure] = statistics.fmean(values) if values else math.nan
            entry[f"{measure}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else math.nan
        out.append(entry)
    return out


def compare_differences(results: list[dict], reference: str = REFERENCE_METHOD) -> dict:
    """Paired differences ``reference - method`` for every other method in ``results``, on
    ``DIFFERENCE_MEASURES``, over seeds x customers: a pair is the two methods' rows of the same
    replicate and customer (``experiments.stats.paired_difference``: mean, std, n, Student-t 95%
    interval of the mean difference, and whether it excludes 0). Returns
    ``{"diredi - fedavg": {"mAP": {...}, "f1": {...}, "gain": {...}, "forgetting": {...}}, ...}``;
    empty when ``reference`` is not among the methods. Positive mAP, F1 and gain differences
    favour ``reference``; for forgetting a negative difference does."""
    by_method: dict[str, dict[tuple, dict]] = {}
    for row in results:
        by_method.setdefault(row["method"], {})[(row.get("replicate", 0), row["customer"])] = row
    if reference not in by_method:
        return {}
    ours = by_method[reference]
    out = {}
    for method, theirs in by_method.items():
        if method == reference:
            continue
        keys = sorted(set(ours) & set(theirs), key=lambda k: (k[0], str(k[1])))
        if not keys:
            continue
        out[f"{reference} - {method}"] = {measure: paired_difference([ours[k].get(measure) for k in keys],
                                                                     [theirs[k].get(measure) for k in keys])
                                          for measure in DIFFERENCE_MEASURES}
    return out


def format_differences(differences: dict) -> str:
    """``compare_differences`` as a Markdown table (differences of fractions, 3 decimals)."""
    def number(value):
        return "-" if value is None else f"{value:+.3f}"

    lines = ["| difference | measure | mean | std | 95% interval | n | significant |", "|---|---|---|---|---|---|---|"]
    for pair, entry in differences.items():
        for measure, diff in entry.items():
            lo, hi = diff["ci95"]
            lines.append("| " + " | ".join([pair, measure, number(diff["mean"]),
                                             "-" if diff["std"] is None else f"{diff['std']:.3f}",
                                             "-" if lo is None else f"[{number(lo)}, {number(hi)}]", str(diff["n"]),
                                             "**yes**" if diff["significant"] else "no"]) + " |")
    return "\n".join(lines)


def format_comparison(summary: list[dict], seeds: int) -> str:
    def cell(entry, measure, scale=1.0, fmt="{:.3f}"):
        mean, std = entry[measure], entry[f"{measure}_std"]
        if math.isnan(mean):
            return "-"
        text = fmt.format(mean * scale)
        return text + (f" ± {fmt.format(std * scale)}" if seeds > 1 else "")

    lines = ["| method | customer | mAP | P | R | F1 | gain | forgetting | uplink MiB | downlink MiB | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in sorted(summary, key=lambda e: (e["customer"] != "all", e["customer"], e["method"])):
        lines.append("| " + " | ".join([entry["method"], entry["customer"], cell(entry, "mAP"), cell(entry, "precision"),
                                         cell(entry, "recall"), cell(entry, "f1"), cell(entry, "gain"), cell(entry, "forgetting"),
                                         cell(entry, "uplink_bytes", 2**-20, "{:.2f}"),
                                         cell(entry, "downlink_bytes", 2**-20, "{:.2f}"), cell(entry, "seconds", 1, "{:.0f}")]) + " |")
    return "\n".join(lines)


def run_compare(config: FederationConfig, seeds: int = 1) -> Path:
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be >= 1")
    run = Run.create(config.runs_dir, f"{config.name}-compare", config)
    results, folders = [], []
    for replicate in range(seeds):
        budgets: dict[int, int] = {}  # the DiReDi customers' image counts, when DiReDi ran first
        seeded = replace(config, replicate=replicate)
        for method in config.baselines.methods:
            print(f"compare: replicate {replicate}, {method}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            if method == "diredi":
                rows, folder = run_diredi(seeded)
                budgets = {row["partition_id"]: row["train_images"] for row in rows}
            elif method in ("fedavg", "fedprox"):
                rows, folder = run_flower_baseline(seeded, method)
            else:
                rows, folder = run_local(seeded, method, budgets if seeded.pipeline.equal_compute else None), None
            seconds = time.perf_counter() - start
            folders.append({"replicate": replicate, "method": method, "folder": str(folder) if folder else None,
                            "seconds": round(seconds, 1)})
            for row in rows:
                results.append({"replicate": replicate, "method": method, "seconds": seconds / max(1, len(rows)), **row})
            run.write_json("compare.json", to_jsonable({"results": results, "summary": summarize(results),
                                                        "differences": compare_differences(results), "runs": folders}))
    summary = summarize(results)
    differences = compare_differences(results)
    text = (f"{seeds} seed(s). mAP, precision, recall, F1 over each customer's classes (score >= "
            f"{config.pipeline.score_threshold}); gain: mean AP change on its private classes, forgetting: mean AP lost on "
            f"its kept presumed classes, both against the original edge model; seconds: the method's wall time per "
            f"customer.\n\n" + format_comparison(summary, seeds) + "\n")
    if differences:
        text += ("\nPaired differences, DiReDi minus each method, over seeds x customers (a pair: the two methods on the same "
                 "customer in the same seed): mean, std, Student-t 95% interval of the mean, n pairs; significant: the "
                 "interval excludes 0 (needs 2 or more pairs). mAP, F1 and gain: positive favours DiReDi; forgetting: "
                 "negative favours DiReDi.\n\n" + format_differences(differences) + "\n")
    atomic_write_text(run.folder / "compare.md", text)
    print(text)
    print(f"comparison in {run.folder} (compare.md, compare.json)")
    return run.folder
