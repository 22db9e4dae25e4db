"""What ``diredi-sim plot`` and ``diredi-sim report`` read from a run folder, by kind, as plain
data: tables (:class:`Table`), heatmaps (:class:`Heatmap`), per-round curves (:class:`Curves`) and
bars (:class:`Bars`). :mod:`experiments.plots` draws them, :mod:`experiments.report` writes them as
HTML; neither knows a folder's files. Nothing here trains, evaluates or writes.

Kinds (:func:`detect_run_kind`, from the folder's files):

- ``compare``: ``compare.json`` (``diredi-sim compare`` / ``demo``); read by the plots module itself.
- ``simulate``: ``summary.json`` with per-customer rows and/or ``round<r>/customer<p>.json``
  (``diredi-sim simulate`` / ``resume``; :mod:`server.ledger` writes them), ``rounds.json`` (each
  round's merge) and ``config.json``.
- ``paper``: ``seed-<s>/table.json`` (one per replicate) and the summary over seeds ``table.json``
  (``diredi-sim paper``; :mod:`experiments.paper` writes them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from diredi_sim.data import VOC_CLASSES
from diredi_sim.table import distill_c_row
from experiments.paper import PAPER_MEASURES

KINDS = ("compare", "simulate", "paper")
# The measures of a model row shown in a Table III analog: (key in the row, column), in %.
MODEL_MEASURES = (("mAP", "mAP"), ("precision", "P"), ("recall", "R"), ("f1", "F1"), ("presumed_map", "presumed mAP"),
                  ("private_ap", "private AP"), ("dropped_ap", "dropped AP"), ("gain", "gain"), ("forgetting", "forgetting"))
SIGNED = frozenset({"gain", "forgetting"})


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Heatmap:
    """``values[i][j]`` of row ``rows[i]`` and class ``columns[j]`` (NaN: none)."""
    name: str
    title: str
    rows: list[str]
    columns: list[str]
    values: list[list[float]]
    label: str
    diverging: bool = True  # centred on 0 (changes); else 0..1 (APs)


@dataclass
class Curves:
    """One line per series over rounds: ``series[name] = (xs, ys)``."""
    name: str
    title: str
    ylabel: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    xlabel: str = "round"


@dataclass
class Bars:
    """Grouped bars: per group (a measure) one bar per series, with error bars."""
    name: str
    title: str
    groups: list[str]
    series: dict[str, tuple[list[float], list[float]]]  # name -> (means, stds), one per group
    ylabel: str = ""


@dataclass
class RunView:
    """Everything plot and report draw from one run folder."""
    kind: str
    folder: Path
    title: str
    intro: str
    tables: list[Table] = field(default_factory=list)
    heatmaps: list[Heatmap] = field(default_factory=list)
    curves: list[Curves] = field(default_factory=list)
    bars: list[Bars] = field(default_factory=list)


def detect_run_kind(folder: str | Path) -> str:
    """``compare``, ``simulate`` or ``paper``, from the files the folder holds."""
    folder = Path(folder)
    if (folder / "compare.json").is_file():
        return "compare"
    if any(folder.glob("seed-*/table.json")):
        return "paper"
    if any(folder.glob("round*/customer*.json")) or "customers" in _read_json(folder / "summary.json", {}):
        return "simulate"
    raise FileNotFoundError(
        f"{folder}: not the folder of a compare, simulate or paper run (looked for compare.json, seed-*/table.json, "
        "round*/customer*.json and summary.json with per-customer rows)")


def _read_json(path: Path, default=None):
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def format_number(value, *, percent: bool = False, signed: bool = False, digits: int = 3) -> str:
    """A measure for a table: '-' when missing or not finite; in % with one decimal if ``percent``."""
    number = _finite(value)
    if number is None:
        return "-"
    if percent:
        number, digits = 100 * number, 1
    return f"{number:+.{digits}f}" if signed else f"{number:.{digits}f}"


def _classes_in_order(mappings: list[dict]) -> list[str]:
    names = {name for mapping in mappings for name in mapping}
    return [c for c in VOC_CLASSES if c in names] + sorted(n for n in names if n not in VOC_CLASSES)


def _model_cells(row: dict) -> list[str]:
    return [format_number(row.get(key), percent=True, signed=key in SIGNED) for key, _ in MODEL_MEASURES]


# ------------------------------------------------------------------------------ simulate


def load_round_files(folder: Path) -> list[dict]:
    """Every ``round<r>/customer<p>.json``, in (round, partition) order."""
    def order(path: Path) -> tuple[int, int]:
        return int(path.parent.name.removeprefix("round")), int(path.stem.removeprefix("customer"))

    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("round*/customer*.json"), key=order)]


def deployed_row(detail: dict, deployed_key: str) -> dict:
    """The model row the customer runs after the round: Distill C's when its edge was deployed,
    the original edge's when not (as :func:`server.ledger.federation_results` has it)."""
    models = {row["key"]: row for row in detail.get("rows", [])}
    deployed = detail.get("edge", "deployed" if detail.get("verdict") == "accepted" else "kept") == "deployed"
    return models.get(deployed_key if deployed else "edge_original", {})


def simulate_view(folder: str | Path) -> RunView:
    """Tables, the AP-change heatmap and per-round curves of a federation run folder."""
    folder = Path(folder)
    config = _read_json(folder / "config.json", {})
    summary = _read_json(folder / "summary.json", {})
    details = load_round_files(folder)
    customers = details or summary.get("customers", [])
    reports = _read_json(folder / "rounds.json", None) or summary.get("rounds", [])
    simulation, pipeline = config.get("simulation", {}), config.get("pipeline", {})
    deployed_key = distill_c_row(simulation.get("deploy_mode", "public+private"), (pipeline.get("distill_c_losses") or ["fgd"])[0])
    view = RunView("simulate", folder, f"DiReDi federation: {folder.name}",
                   f"{len({c['customer'] for c in customers})} customer(s), {len(reports)} round(s) finished"
                   + (f" of {simulation['num_rounds']}" if "num_rounds" in simulation else "") + ". Gain: mean AP change on "
                   "the customer's private classes; forgetting: mean AP lost on its kept presumed classes; of the edge model "
                   "the customer runs after the round (Distill C's when deployed, its previous one when not) against the "
                   "original edge, on the customer's test images.")
    view.tables.append(Table(
        "Customers per round",
        ["round", "customer", "private", "dropped", "verdict", "edge", "gain", "forgetting", "mAP before", "mAP after", "uplink MiB",
         "seconds"],
        [[str(c["round"]), c["customer"], ", ".join(c.get("private", [])) or "-", ", ".join(c.get("dropped", [])) or "-",
          c.get("verdict", "-"), c.get("edge", "-"), format_number(c.get("gain"), signed=True),
          format_number(c.get("forgetting"), signed=True), format_number(c.get("mAP_before")), format_number(c.get("mAP_after")),
          format_number((c.get("uplink_bytes") or 0) / 2**20, digits=2), format_number(c.get("seconds"), digits=1)]
         for c in customers]))
    if reports:
        view.tables.append(Table(
            "Rounds: the merge of the accepted deltas",
            ["round", "replies", "failures", "accepted customers", "merged", "merge verdict", "presumed mAP before", "after",
             "shared tutor updated"],
            [[str(r["round"]), str(r.get("replies", "-")), str(r.get("failures", "-")), str(r.get("accepted_customers", "-")),
              str((r.get("merge") or {}).get("merged", "-")),
              {True: "accepted", False: "rejected"}.get((r.get("merge") or {}).get("accepted"), "-"),
              format_number((r.get("merge") or {}).get("map_before")), format_number((r.get("merge") or {}).get("map_after")),
              "yes" if r.get("shared_tutor_updated") else "no"] for r in reports],
            "presumed mAP: the shared tutor before and after the merge, on the manufacturer's held-out images."))
    if details:
        view.tables.append(Table(
            "Table III analog: every model of each customer's round",
            ["round", "customer", "model", *[label for _, label in MODEL_MEASURES]],
            [[str(d["round"]), d["customer"], row.get("label", row["key"]), *_model_cells(row)] for d in details for row in d["rows"]],
            "In %, on the customer's test images; mAP, P, R, F1 over the customer's classes; gain and forgetting in AP "
            "points against the original tutor (tutor rows) or the original edge (edge rows)."))
        last = {}
        for detail in details:  # each customer's last round
            last[detail["partition_id"]] = detail
        changes = [(d, deployed_row(d, deployed_key).get("change") or {}) for d in last.values()]
        classes = _classes_in_order([change for _, change in changes])
        if classes:
            view.heatmaps.append(Heatmap(
                "change_deployed_edge", "the deployed edge: AP change per customer and class (last round)",
                [f"{d['customer']} (round {d['round']}, {d.get('edge', d.get('verdict', ''))})" for d, _ in changes], classes,
                [[_nan(change.get(c)) for c in classes] for _, change in changes], "AP@0.5 change vs the original edge"))
    by_customer: dict[str, list[dict]] = {}
    for c in customers:
        by_customer.setdefault(c["customer"], []).append(c)
    for measure, title in (("gain", "knowledge gain (private classes)"), ("forgetting", "forgetting (kept presumed classes)"),
                           ("mAP_after", "mAP of the edge the customer runs")):
        curves = Curves(f"rounds_{measure}", f"per customer: {title}", measure)
        for name, rows in by_customer.items():
            points = [(r["round"], _finite(r.get(measure))) for r in rows]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                curves.series[name] = ([x for x, _ in points], [y for _, y in points])
        if curves.series:
            view.curves.append(curves)
    if reports:
        rounds = [r["round"] for r in reports]
        view.curves.append(Curves("rounds_customers", "customers per round", "customers", {
            "replies": (rounds, [r.get("replies", 0) for r in reports]),
            "accepted": (rounds, [r.get("accepted_customers", 0) for r in reports]),
            "failures": (rounds, [r.get("failures", 0) for r in reports])}))
        merges = [(r["round"], r.get("merge") or {}) for r in reports]
        tutor = Curves("rounds_tutor", "shared tutor: presumed mAP on the manufacturer's held-out images", "mAP@0.5")
        for key, name in (("map_before", "before the merge"), ("map_after", "merged tutor")):
            points = [(x, _finite(m.get(key))) for x, m in merges]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                tutor.series[name] = ([x for x, _ in points], [y for _, y in points])
        if tutor.series:
            view.curves.append(tutor)
    return view


def _nan(value) -> float:
    number = _finite(value)
    return math.nan if number is None else number


# ------------------------------------------------------------------------------ paper


def load_seed_tables(folder: Path) -> list[dict]:
    """Every replicate's ``seed-<s>/table.json``, in customer-seed order."""
    tables = [json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("seed-*/table.json")]
    return sorted(tables, key=lambda t: t["settings"].get("customer_seed", 0))


def _mean(values: list) -> float:
    numbers = [v for v in map(_finite, values) if v is not None]
    return sum(numbers) / len(numbers) if numbers else math.nan


def _training_images(value) -> str:
    """The pipeline's count of training images: a number, or per method (``{"diredi": n, ...}``)."""
    if isinstance(value, dict):
        value = value.get("diredi")
    return "-" if value is None else str(value)


def paper_view(folder: str | Path) -> RunView:
    """The Table III analog (mean ± std over seeds), the paired differences, the per-seed
    verdicts, per-class heatmaps (mean over seeds) and bars of a paper run folder."""
    folder = Path(folder)
    tables = load_seed_tables(folder)
    summary = _read_json(folder / "table.json")
    if summary is None or "rows" not in summary or "per_seed" not in summary:
        raise FileNotFoundError(f"{folder / 'table.json'}: no summary over seeds; `diredi-sim paper-summary {folder}` writes it")
    first = tables[0]
    classes = first["classes"]
    view = RunView("paper", folder, f"The paper's flow, {summary['experiment']}: {folder.name}",
                   f"{summary['experiment']}: customer classes {', '.join(classes['customer'])} (private: "
                   f"{', '.join(classes['private']) or '-'}; dropped: {', '.join(classes['dropped']) or '-'}); {summary['preset']} "
                   f"preset, {summary['data']} data, customer seeds {', '.join(map(str, summary['seeds']))}. Mean ± sample "
                   "standard deviation over the seeds, in %; the manufacturer's models are trained once (std 0).")
    several = len(summary["seeds"]) > 1

    def cell(stats: dict) -> str:
        text = format_number(stats.get("mean"), percent=True)
        return text + (f" ± {format_number(stats.get('std'), percent=True)}" if several and text != "-" else "")

    view.tables.append(Table("Table III analog", ["model", *[label for _, _, label in PAPER_MEASURES]],
                             [[name, *[cell(row[m]) for m, _, _ in PAPER_MEASURES]] for name, row in summary["rows"].items()],
                             "presumed mAP: on the presumed classes; private AP: on the customer's private classes; dropped AP: "
                             "on the presumed classes it dropped; mAP, P, R, F1: over the customer's classes."))
    differences = [[pair, measure, format_number(d["mean"], percent=True, signed=True),
                    "-" if d["ci95"][0] is None else f"[{format_number(d['ci95'][0], percent=True, signed=True)}, "
                                                     f"{format_number(d['ci95'][1], percent=True, signed=True)}]",
                    str(d["n"]), "yes" if d["significant"] else "no"]
                   for pair, entry in summary["differences"].items() for measure, d in entry.items()]
    if differences:
        view.tables.append(Table("Paired differences over seeds", ["A - B", "measure", "mean (points)", "95% interval", "n",
                                                                   "significant"], differences,
                                 "A - B of the same seed; Student-t 95% interval of the mean; significant: it excludes 0."))
    view.tables.append(Table("Replicates", ["seed", "folder", "verdict", "DiReDi training images", "delta norm"],
                             [[str(e["seed"]), str(e.get("folder", "-")), "accepted" if e.get("accepted") else "rejected",
                               _training_images(e.get("training_images")), format_number((t.get("delta") or {}).get("norm"), digits=4)]
                              for e, t in zip(summary["per_seed"], tables)],
                             "training images: the customer's, over RD B, RD A and Distill C (the pipeline's count)."))
    keys = [row["key"] for row in first["rows"]]
    labels = {row["key"]: row.get("label", row["key"]) for row in first["rows"]}
    for measure, name, title, label, diverging in (
            ("per_class", "ap_per_class", "AP per model and class", "AP@0.5", False),
            ("change", "change_per_class", "AP change per model and class (tutor rows: vs the original tutor; edge rows: vs "
                                           "the original edge)", "AP@0.5 change", True)):
        per_key = {key: [row.get(measure) or {} for t in tables for row in t["rows"] if row["key"] == key] for key in keys}
        columns = _classes_in_order([m for maps in per_key.values() for m in maps])
        if columns:
            view.heatmaps.append(Heatmap(name, title + (f", mean over {len(tables)} seeds" if several else ""),
                                         [labels[k] for k in keys], columns,
                                         [[_mean([m.get(c) for m in per_key[k]]) for c in columns] for k in keys], label,
                                         diverging))
    measures = [(m, label) for m, _, label in PAPER_MEASURES if m in ("map", "presumed_map", "private_ap")]
    view.bars.append(Bars("models", "mean over seeds" + ("; error bars: std" if several else ""), [label for _, label in measures],
                          {name: ([_nan(row[m]["mean"]) for m, _ in measures], [_nan(row[m]["std"]) for m, _ in measures])
                           for name, row in summary["rows"].items()}, "AP@0.5"))
    return view


__all__ = ["KINDS", "Table", "Heatmap", "Curves", "Bars", "RunView", "detect_run_kind", "format_number", "simulate_view",
           "paper_view", "load_round_files", "load_seed_tables", "deployed_row"]
