"""Plots of a run, drawn from its saved results alone (``diredi-sim plot RUN_DIR``): a compare,
simulate or paper run folder, the kind read from its files (:func:`plot_run`).

Simulate and paper runs: what :mod:`experiments.run_folders` reads from the folder, drawn by
:func:`draw_heatmap`, :func:`draw_curves` and :func:`draw_bars`, each as PNG and SVG under
``RUN_DIR/plots/``. A simulate run: ``change_deployed_edge`` (customer x class AP change of the
edge each customer runs after its last round), ``rounds_gain``, ``rounds_forgetting``,
``rounds_mAP_after`` (per customer and round), ``rounds_customers`` (replies, accepted deltas and
failures per round), ``rounds_tutor`` (the shared tutor's presumed mAP before and after each
round's merge). A paper run: ``ap_per_class`` and ``change_per_class`` (model x class, mean over
seeds) and ``models`` (mAP, presumed mAP and private AP per model of the Table III analog).

A comparison, from ``compare.json`` (and the federated baselines' own ``summary.json``), each as PNG and SVG
under ``RUN_DIR/plots/``:
- ``change_<method>``: a customer x class heatmap of the AP change of the customer's final edge
  model against the original edge (gain on private classes, forgetting on presumed ones);
- ``before_after_<method>``: per customer, per-class AP of the original and the final edge model;
- ``methods``: mAP, F1, gain and forgetting per method, mean over customers, error bars over seeds;
- ``rounds``: mean mAP over customers after each round, for the federated baselines;
- ``bytes``: bytes moved per customer (uplink and downlink) per method.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diredi_sim.data import VOC_CLASSES  # noqa: E402
from experiments.compare import summarize  # noqa: E402
from experiments.run_folders import (Bars, Curves, Heatmap, RunView, detect_run_kind, paper_view,  # noqa: E402
                                    simulate_view)


def load_comparison(folder: str | Path) -> dict:
    path = Path(folder) / "compare.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the folder of a `diredi-sim compare` run")
    return json.loads(path.read_text(encoding="utf-8"))


def _save(figure, folder: Path, name: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in ("png", "svg"):
        path = folder / f"{name}.{suffix}"
        tmp = path.with_suffix(f".tmp.{suffix}")
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
        tmp.replace(path)
        paths.append(path)
    plt.close(figure)
    return paths


def _final_rows(data: dict, method: str) -> list[dict]:
    """The method's rows of the first replicate, one per customer, in partition order."""
    rows = [r for r in data["results"] if r["method"] == method and r.get("replicate", 0) == 0]
    return sorted(rows, key=lambda r: r.get("partition_id", 0))


def draw_heatmap(heatmap: Heatmap, out: Path) -> list[Path]:
    """Rows x classes, each cell annotated; a diverging map centred on 0 for changes, 0..1 for APs."""
    values = heatmap.values
    figure, axes = plt.subplots(figsize=(2 + 0.6 * len(heatmap.columns), 1 + 0.5 * len(heatmap.rows)))
    if heatmap.diverging:
        limit = max([abs(v) for row in values for v in row if not math.isnan(v)] + [0.05])
        image = axes.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    else:
        image = axes.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    axes.set_xticks(range(len(heatmap.columns)), heatmap.columns, rotation=60, ha="right")
    axes.set_yticks(range(len(heatmap.rows)), heatmap.rows)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                axes.text(j, i, f"{value:+.2f}" if heatmap.diverging else f"{value:.2f}", ha="center", va="center",
                          fontsize=7, color="black" if heatmap.diverging or value > 0.5 else "white")
    figure.colorbar(image, ax=axes, label=heatmap.label)
    axes.set_title(heatmap.title)
    return _save(figure, out, heatmap.name)


def draw_curves(curves: Curves, out: Path) -> list[Path]:
    """One line (with markers: a single round is a point) per series."""
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, (xs, ys) in curves.series.items():
        axes.plot(xs, ys, marker="o", label=name)
    rounds = sorted({x for xs, _ in curves.series.values() for x in xs})
    if rounds and all(float(x).is_integer() for x in rounds):
        axes.set_xticks(rounds)
    axes.set_xlabel(curves.xlabel)
    axes.set_ylabel(curves.ylabel)
    axes.set_title(curves.title)
    axes.legend(fontsize=8)
    return _save(figure, out, curves.name)


def draw_bars(bars: Bars, out: Path) -> list[Path]:
    """Per group one bar per series, error bars where the std is known."""
    figure, axes = plt.subplots(figsize=(max(6, 1 + 0.5 * len(bars.series) * len(bars.groups)), 3.5))
    width = 0.8 / max(len(bars.series), 1)
    for i, (name, (means, stds)) in enumerate(bars.series.items()):
        positions = [g + i * width for g in range(len(bars.groups))]
        axes.bar(positions, [0.0 if math.isnan(m) else m for m in means], width=width,
                 yerr=[0.0 if math.isnan(s) else s for s in stds], capsize=3, label=name)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(bars.groups))], bars.groups)
    axes.axhline(0, color="black", linewidth=0.5)
    axes.set_ylabel(bars.ylabel)
    axes.set_title(bars.title)
    axes.legend(fontsize=7, ncol=2)
    return _save(figure, out, bars.name)


def plot_change_heatmap(data: dict, method: str, out: Path) -> list[Path]:
    rows = _final_rows(data, method)
    classes = [c for c in VOC_CLASSES if any(c in (r.get("change") or {}) for r in rows)]
    if not rows or not classes:
        return []
    return draw_heatmap(Heatmap(f"change_{method}", f"{method}: knowledge gained (+) and lost (-) per customer and class",
                                [r["customer"] for r in rows], classes,
                                [[(r.get("change") or {}).get(c, math.nan) for c in classes] for r in rows],
                                "AP@0.5 change vs the original edge"), out)


def plot_before_after(data: dict, method: str, out: Path) -> list[Path]:
    rows = _final_rows(data, method)
    if not rows:
        return []
    figure, all_axes = plt.subplots(len(rows), 1, figsize=(9, 2.4 * len(rows)), squeeze=False)
    for axes, row in zip(all_axes[:, 0], rows):
        after = row.get("per_class") or {}
        change = row.get("change") or {}
        classes = [c for c in VOC_CLASSES if c in after and c in change]
        before = [after[c] - change[c] for c in classes]
        positions = range(len(classes))
        axes.bar([p - 0.2 for p in positions], before, width=0.4, label="original edge")
        axes.bar([p + 0.2 for p in positions], [after[c] for c in classes], width=0.4, label=method)
        axes.set_xticks(list(positions), classes)
        axes.set_ylabel("AP@0.5")
        axes.set_title(row["customer"], fontsize=9)
    all_axes[0, 0].legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, out, f"before_after_{method}")


def plot_methods(data: dict, out: Path) -> list[Path]:
    summary = [e for e in summarize(data["results"]) if e["customer"] == "all"]
    if not summary:
        return []
    measures = ["mAP", "f1", "gain", "forgetting"]
    seeds = len({r.get("replicate", 0) for r in data["results"]})
    return draw_bars(Bars("methods", f"mean over customers; error bars: std over customers and {seeds} seed(s)", measures,
                          {e["method"]: ([e[m] for m in measures], [e[f"{m}_std"] for m in measures]) for e in summary}), out)


def plot_rounds(data: dict, out: Path) -> list[Path]:
    curves = Curves("rounds", "federated baselines", "mean mAP@0.5 over customers", xlabel="round (0: before training)")
    for run in data.get("runs", []):
        if run["method"] not in ("fedavg", "fedprox") or run.get("replicate", 0) != 0 or not run.get("folder"):
            continue
        path = Path(run["folder"]) / "summary.json"
        if not path.is_file():
            continue
        rounds: dict[int, list[float]] = {}
        for row in json.loads(path.read_text())["rounds"]:
            rounds.setdefault(row["round"], []).append(row["mAP"])
        xs = sorted(rounds)
        curves.series[run["method"]] = (xs, [sum(rounds[x]) / len(rounds[x]) for x in xs])
    return draw_curves(curves, out) if curves.series else []


def plot_bytes(data: dict, out: Path) -> list[Path]:
    summary = [e for e in summarize(data["results"]) if e["customer"] == "all"]
    if not summary:
        return []
    figure, axes = plt.subplots(figsize=(6, 3.5))
    names = [e["method"] for e in summary]
    axes.bar(names, [e["uplink_bytes"] / 2**20 for e in summary], label="uplink")
    axes.bar(names, [e["downlink_bytes"] / 2**20 for e in summary], bottom=[e["uplink_bytes"] / 2**20 for e in summary],
             label="downlink")
    axes.set_ylabel("MiB per customer, all rounds")
    axes.legend()
    return _save(figure, out, "bytes")


def plot_comparison(folder: str | Path) -> list[Path]:
    """Every plot of a comparison run folder, redrawn from its saved results."""
    folder = Path(folder)
    data = load_comparison(folder)
    out = folder / "plots"
    paths: list[Path] = []
    for method in dict.fromkeys(r["method"] for r in data["results"]):
        paths += plot_change_heatmap(data, method, out)
        paths += plot_before_after(data, method, out)
    paths += plot_methods(data, out) + plot_rounds(data, out) + plot_bytes(data, out)
    return paths


def plot_view(view: RunView, out: Path) -> list[Path]:
    """Every heatmap, curve and bar chart of a simulate or paper run's view."""
    paths: list[Path] = []
    for heatmap in view.heatmaps:
        paths += draw_heatmap(heatmap, out)
    for curves in view.curves:
        paths += draw_curves(curves, out)
    for bars in view.bars:
        paths += draw_bars(bars, out)
    return paths


def load_view(folder: str | Path) -> RunView:
    """The view of a simulate or paper run folder (:mod:`experiments.run_folders`)."""
    kind = detect_run_kind(folder)
    if kind == "compare":
        raise ValueError(f"{folder}: a comparison; plot_comparison and the report read it")
    return {"simulate": simulate_view, "paper": paper_view}[kind](folder)


def plot_run(folder: str | Path) -> list[Path]:
    """Every plot of a compare, simulate or paper run folder (the kind read from its files),
    redrawn from its saved results into ``RUN_DIR/plots/``."""
    folder = Path(folder)
    if detect_run_kind(folder) == "compare":
        return plot_comparison(folder)
    return plot_view(load_view(folder), folder / "plots")
