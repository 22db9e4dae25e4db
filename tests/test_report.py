"""``diredi-sim plot`` and ``diredi-sim report`` on a simulate and a paper run folder, each written
by the project's own writers (the federation's Ledger and write_summary; the paper's
write_paper_outputs and summarize_paper_run) from small synthetic records, without training;
the report checked in headless Chromium where one is installed."""
from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from diredi_sim.config import DataConfig
from diredi_sim.population import PopulationConfig, build_population
from diredi_sim.federation_config import FederationConfig, SimulationConfig
from diredi_sim.runs import Run, write_config
from diredi_sim.settings import ClassSets
from diredi_sim.table import distill_c_row
from diredi_sim.tidy import read_results_csv
from diredi_sim.verify import Verdict
from experiments.run_folders import detect_run_kind, paper_view, simulate_view

# The browsers the check looks for, in order (Debian's chromium-headless-shell or chromium packages, or Google's).
BROWSERS = ("chromium-headless-shell", "headless_shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MODEL_KEYS = ("tutor_original", "edge_original", "tutor_updated", "edge_distill_c_public_private")


def model_row(key: str, level: float, classes: list[str], private: list[str]) -> dict:
    """A model row shaped as the pipeline's table gives it; values distinct per model and class."""
    per_class = {c: round(level + 0.03 * i, 4) for i, c in enumerate(classes)}
    change = {c: round(0.2 if c in private else -0.01 * i, 4) for i, c in enumerate(classes)} if key.startswith("edge_distill") \
        else {c: 0.0 for c in classes}
    return {"key": key, "label": key.replace("_", " "), "role": key.split("_")[0], "mAP": level, "precision": level + 0.1,
            "recall": level + 0.05, "f1": level + 0.07, "per_class": per_class, "change": change,
            "num_gt": {c: 10 for c in classes}, "presumed_map": level + 0.2, "private_ap": level / 2, "dropped_ap": None,
            "gain": change.get(private[0], 0.0) if private else 0.0, "forgetting": -0.01, "dropped_forgetting": None,
            "tp": 5, "fp": 2, "fn": 3}


@pytest.fixture()
def simulate_run(tmp_path) -> Path:
    """Two rounds of two customers through the Ledger (a deployed edge; a rejected delta in round 1)."""
    import torch

    from diredi_sim.models import build_detector
    from server.ledger import Ledger, write_summary

    torch.manual_seed(0)
    config = FederationConfig(runs_dir=str(tmp_path / "runs"), population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                              simulation=SimulationConfig(num_rounds=2))
    run = Run.create(config.runs_dir, "ledger", config)
    ledger = Ledger(run, config)
    edge = build_detector("edge", "cpu").state_dict()
    deployed_key = distill_c_row(config.simulation.deploy_mode, config.pipeline.distill_c_losses[0])
    assert deployed_key in MODEL_KEYS
    for server_round in (1, 2):
        for customer in build_population(config.population):
            accepted = customer.partition_id == 0 or server_round == 2
            classes = customer.class_sets(config.pipeline)
            rows = [model_row(key, 0.3 + 0.1 * customer.partition_id + 0.02 * server_round + 0.01 * i, list(classes.union),
                              list(classes.private)) for i, key in enumerate(MODEL_KEYS)]
            job = {"customer": customer, "metrics": {"num-examples": 40, "seconds": 3.5, "uplink-bytes": 1000},
                   "bytes": {"train.up": 1000, "train.down": 5000}}
            result = {"rows": rows, "verdict": {"accepted": accepted, "reasons": [] if accepted else ["too far"]},
                      "edges": {config.simulation.deploy_mode: edge} if accepted else {}, "stages": [], "seconds": 2.0}
            ledger.customer(server_round, job, result)
        ledger.round({"round": server_round, "replies": 2, "failures": 0, "accepted_customers": 1 + (server_round == 2),
                      "shared_tutor_updated": server_round == 2,
                      "merge": {"rule": "mean", "merged": 1 + (server_round == 2), "accepted": server_round == 2,
                                "map_before": 0.8, "map_after": 0.79 + 0.02 * server_round}}, None)
        ledger.save_state(server_round)
    write_summary(run, ledger.summary_rows, ledger.round_reports, config)
    run.close()
    return run.folder


def pipeline_result(seed: int, accepted: bool):
    from diredi_sim.pipeline import PipelineResult

    classes = ClassSets(customer=("aeroplane", "bus", "cat"), presumed=("aeroplane", "bus", "horse"), teacher=("aeroplane", "bus", "horse"),
                        private=("cat",), kept=("aeroplane", "bus"), dropped=("horse",), union=("aeroplane", "bus", "cat", "horse"))
    keys = ("teacher", "tutor_original", "edge_original", "tutor_updated", "edge_direct", "edge_local", "edge_distill_c_public",
            "edge_distill_c_public_private")
    rows = [model_row(key, 0.2 + 0.05 * i + 0.01 * seed, list(classes.union), ["cat"]) for i, key in enumerate(keys)]
    verdict = Verdict(accepted=accepted, reasons=[] if accepted else ["critical class bus fell"], delta_norm=1.5, map_before=0.7,
                      map_after=0.71)
    delta = {"norm": 1.5, "gamma": 1.0, "tensors": 10, "values": 1000, "bytes_fp32": 4000, "bytes_fp16": 2000}
    return PipelineResult(rows=rows, verdict=verdict, delta={}, delta_info=delta, stages=[], classes=classes, manufacturer={},
                          settings={"preset": "cpu", "seed": 0, "customer_seed": seed, "score_threshold": 0.5, "test_images": 16,
                                    "training_images": 40})


@pytest.fixture()
def paper_run(tmp_path) -> Path:
    """A paper run of two replicates (customer seeds 0 and 1; the second delta rejected)."""
    from experiments.paper import summarize_paper_run, write_paper_outputs

    folder = tmp_path / "paper-exp1"
    folder.mkdir()
    write_config(folder, {"experiment": "exp1", "seed": 0, "preset": "cpu", "data": DataConfig()})
    for seed in (0, 1):
        replicate = Run(folder / f"seed-{seed}")
        replicate.folder.mkdir()
        with replicate:
            write_paper_outputs(replicate, pipeline_result(seed, accepted=seed == 0), "exp1")
    summarize_paper_run(folder)
    return folder


def test_the_kind_of_a_run_folder_is_read_from_its_files(simulate_run, paper_run, tmp_path):
    assert detect_run_kind(simulate_run) == "simulate"
    assert detect_run_kind(paper_run) == "paper"
    (tmp_path / "compare").mkdir()
    (tmp_path / "compare" / "compare.json").write_text("{}")
    assert detect_run_kind(tmp_path / "compare") == "compare"
    with pytest.raises(FileNotFoundError, match="compare.json, seed-\\*/table.json"):
        detect_run_kind(tmp_path / "runs")


def test_a_simulate_run_gives_its_tables_heatmap_and_round_curves(simulate_run):
    view = simulate_view(simulate_run)
    tables = {t.title: t for t in view.tables}
    assert len(tables["Customers per round"].rows) == 4
    assert [row[:5] for row in tables["Rounds: the merge of the accepted deltas"].rows] == [["1", "2", "0", "1", "1"],
                                                                                              ["2", "2", "0", "2", "2"]]
    models = tables["Table III analog: every model of each customer's round"]
    assert len(models.rows) == 2 * 2 * len(MODEL_KEYS)
    assert models.rows[0][:4] == ["1", "exp1", "tutor original", "32.0"]  # mAP in %: 0.3 + 0.02 * round 1
    # the heatmap is the AP change of the edge each customer runs after its last round: what
    # results.csv (the ledger's tidy table) has as AP_change in round 2
    (heatmap,) = view.heatmaps
    csv_rows = [r for r in read_results_csv(simulate_run / "results.csv") if r["metric"] == "AP_change" and r["round"] == 2]
    assert len(heatmap.rows) == 2 and csv_rows
    for row in csv_rows:
        i = next(i for i, name in enumerate(heatmap.rows) if name.startswith(f"{row['customer']} (round 2"))
        assert heatmap.values[i][heatmap.columns.index(row["class"])] == pytest.approx(row["value"])
    curves = {c.name: c for c in view.curves}
    assert set(curves) == {"rounds_gain", "rounds_forgetting", "rounds_mAP_after", "rounds_customers", "rounds_tutor"}
    assert curves["rounds_customers"].series["accepted"] == ([1, 2], [1, 2])
    assert curves["rounds_tutor"].series["merged tutor"][1] == pytest.approx([0.81, 0.83])
    summary = {(r["round"], r["customer"]): r for r in json.loads((simulate_run / "summary.json").read_text())["customers"]}
    assert curves["rounds_gain"].series["exp2"] == ([1, 2], [summary[(1, "exp2")]["gain"], summary[(2, "exp2")]["gain"]])
    assert summary[(1, "exp2")]["edge"] == "kept" and summary[(1, "exp2")]["gain"] == 0.0  # its original edge


def test_a_paper_run_gives_the_table_iii_analog_over_seeds_and_heatmaps(paper_run):
    view = paper_view(paper_run)
    table = view.tables[0]
    assert table.title == "Table III analog"
    summary = json.loads((paper_run / "table.json").read_text())
    assert [row[0] for row in table.rows] == list(summary["rows"])
    edge = next(row for row in table.rows if row[0] == "edge")
    mean, std = summary["rows"]["edge"]["map"]["mean"], summary["rows"]["edge"]["map"]["std"]
    assert edge[table.headers.index("mAP")] == f"{100 * mean:.1f} ± {100 * std:.1f}"
    assert any(t.title == "Paired differences over seeds" for t in view.tables)
    replicates = next(t for t in view.tables if t.title == "Replicates")
    assert [row[2] for row in replicates.rows] == ["accepted", "rejected"]
    heatmaps = {h.name: h for h in view.heatmaps}
    ap = heatmaps["ap_per_class"]
    assert ap.columns == ["aeroplane", "bus", "cat", "horse"] and not ap.diverging
    seeds = [json.loads((paper_run / f"seed-{s}" / "table.json").read_text()) for s in (0, 1)]
    edge_rows = [next(r for r in t["rows"] if r["key"] == "edge_original") for t in seeds]
    i = ap.rows.index(edge_rows[0]["label"])
    assert ap.values[i][2] == pytest.approx((edge_rows[0]["per_class"]["cat"] + edge_rows[1]["per_class"]["cat"]) / 2)
    assert heatmaps["change_per_class"].diverging and view.bars[0].groups == ["presumed mAP", "private AP", "mAP"]


class Page(HTMLParser):
    """Well-formed HTML (every opened tag closed in order); its tables and image sources."""
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.images, self.tables = [], [], 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in self.VOID:
            self.stack.append(tag)
        self.tables += tag == "table"

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"</{tag}> does not close the open tag"


def check_report(path: Path, tables: int, images: int) -> Page:
    """The report is self-contained, well formed, and every embedded PNG decodes to a picture that is not one colour."""
    from PIL import Image

    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.stack == [] and page.tables == tables and len(page.images) == images
    assert not re.search(r"""(src|href)=["'](?!data:)""", text), "the report must not refer to outside files"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L")
        assert image.width > 100 and image.height > 100
        low, high = image.getextrema()
        assert high - low > 100
    return page


@pytest.mark.parametrize("kind", ["simulate", "paper"])
def test_plot_and_report_commands_work_on_a_simulate_and_a_paper_run(kind, simulate_run, paper_run, capsys):
    from experiments.cli import main

    folder = {"simulate": simulate_run, "paper": paper_run}[kind]
    assert main(["plot", str(folder)]) == 0
    printed = capsys.readouterr().out.split()
    expected = {"simulate": {"change_deployed_edge", "rounds_gain", "rounds_forgetting", "rounds_mAP_after", "rounds_customers",
                             "rounds_tutor"},
                "paper": {"ap_per_class", "change_per_class", "models"}}[kind]
    assert {Path(p).stem for p in printed} == expected and {Path(p).suffix for p in printed} == {".png", ".svg"}
    assert all(Path(p).is_file() and Path(p).parent == folder / "plots" for p in printed)
    assert main(["report", str(folder)]) == 0
    report = Path(capsys.readouterr().out.strip())
    assert report == folder / "report.html"
    check_report(report, tables={"simulate": 3, "paper": 3}[kind], images=len(expected))


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


# Appended to a copy of the report: after load, every image's decoded size goes into the DOM
# that --dump-dom prints (naturalWidth is 0 for an image the browser could not decode).
PROBE = ("<script>window.addEventListener('load', () => { const p = document.createElement('pre'); p.id = 'probe'; "
         "p.textContent = JSON.stringify({images: [...document.images].map(i => [i.naturalWidth, i.naturalHeight]), "
         "tables: document.querySelectorAll('table').length, rows: document.querySelectorAll('tr').length}); "
         "document.body.appendChild(p); });</script>")


def run_browser(browser: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                           "--disable-extensions", *args], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.parametrize("kind", ["simulate", "paper"])
def test_the_report_renders_in_headless_chromium(kind, simulate_run, paper_run, tmp_path):
    browser = find_browser()
    if browser is None:
        pytest.skip(f"no headless Chromium: none of {', '.join(BROWSERS)} on PATH "
                    "(Debian/Ubuntu: apt-get install chromium-headless-shell, or chromium)")
    from PIL import Image

    from experiments.report import render_report

    report = render_report({"simulate": simulate_run, "paper": paper_run}[kind])
    page = check_report(report, tables=3, images=6 if kind == "simulate" else 3)
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    dom = run_browser(browser, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()).stdout
    found = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    assert found["tables"] == 3 and found["rows"] > 3
    assert len(found["images"]) == len(page.images) and all(w > 100 and h > 100 for w, h in found["images"]), found
    screenshot = tmp_path / "report.png"
    run_browser(browser, "--window-size=1200,3000", f"--screenshot={screenshot}", report.as_uri())
    image = Image.open(screenshot).convert("L")
    assert image.size == (1200, 3000)
    histogram = image.histogram()
    non_white = sum(histogram[:240]) / (image.width * image.height)
    assert 0.03 < non_white < 0.9, f"{non_white:.3f} of the screenshot is not white"
    assert max(histogram) < 0.97 * image.width * image.height  # not one colour
