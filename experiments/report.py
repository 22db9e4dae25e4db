"""``diredi-sim report RUN_DIR``: one self-contained HTML file (tables and embedded plots) for a
compare, simulate or paper run, written to ``RUN_DIR/report.html``. Plots are redrawn from the
saved results; a simulate or paper run's tables are :mod:`experiments.run_folders`'s."""

from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

from diredi_sim.runs import atomic_write_text
from experiments.compare import DIFFERENCE_HEADERS, MEASURES, difference_rows, summarize
from experiments.plots import load_comparison, load_view, plot_comparison, plot_view
from experiments.run_folders import Table, detect_run_kind

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}td:first-child,td:nth-child(2)"
         "{text-align:left}td.text{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}")

# A cell right-aligned as a number: a signed or unsigned number, '-', with ± or a unit after it.
NUMBER = re.compile(r"^([-+]?\d|-$)")


def _cell(entry: dict, measure: str) -> str:
    mean, std = entry[measure], entry[f"{measure}_std"]
    if math.isnan(mean):
        return "-"
    scale = 2**-20 if measure.endswith("bytes") else 1.0
    text = f"{mean * scale:.3f}" if measure not in ("seconds",) else f"{mean:.0f}"
    return text + (f" ± {std * scale:.3f}" if entry["n"] > 1 and std and not math.isnan(std) else "")


def render_cell(text: str) -> str:
    """A table cell; text (not a number) left-aligned."""
    return f"<td>{html.escape(text)}</td>" if NUMBER.match(text) else f'<td class="text">{html.escape(text)}</td>'


def render_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
    body = "\n".join("<tr>" + "".join(render_cell(str(v)) for v in row) + "</tr>" for row in table.rows)
    note = f"\n<p>{html.escape(table.note)}</p>" if table.note else ""
    return f"<h2>{html.escape(table.title)}</h2>{note}\n<table>\n<tr>{head}</tr>\n{body}\n</table>"


def render_images(paths: list[Path]) -> str:
    """Each PNG embedded as base64 under its name."""
    return "\n".join(
        f'<h3>{html.escape(p.stem)}</h3>\n<img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}">' for p in paths if p.suffix == ".png")


def render_page(title: str, intro: str, tables: list[Table], images: list[Path], extra: str = "") -> str:
    """One self-contained HTML page: the tables, then the plots (embedded), then ``extra``."""
    sections = "\n".join(render_table(t) for t in tables)
    return f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(intro)}</p>
{sections}
<h2>Plots</h2>
{render_images(images)}
{extra}
</body>
</html>
"""


def comparison_page(folder: Path) -> str:
    data = load_comparison(folder)
    images = plot_comparison(folder)
    summary = sorted(summarize(data["results"]), key=lambda e: (e["customer"] != "all", e["customer"], e["method"]))
    table = Table("Methods per customer", ["method", "customer", *[m.replace("_bytes", " MiB") for m in MEASURES], "raw data leaves"],
                  [[e["method"], e["customer"], *[_cell(e, m) for m in MEASURES], "yes" if e.get("raw_data_leaves") else "no"]
                   for e in summary])
    differences = Table("Paired differences (DiReDi minus each method, over seeds x customers)", list(DIFFERENCE_HEADERS),
                        difference_rows(data.get("differences", {})))
    runs = "\n".join(f"<li>{html.escape(str(r['method']))} (seed {r['replicate']}): {html.escape(str(r['folder']))}, "
                     f"{r['seconds']} s</li>" for r in data.get("runs", []))
    intro = ("Per method and customer: mAP@0.5, precision, recall and F1 over the customer's classes; gain (mean AP change on "
             "its private classes) and forgetting (mean AP lost on its kept presumed classes) against the original edge model; "
             "bytes moved per customer over all rounds; whether raw images or labels leave the customer; training images; "
             "wall time per customer. \"all\": over every customer (and seed). A method measured on other test images "
             "than DiReDi's (CEMA: shifted) has no paired difference.")
    return render_page(f"DiReDi and the baselines: {folder.name}", intro, [table, differences], images,
                       f"<h2>Runs</h2>\n<ul>\n{runs}\n</ul>")


def render_report(folder: str | Path) -> Path:
    """``RUN_DIR/report.html`` of a compare, simulate or paper run folder (the kind read from its
    files): its tables and its plots, redrawn from the saved results and embedded."""
    folder = Path(folder)
    if detect_run_kind(folder) == "compare":
        page = comparison_page(folder)
    else:
        view = load_view(folder)
        page = render_page(view.title, view.intro, view.tables, plot_view(view, folder / "plots"))
    path = folder / "report.html"
    atomic_write_text(path, page)
    return path
