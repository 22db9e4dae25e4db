"""results.csv (one tidy row per method x seed x round x customer x class x metric) of simulate,
compare and paper runs, read back with the csv module (and pandas where installed) and checked
against the runs' JSON; config.json's environment record; the optional TensorBoard writer."""
from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diredi_sim.config import ConfigError, DataConfig
from diredi_sim.population import PopulationConfig, build_population
from diredi_sim.federation_config import BaselineConfig, FederationConfig
from diredi_sim.models import build_detector
from diredi_sim.runs import Run, read_git_commit
from diredi_sim.table import distill_c_row
from diredi_sim.tidy import COLUMNS, read_results_csv, tidy_rows

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> dict[tuple, float]:
    """(method, seed, round, customer, class, metric) -> value, from csv.DictReader; every row
    has the columns in order and no key twice."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    table = {}
    for row in rows:
        key = (row["method"], row["seed"], row["round"], row["customer"], row["class"], row["metric"])
        assert key not in table, key
        table[key] = float(row["value"])
    assert table and len(read_results_csv(path)) == len(rows)
    return table


def check_pandas(path: Path, rows: int) -> None:
    """Where pandas is installed (it is not a dependency), one read_csv call reads the table."""
    try:
        import pandas
    except ImportError:
        return
    frame = pandas.read_csv(path)
    assert list(frame.columns) == list(COLUMNS) and len(frame) == rows and frame["value"].dtype.kind == "f"


def model_row(key: str, m: float, classes: list[str]) -> dict:
    """A table row as combine_round gives it (values distinct per model and class)."""
    per_class = {c: round(m + 0.01 * i, 4) for i, c in enumerate(classes)}
    return {"key": key, "label": key, "role": key.split("_")[0], "mAP": m, "precision": m + 0.1, "recall": m + 0.2, "f1": m + 0.15,
            "per_class": per_class, "change": {c: round(v - 0.3, 4) for c, v in per_class.items()},
            "num_gt": {c: 10 + i for i, c in enumerate(classes)}, "gain": m / 10, "forgetting": -m / 20,
            "dropped_forgetting": None, "tp": 5, "fp": 2, "fn": 3}


def test_a_federation_run_writes_results_csv_that_agrees_with_its_round_files(tmp_path):
    """The ledger's files of two rounds (a deployed edge, a rejected delta), then write_summary:
    every number of results.csv is the round file's (outcome: the deployed edge's row, or the
    original edge's when the delta was rejected), the merge's rows have no customer."""
    from server.ledger import Ledger, write_summary

    config = FederationConfig(runs_dir=str(tmp_path / "runs"), seed=7, replicate=2,
                              population=PopulationConfig(customers=("exp1", "exp2"), generated=0))
    run = Run.create(config.runs_dir, "ledger", config)
    ledger = Ledger(run, config)
    edge = build_detector("edge", "cpu").state_dict()
    deployed_key = distill_c_row(config.simulation.deploy_mode, config.pipeline.distill_c_losses[0])
    for server_round in (1, 2):
        for customer, accepted in zip(build_population(config.population), (True, server_round == 2)):
            base = 0.3 + 0.1 * customer.partition_id + 0.01 * server_round
            rows = [model_row(key, base + 0.02 * i, list(customer.classes))
                    for i, key in enumerate(("tutor_original", "edge_original", "tutor_updated", deployed_key))]
            job = {"customer": customer, "metrics": {"num-examples": 40, "seconds": 3.5, "uplink-bytes": 1000},
                   "bytes": {"train.up": 1000, "train.down": 5000}}
            result = {"rows": rows, "verdict": {"accepted": accepted, "reasons": [] if accepted else ["too far"]},
                      "edges": {config.simulation.deploy_mode: edge} if accepted else {}, "stages": [], "seconds": 2.0,
                      "train_images": {"edge_distill_c_public_private": 64}}
            ledger.customer(server_round, job, result)
        ledger.round({"round": server_round, "replies": 2, "failures": 0, "accepted_customers": 1 + (server_round == 2),
                      "shared_tutor_updated": False, "merge": {"rule": "mean"}}, None)
    write_summary(run, ledger.summary_rows, ledger.round_reports, config)
    run.close()

    table = read_csv(run.folder / "results.csv")
    assert {key[1] for key in table} == {"9"}  # seed 7 + replicate 2
    summary = {(r["round"], r["customer"]): r for r in json.loads((run.folder / "summary.json").read_text())["customers"]}
    checked = 0
    for path in sorted(run.folder.glob("round*/customer*.json")):
        detail = json.loads(path.read_text())
        where = ("diredi", "9", str(detail["round"]), detail["customer"])
        rows = {row["key"]: row for row in detail["rows"]}
        outcome = rows[deployed_key] if detail["edge"] == "deployed" else rows["edge_original"]
        for measure in ("mAP", "precision", "recall", "f1"):
            assert table[(*where, "", measure)] == outcome[measure]
        for name, ap in outcome["per_class"].items():
            assert table[(*where, name, "AP")] == ap and table[(*where, name, "AP_change")] == outcome["change"][name]
        for measure in ("gain", "forgetting", "mAP_before", "mAP_after", "uplink_bytes", "seconds"):
            assert table[(*where, "", measure)] == summary[(detail["round"], detail["customer"])][measure] == detail[measure]
        assert table[(*where, "", "accepted")] == (detail["verdict"] == "accepted")
        assert table[(*where, "", "edge_deployed")] == (detail["edge"] == "deployed")
        assert table[(*where, "", "bytes/train.down")] == 5000
        for key, row in rows.items():  # every model of the round's table, under its row key
            assert table[(*where, "", f"{key}/mAP")] == row["mAP"] and table[(*where, "", f"{key}/tp")] == 5
            for name in row["per_class"]:
                assert table[(*where, name, f"{key}/AP")] == row["per_class"][name]
                assert table[(*where, name, f"{key}/num_gt")] == row["num_gt"][name]
            assert (*where, "", f"{key}/dropped_forgetting") not in table  # None: no row
            checked += 1
    assert checked == 2 * 2 * 4
    assert table[("diredi", "9", "1", "", "", "merge/accepted_customers")] == 1
    assert table[("diredi", "9", "2", "", "", "merge/accepted_customers")] == 2
    assert table[("diredi", "9", "1", "exp2", "", "accepted")] == 0.0  # rejected in round 1: its original edge
    assert table[("diredi", "9", "1", "exp2", "", "mAP")] == pytest.approx(0.43)
    check_pandas(run.folder / "results.csv", len(table))


def test_a_comparison_writes_results_csv_that_agrees_with_compare_json(tmp_path, caplog):
    """Two stand-in methods (one with rounds, one without) over two replicates through run_compare."""
    from experiments.compare import run_compare
    from experiments.methods import REGISTRY, Method, register

    def with_rounds(config, shared):
        return [{"round": 3, "partition_id": c.partition_id, "customer": c.name, "verdict": "accepted",
                 "mAP": 0.5 + 0.1 * config.replicate + 0.01 * c.partition_id, "precision": 0.6, "recall": 0.4, "f1": 0.48,
                 "gain": 0.05, "forgetting": 0.01, "uplink_bytes": 123, "per_class": {n: 0.1 * i for i, n in enumerate(c.classes)},
                 "change": {n: -0.01 * i for i, n in enumerate(c.classes)}} for c in build_population(config.population)], None

    def without_rounds(config, shared):
        return [{"partition_id": c.partition_id, "customer": c.name, "mAP": 0.2 + 0.05 * config.replicate, "precision": 0.3,
                 "recall": 0.2, "f1": float("nan"), "gain": 0.0, "forgetting": 0.4} for c in build_population(config.population)], None

    register(Method("csv_rounds", "stand-in with rounds", with_rounds))
    register(Method("csv_plain", "stand-in without rounds", without_rounds))
    config = FederationConfig(name="csv", seed=4, runs_dir=str(tmp_path / "runs"), device="cpu",
                              population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                              baselines=BaselineConfig(methods=("csv_rounds", "csv_plain")))
    caplog.set_level(logging.INFO, logger="experiments")
    try:
        folder = run_compare(config, seeds=2)
    finally:
        REGISTRY.pop("csv_rounds")
        REGISTRY.pop("csv_plain")
    results = json.loads((folder / "compare.json").read_text())["results"]
    table = read_csv(folder / "results.csv")
    assert len(results) == 8
    for row in results:
        where = (row["method"], str(4 + row["replicate"]), str(row.get("round", "")), row["customer"])
        for measure in ("mAP", "precision", "recall", "gain", "forgetting", "seconds"):
            assert table[(*where, "", measure)] == row[measure]
        for name, ap in row.get("per_class", {}).items():
            assert table[(*where, name, "AP")] == ap and table[(*where, name, "AP_change")] == row["change"][name]
        if row["method"] == "csv_plain":
            assert row["f1"] is None and (*where, "", "f1") not in table  # NaN in the run: no row
        else:
            assert table[(*where, "", "accepted")] == 1 and table[(*where, "", "uplink_bytes")] == 123
    assert {key[2] for key in table if key[0] == "csv_plain"} == {""}  # no rounds
    assert table[("csv_rounds", "5", "3", "exp2", "", "mAP")] == pytest.approx(0.61)
    assert (folder / "log.txt").read_text().count("compare: replicate") == 4
    check_pandas(folder / "results.csv", len(table))


def test_a_paper_run_writes_results_csv_that_agrees_with_each_seeds_table(tmp_path, monkeypatch):
    import experiments.paper as paper
    from diredi_sim.config import ExperimentConfig
    from diredi_sim.pipeline import PipelineResult
    from diredi_sim.settings import ClassSets, PipelineConfig
    from diredi_sim.verify import Verdict

    classes = ["aeroplane", "bus", "cat", "horse", "motorbike", "person"]

    def fake_pipeline(pipeline, data, *, preset, seed, run, config, progress, seeds):
        k = seeds.customer - 10
        rows = [model_row(key, 0.2 + 0.05 * i + 0.01 * k, classes)
                for i, key in enumerate(("teacher", "tutor_original", "edge_original", "edge_direct", "edge_local",
                                         "edge_distill_c_public_private"))]
        delta_info = {"norm": 1.5 + k, "gamma": 1.0, "tensors": 2, "values": 10, "bytes_fp32": 40, "bytes_fp16": 20}
        return PipelineResult(rows, Verdict(k == 0, [] if k == 0 else ["too far"], 1.0), {}, delta_info, [],
                              ClassSets.of(pipeline.customer, pipeline.presumed_split), {"folder": "-", "key": "-", "reused": True},
                              {"preset": preset, "seed": seed})

    monkeypatch.setattr(paper, "run_pipeline", fake_pipeline)
    run = paper.run_paper(ExperimentConfig(name="csv", seed=10, runs_dir=str(tmp_path / "runs")), "exp1", PipelineConfig(),
                          progress=False, seeds=2)
    table = read_csv(run.folder / "results.csv")
    for seed in (10, 11):
        single = json.loads((run.folder / f"seed-{seed}" / "table.json").read_text())
        assert table[("diredi", str(seed), "1", "exp1", "", "accepted")] == single["verdict"]["accepted"]
        assert table[("diredi", str(seed), "1", "exp1", "", "delta/norm")] == single["delta"]["norm"]
        for row in single["rows"]:
            method = {"edge_direct": "direct", "edge_local": "local"}.get(row["key"], "diredi")
            where = (method, str(seed), "1", "exp1")
            assert table[(*where, "", f"{row['key']}/f1")] == row["f1"]
            for name, ap in row["per_class"].items():
                assert table[(*where, name, f"{row['key']}/AP")] == ap
    (run.folder / "results.csv").unlink()  # paper-summary writes it again from the seed folders alone
    paper.summarize_paper_run(run.folder)
    assert read_csv(run.folder / "results.csv") == table


def test_tidy_rows_skip_identifiers_and_missing_values():
    rows = tidy_rows({"round": 2, "customer": "x", "mAP": 0.5, "gain": math.nan, "label": "text", "dropped": ["a"],
                      "accepted": True, "verdict": "rejected", "per_class": {"cat": 0.25, "dog": None},
                      "bytes": {"train.up": 7}, "value": torch.tensor(1.5)},
                     method="m", seed=3, round=2, customer="x", partition_id=1)
    assert [(r["class"], r["metric"], r["value"]) for r in rows] == [
        (None, "mAP", 0.5), (None, "accepted", 1), (None, "accepted", 0), ("cat", "AP", 0.25), (None, "bytes/train.up", 7),
        (None, "value", 1.5)]


def test_config_json_records_versions_device_and_commit(tmp_path, monkeypatch):
    run = Run.create(tmp_path, "env", {"seed": 1})
    run.close()
    data = json.loads((run.folder / "config.json").read_text())
    assert data["seed"] == 1
    environment = data["environment"]
    versions = environment["versions"]
    assert set(versions) >= {"python", "torch", "torchvision", "flwr", "ray", "numpy"}
    assert versions["torch"] == torch.__version__ and versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["numpy"] == __import__("numpy").__version__
    assert environment["device"] == "cpu" or environment["device"].startswith("cuda")
    git = shutil.which("git")
    expected = subprocess.run([git, "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() if git else ""
    assert environment["git_commit"] == (expected or None)
    assert read_git_commit(tmp_path) is None  # not a git checkout
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert read_git_commit() is None
    Run.create(tmp_path, "no-git", {}).close()  # and a run is still created
    # the resume path reads a config.json with its environment record back into the typed config
    from experiments.resume import load_run_config
    from server.engine import EngineConfig, RunConfig

    federation = RunConfig(name="fed", data=DataConfig(cache_dir=str(tmp_path / "d")), engine=EngineConfig(client_threads=2))
    with Run.create(tmp_path, "fed", federation) as fed:
        assert load_run_config(fed.folder) == federation


def test_tensorboard_on_writes_scalars_or_says_which_setting_needs_the_package(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:  # an optional package: the writer where it is installed
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        with Run.create(tmp_path, "tb", {"tensorboard": True}) as run:
            run.log({"stage": "edge", "epoch": 1, "loss.task.classification": 0.5, "val.mAP50": 0.25})
            run.log({"event": "customer", "round": 2, "partition_id": 1, "gain": 0.125, "per_class": {"cat": 0.5}})
        events = EventAccumulator(str(run.folder / "tensorboard"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("edge/loss.task.classification")] == [(1, 0.5)]
        assert [(e.step, e.value) for e in events.Scalars("customer/customer1/per_class/cat")] == [(2, 0.5)]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as when the package is missing
    with pytest.raises(ConfigError, match=r"tensorboard = true needs the tensorboard package.*or set tensorboard = false"):
        Run.create(tmp_path / "missing", "tb", FederationConfig(tensorboard=True))
    assert not (tmp_path / "missing").exists()
    Run.create(tmp_path / "off", "tb", FederationConfig()).close()  # off: never imported
