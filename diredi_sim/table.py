"""The table: each model row's numbers on the customer's test images (the customer's half),
on the manufacturer's test images (its half), and knowledge gain and forgetting against the
row's reference (:data:`ROWS`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from torch import nn

from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.voc import ImageRecord
from diredi_sim.datasets import DataSets
from diredi_sim.evaluate import compute_voc_ap, evaluate_detections
from diredi_sim.settings import DISTILL_C_LOSSES, ClassSets, PipelineConfig
from diredi_sim.stages import StageRecorder
from diredi_sim.train import predict_records, records_to_ground_truth



def evaluate_row(detector: nn.Module, records: Sequence[ImageRecord], target: Sequence[str], union: Sequence[str], *,
                 batch_size: int = 32, score_threshold: float = 0.3) -> dict:
    """One table row's numbers: mAP@0.5 (VOC all-point), VOC07 mAP, COCO AP, precision, recall
    and F1 over ``target`` classes; per-class AP (and ground-truth counts) of every ``union``
    class. One prediction pass; AP per class does not depend on which classes are selected,
    so ``mAP`` is the mean of ``per_class`` over the target classes that have ground truth."""
    detections = predict_records(detector, records, batch_size=batch_size)
    truth = records_to_ground_truth(records)
    headline = evaluate_detections(detections, truth, VOC_CLASSES, class_indices=ClassSets.indices(target),
                                   score_threshold=score_threshold)
    every = compute_voc_ap(detections, truth, VOC_CLASSES, class_indices=ClassSets.indices(union))
    prf = headline["prf"]
    return {
        "mAP": headline["voc"]["mAP"], "mAP_voc07": headline["voc07"]["mAP"], "coco_AP": headline["coco"]["AP"],
        "precision": prf["precision"], "recall": prf["recall"], "f1": prf["f1"],
        "tp": prf["tp"], "fp": prf["fp"], "fn": prf["fn"],
        "per_class": every["per_class"], "num_gt": every["num_gt"],
    }


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def compute_knowledge(per_class: dict[str, float], reference: dict[str, float], classes: ClassSets) -> dict:
    """Knowledge measures of a row against its reference row, from per-class AP@0.5.

    gain: mean over the private classes of (AP - AP_ref); forgetting: mean over the kept
    presumed classes of (AP_ref - AP); dropped_forgetting: the same over the dropped classes
    (intended). Classes whose AP is undefined (no ground truth) in either row are left out; a
    mean over no class is NaN. ``change`` holds AP - AP_ref for every class of the union.
    """
    change = {n: per_class[n] - reference[n] for n in classes.union
              if _finite(per_class.get(n)) and _finite(reference.get(n))}

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    return {
        "gain": mean([change[n] for n in classes.private if n in change]),
        "forgetting": mean([-change[n] for n in classes.kept if n in change]),
        "dropped_forgetting": mean([-change[n] for n in classes.dropped if n in change]),
        "change": change,
    }


DISTILL_C_ROW = {"public": "edge_distill_c_public", "public+private": "edge_distill_c_public_private"}


def distill_c_row(mode: str, loss: str = "fgd") -> str:
    """The table row of Distill C in data ``mode`` with ``loss``: edge_distill_c_public(_private)(_score)."""
    return DISTILL_C_ROW[mode] + ("_score" if loss == "fgd+score" else "")


# Table rows: key, label, role, reference row, whose "own" classes (the teacher's row only).
ROWS = (
    ("teacher", "large (teacher)", "teacher", None, "teacher"),
    ("tutor_original", "tutor after Distill A (original tutor)", "tutor", "tutor_original", None),
    ("edge_original", "edge after Distill B (original edge)", "edge", "edge_original", None),
    ("tutor1", "tutor1 (RD B: presumed data)", "tutor", "tutor_original", None),
    ("tutor2", "tutor2 (RD A: presumed + customer data)", "tutor", "tutor_original", None),
    ("tutor_updated", "updated tutor", "tutor", "tutor_original", None),
    ("tutor_rejected_candidate", "updated tutor (rejected candidate, not deployed)", "tutor", "tutor_original", None),
    ("edge_direct", "direct training", "edge", "edge_original", None),
    ("edge_local", "local fine-tuning", "edge", "edge_original", None),
    *((distill_c_row(mode, loss), f"edge after Distill C ({mode}{', + score KD' if loss == 'fgd+score' else ''})", "edge",
       "edge_original", None) for loss in DISTILL_C_LOSSES for mode in DISTILL_C_ROW),
)


def _mean_ap(per_class: dict[str, float], names: Sequence[str]) -> float | None:
    values = [per_class[n] for n in names if _finite(per_class.get(n))]
    return sum(values) / len(values) if values else None


def measure_on_customer(model: nn.Module, test: Sequence[ImageRecord], classes: ClassSets, pipeline: PipelineConfig) -> dict:
    """A row's numbers on the customer's test images (the customer's side): mAP, P, R, F1 over
    its classes, per-class AP of the union, ``private_ap`` and ``dropped_ap`` (mean AP of the
    private and of the dropped classes, None when there are none)."""
    row = evaluate_row(model, test, classes.customer, classes.union, batch_size=pipeline.eval_batch_size,
                       score_threshold=pipeline.score_threshold)
    row["private_ap"] = _mean_ap(row["per_class"], classes.private)
    row["dropped_ap"] = _mean_ap(row["per_class"], classes.dropped)
    return row


def measure_on_manufacturer(key: str, model: nn.Module, classes: ClassSets, datasets: DataSets, pipeline: PipelineConfig) -> dict:
    """A row's numbers on the manufacturer's test images of the presumed classes (its side, public
    pool; the same images for every row): ``presumed_map`` over the presumed classes the customer
    keeps (``classes.kept``: a dropped class is reported apart, as forgetting it is wanted, and
    as verification leaves it out) and ``presumed_all_map`` over every presumed class, dropped ones
    included (equal when the customer drops none), ``presumed_per_class`` their AP per class; the
    teacher's row also ``own``, its classes on those images."""
    settings = dict(batch_size=pipeline.eval_batch_size, score_threshold=pipeline.score_threshold)
    maker_test = datasets.records(datasets.data.test_set, classes.presumed, pipeline.max_eval_images, pool="public")
    presumed = evaluate_row(model, maker_test, classes.presumed, classes.presumed, **settings)
    row = {"presumed_map": _mean_ap(presumed["per_class"], classes.kept), "presumed_all_map": presumed["mAP"],
           "presumed_per_class": presumed["per_class"], "presumed_test_images": len(maker_test)}
    whose = {r[0]: r[4] for r in ROWS}.get(key)
    if whose is not None:
        names = {"teacher": classes.teacher, "presumed": classes.presumed}[whose]
        records = datasets.records(datasets.data.test_set, names, pipeline.max_eval_images, pool="public")
        result = evaluate_row(model, records, names, names, **settings)
        row["own"] = {"classes": whose, "test_images": len(records),
                      **{k: result[k] for k in ("mAP", "precision", "recall", "f1", "coco_AP", "per_class")}}
    return row


def assemble_rows(measured: dict[str, dict], classes: ClassSets, say: Callable[[str], None] = lambda text: None) -> list[dict]:
    """The table (ROWS order) from each row's measured numbers (both sides' halves merged), with
    knowledge measures (gain, forgetting) against its reference row."""
    rows = []
    for key, label, role, reference, _ in ROWS:
        if key not in measured:
            continue
        row = {"key": key, "label": label, "role": role, "reference": reference, **measured[key]}
        if reference is not None and reference in measured:
            row.update(compute_knowledge(row["per_class"], measured[reference]["per_class"], classes))
        else:
            row.update({"gain": math.nan, "forgetting": math.nan, "dropped_forgetting": math.nan, "change": {}})
        rows.append(row)
        presumed_map = row.get("presumed_map", math.nan)
        say(f"{label:52} presumed mAP {presumed_map:.3f} | customer mAP {row['mAP']:.3f}  P {row['precision']:.3f}  "
            f"R {row['recall']:.3f}  F1 {row['f1']:.3f}" + (f"  private AP {row['private_ap']:.3f}" if row.get("private_ap") is not None else ""))
    return rows


def evaluate_rows(models: dict[str, nn.Module], test: Sequence[ImageRecord], classes: ClassSets, datasets: DataSets,
                  pipeline: PipelineConfig, recorder: StageRecorder, say: Callable[[str], None],
                  manufacturer_rows: bool = True) -> list[dict]:
    """Every row of the table, both halves in this process (the ``paper`` flow): each model on
    the customer's test images ``test`` (:func:`measure_on_customer`) and on the manufacturer's
    test images (:func:`measure_on_manufacturer`), then :func:`assemble_rows`.
    ``manufacturer_rows=False`` leaves out the teacher's row."""
    measured: dict[str, dict] = {}
    with recorder.measure("evaluate", test_images=len(test)):
        for key in (r[0] for r in ROWS):
            if key not in models or (key == "teacher" and not manufacturer_rows):
                continue
            start = time.perf_counter()
            measured[key] = {**measure_on_customer(models[key], test, classes, pipeline),
                             **measure_on_manufacturer(key, models[key], classes, datasets, pipeline)}
            measured[key]["eval_seconds"] = round(time.perf_counter() - start, 2)
    return assemble_rows(measured, classes, say)
