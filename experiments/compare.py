"""``diredi-sim compare CONFIG [--seeds K]``: DiReDi against FedAvg, FedProx, direct training and
local fine-tuning, on the same customers, splits and seeds.

Per method and customer: mAP, precision, recall and F1 on the customer's classes, gain on its
private classes and forgetting on its presumed classes (against the original edge model), bytes
up and down, wall time. With K seeds (replicates: the customers' seeds change, the manufacturer's
models stay), the mean and standard deviation over seeds. DiReDi's paired differences against
each other method on mAP, F1, gain and forgetting (pairs matched by seed and customer) with
Student-t 95% intervals (``compare_differences``). Writes ``compare.json`` (``results``,
``summary``, ``differences``, ``runs``) and ``compare.md`` to a new run folder; every method's
own run folder is listed there, and ``results.csv`` holds every method's rows as one tidy table
(:mod:`diredi_sim.tidy`; seed = run seed + replicate).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

from diredi_sim.compute import configure_process
from diredi_sim.config import ConfigError
from diredi_sim.federation_config import FederationConfig
from diredi_sim.progress import Tracker, Unit, plan_units
from diredi_sim.runs import Run, atomic_write_text, require_tensorboard, to_jsonable
from diredi_sim.tidy import tidy_rows, write_results_csv
from experiments.methods import resolve
from experiments.stats import paired_difference

MEASURES = ("mAP", "precision", "recall", "f1", "gain", "forgetting", "uplink_bytes", "downlink_bytes", "train_images", "seconds")
DIFFERENCE_MEASURES = ("mAP", "f1", "gain", "forgetting")
REFERENCE_METHOD = "diredi"

logger = logging.getLogger(__name__)


def summarize(results: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of every measure, per method and customer, and
    per method over customers (``customer = "all"``)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in results:
        groups.setdefault((row["method"], row["customer"]), []).append(row)
        groups.setdefault((row["method"], "all"), []).append(row)
    out = []
    for (method, customer), rows in groups.items():
        # whether the method sends a customer's raw images or labels away (CEMA's uploads): no unless a row says so
        entry = {"method": method, "customer": customer, "n": len(rows), "raw_data_leaves": any(r.get("raw_data_leaves") for r in rows)}
        for measure in MEASURES:
            values = [float(r[measure]) for r in rows if r.get(measure) is not None and math.isfinite(float(r[measure]))]
            entry[measure] = statistics.fmean(values) if values else math.nan
            entry[f"{measure}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else math.nan
        out.append(entry)
    return out


def evaluated_on(row: dict) -> str:
    """What a row was measured on: the customer's own test images (``clean``) unless the method
    says otherwise in ``evaluated_on`` (CEMA: its shifted copies). Rows measured on different
    images are not paired."""
    return row.get("evaluated_on", "clean")


def unpaired_methods(results: list[dict], reference: str = REFERENCE_METHOD) -> list[str]:
    """The methods whose rows were measured on other test images than ``reference``'s."""
    ours = {evaluated_on(r) for r in results if r["method"] == reference}
    return sorted({r["method"] for r in results if r["method"] != reference and evaluated_on(r) not in ours})


def compare_differences(results: list[dict], reference: str = REFERENCE_METHOD) -> dict:
    """Paired differences ``reference - method`` for every other method in ``results``, on
    ``DIFFERENCE_MEASURES``, over seeds x customers: a pair is the two methods' rows of the same
    replicate and customer (``experiments.stats.paired_difference``: mean, std, n, Student-t 95%
    interval of the mean difference, and whether it excludes 0). Returns
    ``{"diredi - fedavg": {"mAP": {...}, "f1": {...}, "gain": {...}, "forgetting": {...}}, ...}``;
    empty when ``reference`` is not among the methods. Only rows measured on the same test images
    pair (:func:`evaluated_on`). Positive mAP, F1 and gain differences favour ``reference``; for
    forgetting a negative difference does."""
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
        keys = sorted((k for k in set(ours) & set(theirs) if evaluated_on(ours[k]) == evaluated_on(theirs[k])),
                      key=lambda k: (k[0], str(k[1])))
        if not keys:
            continue
        out[f"{reference} - {method}"] = {measure: paired_difference([ours[k].get(measure) for k in keys],
                                                                     [theirs[k].get(measure) for k in keys])
                                          for measure in DIFFERENCE_MEASURES}
    return out


DIFFERENCE_HEADERS = ("difference", "measure", "mean", "std", "95% interval", "n", "significant")


def difference_rows(differences: dict) -> list[list[str]]:
    """``compare_differences`` as table cells, one row per pair and measure (differences of
    fractions, 3 decimals; "-" where there is no value), in :data:`DIFFERENCE_HEADERS`' order."""
    def number(value):
        return "-" if value is None else f"{value:+.3f}"

    rows = []
    for pair, entry in differences.items():
        for measure, diff in entry.items():
            lo, hi = diff["ci95"]
            rows.append([pair, measure, number(diff["mean"]), "-" if diff["std"] is None else f"{diff['std']:.3f}",
                         "-" if lo is None else f"[{number(lo)}, {number(hi)}]", str(diff["n"]),
                         "yes" if diff["significant"] else "no"])
    return rows


def format_differences(differences: dict) -> str:
    """``compare_differences`` as a Markdown table, significant differences in bold."""
    lines = ["| " + " | ".join(DIFFERENCE_HEADERS) + " |", "|" + "---|" * len(DIFFERENCE_HEADERS)]
    for *cells, significant in difference_rows(differences):
        lines.append("| " + " | ".join([*cells, "**yes**" if significant == "yes" else "no"]) + " |")
    return "\n".join(lines)


def format_comparison(summary: list[dict], seeds: int) -> str:
    def cell(entry, measure, scale=1.0, fmt="{:.3f}"):
        mean, std = entry[measure], entry[f"{measure}_std"]
        if math.isnan(mean):
            return "-"
        text = fmt.format(mean * scale)
        return text + (f" ± {fmt.format(std * scale)}" if seeds > 1 else "")

    lines = ["| method | customer | mAP | P | R | F1 | gain | forgetting | uplink MiB | downlink MiB | raw data leaves | train images | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in sorted(summary, key=lambda e: (e["customer"] != "all", e["customer"], e["method"])):
        lines.append("| " + " | ".join([entry["method"], entry["customer"], cell(entry, "mAP"), cell(entry, "precision"),
                                         cell(entry, "recall"), cell(entry, "f1"), cell(entry, "gain"), cell(entry, "forgetting"),
                                         cell(entry, "uplink_bytes", 2**-20, "{:.2f}"),
                                         cell(entry, "downlink_bytes", 2**-20, "{:.2f}"),
                                         "**yes**" if entry.get("raw_data_leaves") else "no", cell(entry, "train_images", 1, "{:.0f}"),
                                         cell(entry, "seconds", 1, "{:.0f}")]) + " |")
    return "\n".join(lines)


def compare_results(results: list[dict], run_seed: int) -> list[dict]:
    """The tidy rows of ``compare.json``'s results: one method's row per replicate and customer
    (seed = ``run_seed`` + replicate; round: the method's last, none for direct / local)."""
    return [tidy for row in results
            for tidy in tidy_rows(row, method=row["method"], seed=run_seed + row.get("replicate", 0), round=row.get("round"),
                                  customer=row.get("customer"), partition_id=row.get("partition_id"))]


def run_compare(config: FederationConfig, seeds: int = 1) -> Path:
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: must be >= 1")
    methods = resolve(config.baselines.methods)  # an unknown name stops here, before anything runs
    for method in methods:
        if method.check is not None:
            method.check(config)  # and a method's bad parameter
    configure_process(device=config.device, threads=config.threads)  # the device config.json records
    if config.tensorboard:
        require_tensorboard()
    with Run.create(config.runs_dir, f"{config.name}-compare", config) as run:
        return _compare(config, seeds, methods, run)


def _compare(config: FederationConfig, seeds: int, methods: list, run: Run) -> Path:
    """Every method on every replicate; compare.json and results.csv rewritten after each (a
    stopped comparison keeps what it finished), compare.md at the end."""
    results, folders = [], []
    # units named apart from the flows' stage names ("direct", "local"), which would finish them too
    plan = plan_units([f"seed {r}" for r in range(seeds)], [Unit(f"method {m.name}", m.name) for m in methods])
    with Tracker("compare", plan) as tracker:
        _run_methods(config, seeds, methods, run, tracker, results, folders)
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
    unpaired = unpaired_methods(results)
    if unpaired:
        text += (f"\nNot paired with DiReDi: {', '.join(unpaired)}, measured on other test images ("
                 + "; ".join(sorted({f"{r['method']}: {evaluated_on(r)}" for r in results if r["method"] in unpaired}))
                 + "); their rows above are not comparable with DiReDi's either.\n")
    atomic_write_text(run.folder / "compare.md", text)
    print(text)
    print(f"comparison in {run.folder} (compare.md, compare.json, results.csv)")
    return run.folder


def _run_methods(config: FederationConfig, seeds: int, methods: list, run: Run, tracker: Tracker, results: list[dict],
                 folders: list[dict]) -> None:
    """Every method on every replicate, into ``results`` and ``folders``; the tracker told as each ends."""
    for replicate in range(seeds):
        shared: dict = {}  # what this replicate's methods share (DiReDi's image counts, for equal compute)
        seeded = replace(config, replicate=replicate)
        for method in methods:
            logger.info("compare: replicate %d, %s", replicate, method.name)
            tracker.start(label=f"seed {replicate}, {method.name}")
            start = time.perf_counter()
            rows, folder = method.run(seeded, shared)
            seconds = time.perf_counter() - start
            folders.append({"replicate": replicate, "method": method.name, "folder": str(folder) if folder else None,
                            "seconds": round(seconds, 1)})
            for row in rows:
                results.append({"replicate": replicate, "method": method.name, "seconds": seconds / max(1, len(rows)), **row})
            run.write_json("compare.json", to_jsonable({"results": results, "summary": summarize(results),
                                                        "differences": compare_differences(results), "runs": folders}))
            write_results_csv(run.folder / "results.csv", compare_results(to_jsonable(results), config.seed))
            tracker.finish(f"method {method.name}")
