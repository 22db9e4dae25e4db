"""The training loops on small real computations (tiny synthetic data, cpu-preset models)."""
import math

import pytest
import torch

from diredi_sim.config import TrainConfig
from diredi_sim.data.splits import filter_split
from diredi_sim.data.synthetic import SyntheticConfig, ensure_synthetic
from diredi_sim.data.voc import load_annotations
from diredi_sim.deltas import compute_delta
from diredi_sim.models import build_detector, part_of
from diredi_sim.runs import Run, load_detector_weights
from diredi_sim.train import (Distiller, Reporting, KDLoss, NonFiniteLossError, build_loader, compute_task_losses, evaluate_detector,
                              train_detector, train_one_epoch)
from diredi_sim.verify import VerifyConfig, verify_update

TINY = SyntheticConfig(seed=3, num_train=16, num_val=8, num_test=8, min_objects=1, max_objects=2, min_object_size=40)


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    folder = ensure_synthetic(tmp_path_factory.mktemp("cache"), TINY, workers=1)
    return {s: load_annotations(folder, s) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def trained(tiny_records, tmp_path_factory):
    """An edge model trained directly on 16 tiny images (80 AdamW steps), with its run folder."""
    torch.manual_seed(1)
    edge = build_detector("edge", "cpu")
    cfg = TrainConfig(epochs=20, batch_size=4, lr=0.004, optimizer="adamw", warmup_steps=5, eval_every=10, hflip_prob=0.0)
    run = Run.create(tmp_path_factory.mktemp("runs"), "t", {"what": "test"})
    train = tiny_records["train"]
    result = train_detector(edge, train, train, cfg, class_indices=list(range(20)),
                            report=Reporting("edge", run, {"what": "test"}, progress=False))
    return edge, run, result


def test_direct_training_learns_and_writes_a_run(trained):
    edge, run, result = trained
    rows = run.metrics()
    assert [r["epoch"] for r in rows] == list(range(1, 21))
    loss = lambda r: sum(v for k, v in r.items() if k.startswith("loss.task."))
    assert loss(rows[-1]) < 0.6 * loss(rows[0])  # the task loss falls on the images it sees
    assert "val.mAP50" in rows[9] and "val.mAP50" in rows[-1] and "val.mAP50" not in rows[0]
    assert rows[-1]["val.mAP50"] > 0.5  # it fits its 16 training images (an untrained model scores ~0)
    assert result["voc"]["mAP"] == rows[-1]["val.mAP50"]
    payload = load_detector_weights(build_detector("edge", "cpu"), run.checkpoint_path("edge"))
    assert payload["config"] == {"what": "test"} and payload["epoch"] == 20
    for k, v in edge.state_dict().items():
        assert torch.equal(v, payload["state_dict"][k]), k


def test_max_steps_trains_exactly_that_many_steps_across_epochs(tiny_records):
    records = tiny_records["train"][:8]  # 2 batches of 4 an epoch
    for max_steps, images in ((3, 12), (1, 4), (0, 3 * 8)):  # 0: the configured 3 epochs
        edge = build_detector("edge", "cpu")
        cfg = TrainConfig(epochs=3, batch_size=4, warmup_steps=1, eval_every=100, max_steps=max_steps)
        result = train_detector(edge, records, records[:2], cfg, class_indices=list(range(20)), report=Reporting(progress=False))
        assert (result["train_steps"], result["train_images"]) == (max_steps or 6, images)


def test_non_finite_loss_raises_naming_step_and_terms(tiny_records):
    edge = build_detector("edge", "cpu")
    loader = build_loader(tiny_records["train"], batch_size=4, train=True)
    task = compute_task_losses(edge)
    calls = {"n": 0}

    def losses(images, targets):
        calls["n"] += 1
        terms = task(images, targets)
        if calls["n"] == 3:
            terms["task.classification"] = terms["task.classification"] * float("nan")
        return terms

    optimizer = torch.optim.SGD(edge.parameters(), lr=0.001)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 step 3: task.classification=nan, task.bbox_regression="):
        train_one_epoch(edge, losses, optimizer, loader, epoch=2, progress=False)


def test_distiller_freezes_teacher_and_optionally_student_backbone(tiny_records):
    torch.manual_seed(0)
    teacher, student = build_detector("edge", "cpu"), build_detector("tutor", "cpu")
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    distiller = Distiller(teacher, student, KDLoss(feature_weight=2.0, task_weight=1.0, score_weight=1.0), freeze_student_backbone=True)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.01, momentum=0.9)
    loader = build_loader(tiny_records["train"][:8], batch_size=4, train=True)
    stats = train_one_epoch(distiller, distiller, optimizer, loader, epoch=1, progress=False)
    assert {"task.classification", "distill.fg", "distill.bg", "distill.mask", "distill.global", "distill.score"} <= set(stats.losses)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights and BatchNorm statistics untouched
        assert torch.equal(v, teacher_before[k]), k
    changed = {part_of(k) for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])}
    assert changed == {"neck", "head"}  # the frozen backbone (and its BN statistics) did not move
    assert distiller.fgd.levels[0].align is not None  # tutor 64 channels -> edge 32


def test_verification_rejects_a_destructive_update_and_leaves_the_tutor_untouched(tiny_records, trained):
    trained_edge = trained[0]
    records = tiny_records["train"]
    classes = sorted({int(l) for r in records for l in r.labels})
    evaluate = lambda model: evaluate_detector(model, records, classes)  # the full result: AP and P/R/F1
    state_before = {k: v.clone() for k, v in trained_edge.state_dict().items()}
    before = evaluate(trained_edge)
    assert before["voc"]["mAP"] > 0.5
    # a zero delta changes nothing: accepted
    zero = {k: torch.zeros_like(v) for k, v in compute_delta(state_before, state_before).items()}
    verdict, state = verify_update(trained_edge, zero, evaluate, VerifyConfig(max_ap_drop=0.0), before=before)
    assert verdict.accepted and verdict.reasons == [] and state is not None
    # a sign-flipped, scaled copy of the head's own weights wipes out what it learned: rejected
    hostile = {k: (-3.0 * v if k.startswith("head.") else torch.zeros_like(v)) for k, v in compute_delta(state_before, zero).items()}
    verdict, state = verify_update(trained_edge, hostile, evaluate, VerifyConfig(max_ap_drop=0.05), before=before)
    assert not verdict.accepted and state is None
    assert any(r.startswith("critical class") for r in verdict.reasons)
    assert verdict.map_after < verdict.map_before
    for k, v in trained_edge.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    # a small update scaled x100 (a customer boosting its own weight): rejected, the tutor untouched
    generator = torch.Generator().manual_seed(0)
    small = {k: 1e-3 * torch.randn(v.shape, generator=generator) for k, v in zero.items()}
    boosted = {k: 100.0 * v for k, v in small.items()}
    verdict, state = verify_update(trained_edge, boosted, evaluate, VerifyConfig(max_ap_drop=0.05), before=before)
    assert not verdict.accepted and state is None and any(r.startswith("critical class") for r in verdict.reasons)
    assert all(torch.equal(v, state_before[k]) for k, v in trained_edge.state_dict().items())
    # a malformed delta is rejected before any evaluation, naming the key
    smuggled = dict(zero)
    smuggled["backbone.body.0.0.weight"] = torch.zeros_like(state_before["backbone.body.0.0.weight"])
    verdict, _ = verify_update(trained_edge, smuggled, lambda m: pytest.fail("evaluated a malformed delta"))
    assert not verdict.accepted and "backbone.body.0.0.weight is in the backbone" in verdict.reasons[0]
    assert math.isnan(verdict.map_after)
    # the norm bound
    verdict, _ = verify_update(trained_edge, hostile, evaluate, VerifyConfig(max_delta_norm=1e-3), before=before)
    assert not verdict.accepted and "exceeds the bound" in verdict.reasons[0]


def test_split_evaluation_counts_only_split_classes(tiny_records, trained):
    trained_edge = trained[0]
    records = filter_split(tiny_records["train"], ["person", "car", "bus"])
    if not records:
        pytest.skip("no person/car/bus in the tiny set")
    result = evaluate_detector(trained_edge, records, [5, 6, 14])
    assert set(result["voc"]["per_class"]) == {"bus", "car", "person"}


def test_align_convs_fitted_by_least_squares_start_reverse_distillation_closer(tiny_records, trained):
    """RD's student (a tutor copy, 64 channels) is aligned to the edge (32 channels) by a 1x1 conv;
    fitted on one batch, it leaves less of the edge's features unexplained than a random one,
    and the fit repeats to the bit."""
    edge, _, _ = trained
    images, targets = next(iter(build_loader(tiny_records["train"][:8], batch_size=8, train=False)))
    torch.manual_seed(0)
    tutor = build_detector("tutor", "cpu")

    def fg_loss(distiller):
        with torch.no_grad():
            return float(distiller(images, targets)["distill.fg"])

    torch.manual_seed(5)
    distiller = Distiller(edge, tutor, freeze_student_backbone=True)
    random_loss = fg_loss(distiller)
    residuals = distiller.fit_align(images)
    assert set(residuals) == {0, 1, 2} and all(0 <= r < 1 for r in residuals.values()), residuals
    fitted_loss = fg_loss(distiller)
    assert fitted_loss < random_loss, (fitted_loss, random_loss)
    weights = [level.align.weight.clone() for level in distiller.fgd.levels]
    distiller.fit_align(images)
    assert all(torch.equal(w, level.align.weight) for w, level in zip(weights, distiller.fgd.levels))
