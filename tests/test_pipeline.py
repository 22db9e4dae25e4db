"""The paper's flow end to end on tiny data (every stage 1 epoch), its outputs and its cache.

One real pipeline run (Exp 2's split: a private class, a dropped class and kept classes) feeds
most tests; a second real run (through run_paper) must reuse the manufacturer's artefacts.
Torch runs on one thread here: two threads on two cores that other jobs also use are many
times slower, not faster.
"""
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import diredi_sim.flow as flow_module
import diredi_sim.manufacturer as manufacturer_module
from diredi_sim.config import ConfigError, DataConfig, ExperimentConfig, TrainConfig
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.models import build_detector, part_of
from diredi_sim.manufacturer import compute_manufacturer_key, describe_manufacturer
from diredi_sim.pipeline import run_pipeline
from diredi_sim.settings import ClassSets, PipelineConfig
from diredi_sim.table import ROWS, compute_knowledge
from diredi_sim.runs import Run, load_checkpoint
from diredi_sim.verify import VerifyConfig
from experiments.paper import find_paper_config, load_paper_config, run_paper, write_paper_outputs

# 48 train / 16 val / 32 test images, half of each the manufacturer's (public pool); with this
# seed every class of exp2 | presumed (aeroplane, bus, dog, horse, motorbike, person) has ground
# truth in the customer's test images.
TINY = SyntheticConfig(seed=3, num_train=48, num_val=16, num_test=32, min_objects=3, max_objects=5, min_object_size=24, clutter=2.0)
STAGE = TrainConfig(epochs=1, batch_size=8, lr=0.01, warmup_steps=1)
EXPECTED_KEYS = ["teacher", "tutor_original", "edge_original", "tutor1", "tutor2", "tutor_updated", "edge_direct", "edge_local",
                 "edge_distill_c_public", "edge_distill_c_public_private"]


def tiny_pipeline(tmp_path, **changes) -> PipelineConfig:
    settings = dict(customer="exp2", teacher=STAGE, distill_a=STAGE, distill_b=STAGE, rd=STAGE, distill_c=STAGE, direct=STAGE,
                    local=STAGE, rd_customer_per_batch=4, cache_dir=str(tmp_path / "manufacturer-cache"), eval_batch_size=16, verify=VerifyConfig(max_ap_drop=0.05))
    return PipelineConfig(**{**settings, **changes})


class CallCounter:
    """Wraps the real training functions the pipeline calls and records each call's name and,
    for the distillations, the role of the model that teaches."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        self.teachers: dict[str, str] = {}
        for module in (manufacturer_module, flow_module):  # where the flow's stages call them
            for attr in ("train_detector", "distill", "reverse_distill", "finetune"):
                if hasattr(module, attr):
                    real = getattr(module, attr)
                    monkeypatch.setattr(module, attr, self._wrap(real, attr in ("distill", "reverse_distill")))

    def _wrap(self, real, teaches: bool):
        def wrapped(*args, **kwargs):
            name = kwargs["report"].name
            self.names.append(name)
            if teaches:
                self.teachers[name] = args[0].role
            return real(*args, **kwargs)

        return wrapped


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first(tmp_path_factory, one_thread):
    """The first (cold) pipeline run: trains everything, fills the manufacturer cache."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data = DataConfig(cache_dir=str(tmp / "data"), synthetic=TINY)
    cfg = tiny_pipeline(tmp)
    run = Run.create(tmp / "runs", "tiny-exp2", {"test": "pipeline"})
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = CallCounter(monkeypatch)
        result = run_pipeline(cfg, data, preset="cpu", seed=0, run=run, progress=False)
    write_paper_outputs(run, result, "exp2")
    return SimpleNamespace(tmp=tmp, data=data, cfg=cfg, run=run, result=result, calls=calls.names, teachers=calls.teachers,
                           table=json.loads((run.folder / "table.json").read_text()))


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_table_has_every_row_with_finite_numbers(first):
    result, classes = first.result, first.result.classes
    assert classes == ClassSets(("aeroplane", "bus", "dog", "motorbike", "person"), ("aeroplane", "bus", "horse", "motorbike", "person"),
                                ("aeroplane", "bird", "bus", "car", "cow", "horse", "motorbike", "person", "sheep", "tvmonitor"),
                                ("dog",), ("aeroplane", "bus", "motorbike", "person"), ("horse",),
                                ("aeroplane", "bus", "dog", "horse", "motorbike", "person"))
    keys = [row["key"] for row in result.rows]
    expected = list(EXPECTED_KEYS)
    if not result.verdict.accepted:
        expected.insert(expected.index("tutor_updated") + 1, "tutor_rejected_candidate")
    assert keys == expected
    assert [r["key"] for r in first.table["rows"]] == expected
    for row in result.rows:
        for metric in ("mAP", "precision", "recall", "f1", "coco_AP"):
            assert _finite(row[metric]) and 0 <= row[metric] <= 1, (row["key"], metric)
        assert set(row["per_class"]) == set(classes.union)
        for name in classes.union:
            assert row["num_gt"][name] > 0 and _finite(row["per_class"][name]), (row["key"], name)
        # one prediction pass: the headline mAP is the mean of the customer classes' per-class AP
        assert row["mAP"] == pytest.approx(sum(row["per_class"][n] for n in classes.customer) / len(classes.customer))
        if row["key"] == "teacher":
            assert row["reference"] is None and math.isnan(row["gain"])
        else:
            for measure in ("gain", "forgetting", "dropped_forgetting"):
                assert _finite(row[measure]), (row["key"], measure)
        # rows on their own classes: presumed mAP on the manufacturer's test images, private and dropped AP apart
        assert _finite(row["presumed_map"]) and row["presumed_test_images"] > 0
        # presumed mAP over the presumed classes the customer keeps (horse, dropped, apart), and over all of them
        maker_ap = row["presumed_per_class"]  # NaN: no such object among these few test images
        assert set(maker_ap) == set(classes.presumed) and _finite(maker_ap["horse"])  # the dropped class is measured
        kept = [maker_ap[n] for n in classes.kept if _finite(maker_ap[n])]
        every = [ap for ap in maker_ap.values() if _finite(ap)]
        assert row["presumed_map"] == pytest.approx(sum(kept) / len(kept))
        assert row["presumed_all_map"] == pytest.approx(sum(every) / len(every))
        assert row["private_ap"] == pytest.approx(row["per_class"]["dog"])
        assert row["dropped_ap"] == pytest.approx(row["per_class"]["horse"])
    own = {row["key"]: row["own"] for row in result.rows if "own" in row}
    assert set(own) == {"teacher"}
    assert own["teacher"]["classes"] == "teacher" and set(own["teacher"]["per_class"]) == set(classes.teacher)
    assert all(_finite(o["mAP"]) and o["test_images"] > 0 for o in own.values())


def test_distill_b_is_taught_by_the_tutor_and_reverse_distillation_by_the_edge(first):
    assert first.teachers["tutor_distill_a"] == "teacher"
    assert first.teachers["edge_distill_b"] == "tutor"  # paper section III-A: the tutor is the edge's teacher
    assert first.teachers["tutor1_rd_b"] == first.teachers["tutor2_rd_a"] == "edge"
    assert first.teachers["edge_distill_c_public"] == "tutor"


def test_tutor1_and_tutor2_take_the_same_steps_and_reverse_distillation_logs_both_terms(first):
    stages = {s["stage"]: s for s in first.result.stages}
    rd_b, rd_a = stages["rd_b"], stages["rd_a"]
    assert rd_b["presumed_images"] == rd_a["presumed_images"] > 0 and rd_a["own_images"] > 0
    assert rd_b["train_steps"] == rd_a["train_steps"] > 0
    assert rd_a["train_images"] == rd_b["train_images"] + rd_a["train_steps"] * first.cfg.rd_customer_per_batch
    rows = [json.loads(line) for line in (first.run.folder / "metrics.jsonl").read_text().splitlines()]
    for stage in ("tutor1_rd_b", "tutor2_rd_a"):
        row = next(r for r in rows if r.get("stage") == stage and "epoch" in r)
        assert row["loss_sum.task"] > 0 and row["loss_sum.distill"] > 0, row
        assert row["loss_sum.task"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("loss.task.")))
    # the baselines trained on as many images as the DiReDi customer
    compute = first.result.settings["training_images"]
    assert compute["diredi"] == rd_b["train_images"] + rd_a["train_images"] + stages["distill_c_public+private"]["train_images"]
    for key in ("edge_direct", "edge_local"):
        assert compute["diredi"] <= compute["baselines"][key] < compute["diredi"] + STAGE.batch_size


def test_knowledge_measures_follow_from_the_tables_own_per_class_ap(first):
    """Recomputed from table.json as written (what a reader of the run folder sees)."""
    table = first.table
    rows = {row["key"]: row for row in table["rows"]}
    private, kept, dropped = (table["classes"][k] for k in ("private", "kept", "dropped"))
    assert (private, kept, dropped) == (["dog"], ["aeroplane", "bus", "motorbike", "person"], ["horse"])
    checked = 0
    for key, row in rows.items():
        if row["reference"] is None:
            assert row["gain"] is None and row["forgetting"] is None
            continue
        ref = rows[row["reference"]]["per_class"]
        pc = row["per_class"]
        assert row["gain"] == pytest.approx(sum(pc[n] - ref[n] for n in private) / len(private), abs=1e-12)
        assert row["forgetting"] == pytest.approx(sum(ref[n] - pc[n] for n in kept) / len(kept), abs=1e-12)
        assert row["dropped_forgetting"] == pytest.approx(sum(ref[n] - pc[n] for n in dropped) / len(dropped), abs=1e-12)
        checked += 1
    assert checked == len(rows) - 1
    assert {rows[k]["reference"] for k in ("tutor1", "tutor2", "tutor_updated")} == {"tutor_original"}
    assert {rows[k]["reference"] for k in ("edge_direct", "edge_distill_c_public", "edge_distill_c_public_private")} == {"edge_original"}
    assert rows["tutor_original"]["gain"] == 0 and rows["edge_original"]["forgetting"] == 0


def test_compute_knowledge_skips_undefined_classes():
    classes = ClassSets.of(["aeroplane", "bus", "cat", "dog"], ["aeroplane", "bus", "horse"])
    assert (classes.private, classes.kept, classes.dropped) == (("cat", "dog"), ("aeroplane", "bus"), ("horse",))
    before = {"aeroplane": 0.5, "bus": 0.4, "cat": 0.0, "dog": math.nan, "horse": 0.6}
    after = {"aeroplane": 0.3, "bus": 0.5, "cat": 0.2, "dog": 0.9, "horse": 0.1}
    k = compute_knowledge(after, before, classes)
    assert k["gain"] == pytest.approx(0.2)  # dog has no reference AP: left out
    assert k["forgetting"] == pytest.approx((0.2 - 0.1) / 2)
    assert k["dropped_forgetting"] == pytest.approx(0.5)
    assert set(k["change"]) == {"aeroplane", "bus", "cat", "horse"}
    assert math.isnan(compute_knowledge(after, before, ClassSets.of(["aeroplane"], ["aeroplane"]))["gain"])


def test_delta_is_neck_and_head_only_and_is_saved(first):
    delta, info = first.result.delta, first.result.delta_info
    tutor = build_detector("tutor", "cpu")
    expected = {k for k, v in tutor.state_dict().items() if part_of(k) in ("neck", "head") and v.is_floating_point()}
    assert set(delta) == expected
    assert all(part_of(k) in ("neck", "head") for k in delta)
    assert all(v.dtype == torch.float32 for v in delta.values())
    assert info["values"] == sum(v.numel() for v in delta.values())
    assert info["bytes_fp32"] == 4 * info["values"] and info["bytes_fp16"] == 2 * info["values"]
    assert info["norm"] > 0  # Tutor1 and Tutor2 saw different data
    saved = torch.load(first.run.folder / "delta.pt", weights_only=True)
    assert set(saved) == set(delta) and all(torch.equal(saved[k], delta[k]) for k in delta)


def test_verdict_is_recorded_and_decides_the_deployed_tutor(first):
    verdict = json.loads((first.run.folder / "verdict.json").read_text())
    result = first.result
    assert verdict["accepted"] is result.verdict.accepted
    assert set(verdict["ap_before"]) == set(result.classes.presumed) == set(verdict["ap_after"])
    assert verdict["delta"]["bytes_fp32"] == result.delta_info["bytes_fp32"]
    updated, original = result.row("tutor_updated"), result.row("tutor_original")
    if verdict["accepted"]:
        assert verdict["reasons"] == [] and verdict["deployed"] == "updated tutor"
    else:
        assert verdict["reasons"] and verdict["deployed"] == "original tutor"
        assert updated["per_class"] == original["per_class"]  # the tutor stays as it was
        assert "tutor_rejected_candidate" in [r["key"] for r in result.rows]
    stages = {s["stage"]: s for s in json.loads((first.run.folder / "stages.json").read_text())["stages"]}
    assert stages["verify"]["accepted"] is result.verdict.accepted


def test_outputs_table_markdown_and_stages(first):
    folder = first.run.folder
    markdown = (folder / "table.md").read_text()
    for key, label, *_ in ROWS:
        if key in [r["key"] for r in first.result.rows]:
            assert f"| {label} |" in markdown
    assert "| model | mAP | P | R | F1 | gain | forgetting | dropped |" in markdown
    stages = json.loads((folder / "stages.json").read_text())
    names = [s["stage"] for s in stages["stages"]]
    for name in ("data", "teacher", "distill_a", "distill_b", "rd_b", "rd_a", "delta", "verify", "distill_c_public",
                 "distill_c_public+private", "direct", "local", "evaluate"):
        assert name in names
    for stage in stages["stages"]:
        assert stage["seconds"] >= 0 and stage["peak_rss_mb"] > 0 and stage["peak_rss_growth_mb"] >= 0
    assert "ru_maxrss" in stages["note"]
    assert not any(s.get("cached") for s in stages["stages"] if s["stage"] in ("teacher", "distill_a", "distill_b"))
    # every training stage ran once, with the seeds' names; checkpoints in the run folder
    assert sorted(first.calls) == sorted(["teacher", "tutor_distill_a", "edge_distill_b", "tutor1_rd_b", "tutor2_rd_a",
                                          "edge_distill_c_public", "edge_distill_c_public_private", "edge_direct", "edge_local"])
    assert (folder / "checkpoints" / "tutor2_rd_a.pt").is_file()


def test_second_run_reuses_the_manufacturer_and_a_rejected_update_keeps_the_tutor(first, monkeypatch, capsys):
    """A second real run (through run_paper) trains only the customer's stages and loads the
    manufacturer's models from the cache: the very weights the first run trained. Its
    verification bounds the delta norm so tightly that the update is rejected: the tutor stays,
    and the rejected candidate is shown apart."""
    assert first.result.manufacturer["reused"] is False
    folder = first.tmp / "manufacturer-cache" / f"manufacturer-{first.result.manufacturer['key']}"
    assert {p.name for p in folder.iterdir()} == {"teacher.pt", "tutor.pt", "edge.pt", "manifest.json"}
    manifest = json.loads((folder / "manifest.json").read_text())  # what the key leaves out but changes the bits
    assert [(s["stage"], s["torch_threads"]) for s in manifest["stages"]] == [
        (stage, torch.get_num_threads()) for stage in ("teacher", "distill_a", "distill_b")]
    calls = CallCounter(monkeypatch)
    loaded = {}
    real_load = manufacturer_module.load_detector_weights

    def record_load(detector, path):
        loaded[path.stem] = detector
        return real_load(detector, path)

    monkeypatch.setattr(manufacturer_module, "load_detector_weights", record_load)
    config = ExperimentConfig(name="tiny-exp2-again", runs_dir=str(first.tmp / "runs"), data=first.data)
    rejecting = replace(first.cfg, verify=VerifyConfig(max_delta_norm=1e-9))  # verification is not part of the cache key
    run = Run(run_paper(config, "exp2", rejecting, progress=False).folder / "seed-0")
    assert sorted(calls.names) == sorted(["tutor1_rd_b", "tutor2_rd_a", "edge_distill_c_public", "edge_distill_c_public_private",
                                          "edge_direct", "edge_local"])  # no teacher, no Distill A / B
    for role, trained_name in (("teacher", "teacher"), ("tutor", "tutor_distill_a"), ("edge", "edge_distill_b")):
        trained = load_checkpoint(first.run.checkpoint_path(trained_name))["state_dict"]
        for k, v in loaded[role].state_dict().items():
            assert torch.equal(v, trained[k]), (role, k)
    stages = {s["stage"]: s for s in json.loads((run.folder / "stages.json").read_text())["stages"]}
    assert stages["manufacturer_cache_load"]["hit"] is True
    assert all(stages[s]["cached"] and stages[s]["seconds"] == 0.0 and stages[s]["seconds_when_trained"] > 0
               for s in ("teacher", "distill_a", "distill_b"))
    table = json.loads((run.folder / "table.json").read_text())
    assert table["manufacturer"]["reused"] is True
    # same manufacturer, same seeds: the manufacturer rows come out the same
    assert table["rows"][0]["per_class"] == first.table["rows"][0]["per_class"]
    printed = capsys.readouterr().out
    assert "| edge after Distill B (original edge) |" in printed and "Verification: **rejected**" in printed  # the table is printed
    verdict = json.loads((run.folder / "verdict.json").read_text())
    assert verdict["accepted"] is False and verdict["deployed"] == "original tutor"
    assert "exceeds the bound" in verdict["reasons"][0]
    rows = {row["key"]: row for row in table["rows"]}
    assert list(rows) == EXPECTED_KEYS[:6] + ["tutor_rejected_candidate"] + EXPECTED_KEYS[6:]
    assert rows["tutor_updated"]["per_class"] == rows["tutor_original"]["per_class"]
    assert table["verdict"] == {"accepted": False, "reasons": verdict["reasons"]}


def test_new_distillation_settings_reuse_the_cached_teacher(first, monkeypatch):
    """The teacher is cached on its own: other Distill A/B settings train the tutor and the edge
    again from the very teacher the first run trained."""
    calls = CallCounter(monkeypatch)
    changed = replace(first.cfg, distill_feature_weight=0.5)
    assert manufacturer_module.manufacturer_is_cached(first.cfg, first.data, preset="cpu", seed=0)
    assert not manufacturer_module.manufacturer_is_cached(changed, first.data, preset="cpu", seed=0)
    maker = manufacturer_module.prepare_manufacturer(changed, first.data, preset="cpu", seed=0, progress=False)
    assert manufacturer_module.manufacturer_is_cached(changed, first.data, preset="cpu", seed=0)
    assert calls.names == ["tutor_distill_a", "edge_distill_b"]
    assert maker.reused is False and maker.key != first.result.manufacturer["key"]
    trained = load_checkpoint(first.run.checkpoint_path("teacher"))["state_dict"]
    assert all(torch.equal(v, trained[k]) for k, v in maker.teacher.state_dict().items())


def test_cache_key_covers_manufacturer_settings_only(first):
    describe = lambda cfg, **kw: compute_manufacturer_key(describe_manufacturer(cfg, first.data, **{"preset": "cpu", "seed": 0, **kw}))  # noqa: E731
    base = describe(first.cfg)
    assert base == first.result.manufacturer["key"]
    for change in ({"rd": TrainConfig(epochs=2)}, {"alpha": 0.5}, {"customer": "exp1"}, {"distill_c_score_weight": 0.0},
                   {"teacher": replace(STAGE, eval_every=5, max_eval_images=3)}):
        assert describe(replace(first.cfg, **change)) == base, change
    for change in ({"teacher": TrainConfig(epochs=2, batch_size=8)}, {"distill_b": TrainConfig(epochs=1, batch_size=8, lr=0.5)},
                   {"presumed_split": ("aeroplane", "bus")}, {"distill_feature_weight": 2.0}):
        assert describe(replace(first.cfg, **change)) != base, change
    assert describe(first.cfg, seed=1) != base and describe(first.cfg, preset="paper") != base


def test_paper_configs_load_and_bad_keys_are_named():
    for experiment, customer in (("exp1", "exp1"), ("exp2", "exp2")):
        config, pipeline = load_paper_config(find_paper_config(experiment))
        assert pipeline.customer == customer and config.preset == "cpu"
        assert pipeline.distill_c_modes == ("public", "public+private") and pipeline.distill_c_temperature == 1.5
        assert pipeline.teacher.epochs >= 1 and pipeline.distill_c.batch_size == 8
    _, pipeline = load_paper_config(find_paper_config("exp2"), {"pipeline.rd.epochs": 1, "seed": 4})
    assert pipeline.rd.epochs == 1 and pipeline.verify.critical_classes == ("aeroplane", "bus", "motorbike", "person")
    with pytest.raises(ConfigError, match=r"pipeline\.rd\.epoch\b"):
        load_paper_config(find_paper_config("exp1"), {"pipeline.rd.epoch": 1})
    with pytest.raises(ConfigError, match=r"pipeline\.alpha: expected a number"):
        load_paper_config(find_paper_config("exp1"), {"pipeline.alpha": "high"})
    with pytest.raises(ConfigError, match=r"pipeline\.distill_c_modes"):
        load_paper_config(find_paper_config("exp1"), {"pipeline.distill_c_modes": ["private"]})
    with pytest.raises(ConfigError, match=r"pipeline\.verify\.critical_classes: unknown class 'unicorn'"):
        load_paper_config(find_paper_config("exp1"), {"pipeline.verify.critical_classes": ["unicorn"]})
    with pytest.raises(ConfigError, match=r"pipeline\.customer"):
        PipelineConfig(customer="nonsense")
    with pytest.raises(ConfigError, match="no config for experiment 'exp9'"):
        find_paper_config("exp9")


def test_a_paper_run_stopped_in_a_seed_resumes_that_seed_alone_to_the_uninterrupted_table(first, tmp_path, capsys):
    """`diredi-sim resume` on a paper run folder: a replicate without its table.json (the file a
    replicate writes last, so a kill anywhere in it leaves none) is removed and run again with the
    folder's own settings; the finished replicate is kept untouched; the resumed run's tables equal
    the uninterrupted run's."""
    from experiments.cli import main as cli_main

    config = ExperimentConfig(name="tiny-seeds", runs_dir=str(tmp_path / "runs"), data=first.data)
    whole = run_paper(config, "exp2", first.cfg, progress=False, seeds=2).folder
    stopped = tmp_path / "stopped"
    shutil.copytree(whole, stopped)
    (stopped / "seed-1" / "table.json").unlink()
    (stopped / "seed-1" / "checkpoints" / "torn.pt.tmp").write_bytes(b"\0" * 10)  # what a kill in a write leaves
    kept = (stopped / "seed-0" / "table.json").stat().st_mtime_ns
    capsys.readouterr()

    assert cli_main(["resume", str(stopped)]) == 0
    assert (stopped / "seed-0" / "table.json").stat().st_mtime_ns == kept  # the finished seed was not run again
    assert not (stopped / "seed-1" / "checkpoints" / "torn.pt.tmp").exists()
    def measured(name: str, folder: Path) -> object:  # every figure but the evaluations' wall times
        rows = json.loads((folder / name).read_text())["rows"]
        return [{k: v for k, v in row.items() if k != "eval_seconds"} for row in rows] if isinstance(rows, list) else rows

    for name in ("seed-1/table.json", "table.json"):
        assert measured(name, stopped) == measured(name, whole), name
    before, log = (whole / "log.txt").read_text(), (stopped / "log.txt").read_text()
    assert log.startswith(before) and "removed the unfinished replicate" in log[len(before):]  # the run's log goes on

    assert cli_main(["resume", str(stopped)]) == 0  # a finished run: nothing runs, the summary is rewritten
    assert "already finished (2 of 2 seeds)" in capsys.readouterr().out
