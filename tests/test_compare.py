"""Baselines and the comparison: FedProx's proximal term, aggregation over seeds, and one real
comparison (DiReDi, FedAvg and FedProx on Flower, direct training, local fine-tuning) on tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diredi_sim.config import DataConfig, TrainConfig
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.federation import BaselineConfig, FederationConfig, PopulationConfig, SimulationConfig
from diredi_sim.models import build_detector
from diredi_sim.pipeline import PipelineConfig
from diredi_sim.train import compute_proximal_losses
from experiments.compare import format_comparison, run_compare, summarize

TINY = SyntheticConfig(seed=3, num_train=24, num_val=8, num_test=16, min_objects=3, max_objects=5, min_object_size=24, clutter=2.0)
STAGE = TrainConfig(epochs=1, batch_size=8, lr=0.01, warmup_steps=1)


def test_proximal_term_is_half_mu_times_the_squared_distance():
    torch.manual_seed(0)
    edge = build_detector("edge", "cpu")
    reference = {k: v.clone() for k, v in edge.state_dict().items()}
    images = [torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([3])}]
    losses = compute_proximal_losses(edge, reference, mu=0.5)
    assert float(losses(images, targets)["proximal"]) == 0.0
    with torch.no_grad():
        edge.head.classification_head.cls_logits.bias.add_(2.0)  # 20 values moved by 2
    assert float(losses(images, targets)["proximal"]) == pytest.approx(0.5 * 0.5 * 20 * 4.0)
    assert "proximal" not in compute_proximal_losses(edge, reference, mu=0.0)(images, targets)


def test_summary_over_seeds_gives_mean_and_standard_deviation():
    results = [{"method": "fedavg", "customer": "exp1", "replicate": r, "mAP": m, "gain": g, "seconds": 10.0}
               for r, (m, g) in enumerate([(0.2, 0.1), (0.4, float("nan")), (0.3, 0.3)])]
    summary = {(e["method"], e["customer"]): e for e in summarize(results)}
    entry = summary[("fedavg", "exp1")]
    assert entry["n"] == 3 and entry["mAP"] == pytest.approx(0.3) and entry["mAP_std"] == pytest.approx(0.1)
    assert entry["gain"] == pytest.approx(0.2) and entry["gain_std"] == pytest.approx(math.sqrt(0.02))  # NaN left out
    assert math.isnan(entry["f1"])  # never measured
    assert summary[("fedavg", "all")]["n"] == 3
    assert "0.300 ± 0.100" in format_comparison(summarize(results), seeds=3)


@pytest.mark.slow
def test_compare_runs_every_method_on_the_same_customers(tmp_path):
    pipeline = PipelineConfig(teacher=STAGE, distill_a=STAGE, distill_b=STAGE, rd=STAGE, distill_c=STAGE, direct=STAGE,
                              cache_dir=str(tmp_path / "manufacturer-cache"), eval_batch_size=16)
    config = FederationConfig(name="tiny", runs_dir=str(tmp_path / "runs"),
                              data=DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY), pipeline=pipeline,
                              population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                              simulation=SimulationConfig(client_threads=1, num_cpus=2),
                              baselines=BaselineConfig(rounds=2, local=STAGE))
    torch.set_num_threads(1)
    folder = run_compare(config, seeds=1)
    data = json.loads((folder / "compare.json").read_text())
    methods = {(r["method"], r["customer"]) for r in data["results"]}
    assert methods == {(m, c) for m in ("diredi", "fedavg", "fedprox", "direct", "local") for c in ("exp1", "exp2")}
    by = {(r["method"], r["customer"]): r for r in data["results"]}
    for (method, _), row in by.items():
        assert 0.0 <= row["mAP"] <= 1.0 and 0.0 <= row["f1"] <= 1.0, method
    edge_bytes = sum(v.numel() * v.element_size() for v in build_detector("edge", "cpu").state_dict().values())
    assert by[("fedavg", "exp1")]["uplink_bytes"] == 2 * edge_bytes  # the whole edge model, each of 2 rounds
    assert by[("direct", "exp1")]["uplink_bytes"] == 0
    assert 0 < by[("diredi", "exp1")]["uplink_bytes"] < edge_bytes * 10
    runs = {r["method"]: r for r in data["runs"]}
    fedavg_summary = json.loads((Path(runs["fedavg"]["folder"]) / "summary.json").read_text())
    assert sorted({row["round"] for row in fedavg_summary["rounds"]}) == [0, 1, 2]  # evaluated before and after each round
    first = [row for row in fedavg_summary["rounds"] if row["round"] == 0]  # the original edge: the reference itself
    assert len(first) == 2 and all(row["gain"] == 0.0 and row["forgetting"] == 0.0 for row in first), first
    assert "| fedprox | all |" in (folder / "compare.md").read_text()

    # plots and the report, from the saved results alone
    from experiments.plots import plot_comparison
    from experiments.report import render_report

    paths = plot_comparison(folder)
    names = {p.name for p in paths}
    for stem in ("change_diredi", "change_fedavg", "before_after_diredi", "methods", "rounds", "bytes"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names, stem
    report = render_report(folder)
    check_report(report.read_text())


def check_report(text: str) -> None:
    """Well-formed HTML (every opened tag closed, in order) whose every embedded image decodes."""
    import base64
    import io
    from html.parser import HTMLParser

    import matplotlib.image

    class Checker(HTMLParser):
        VOID = {"meta", "img", "br", "hr", "link", "input"}

        def __init__(self):
            super().__init__()
            self.stack, self.images = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            elif tag not in self.VOID:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack.pop() == tag, f"</{tag}> does not close the open tag"

    checker = Checker()
    checker.feed(text)
    checker.close()
    assert checker.stack == [] and len(checker.images) >= 6
    for src in checker.images:
        assert src.startswith("data:image/png;base64,")
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert pixels.shape[0] > 50 and pixels.shape[1] > 50
