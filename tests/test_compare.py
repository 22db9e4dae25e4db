"""Baselines and the comparison: FedProx's proximal term, aggregation over seeds, and one real
comparison (DiReDi, FedAvg and FedProx on Flower, direct training, local fine-tuning) on tiny data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from diredi_sim.config import ConfigError, DataConfig, TrainConfig
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.population import PopulationConfig
from diredi_sim.federation_config import BaselineConfig, FederationConfig
from server.engine import EngineConfig, RunConfig
from diredi_sim.models import build_detector
from diredi_sim.settings import PipelineConfig
from diredi_sim.train import compute_proximal_losses
from experiments.compare import compare_differences, format_comparison, format_differences, run_compare, summarize, unpaired_methods

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
    cema = [{"method": "cema", "customer": "exp1", "replicate": 0, "mAP": 0.1, "raw_data_leaves": True}]
    table = format_comparison(summarize(results + cema), seeds=3).splitlines()
    assert "raw data leaves" in table[0]
    assert "| **yes** |" in next(line for line in table if line.startswith("| cema | all |"))
    assert "| no |" in next(line for line in table if line.startswith("| fedavg | all |"))


def test_differences_pair_diredi_with_each_method_by_seed_and_customer():
    def result(method, replicate, customer, m, f1=0.5, gain=0.1, forgetting=0.05):
        return {"method": method, "replicate": replicate, "customer": customer, "mAP": m, "f1": f1, "gain": gain,
                "forgetting": forgetting, "seconds": 1.0}

    results = [result("diredi", 0, "exp1", 0.30), result("diredi", 0, "exp2", 0.40), result("diredi", 1, "exp1", 0.35),
               result("diredi", 1, "exp2", 0.50, gain=float("nan")),
               # fedavg: listed in another order, and its (seed 1, exp2) row is missing
               result("fedavg", 1, "exp1", 0.30, forgetting=0.10), result("fedavg", 0, "exp2", 0.30, forgetting=0.15),
               result("fedavg", 0, "exp1", 0.20, forgetting=0.05),
               result("direct", 0, "exp1", 0.30, f1=0.4), result("direct", 0, "exp2", 0.40, f1=0.4),
               result("direct", 1, "exp1", 0.35, f1=0.4), result("direct", 1, "exp2", 0.50, f1=0.4)]
    diffs = compare_differences(results)
    assert list(diffs) == ["diredi - fedavg", "diredi - direct"]
    fedavg = diffs["diredi - fedavg"]
    assert list(fedavg) == ["mAP", "f1", "gain", "forgetting"]
    # pairs (0, exp1) 0.30-0.20, (0, exp2) 0.40-0.30, (1, exp1) 0.35-0.30: differences 0.1, 0.1, 0.05
    assert fedavg["mAP"]["n"] == 3 and fedavg["mAP"]["mean"] == pytest.approx(0.25 / 3)
    std = math.sqrt(((0.1 - 0.25 / 3) ** 2 * 2 + (0.05 - 0.25 / 3) ** 2) / 2)
    assert fedavg["mAP"]["std"] == pytest.approx(std)
    half = 4.302652729749464 * std / math.sqrt(3)
    assert fedavg["mAP"]["ci95"] == pytest.approx([0.25 / 3 - half, 0.25 / 3 + half]) and fedavg["mAP"]["significant"] is True
    # forgetting differences 0, -0.1, -0.05: the interval holds 0
    assert fedavg["forgetting"]["mean"] == pytest.approx(-0.05) and fedavg["forgetting"]["significant"] is False
    direct = diffs["diredi - direct"]
    assert direct["mAP"]["n"] == 4 and direct["mAP"]["mean"] == 0.0 and direct["mAP"]["significant"] is False
    assert direct["f1"]["mean"] == pytest.approx(0.1) and direct["f1"]["ci95"] == pytest.approx([0.1, 0.1])
    assert direct["f1"]["significant"] is True  # the same difference on every pair
    assert direct["gain"]["n"] == 3  # DiReDi's NaN gain drops that pair
    table = format_differences(diffs)
    assert "| diredi - fedavg | mAP | +0.083 |" in table and "| diredi - fedavg | forgetting | -0.050 |" in table
    assert "**yes**" in table and "| no |" in table
    assert compare_differences([r for r in results if r["method"] != "diredi"]) == {}
    # a method measured on other test images (CEMA: the customer's shifted copies) is never paired
    shifted = [{**result("cema", 0, c, 0.1), "evaluated_on": "shifted by contrast at severity 3"} for c in ("exp1", "exp2")]
    assert "diredi - cema" not in compare_differences(results + shifted)
    assert unpaired_methods(results + shifted) == ["cema"] and unpaired_methods(results) == []


@pytest.mark.slow
def test_compare_runs_every_method_on_the_same_customers(tmp_path):
    pipeline = PipelineConfig(teacher=STAGE, distill_a=STAGE, distill_b=STAGE, rd=STAGE, distill_c=STAGE, direct=STAGE,
                              cache_dir=str(tmp_path / "manufacturer-cache"), eval_batch_size=16)
    config = RunConfig(name="tiny", runs_dir=str(tmp_path / "runs"),
                              data=DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY), pipeline=pipeline,
                              population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                              engine=EngineConfig(client_threads=1, num_cpus=2),
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
    assert set(data["differences"]) == {f"diredi - {m}" for m in ("fedavg", "fedprox", "direct", "local")}
    assert data["differences"]["diredi - fedavg"]["mAP"]["n"] == 2  # 1 seed x 2 customers
    assert "| diredi - fedavg | mAP |" in (folder / "compare.md").read_text()

    # plots and the report, from the saved results alone
    from experiments.plots import plot_comparison
    from experiments.report import render_report

    paths = plot_comparison(folder)
    names = {p.name for p in paths}
    for stem in ("change_diredi", "change_fedavg", "before_after_diredi", "methods", "rounds", "bytes"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names, stem
    report = render_report(folder)
    check_report(report.read_text())
    text = report.read_text()
    assert "<th>raw data leaves</th>" in text and "<th>train_images</th>" in text and "Paired differences" in text
    assert text.count(">diredi - fedavg</td>") == 4  # mAP, f1, gain, forgetting


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


def test_a_registered_method_runs_through_compare(tmp_path):
    """Adding a method is one module that registers it (README, "Adding a method"): a toy method
    registered here runs through compare on the same customers and replicates, its rows
    summarised and stored like any method's; an unregistered name stops compare before it runs."""
    from diredi_sim.population import build_population
    from diredi_sim.federation import evaluate_for_customer
    from diredi_sim.manufacturer import prepare_manufacturer
    from experiments.methods import REGISTRY, Method, register

    pipeline = PipelineConfig(teacher=STAGE, distill_a=STAGE, distill_b=STAGE, cache_dir=str(tmp_path / "manufacturer-cache"),
                              eval_batch_size=16)
    config = FederationConfig(name="toy", runs_dir=str(tmp_path / "runs"), pipeline=pipeline,
                              data=DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY),
                              population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                              baselines=BaselineConfig(methods=("toy",)))
    seen = []

    def toy(config, shared):
        """The original edge model, evaluated on each customer's own test images."""
        seen.append((config.replicate, dict(shared)))
        edge = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed, progress=False).edge
        return [{"partition_id": c.partition_id, "customer": c.name, **evaluate_for_customer(config, c, edge)}
                for c in build_population(config.population)], None

    torch.set_num_threads(1)
    register(Method("toy", "the original edge, unchanged", toy))
    try:
        data = json.loads((run_compare(config, seeds=2) / "compare.json").read_text())
    finally:
        REGISTRY.pop("toy")
    assert [replicate for replicate, _ in seen] == [0, 1] and all(shared == {} for _, shared in seen)
    assert sorted((r["replicate"], r["customer"]) for r in data["results"]) == [(0, "exp1"), (0, "exp2"), (1, "exp1"), (1, "exp2")]
    summary = {(e["method"], e["customer"]): e for e in data["summary"]}
    assert summary[("toy", "all")]["n"] == 4 and 0 <= summary[("toy", "all")]["mAP"] <= 1
    assert summary[("toy", "exp1")]["mAP_std"] == 0.0  # the same model in both replicates
    with pytest.raises(ConfigError, match="baselines.methods: unknown method 'toy'"):
        run_compare(config)
