"""Plots of a comparison, drawn from its saved results alone (``diredi-sim plot RUN_DIR``).

From ``compare.json`` (and the federated baselines' own ``summary.json``), each as PNG and SVG
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


def plot_change_heatmap(data: dict, method: str, out: Path) -> list[Path]:
    rows = _final_rows(data, method)
    classes = [c for c in VOC_CLASSES if any(c in (r.get("change") or {}) for r in rows)]
    if not rows or not classes:
        return []
    values = [[(r.get("change") or {}).get(c, math.nan) for c in classes] for r in rows]
    limit = max([abs(v) for row in values for v in row if not math.isnan(v)] + [0.05])
    figure, axes = plt.subplots(figsize=(1 + 0.6 * len(classes), 1 + 0.5 * len(rows)))
    image = axes.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    axes.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    axes.set_yticks(range(len(rows)), [r["customer"] for r in rows])
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                axes.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axes, label="AP@0.5 change vs the original edge")
    axes.set_title(f"{method}: knowledge gained (+) and lost (-) per customer and class")
    return _save(figure, out, f"change_{method}")


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
    measures = ("mAP", "f1", "gain", "forgetting")
    figure, axes = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(summary)
    for i, entry in enumerate(summary):
        positions = [m + i * width for m in range(len(measures))]
        means = [0.0 if math.isnan(entry[m]) else entry[m] for m in measures]
        errors = [0.0 if math.isnan(entry[f"{m}_std"]) else entry[f"{m}_std"] for m in measures]
        axes.bar(positions, means, width=width, yerr=errors, capsize=3, label=entry["method"])
    axes.set_xticks([m + 0.4 - width / 2 for m in range(len(measures))], measures)
    axes.axhline(0, color="black", linewidth=0.5)
    seeds = len({r.get("replicate", 0) for r in data["results"]})
    axes.set_title(f"mean over customers; error bars: std over customers and {seeds} seed(s)")
    axes.legend(fontsize=8)
    return _save(figure, out, "methods")


def plot_rounds(data: dict, out: Path) -> list[Path]:
    figure, axes = plt.subplots(figsize=(6, 3.5))
    drawn = False
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
        axes.plot(xs, [sum(rounds[x]) / len(rounds[x]) for x in xs], marker="o", label=run["method"])
        drawn = True
    if not drawn:
        plt.close(figure)
        return []
    axes.set_xlabel("round (0: before training)")
    axes.set_ylabel("mean mAP@0.5 over customers")
    axes.legend()
    return _save(figure, out, "rounds")


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
