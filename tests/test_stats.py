"""Statistics over seeds (experiments/stats.py) and the paper's summary over seeds, against values
computed by hand."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from experiments.paper import aggregate_paper_tables, format_paper_summary
from experiments.stats import paired_difference, summarize

T_975_3 = 3.182446305284263  # Student's t, 0.975 quantile, 3 degrees of freedom (tables: 3.182)
T_975_2 = 4.302652729749464  # 2 degrees of freedom (tables: 4.303)


def test_summarize_gives_mean_and_sample_standard_deviation():
    out = summarize([1.0, 2.0, 3.0, 4.0])
    assert out["n"] == 4 and out["mean"] == pytest.approx(2.5)
    assert out["std"] == pytest.approx(math.sqrt(5 / 3))  # ddof=1: sum of squares 5 over 3
    assert summarize([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1}


def test_summarize_leaves_out_missing_values():
    out = summarize([0.2, None, float("nan"), 0.4])
    assert out["n"] == 2 and out["mean"] == pytest.approx(0.3) and out["std"] == pytest.approx(math.sqrt(0.02))
    assert summarize([None, float("nan")]) == {"mean": None, "std": None, "n": 0}
    assert summarize([]) == {"mean": None, "std": None, "n": 0}


def test_paired_difference_interval_by_hand():
    # differences 1, 0, 2, 3: mean 1.5, std sqrt(5/3), standard error sqrt(5/3)/2
    out = paired_difference([1, 2, 3, 4], [0, 2, 1, 1])
    assert out["n"] == 4 and out["mean"] == pytest.approx(1.5) and out["std"] == pytest.approx(math.sqrt(5 / 3))
    half = T_975_3 * math.sqrt(5 / 3) / 2  # 2.05426
    assert out["ci95"] == pytest.approx([1.5 - half, 1.5 + half])
    assert out["ci95"][0] == pytest.approx(-0.55426, abs=1e-5)
    assert out["significant"] is False  # the interval holds 0

    # differences 2, 2, 3: mean 7/3, std sqrt(1/3); the interval [0.899, 3.768] excludes 0
    out = paired_difference([2, 3, 4], [0, 1, 1])
    half = T_975_2 * math.sqrt(1 / 3) / math.sqrt(3)
    assert out["mean"] == pytest.approx(7 / 3) and out["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half])
    assert out["ci95"][0] == pytest.approx(0.89912, abs=1e-5) and out["significant"] is True
    # a negative difference is significant too: the sign does not matter
    assert paired_difference([0, 1, 1], [2, 3, 4])["significant"] is True


def test_paired_difference_uses_only_complete_pairs():
    # pairs 2, 4 and 5 have a missing side: differences 1 and 2 remain
    out = paired_difference([1.0, None, 3.0, 5.0, float("nan")], [0.0, 1.0, 1.0, float("nan"), 1.0])
    assert out["n"] == 2 and out["mean"] == pytest.approx(1.5)
    out = paired_difference([1.0, 2.0, 6.0, None], [0.0, 0.0, 3.0, 1.0])
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0) and out["std"] == pytest.approx(1.0)
    half = T_975_2 / math.sqrt(3)  # 2.484: the interval [-0.484, 4.484] holds 0
    assert out["ci95"] == pytest.approx([2.0 - half, 2.0 + half]) and out["significant"] is False


def test_paired_difference_needs_two_pairs_for_an_interval():
    one = paired_difference([0.5, None], [0.1, 0.2])
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.4) and one["std"] == 0.0
    assert one["ci95"] == [None, None] and one["significant"] is False
    none = paired_difference([None], [0.2])
    assert none == {"mean": None, "std": None, "n": 0, "ci95": [None, None], "significant": False}
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def row(key, m, presumed=None, private=None, dropped=None, p=0.5, r=0.4, f1=0.45):
    return {"key": key, "label": key, "mAP": m, "presumed_map": presumed, "private_ap": private, "dropped_ap": dropped,
            "precision": p, "recall": r, "f1": f1, "gain": 0.0, "per_class": {}}


def seed_rows(direct_map, distill_map, distill_private, tutor1_presumed, extra=True):
    """One replicate's pipeline rows (table order); the manufacturer's rows are the same in every seed."""
    rows = [row("teacher", 0.40, presumed=0.42, dropped=float("nan")), row("tutor_distill_a", 0.30, presumed=0.31),
            row("edge_distill_b", 0.20, presumed=0.21), row("tutor1", 0.33, presumed=tutor1_presumed, private=0.1),
            row("tutor_original", 0.30, presumed=0.31), row("tutor_updated", 0.32, presumed=0.30, private=0.2),
            row("edge_original", 0.20, presumed=0.21, private=0.0), row("edge_direct", direct_map, presumed=0.15, private=0.25),
            row("edge_distill_c_public_private", distill_map, presumed=0.22, private=distill_private)]
    if extra:
        rows.append(row("edge_distill_c_public_score", 0.21))
    return rows


def test_paper_summary_over_seeds_has_the_documented_shape():
    rows = [seed_rows(0.18, 0.25, 0.10, 0.30), seed_rows(0.20, 0.27, None, 0.32), seed_rows(0.16, 0.29, 0.14, 0.31, extra=False)]
    summary = aggregate_paper_tables("exp1", "cpu", "synthetic", [5, 6, 7], rows)
    json.dumps(summary, allow_nan=False)  # plain JSON: no NaN anywhere
    assert list(summary) == ["experiment", "preset", "data", "seeds", "rows", "differences", "per_seed"]
    assert (summary["experiment"], summary["preset"], summary["data"], summary["seeds"]) == ("exp1", "cpu", "synthetic", [5, 6, 7])
    # renamed rows first, in the documented order; others carried under their own names; no edge_local here
    assert list(summary["rows"]) == ["teacher", "tutor", "edge", "tutor1", "tutor_updated", "tutor_deployed", "edge_direct",
                                     "edge_distill_c_public_private", "tutor_distill_a", "edge_distill_b",
                                     "edge_distill_c_public_score"]
    measures = ["presumed_map", "presumed_all_map", "private_ap", "dropped_ap", "map", "precision", "recall", "f1"]
    for name, entry in summary["rows"].items():
        assert list(entry) == measures, name
        assert all(set(v) == {"mean", "std"} for v in entry.values()), name
    rows_out = summary["rows"]
    assert rows_out["edge_direct"]["map"] == {"mean": pytest.approx(0.18), "std": pytest.approx(0.02)}
    assert rows_out["edge_distill_c_public_private"]["map"]["mean"] == pytest.approx(0.27)
    assert rows_out["edge_distill_c_public_private"]["private_ap"] == {"mean": pytest.approx(0.12),
                                                                       "std": pytest.approx(math.sqrt(0.0008))}
    assert rows_out["tutor"]["map"] == {"mean": pytest.approx(0.30), "std": 0.0}  # the manufacturer's rows do not vary
    assert rows_out["teacher"]["private_ap"] == {"mean": None, "std": None}  # never a value
    assert rows_out["teacher"]["dropped_ap"] == {"mean": None, "std": None}  # NaN only
    assert rows_out["edge_distill_c_public_score"]["map"] == {"mean": pytest.approx(0.21), "std": 0.0}  # 2 seeds of 3

    diffs = summary["differences"]
    assert list(diffs) == ["edge_distill_c_public_private - edge_direct", "edge_distill_c_public_private - edge",
                           "tutor_updated - tutor", "tutor1 - edge", "tutor1 - tutor"]  # no edge_local, no edge_distill_c_public rows
    versus_direct = diffs["edge_distill_c_public_private - edge_direct"]
    assert list(versus_direct) == ["map", "f1", "private_ap", "presumed_map"]
    # mAP differences 0.07, 0.07, 0.13: mean 0.09, std sqrt(0.0012)
    assert versus_direct["map"]["n"] == 3 and versus_direct["map"]["mean"] == pytest.approx(0.09)
    half = T_975_2 * math.sqrt(0.0012) / math.sqrt(3)
    assert versus_direct["map"]["ci95"] == pytest.approx([0.09 - half, 0.09 + half]) and versus_direct["map"]["significant"]
    assert versus_direct["private_ap"]["n"] == 2  # seed 6 has no private AP for Distill C

    assert versus_direct["private_ap"]["mean"] == pytest.approx(-0.13)
    assert versus_direct["f1"]["mean"] == 0.0 and versus_direct["f1"]["significant"] is False
    assert list(diffs["tutor1 - edge"]) == ["presumed_map", "map"]
    assert diffs["tutor1 - edge"]["presumed_map"]["mean"] == pytest.approx(0.10)
    assert diffs["tutor1 - edge"]["map"]["mean"] == pytest.approx(0.13)  # on the customer's classes: 0.33 vs 0.20
    assert diffs["tutor1 - tutor"]["presumed_map"]["mean"] == pytest.approx(0.0)
    assert "dropped_ap" not in diffs["tutor_updated - tutor"]

    assert [entry["seed"] for entry in summary["per_seed"]] == [5, 6, 7]
    assert summary["per_seed"][1]["rows"]["edge_distill_c_public_private"]["private_ap"] is None
    assert summary["per_seed"][0]["rows"]["edge"]["map"] == 0.20
    assert "edge_distill_c_public_score" not in summary["per_seed"][2]["rows"]

    text = format_paper_summary(summary, manufacturer_seed=5)
    assert "| model | presumed mAP | presumed mAP (all) | private AP | dropped AP | mAP | P | R | F1 |" in text
    assert "| edge_direct | 15.0 ± 0.0 | - | 25.0 ± 0.0 | - | 18.0 ± 2.0 | 50.0 ± 0.0 | 40.0 ± 0.0 | 45.0 ± 0.0 |" in text
    assert "| edge_distill_c_public_private - edge_direct | mAP | +9.0 |" in text and "**yes**" in text


def test_the_updated_tutor_is_tutor_plus_delta_even_when_verification_rejected_it():
    """The paper's "updated tutor" row is the substituted tutor; a rejected one is the pipeline's
    candidate row, and what the manufacturer keeps (the original tutor) is "tutor_deployed"."""
    accepted = seed_rows(0.18, 0.25, 0.10, 0.30)
    rejected = [r if r["key"] != "tutor_updated" else row("tutor_updated", 0.30, presumed=0.31, private=0.0) for r in accepted]
    rejected.insert(6, row("tutor_rejected_candidate", 0.36, presumed=0.28, private=0.3))
    summary = aggregate_paper_tables("exp1", "cpu", "synthetic", [0, 1], [accepted, rejected])
    first, second = (entry["rows"] for entry in summary["per_seed"])
    assert first["tutor_updated"] == first["tutor_deployed"] and first["tutor_updated"]["private_ap"] == 0.2
    assert second["tutor_updated"]["map"] == 0.36 and second["tutor_updated"]["private_ap"] == 0.3
    assert second["tutor_deployed"]["map"] == 0.30 and "tutor_rejected_candidate" not in second

def test_paper_summary_with_edge_local_and_public_rows():
    rows = []
    for k, (local, public) in enumerate([(0.22, 0.23), (0.24, 0.22)]):
        rows.append(seed_rows(0.18, 0.25, 0.1, 0.3) + [row("edge_local", local, private=0.05), row("edge_distill_c_public", public)])
    summary = aggregate_paper_tables("exp2", "paper", "voc", [0, 1], rows)
    assert list(summary["rows"])[:10] == ["teacher", "tutor", "edge", "tutor1", "tutor_updated", "tutor_deployed", "edge_direct", "edge_local",
                                         "edge_distill_c_public", "edge_distill_c_public_private"]
    local = summary["differences"]["edge_distill_c_public_private - edge_local"]
    assert local["map"]["mean"] == pytest.approx(0.02) and local["map"]["n"] == 2
    assert local["private_ap"]["mean"] == pytest.approx(0.05)
    assert summary["differences"]["edge_distill_c_public - edge"]["map"]["mean"] == pytest.approx(0.025)
    with pytest.raises(ValueError):
        aggregate_paper_tables("exp2", "cpu", "synthetic", [0], rows)


def fake_paper_pipeline(calls, teacher_map=0.4):
    """A stand-in for run_pipeline (no training): rows that depend on the customer seed k = seed - 10."""
    from diredi_sim.pipeline import PipelineResult
    from diredi_sim.settings import ClassSets
    from diredi_sim.verify import Verdict

    def fake_pipeline(pipeline, data, *, preset, seed, run, config, progress, seeds):
        customer_seed = seeds.customer
        calls.append((seed, customer_seed, run.folder.name, config["customer_seed"]))
        k = customer_seed - 10
        rows = [{**row(key, m, presumed=0.3, private=p), "forgetting": 0.0, "dropped_forgetting": float("nan")}
                for key, m, p in [("teacher", teacher_map, None), ("tutor_original", 0.3, 0.0), ("edge_original", 0.2, 0.0),
                                  ("edge_direct", 0.2 + 0.01 * k, 0.1), ("edge_distill_c_public_private", 0.25 + 0.02 * k, 0.2)]]
        delta_info = {"norm": 1.0, "gamma": 1.0, "tensors": 2, "values": 10, "bytes_fp32": 40, "bytes_fp16": 20}
        return PipelineResult(rows, Verdict(True, [], 1.0), {}, delta_info, [], ClassSets.of(pipeline.customer, pipeline.presumed_split),
                              {"folder": "-", "key": "abc", "reused": True}, {"preset": preset, "seed": seed})

    return fake_pipeline


def test_run_paper_with_seeds_writes_each_seed_and_the_summary(tmp_path, monkeypatch, capsys):
    """run_paper(seeds=3) on a stand-in for run_pipeline (no training): the manufacturer keeps the
    config's seed, the customer's seed is seed + k, each replicate's outputs go to seed-<s>/ and the
    summary over seeds to the top of the one run folder."""
    import experiments.paper as paper
    from diredi_sim.config import ConfigError, ExperimentConfig
    from diredi_sim.settings import PipelineConfig

    calls = []
    fake_pipeline = fake_paper_pipeline(calls)

    monkeypatch.setattr(paper, "run_pipeline", fake_pipeline)
    config = ExperimentConfig(name="multi", seed=10, runs_dir=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="--seeds 0"):
        paper.run_paper(config, "exp1", PipelineConfig(), progress=False, seeds=0)
    run = paper.run_paper(config, "exp1", PipelineConfig(), progress=False, seeds=3)
    assert calls == [(10, 10, "seed-10", 10), (10, 11, "seed-11", 11), (10, 12, "seed-12", 12)]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.folder.name]  # one run folder
    for s in (10, 11, 12):
        single = json.loads((run.folder / f"seed-{s}" / "table.json").read_text())  # the single-seed outputs, per seed
        assert [r["key"] for r in single["rows"]][:3] == ["teacher", "tutor_original", "edge_original"]
        if s != config.seed:  # the single-seed table names the customer's seed where it differs from the manufacturer's
            assert f"seed 10, customer seed {s};" in (run.folder / f"seed-{s}" / "table.md").read_text()
        assert json.loads((run.folder / f"seed-{s}" / "config.json").read_text())["customer_seed"] == s
    summary = json.loads((run.folder / "table.json").read_text())
    assert list(summary) == ["experiment", "preset", "data", "seeds", "rows", "differences", "per_seed", "config"]
    assert summary["config"]["seed"] == 10 and "runs_dir" not in summary["config"] and "seeds" not in summary["config"]
    assert summary["seeds"] == [10, 11, 12] and summary["data"] == "synthetic" and summary["preset"] == "cpu"
    assert summary["rows"]["edge_direct"]["map"] == {"mean": pytest.approx(0.21), "std": pytest.approx(0.01)}
    assert summary["rows"]["edge"]["map"] == {"mean": pytest.approx(0.2), "std": 0.0}
    assert summary["differences"]["edge_distill_c_public_private - edge_direct"]["map"]["mean"] == pytest.approx(0.06)
    assert [(e["seed"], e["folder"], e["accepted"]) for e in summary["per_seed"]] == [(10, "seed-10", True), (11, "seed-11", True),
                                                                                      (12, "seed-12", True)]
    markdown = (run.folder / "table.md").read_text()
    assert "| edge_direct |" in markdown and "the manufacturer's seed stays 10" in markdown
    assert markdown.strip() in capsys.readouterr().out
    # the summary is a function of the saved replicates alone: rewritten from them, it is the same
    (run.folder / "table.json").unlink()
    assert paper.summarize_paper_run(run.folder).strip() == markdown.strip()
    assert json.loads((run.folder / "table.json").read_text()) == summary
    with pytest.raises(ConfigError, match="no finished replicate"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text(json.dumps({"experiment": "exp1", "preset": "cpu", "data": {"source": "synthetic"}}))
        paper.summarize_paper_run(tmp_path / "empty")


def test_paper_merge_of_runs_on_other_machines_equals_one_run(tmp_path, monkeypatch, capsys):
    """Seeds 10-11 in one run and seed 12 in another (--customer-seeds 12) merge into the summary
    of one 3-seed run; a repeated seed, another config, another manufacturer and a summary without
    its config are refused with the file's name."""
    import experiments.paper as paper
    from diredi_sim.config import ConfigError, ExperimentConfig
    from diredi_sim.settings import PipelineConfig
    from experiments.cli import main as cli_main

    calls = []
    monkeypatch.setattr(paper, "run_pipeline", fake_paper_pipeline(calls))
    config = ExperimentConfig(name="multi", seed=10, runs_dir=str(tmp_path / "runs"))
    whole = paper.run_paper(config, "exp1", PipelineConfig(), progress=False, seeds=3)
    first = paper.run_paper(config, "exp1", PipelineConfig(), progress=False, seeds=2)
    # the third replicate alone, on another machine with another thread count
    third = paper.run_paper(replace(config, threads=1), "exp1", PipelineConfig(), progress=False, customer_seeds=[12])
    assert calls[-1] == (10, 12, "seed-12", 12) and json.loads((third.folder / "config.json").read_text())["seeds"] == [12]
    for bad in ([9], [11, 11], []):
        with pytest.raises(ConfigError, match="--customer-seeds"):
            paper.run_paper(config, "exp1", PipelineConfig(), progress=False, customer_seeds=bad)
    out = tmp_path / "merged.json"
    capsys.readouterr()
    assert cli_main(["paper-merge", str(out), str(first.folder), str(third.folder / "table.json")]) == 0
    merged, single = json.loads(out.read_text()), json.loads((whole.folder / "table.json").read_text())
    assert merged["seeds"] == [10, 11, 12]
    assert merged["rows"] == single["rows"] and merged["differences"] == single["differences"]
    assert [e["rows"] for e in merged["per_seed"]] == [e["rows"] for e in single["per_seed"]]
    assert "| edge_direct |" in capsys.readouterr().out
    # merging into one of the inputs adds a seed to a committed table
    assert cli_main(["paper-merge", str(out), str(out)]) == 0 and json.loads(out.read_text())["seeds"] == [10, 11, 12]
    assert cli_main(["paper-merge", str(out), str(out), str(third.folder)]) == 2
    assert f"{third.folder / 'table.json'}: customer seed 12 is also in {out}" in capsys.readouterr().err
    other = paper.run_paper(config, "exp1", PipelineConfig(alpha=3.0), progress=False, customer_seeds=[13])
    with pytest.raises(ConfigError, match=r"config key\(s\) pipeline differ"):
        paper.merge_paper_summaries([first.folder, other.folder])
    monkeypatch.setattr(paper, "run_pipeline", fake_paper_pipeline(calls, teacher_map=0.41))  # a retrained manufacturer
    retrained = paper.run_paper(config, "exp1", PipelineConfig(), progress=False, customer_seeds=[14])
    with pytest.raises(ConfigError, match=r"seed 14's teacher \(map 0.41\) is not .*another manufacturer"):
        paper.merge_paper_summaries([first.folder, retrained.folder])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in single.items() if k != "config"}))
    with pytest.raises(ConfigError, match="no config .*paper-summary RUN_DIR"):
        paper.merge_paper_summaries([old])
