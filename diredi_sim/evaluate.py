"""Detection metrics: Pascal VOC AP (hand-written, devkit rules), COCO AP (pycocotools), P/R/F1.

Data layout shared by every function here, keyed by image id::

    ground_truth[image_id] = {"boxes": (N, 4), "labels": (N,), "difficult": (N,)}   # "difficult" optional
    detections[image_id]   = {"boxes": (M, 4), "scores": (M,), "labels": (M,)}

Arrays may be numpy arrays, torch tensors or nested lists. Labels are 0-based indices into the
class list. Boxes are 0-based continuous ``x1, y1, x2, y2`` with ``x1 = xmin - 1, y1 = ymin - 1,
x2 = xmax, y2 = ymax`` from VOC's 1-based inclusive pixel coordinates, so plain
``(x2 - x1) * (y2 - y1)`` areas and intersections equal the VOC devkit's ``(xmax - xmin + 1)``
computations exactly and no ``+1`` terms appear below.

Every image of the data set must be a key of ``ground_truth`` (an image without objects has empty
arrays); an image missing from ``detections`` has no detections. A detection on an image id that
is not in ``ground_truth`` is an error (the devkit would fail on it too).

VOC rules (``compute_voc_ap``, following py-faster-rcnn's ``voc_eval.py`` and the devkit's
``VOCevaldet.m``), applied per class:

* the detections of the class over all images are sorted by score, highest first; the sort is
  stable, so ties keep the order of ``detections`` (image order, then order within the image);
* each detection is compared with the ground-truth boxes of the same image and class and takes the
  one of maximal IoU (first one on a tie), whether or not that box is already taken;
* it is a match when that IoU is strictly greater than the threshold (``ovmax > ovthresh``);
* a match on a *difficult* box is ignored: neither true nor false positive (the devkit keeps such
  detections with tp = fp = 0, which leaves precision/recall unchanged; dropping them is the same);
* a match on a non-difficult box not yet taken is a true positive and takes the box; a match on a
  taken box (a duplicate) and a detection without a match are false positives;
* recall = TP / npos with npos the number of non-difficult boxes of the class; precision =
  TP / (TP + FP);
* AP (VOC2010 and later) = area under the monotone precision envelope over all recall points;
  with ``use_07_metric`` (VOC2007) AP = mean over ``t in np.arange(0.0, 1.1, 0.1)`` of the maximal
  precision at recall >= t (0 when no such point). The thresholds are those of py-faster-rcnn
  (and mmdetection / detectron2), including floating-point quirks: ``np.arange`` yields
  0.30000000000000004, 0.6000000000000001 and 0.7000000000000001, so a recall of exactly 0.3, 0.6
  or 0.7 does not reach those levels. This keeps VOC07 numbers identical to the usual tools.
* a class without non-difficult ground truth has AP = NaN (recall is undefined) and is left out of
  the mAP, which is the mean over the evaluated classes that have at least one non-difficult box
  (NaN when there are none).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "collect_detections",
    "compute_coco_ap",
    "compute_prf",
    "compute_voc_ap",
    "evaluate_detection_folder",
    "evaluate_detections",
    "read_class_names",
    "read_detection_folder",
]

# Detection status after matching.
_TP, _FP, _IGNORED = 1, 0, -1


# ----------------------------------------------------------------------------- input handling
def _convert_to_numpy(value: Any, dtype: Any) -> np.ndarray:
    """Return ``value`` (numpy array, torch tensor, list) as a numpy array of ``dtype``."""
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _convert_boxes(value: Any, image_id: str, what: str) -> np.ndarray:
    """Return boxes as float64 (K, 4); an empty input gives (0, 4)."""
    boxes = _convert_to_numpy(value, np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} boxes of image {image_id!r} have shape {boxes.shape}, expected (K, 4)")
    return boxes


def _normalise_entry(entry: Mapping[str, Any], image_id: str, what: str, columns: dict[str, Any]) -> dict[str, np.ndarray]:
    """One image's boxes (float64, (K, 4)) and per-box ``columns`` (name -> dtype), each of length K.
    Every column is required except ``difficult``, which is all False when absent or None."""
    out = {"boxes": _convert_boxes(entry["boxes"], image_id, what)}
    for name, dtype in columns.items():
        if name == "difficult" and entry.get(name) is None:
            out[name] = np.zeros(len(out["boxes"]), dtype=bool)
        else:
            out[name] = _convert_to_numpy(entry[name], dtype).reshape(-1)
    if len({len(v) for v in out.values()}) != 1:
        counts = ", ".join(f"{len(v)} {name}" for name, v in out.items())
        raise ValueError(f"{what} of image {image_id!r}: {counts} (one of each per box)")
    return out


def _normalise_ground_truth(ground_truth: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Check and convert ground truth to float64 boxes, int64 labels, bool difficult flags."""
    columns = {"labels": np.int64, "difficult": bool}
    return {str(image_id): _normalise_entry(entry, image_id, "ground-truth", columns) for image_id, entry in ground_truth.items()}


def _normalise_detections(
    detections: Mapping[str, Mapping[str, Any]], ground_truth: Mapping[str, Any]
) -> dict[str, dict[str, np.ndarray]]:
    """Check and convert detections to float64 boxes and scores, int64 labels."""
    unknown = [image_id for image_id in detections if str(image_id) not in ground_truth]
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"detections for {len(unknown)} image id(s) without ground truth: {shown}")
    columns = {"scores": np.float64, "labels": np.int64}
    return {str(image_id): _normalise_entry(entry, image_id, "detection", columns) for image_id, entry in detections.items()}


def _select_class_indices(class_names: Sequence[str] | None, class_indices: Sequence[int] | None) -> list[int]:
    """Return the evaluated class indices: ``class_indices`` checked, or all of ``class_names``."""
    if class_indices is None:
        if class_names is None:
            raise ValueError("class_indices is required when there are no class names")
        return list(range(len(class_names)))
    indices = [int(k) for k in class_indices]
    if len(set(indices)) != len(indices):
        raise ValueError(f"repeated class indices: {indices}")
    if class_names is not None:
        bad = [k for k in indices if not 0 <= k < len(class_names)]
        if bad:
            raise ValueError(f"class indices {bad} out of range for {len(class_names)} classes")
    return indices


# ----------------------------------------------------------------------------- matching
def _compute_iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``boxes_a`` (A, 4) with every box of ``boxes_b`` (B, 4), continuous x1y1x2y2.

    Widths and heights are clamped at 0; a zero union gives IoU 0.
    """
    ix1 = np.maximum(boxes_a[:, None, 0], boxes_b[None, :, 0])
    iy1 = np.maximum(boxes_a[:, None, 1], boxes_b[None, :, 1])
    ix2 = np.minimum(boxes_a[:, None, 2], boxes_b[None, :, 2])
    iy2 = np.minimum(boxes_a[:, None, 3], boxes_b[None, :, 3])
    inter = np.maximum(ix2 - ix1, 0.0) * np.maximum(iy2 - iy1, 0.0)
    area_a = np.maximum(boxes_a[:, 2] - boxes_a[:, 0], 0.0) * np.maximum(boxes_a[:, 3] - boxes_a[:, 1], 0.0)
    area_b = np.maximum(boxes_b[:, 2] - boxes_b[:, 0], 0.0) * np.maximum(boxes_b[:, 3] - boxes_b[:, 1], 0.0)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _match_detections(
    detections: dict[str, dict[str, np.ndarray]],
    ground_truth: dict[str, dict[str, np.ndarray]],
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match all detections to ground truth with the VOC rules (see the module docstring).

    Returns ``(labels, scores, status)`` over all detections, concatenated in the order of
    ``detections`` (image order, then order within the image), with status ``_TP``, ``_FP`` or
    ``_IGNORED``. Each detection takes the same-class ground-truth box of maximal IoU regardless of
    whether it is taken, so matching is vectorised per image; the "already taken" rule then makes
    the first detection in stable score order matched to a non-difficult box its true positive and
    the later ones false positives.
    """
    all_labels, all_scores, all_gt_keys = [], [], []
    gt_offset = 0
    gt_offsets = {}
    for image_id, gt in ground_truth.items():
        gt_offsets[image_id] = gt_offset
        gt_offset += len(gt["labels"])
    for image_id, det in detections.items():
        gt = ground_truth[image_id]
        m = len(det["labels"])
        # key: global index of the matched non-difficult box; -1 unmatched (FP); -2 difficult (ignored)
        keys = np.full(m, -1, dtype=np.int64)
        if m and len(gt["labels"]):
            iou = _compute_iou_matrix(det["boxes"], gt["boxes"])
            iou[det["labels"][:, None] != gt["labels"][None, :]] = -np.inf
            best = np.argmax(iou, axis=1)
            best_iou = iou[np.arange(m), best]
            matched = best_iou > iou_threshold
            on_difficult = matched & gt["difficult"][best]
            keys[matched] = gt_offsets[image_id] + best[matched]
            keys[on_difficult] = -2
        all_labels.append(det["labels"])
        all_scores.append(det["scores"])
        all_gt_keys.append(keys)
    if not all_labels:
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros(0, dtype=np.float64), empty
    labels = np.concatenate(all_labels)
    scores = np.concatenate(all_scores)
    keys = np.concatenate(all_gt_keys)

    status = np.full(len(labels), _FP, dtype=np.int64)
    status[keys == -2] = _IGNORED
    order = np.argsort(-scores, kind="stable")
    sorted_keys = keys[order]
    matched_positions = np.flatnonzero(sorted_keys >= 0)
    _, first = np.unique(sorted_keys[matched_positions], return_index=True)
    status[order[matched_positions[first]]] = _TP
    return labels, scores, status


def _count_positives(ground_truth: dict[str, dict[str, np.ndarray]], class_index: int) -> int:
    """Number of non-difficult ground-truth boxes of one class."""
    return int(
        sum(np.count_nonzero((gt["labels"] == class_index) & ~gt["difficult"]) for gt in ground_truth.values())
    )


def _compute_average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """VOC AP from a precision/recall curve (py-faster-rcnn's ``voc_ap``)."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):  # the devkit's thresholds, quirks included
            reached = recall >= t
            ap += (float(np.max(precision[reached])) if reached.any() else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


# ----------------------------------------------------------------------------- metrics
def compute_voc_ap(
    detections: Mapping[str, Mapping[str, Any]],
    ground_truth: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    iou_threshold: float = 0.5,
    use_07_metric: bool = False,
    class_indices: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Pascal VOC average precision per class and its mean, with the devkit's rules.

    Rules (see the module docstring for details): per class, detections sorted by score
    (stable); each takes the same-image, same-class ground-truth box of maximal IoU; a match needs
    IoU > ``iou_threshold`` (strictly); a match on a difficult box is ignored; the first match on a
    non-difficult box is a TP, later ones (duplicates) and unmatched detections are FPs; npos =
    non-difficult boxes. AP is the all-point area under the precision envelope (VOC2010+) or, with
    ``use_07_metric``, the 11-point interpolated AP of VOC2007.

    ``class_indices`` selects the evaluated classes (default: all of ``class_names``). A class
    without non-difficult ground truth gets AP NaN and is excluded from the mAP, which is the mean
    over the evaluated classes with at least one non-difficult box (NaN if there is none).

    Returns ``{"mAP": float, "per_class": {name: AP}, "num_gt": {name: non-difficult count}}``.
    """
    gt = _normalise_ground_truth(ground_truth)
    dets = _normalise_detections(detections, gt)
    indices = _select_class_indices(class_names, class_indices)
    labels, scores, status = _match_detections(dets, gt, iou_threshold)

    per_class: dict[str, float] = {}
    num_gt: dict[str, int] = {}
    for k in indices:
        name = class_names[k]
        npos = _count_positives(gt, k)
        num_gt[name] = npos
        if npos == 0:
            per_class[name] = math.nan
            continue
        selected = (labels == k) & (status != _IGNORED)
        order = np.argsort(-scores[selected], kind="stable")
        is_tp = (status[selected][order] == _TP).astype(np.float64)
        tp = np.cumsum(is_tp)
        fp = np.cumsum(1.0 - is_tp)
        recall = tp / float(npos)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        per_class[name] = _compute_average_precision(recall, precision, use_07_metric)
    valid = [ap for ap in per_class.values() if not math.isnan(ap)]
    mean_ap = float(np.mean(valid)) if valid else math.nan
    return {"mAP": mean_ap, "per_class": per_class, "num_gt": num_gt}


def compute_coco_ap(
    detections: Mapping[str, Mapping[str, Any]],
    ground_truth: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    class_indices: Sequence[int] | None = None,
) -> dict[str, Any]:
    """COCO-style AP with pycocotools (``COCO``/``COCOeval`` built in memory, no files written).

    Boxes become COCO ``[x, y, w, h]`` in the same continuous convention (``w = x2 - x1``).
    Difficult ground truth is marked ``iscrowd=1``, which pycocotools ignores (detections on it
    count neither way; note that pycocotools measures overlap with a crowd box as intersection over
    the detection's area), as COCO-style evaluations of VOC commonly do. Note also that
    pycocotools counts IoU >= threshold as a match, where VOC requires IoU > threshold.
    Settings are COCOeval's defaults for the reported numbers: IoU 0.50:0.05:0.95, 101 recall
    points, area range "all", at most 100 detections per image and class (the small/medium/large
    ranges and maxDets 1/10 are not computed). Category ids are class index + 1.

    Returns ``{"AP": AP@[.5:.95], "AP50": ..., "AP75": ..., "per_class": {name: AP@[.5:.95]}}``.
    A class without non-difficult ground truth gets NaN and is excluded from the averages (as
    pycocotools does); with no such class at all every value is NaN. No detections at all gives
    AP 0 without calling pycocotools (its ``loadRes`` fails on an empty list; this code builds both
    ``COCO`` objects directly and does not use ``loadRes``). pycocotools' printing is silenced.
    """
    gt = _normalise_ground_truth(ground_truth)
    dets = _normalise_detections(detections, gt)
    indices = _select_class_indices(class_names, class_indices)
    evaluated = set(indices)

    image_numbers = {image_id: n for n, image_id in enumerate(gt, start=1)}
    gt_annotations = _coco_annotations(gt, image_numbers, evaluated, ground_truth=True)
    dt_annotations = _coco_annotations(dets, image_numbers, evaluated, ground_truth=False)

    has_gt = {class_names[k]: _count_positives(gt, k) > 0 for k in indices}
    if not any(has_gt.values()):
        return {"AP": math.nan, "AP50": math.nan, "AP75": math.nan,
                "per_class": {name: math.nan for name in has_gt}}
    if not dt_annotations:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0,
                "per_class": {name: (0.0 if present else math.nan) for name, present in has_gt.items()}}

    images = [{"id": n, "width": 0, "height": 0} for n in image_numbers.values()]
    categories = [{"id": k + 1, "name": class_names[k]} for k in indices]
    params, precision = _run_cocoeval(images, categories, gt_annotations, dt_annotations)

    def average(values: np.ndarray) -> float:  # as COCOeval.summarize: over the entries > -1
        values = values[values > -1]
        return float(np.mean(values)) if values.size else math.nan

    iou_thresholds = params.iouThrs
    position = {int(cat_id) - 1: n for n, cat_id in enumerate(params.catIds)}  # evaluate() sorted catIds
    per_class = {class_names[k]: average(precision[:, :, position[k]]) for k in indices}
    return {
        "AP": average(precision),
        "AP50": average(precision[np.isclose(iou_thresholds, 0.5)]),
        "AP75": average(precision[np.isclose(iou_thresholds, 0.75)]),
        "per_class": per_class,
    }


def _coco_annotations(entries: Mapping[str, Mapping[str, Any]], image_numbers: Mapping[str, int], evaluated: set[int], *,
                      ground_truth: bool) -> list[dict]:
    """COCO annotations of the evaluated classes: ``[x, y, w, h]`` boxes, category = class + 1,
    ids from 1 (pycocotools uses 0 for "unmatched"); ground truth's difficult boxes as
    ``iscrowd``, detections with their score."""
    annotations = []
    for image_id, entry in entries.items():
        extra = entry["difficult"] if ground_truth else entry["scores"]
        for box, label, value in zip(entry["boxes"], entry["labels"], extra):
            if int(label) not in evaluated:
                continue
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotation = {"id": len(annotations) + 1, "image_id": image_numbers[image_id], "category_id": int(label) + 1,
                          "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h}
            annotation.update({"iscrowd": int(bool(value))} if ground_truth else {"score": float(value), "iscrowd": 0})
            annotations.append(annotation)
    return annotations


def _run_cocoeval(images: list[dict], categories: list[dict], gt_annotations: list[dict], dt_annotations: list[dict]):
    """COCOeval's evaluate + accumulate, silenced; returns its params and the precision array
    ``[T IoU thresholds, R recall points, K classes]`` (-1 = no ground truth)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": gt_annotations}
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": images, "categories": categories, "annotations": dt_annotations}
        coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        params = coco_eval.params
        params.imgIds = [image["id"] for image in images]
        params.catIds = [category["id"] for category in categories]
        # Only what is reported: area "all" and 100 detections (3-4x faster than all four ranges).
        params.areaRng, params.areaRngLbl, params.maxDets = [[0.0, 1e10]], ["all"], [100]
        coco_eval.evaluate()
        coco_eval.accumulate()
    return params, coco_eval.eval["precision"][:, :, :, 0, 0]


def compute_prf(
    detections: Mapping[str, Mapping[str, Any]],
    ground_truth: Mapping[str, Mapping[str, Any]],
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    class_indices: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Precision, recall and F1 of the detections with ``score >= score_threshold``.

    Matching is greedy per image and class in decreasing score order with the VOC rules (IoU >
    ``iou_threshold`` strictly with the best same-class box; matches on difficult boxes ignored;
    duplicates are false positives). ``fn`` = non-difficult boxes not matched. With
    ``class_indices`` only those classes (of detections and ground truth) count; default: all
    labels. Undefined ratios (no detections, no ground truth) are 0.0, as in scikit-learn.

    Returns ``{"precision", "recall", "f1", "tp", "fp", "fn"}``. With ``class_names`` the result
    also holds ``"per_class": {name: {"precision", "recall", "f1", "tp", "fp", "fn"}}`` for the
    evaluated classes (``class_indices``, default: all of ``class_names``), with the same rules and
    the same 0.0 for undefined ratios (tell those apart by the counts: ``tp + fn == 0`` means no
    ground truth, ``tp + fp == 0`` no detection at the threshold), and ``"score_threshold"``.
    The overall figures are the same with or without ``class_names``.
    """
    gt = _normalise_ground_truth(ground_truth)
    dets = _normalise_detections(detections, gt)
    kept = {}
    for image_id, entry in dets.items():
        keep = entry["scores"] >= score_threshold
        kept[image_id] = {key: value[keep] for key, value in entry.items()}
    labels, _, status = _match_detections(kept, gt, iou_threshold)
    if class_indices is None:
        counted = np.ones(len(labels), dtype=bool)
        npos = sum(int(np.count_nonzero(~entry["difficult"])) for entry in gt.values())
    else:
        indices = _select_class_indices(None, class_indices)
        counted = np.isin(labels, indices)
        npos = sum(_count_positives(gt, k) for k in indices)
    result = _summarise_prf(int(np.count_nonzero(counted & (status == _TP))),
                            int(np.count_nonzero(counted & (status == _FP))), npos)
    if class_names is not None:
        result["per_class"] = {
            class_names[k]: _summarise_prf(int(np.count_nonzero((labels == k) & (status == _TP))),
                                           int(np.count_nonzero((labels == k) & (status == _FP))),
                                           _count_positives(gt, k))
            for k in _select_class_indices(class_names, class_indices)
        }
        result["score_threshold"] = float(score_threshold)
    return result


def _summarise_prf(tp: int, fp: int, npos: int) -> dict[str, Any]:
    """Precision, recall, F1 (undefined ratios 0.0) and the counts, from TP, FP and positives."""
    fn = npos - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / npos if npos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def evaluate_detections(
    detections: Mapping[str, Mapping[str, Any]],
    ground_truth: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    class_indices: Sequence[int] | None = None,
    score_threshold: float = 0.5,
) -> dict[str, Any]:
    """All metrics at once: VOC all-point AP, VOC07 11-point AP, COCO AP and P/R/F1.

    Returns ``{"voc": ..., "voc07": ..., "coco": ..., "prf": ...}`` (see the ``compute_*``
    functions; "prf" includes its "per_class" breakdown and "score_threshold"). Values are Python
    floats/ints; NaN marks classes without ground truth, so pass the result through
    ``to_jsonable`` before strict JSON serialisation.
    """
    gt = _normalise_ground_truth(ground_truth)
    dets = _normalise_detections(detections, gt)
    return {
        "voc": compute_voc_ap(dets, gt, class_names, class_indices=class_indices),
        "voc07": compute_voc_ap(dets, gt, class_names, class_indices=class_indices, use_07_metric=True),
        "coco": compute_coco_ap(dets, gt, class_names, class_indices=class_indices),
        "prf": compute_prf(dets, gt, score_threshold=score_threshold, class_indices=class_indices,
                           class_names=class_names),
    }


# ----------------------------------------------------------------------------- model outputs and files
def collect_detections(outputs: list[dict], image_ids: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Turn torchvision-style detection outputs (dicts of "boxes", "scores", "labels" tensors) into
    the detection dict of this module, keyed by the matching entry of ``image_ids``.

    Boxes are taken as they are (they must already be in the continuous convention, in the
    coordinates of the original image); returns float32 boxes and scores and int64 labels.
    """
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs for {len(image_ids)} image ids")
    result: dict[str, dict[str, np.ndarray]] = {}
    for output, image_id in zip(outputs, image_ids):
        image_id = str(image_id)
        if image_id in result:
            raise ValueError(f"image id {image_id!r} appears twice")
        boxes = _convert_to_numpy(output["boxes"], np.float32).reshape(-1, 4)
        scores = _convert_to_numpy(output["scores"], np.float32).reshape(-1)
        labels = _convert_to_numpy(output["labels"], np.int64).reshape(-1)
        result[image_id] = {"boxes": boxes, "scores": scores, "labels": labels}
    return result


def read_detection_folder(det_dir: Path | str, image_ids: Iterable[str], num_classes: int) -> dict[str, dict]:
    """Read detections from one text file per image, ``<det_dir>/<image_id>.txt``.

    Each non-blank line is ``class_index score xmin ymin xmax ymax`` with a 0-based class index and
    box corners in VOC pixel coordinates (like the annotations); boxes are converted to the
    continuous convention (``xmin - 1, ymin - 1, xmax, ymax``). A missing file means no detections
    for that image. A line without exactly six fields, with a non-integer class index, a class
    index outside ``[0, num_classes)`` or a non-finite number raises ValueError naming the file and
    the line number. Returns float64 boxes and scores, int64 labels.
    """
    det_dir = Path(det_dir)
    result: dict[str, dict] = {}
    for image_id in image_ids:
        image_id = str(image_id)
        path = det_dir / f"{image_id}.txt"
        rows: list[list[float]] = []
        labels: list[int] = []
        if path.is_file():
            for line_number, line in enumerate(path.read_text().splitlines(), start=1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{path}, line {line_number}"
                if len(fields) != 6:
                    raise ValueError(f"{where}: expected 'class_index score x1 y1 x2 y2', got {line.strip()!r}")
                try:
                    label = int(fields[0])
                    numbers = [float(field) for field in fields[1:]]
                except ValueError as error:
                    raise ValueError(f"{where}: cannot parse {line.strip()!r} ({error})") from None
                if not 0 <= label < num_classes:
                    raise ValueError(f"{where}: class index {label} outside [0, {num_classes})")
                if not all(math.isfinite(n) for n in numbers):
                    raise ValueError(f"{where}: non-finite number in {line.strip()!r}")
                labels.append(label)
                rows.append(numbers)
        table = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        boxes = table[:, 1:5] - np.array([1.0, 1.0, 0.0, 0.0])
        result[image_id] = {"boxes": boxes, "scores": table[:, 0].copy(), "labels": np.asarray(labels, dtype=np.int64)}
    return result


def read_class_names(path: Path | str) -> list[str]:
    """Read class names, one per line (surrounding whitespace and blank lines dropped).

    Raises ValueError if the file names no class or repeats one.
    """
    path = Path(path)
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{path}: repeated class names {repeated}")
    return names


def evaluate_detection_folder(
    voc_root: Path | str,
    det_dir: Path | str,
    classes_file: Path | str,
    *,
    image_set: str | None = None,
    score_threshold: float = 0.5,
) -> dict[str, Any]:
    """Evaluate a folder of detection text files against a VOC data set (see ``evaluate_detections``).

    ``voc_root`` is anything ``resolve_voc_folder`` accepts (a VOC year folder, a VOCdevkit folder
    or its parent); ground truth comes from ``load_annotations`` with the class names of
    ``classes_file`` (one per line, the order defining the class indices used in the detection
    files) and ``image_set`` (as ``load_annotations`` interprets it); detections are read with
    ``read_detection_folder`` for the loaded image ids.
    """
    from diredi_sim.data.voc import load_annotations, resolve_voc_folder

    class_names = read_class_names(classes_file)
    folder = resolve_voc_folder(voc_root)
    records = load_annotations(folder, image_set, classes=tuple(class_names))
    ground_truth = {
        record.image_id: {"boxes": record.boxes, "labels": record.labels, "difficult": record.difficult}
        for record in records
    }
    detections = read_detection_folder(det_dir, ground_truth.keys(), len(class_names))
    return evaluate_detections(detections, ground_truth, class_names, score_threshold=score_threshold)
