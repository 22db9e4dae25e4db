"""``diredi-sim report RUN_DIR``: one self-contained HTML file (tables and embedded plots) for a
comparison run, written to ``RUN_DIR/report.html``. Plots are redrawn from the saved results."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from diredi_sim.runs import atomic_write_text
from experiments.compare import MEASURES, summarize
from experiments.plots import load_comparison, plot_comparison

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}td:first-child,td:nth-child(2)"
         "{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}")


def _cell(entry: dict, measure: str) -> str:
    mean, std = entry[measure], entry[f"{measure}_std"]
    if math.isnan(mean):
        return "-"
    scale = 2**-20 if measure.endswith("bytes") else 1.0
    text = f"{mean * scale:.3f}" if measure not in ("seconds",) else f"{mean:.0f}"
    return text + (f" ± {std * scale:.3f}" if entry["n"] > 1 and std and not math.isnan(std) else "")


def render_report(folder: str | Path) -> Path:
    folder = Path(folder)
    data = load_comparison(folder)
    images = [p for p in plot_comparison(folder) if p.suffix == ".png"]
    summary = sorted(summarize(data["results"]), key=lambda e: (e["customer"] != "all", e["customer"], e["method"]))
    headers = ["method", "customer", *[m.replace("_bytes", " MiB") for m in MEASURES]]
    rows = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in
                                     [e["method"], e["customer"], *[_cell(e, m) for m in MEASURES]]) + "</tr>" for e in summary)
    figures = "\n".join(
        f'<h3>{html.escape(p.stem)}</h3>\n<img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">' for p in images)
    runs = "\n".join(f"<li>{html.escape(str(r['method']))} (seed {r['replicate']}): {html.escape(str(r['folder']))}, "
                     f"{r['seconds']} s</li>" for r in data.get("runs", []))
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>diredi-sim comparison: {html.escape(folder.name)}</title><style>{STYLE}</style></head>
<body>
<h1>DiReDi and the baselines: {html.escape(folder.name)}</h1>
<p>Per method and customer: mAP@0.5, precision, recall and F1 over the customer's classes; gain (mean AP change on its
private classes) and forgetting (mean AP lost on its kept presumed classes) against the original edge model; bytes moved
per customer over all rounds; wall time per customer. "all": over every customer (and seed).</p>
<table>
<tr>{"".join(f"<th>{html.escape(h)}</th>" for h in headers)}</tr>
{rows}
</table>
<h2>Plots</h2>
{figures}
<h2>Runs</h2>
<ul>
{runs}
</ul>
</body>
</html>
"""
    path = folder / "report.html"
    atomic_write_text(path, page)
    return path
