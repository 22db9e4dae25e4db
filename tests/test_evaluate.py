"""Tests of diredi_sim.evaluate: hand-made cases with known answers, and the real VOC2012 sample
checked against an independent port of py-faster-rcnn's voc_eval working on the raw XML."""

from __future__ import annotations

import importlib.util
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from diredi_sim.evaluate import (
    collect_detections,
    compute_coco_ap,
    compute_prf,
    compute_voc_ap,
    evaluate_detection_folder,
    evaluate_detections,
    read_class_names,
    read_detection_folder,
)
from diredi_sim.runs import to_jsonable

VOC_REAL = Path(__file__).resolve().parent / "data" / "voc-real"  # see README.md there
VOC_SAMPLE = VOC_REAL / "voc2012-100"
VOC_YEAR = VOC_SAMPLE / "VOCdevkit" / "VOC2012"
DET_DIR = VOC_SAMPLE / "detections"


@pytest.fixture
def voc_sample_is_there():
    """The real VOC sample ships with the repository: a missing one fails, it does not skip."""
    if not VOC_YEAR.is_dir():
        pytest.fail(f"{VOC_REAL} is missing: it is part of the repository "
                    "(restore it with `git checkout -- tests/data/voc-real`)", pytrace=False)


needs_sample = pytest.mark.usefixtures("voc_sample_is_there")

CLASSES = ["a", "b", "c"]


def make_gt(boxes, labels, difficult=None):
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64)
    difficult = np.zeros(len(labels), bool) if difficult is None else np.asarray(difficult, bool)
    return {"boxes": boxes, "labels": labels, "difficult": difficult}


def make_det(boxes, scores, labels):
    return {
        "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        "scores": np.asarray(scores, dtype=np.float64),
        "labels": np.asarray(labels, dtype=np.int64),
    }


# Two well separated class-0 objects in one image, used by several cases.
BOX_A = [10, 10, 50, 50]
BOX_B = [100, 100, 150, 160]
FAR = [300, 300, 340, 340]


# ----------------------------------------------------------------------------- hand-made VOC cases
def test_perfect_detections_give_ap_one():
    gt = {"img1": make_gt([BOX_A, BOX_B], [0, 1]), "img2": make_gt([BOX_B], [0])}
    det = {"img1": make_det([BOX_A, BOX_B], [0.9, 0.8], [0, 1]), "img2": make_det([BOX_B], [0.7], [0])}
    for use_07 in (False, True):
        result = compute_voc_ap(det, gt, CLASSES, class_indices=[0, 1], use_07_metric=use_07)
        # (11-point: eleven additions of 1/11, as in the devkit, give 1 + 2e-16)
        assert result["per_class"] == {"a": pytest.approx(1.0, abs=1e-12), "b": pytest.approx(1.0, abs=1e-12)}
        assert result["mAP"] == pytest.approx(1.0, abs=1e-12)
        assert result["num_gt"] == {"a": 2, "b": 1}
    coco = compute_coco_ap(det, gt, CLASSES, class_indices=[0, 1])
    assert coco["AP"] == pytest.approx(1.0) and coco["AP50"] == pytest.approx(1.0)
    assert coco["AP75"] == pytest.approx(1.0)
    assert coco["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}


def test_false_positive_ranked_above_true_positive():
    # Two class-0 objects (npos = 2); detections: FP at 0.9 (nothing there), TP on A at 0.8; B missed.
    # Ranked list: FP, TP -> cumulative tp = [0, 1], fp = [1, 1]
    #   recall    = [0, 0.5], precision = [0, 0.5]
    # All-point: mrec = [0, 0, 0.5, 1], mpre = [0, 0, 0.5, 0] -> envelope [0.5, 0.5, 0.5, 0];
    #   recall steps 0 -> 0.5 (precision 0.5) and 0.5 -> 1 (precision 0): AP = 0.5 * 0.5 = 0.25.
    # 11-point: t = 0, 0.1, ..., 0.5 (6 levels) reach recall 0.5 with max precision 0.5;
    #   t = 0.6 ... 1.0 are never reached: AP = 6 * 0.5 / 11 = 3 / 11.
    gt = {"img": make_gt([BOX_A, BOX_B], [0, 0])}
    det = {"img": make_det([FAR, BOX_A], [0.9, 0.8], [0, 0])}
    result = compute_voc_ap(det, gt, CLASSES, class_indices=[0])
    assert result["per_class"]["a"] == pytest.approx(0.25, abs=1e-12)
    result07 = compute_voc_ap(det, gt, CLASSES, class_indices=[0], use_07_metric=True)
    assert result07["per_class"]["a"] == pytest.approx(3 / 11, abs=1e-12)


def test_interleaved_ranking_known_ap():
    # Three class-0 objects; ranked: TP, FP, TP, FP -> recall [1/3, 1/3, 2/3, 2/3],
    # precision [1, 1/2, 2/3, 1/2].
    # All-point: envelope 1 on (0, 1/3], 2/3 on (1/3, 2/3], 0 after: AP = 1/3 + 2/9 = 5/9.
    # 11-point: t in {0, .1, .2, .3} -> 1; t in {.4, .5, .6} -> 2/3; t >= .7 -> 0: AP = 6/11.
    box_c = [200, 10, 260, 40]
    gt = {"img": make_gt([BOX_A, BOX_B, box_c], [0, 0, 0])}
    det = {"img": make_det([BOX_A, FAR, BOX_B, [400, 400, 420, 420]], [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0])}
    assert compute_voc_ap(det, gt, CLASSES, class_indices=[0])["mAP"] == pytest.approx(5 / 9, abs=1e-12)
    ap07 = compute_voc_ap(det, gt, CLASSES, class_indices=[0], use_07_metric=True)["mAP"]
    assert ap07 == pytest.approx(6 / 11, abs=1e-12)


def test_duplicate_detection_is_false_positive():
    # One object, two detections on it: the higher one is a TP, the other a duplicate FP.
    # recall [1, 1], precision [1, 1/2]: AP stays 1 (the FP comes after full recall) ...
    gt = {"img": make_gt([BOX_A], [0])}
    det = {"img": make_det([BOX_A, BOX_A], [0.9, 0.8], [0, 0])}
    assert compute_voc_ap(det, gt, CLASSES, class_indices=[0])["mAP"] == 1.0
    # ... but ranked above the true positive of a second object it costs: npos = 2, ranked
    # TP(A), FP(dup A), TP(B): recall [.5, .5, 1], precision [1, .5, 2/3] -> AP = .5 + .5 * 2/3.
    gt = {"img": make_gt([BOX_A, BOX_B], [0, 0])}
    det = {"img": make_det([BOX_A, BOX_A, BOX_B], [0.9, 0.8, 0.7], [0, 0, 0])}
    assert compute_voc_ap(det, gt, CLASSES, class_indices=[0])["mAP"] == pytest.approx(0.5 + 1 / 3, abs=1e-12)
    prf = compute_prf(det, gt, score_threshold=0.0)
    assert (prf["tp"], prf["fp"], prf["fn"]) == (2, 1, 0)


def test_detection_on_difficult_box_is_ignored():
    # The FP-above-TP case plus a difficult object D with the top-scoring detection on it.
    box_d = [400, 10, 450, 60]
    gt_plain = {"img": make_gt([BOX_A, BOX_B], [0, 0])}
    det_plain = {"img": make_det([FAR, BOX_A], [0.9, 0.8], [0, 0])}
    gt_diff = {"img": make_gt([BOX_A, BOX_B, box_d], [0, 0, 0], [False, False, True])}
    det_diff = {"img": make_det([box_d, FAR, BOX_A, box_d], [0.95, 0.9, 0.8, 0.3], [0, 0, 0, 0])}
    for use_07 in (False, True):
        plain = compute_voc_ap(det_plain, gt_plain, CLASSES, class_indices=[0], use_07_metric=use_07)
        diff = compute_voc_ap(det_diff, gt_diff, CLASSES, class_indices=[0], use_07_metric=use_07)
        assert diff["per_class"]["a"] == plain["per_class"]["a"]
        assert diff["num_gt"]["a"] == 2  # difficult boxes do not count in npos
    prf = compute_prf(det_diff, gt_diff, score_threshold=0.0)
    assert (prf["tp"], prf["fp"], prf["fn"]) == (1, 1, 1)


def test_iou_exactly_threshold_is_not_a_match():
    # VOC ground truth xmin=1, ymin=1, xmax=2, ymax=1 (2 x 1 pixels) is [0, 0, 2, 1] here; the
    # detection [0, 0, 1, 1] (1 pixel) covers half of it: IoU = 1 / 2 exactly, and VOC requires
    # IoU > 0.5, so the detection is a false positive and AP is 0.
    gt = {"img": make_gt([[0, 0, 2, 1]], [0])}
    det = {"img": make_det([[0, 0, 1, 1]], [0.9], [0])}
    assert compute_voc_ap(det, gt, CLASSES, class_indices=[0])["mAP"] == 0.0
    assert compute_voc_ap(det, gt, CLASSES, class_indices=[0], use_07_metric=True)["mAP"] == 0.0
    assert compute_voc_ap(det, gt, CLASSES, class_indices=[0], iou_threshold=0.49)["mAP"] == 1.0
    assert compute_prf(det, gt)["tp"] == 0
    assert compute_prf(det, gt, iou_threshold=0.49)["tp"] == 1


def test_class_without_ground_truth_is_nan_and_left_out_of_map():
    # Class "b" only has a false detection, class "c" only a difficult box: both have no
    # non-difficult ground truth -> AP NaN, excluded from the mean.
    gt = {"img": make_gt([BOX_A, BOX_B, FAR], [0, 0, 2], [False, False, True])}
    det = {"img": make_det([FAR, BOX_A, [5, 5, 20, 20]], [0.9, 0.8, 0.7], [0, 0, 1])}
    result = compute_voc_ap(det, gt, CLASSES)
    assert result["per_class"]["a"] == pytest.approx(0.25)
    assert math.isnan(result["per_class"]["b"]) and math.isnan(result["per_class"]["c"])
    assert result["num_gt"] == {"a": 2, "b": 0, "c": 0}
    assert result["mAP"] == pytest.approx(0.25)
    coco = compute_coco_ap(det, gt, CLASSES)
    assert math.isnan(coco["per_class"]["b"]) and math.isnan(coco["per_class"]["c"])
    # No class with ground truth at all: mAP NaN.
    assert math.isnan(compute_voc_ap(det, gt, CLASSES, class_indices=[1])["mAP"])


def test_empty_detections_give_ap_zero():
    gt = {"img1": make_gt([BOX_A], [0]), "img2": make_gt([BOX_B], [1]), "img3": make_gt([], [])}
    for det in ({}, {"img1": make_det([], [], []), "img3": make_det([], [], [])}):
        for use_07 in (False, True):
            result = compute_voc_ap(det, gt, CLASSES, use_07_metric=use_07)
            assert result["per_class"]["a"] == 0.0 and result["per_class"]["b"] == 0.0
            assert math.isnan(result["per_class"]["c"])
            assert result["mAP"] == 0.0
        coco = compute_coco_ap(det, gt, CLASSES)
        assert (coco["AP"], coco["AP50"], coco["AP75"]) == (0.0, 0.0, 0.0)
        assert coco["per_class"]["a"] == 0.0 and math.isnan(coco["per_class"]["c"])
        prf = compute_prf(det, gt)
        assert prf == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 2}


def test_eleven_point_thresholds_follow_py_faster_rcnn():
    # npos = 10 and 3 true positives: recall reaches exactly 0.3. py-faster-rcnn's thresholds
    # np.arange(0, 1.1, 0.1) contain 0.30000000000000004 > 0.3, so only t = 0, 0.1, 0.2 count:
    # AP = 3/11 (a mathematically exact 0.3 level would give 4/11). We keep the devkit's number.
    boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(10)]
    gt = {"img": make_gt(boxes, [0] * 10)}
    det = {"img": make_det(boxes[:3], [0.9, 0.8, 0.7], [0, 0, 0])}
    ap07 = compute_voc_ap(det, gt, CLASSES, class_indices=[0], use_07_metric=True)["mAP"]
    assert ap07 == pytest.approx(3 / 11, abs=1e-12)
    assert compute_voc_ap(det, gt, CLASSES, class_indices=[0])["mAP"] == pytest.approx(0.3, abs=1e-12)


def test_match_takes_best_box_even_if_taken():
    # Devkit rule: a detection compares only with its max-IoU box; if that one is taken it is a
    # FP even though another box would match. GT A and A' overlap; det1 (0.9) exactly on A, det2
    # (0.8) also closest to A (IoU 0.9) but IoU 0.6 with A' -> FP.
    a = [0, 0, 100, 100]
    a2 = [0, 40, 100, 140]        # IoU(a, a2) = 60 / 140
    d2 = [0, 0, 100, 90]          # IoU(d2, a) = 0.9, IoU(d2, a2) = 50 / 140
    gt = {"img": make_gt([a, a2], [0, 0])}
    det = {"img": make_det([a, d2], [0.9, 0.8], [0, 0])}
    prf = compute_prf(det, gt, score_threshold=0.0)
    assert (prf["tp"], prf["fp"], prf["fn"]) == (1, 1, 1)


def test_ties_keep_input_order_and_labels_are_matched_per_class():
    # Equal scores: stable order (image order in the dict). FP in img1 first, TP in img2 second:
    # recall [0, 1], precision [0, 1/2] -> AP 1/2 (the other order would give 1).
    gt = {"img1": make_gt([], []), "img2": make_gt([BOX_A], [0])}
    det = {"img1": make_det([BOX_A], [0.5], [0]), "img2": make_det([BOX_A], [0.5], [0])}
    assert compute_voc_ap(det, gt, CLASSES, class_indices=[0])["mAP"] == pytest.approx(0.5)
    det = {"img2": make_det([BOX_A], [0.5], [0]), "img1": make_det([BOX_A], [0.5], [0])}
    assert compute_voc_ap(det, gt, CLASSES, class_indices=[0])["mAP"] == pytest.approx(1.0)
    # A detection of the wrong class on a box never matches it.
    det = {"img2": make_det([BOX_A], [0.9], [1])}
    assert compute_prf(det, gt) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 1, "fn": 1}


def test_tensors_are_accepted_and_unknown_images_rejected():
    gt = {"img": {"boxes": torch.tensor([BOX_A, BOX_B], dtype=torch.float32),
                  "labels": torch.tensor([0, 1]), "difficult": torch.tensor([False, False])}}
    det = {"img": {"boxes": torch.tensor([BOX_A, BOX_B], dtype=torch.float32),
                   "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}}
    assert compute_voc_ap(det, gt, CLASSES)["mAP"] == 1.0
    with pytest.raises(ValueError, match="without ground truth"):
        compute_voc_ap({"other": det["img"]}, gt, CLASSES)


# ----------------------------------------------------------------------------- P/R/F1
def test_prf_known_counts():
    # img1: objects A, B (class 0) and a difficult C (class 1).
    #   dets: A 0.9 (TP), A 0.8 (duplicate FP), FAR 0.7 (FP), C 0.6 (on difficult: ignored),
    #         B 0.3 (below threshold 0.5: not counted).
    # img2: object A (class 1). dets: A class 1 at 0.95 (TP).
    # tp = 2, fp = 2, fn = 3 non-difficult - 2 = 1 -> P = 1/2, R = 2/3, F1 = 2 * (1/3) / (7/6) = 4/7.
    box_c = [200, 10, 260, 40]
    gt = {
        "img1": make_gt([BOX_A, BOX_B, box_c], [0, 0, 1], [False, False, True]),
        "img2": make_gt([BOX_A], [1]),
    }
    det = {
        "img1": make_det([BOX_A, BOX_A, FAR, box_c, BOX_B], [0.9, 0.8, 0.7, 0.6, 0.3], [0, 0, 0, 1, 0]),
        "img2": make_det([BOX_A], [0.95], [1]),
    }
    prf = compute_prf(det, gt, score_threshold=0.5)
    assert (prf["tp"], prf["fp"], prf["fn"]) == (2, 2, 1)
    assert prf["precision"] == pytest.approx(0.5)
    assert prf["recall"] == pytest.approx(2 / 3)
    assert prf["f1"] == pytest.approx(4 / 7)
    # Threshold 0.0 lets B in: tp 3, fp 2, fn 0.
    prf = compute_prf(det, gt, score_threshold=0.0)
    assert (prf["tp"], prf["fp"], prf["fn"]) == (3, 2, 0)
    # Class 1 only: one TP, no FP (the difficult match is ignored), nothing missed.
    prf = compute_prf(det, gt, score_threshold=0.5, class_indices=[1])
    assert prf == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 1, "fp": 0, "fn": 0}


def test_evaluate_detections_is_jsonable():
    gt = {"img": make_gt([BOX_A, BOX_B], [0, 0])}
    det = {"img": make_det([FAR, BOX_A], [0.9, 0.8], [0, 0])}
    result = evaluate_detections(det, gt, CLASSES)
    assert set(result) == {"voc", "voc07", "coco", "prf"}
    assert result["voc"]["per_class"]["a"] == pytest.approx(0.25)
    assert result["voc07"]["per_class"]["a"] == pytest.approx(3 / 11)
    assert math.isnan(result["voc"]["per_class"]["b"])
    text = json.dumps(to_jsonable(result), allow_nan=False)
    assert json.loads(text)["voc"]["per_class"]["b"] is None
    assert to_jsonable({"x": (np.float32(1.5), np.array([1, 2])), "y": float("inf")}) == {"x": [1.5, [1, 2]], "y": None}


# ----------------------------------------------------------------------------- files and model outputs
def test_collect_detections():
    outputs = [
        {"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([3])},
        {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    dets = collect_detections(outputs, ["x", "y"])
    assert list(dets) == ["x", "y"]
    np.testing.assert_array_equal(dets["x"]["boxes"], [[1, 2, 3, 4]])
    assert dets["x"]["labels"].dtype == np.int64 and dets["x"]["labels"].tolist() == [3]
    assert dets["y"]["boxes"].shape == (0, 4)
    with pytest.raises(ValueError):
        collect_detections(outputs, ["x"])
    with pytest.raises(ValueError):
        collect_detections(outputs, ["x", "x"])


def test_read_detection_folder(tmp_path):
    (tmp_path / "a.txt").write_text("2 0.9 11 21 50 60\n\n0 0.25 1 1 2.5 3\n")
    dets = read_detection_folder(tmp_path, ["a", "missing"], num_classes=3)
    np.testing.assert_array_equal(dets["a"]["boxes"], [[10, 20, 50, 60], [0, 0, 2.5, 3]])
    np.testing.assert_array_equal(dets["a"]["scores"], [0.9, 0.25])
    np.testing.assert_array_equal(dets["a"]["labels"], [2, 0])
    assert dets["missing"]["boxes"].shape == (0, 4) and len(dets["missing"]["labels"]) == 0

    (tmp_path / "bad.txt").write_text("0 0.5 1 1 2 2\n1 0.5 1 1 2\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 2"):
        read_detection_folder(tmp_path, ["bad"], num_classes=3)
    (tmp_path / "range.txt").write_text("3 0.5 1 1 2 2\n")
    with pytest.raises(ValueError, match=r"range\.txt, line 1: class index 3"):
        read_detection_folder(tmp_path, ["range"], num_classes=3)
    (tmp_path / "text.txt").write_text("0 0.5 1 1 2 2\n0 high 1 1 2 2\n")
    with pytest.raises(ValueError, match=r"text\.txt, line 2"):
        read_detection_folder(tmp_path, ["text"], num_classes=3)


def test_read_class_names(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n dog \n\n")
    assert read_class_names(path) == ["cat", "dog"]
    path.write_text("cat\ncat\n")
    with pytest.raises(ValueError, match="repeated"):
        read_class_names(path)


# ----------------------------------------------------------------------------- real VOC sample
# Independent reference: a direct port of py-faster-rcnn's lib/datasets/voc_eval.py (parse_rec,
# voc_ap, voc_eval), on the raw 1-based XML coordinates with its +1 terms. It shares no code with
# diredi_sim. Only changes: detections come from memory instead of per-class files, and a class
# without detections returns AP 0 (the original crashes on an empty file).
def devkit_parse_rec(filename):
    tree = ET.parse(filename)
    objects = []
    for obj in tree.findall("object"):
        bbox = obj.find("bndbox")
        objects.append({
            "name": obj.find("name").text,
            "difficult": int(obj.find("difficult").text),
            "bbox": [int(bbox.find("xmin").text), int(bbox.find("ymin").text),
                     int(bbox.find("xmax").text), int(bbox.find("ymax").text)],
        })
    return objects


def devkit_voc_ap(rec, prec, use_07_metric=False):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def devkit_voc_eval(det_lines, recs, imagenames, classname, ovthresh=0.5, use_07_metric=False):
    class_recs = {}
    npos = 0
    for imagename in imagenames:
        R = [obj for obj in recs[imagename] if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in R])
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}

    splitlines = [x.strip().split(" ") for x in det_lines]
    image_ids = [x[0] for x in splitlines]
    confidence = np.array([float(x[1]) for x in splitlines])
    BB = np.array([[float(z) for z in x[2:]] for x in splitlines])
    if len(image_ids) == 0:
        return 0.0, npos
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return devkit_voc_ap(rec, prec, use_07_metric), npos


def devkit_evaluate_sample(use_07_metric):
    """Per-class APs of the sample with the devkit port: {class name: (AP, npos)}."""
    imagenames = (VOC_YEAR / "ImageSets" / "Main" / "val.txt").read_text().split()
    recs = {name: devkit_parse_rec(VOC_YEAR / "Annotations" / f"{name}.xml") for name in imagenames}
    classnames = (DET_DIR / "classes.txt").read_text().split()
    # The devkit's per-class detection files: "image_id score xmin ymin xmax ymax".
    lines = {c: [] for c in classnames}
    for name in imagenames:
        path = DET_DIR / f"{name}.txt"
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    cls, score, *box = line.split()
                    lines[classnames[int(cls)]].append(" ".join([name, score, *box]))
    # The devkit sorts with the unstable np.argsort; make sure no tie makes the order ambiguous.
    for c, class_lines in lines.items():
        scores = [line.split()[1] for line in class_lines]
        assert len(set(scores)) == len(scores), f"tied scores in class {c}"
    return {c: devkit_voc_eval(lines[c], recs, imagenames, c, use_07_metric=use_07_metric) for c in classnames}


def read_sample_ground_truth(class_names):
    """Ground truth of the sample in our convention, read straight from the XML (not via the loader)."""
    ground_truth = {}
    for name in (VOC_YEAR / "ImageSets" / "Main" / "val.txt").read_text().split():
        boxes, labels, difficult = [], [], []
        for obj in ET.parse(VOC_YEAR / "Annotations" / f"{name}.xml").findall("object"):
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([xmin - 1, ymin - 1, xmax, ymax])
            labels.append(class_names.index(obj.find("name").text.strip()))
            difficult.append(obj.find("difficult").text.strip() == "1")
        ground_truth[name] = make_gt(boxes, labels, difficult)
    return ground_truth


def assert_matches_devkit(result, reference):
    assert set(result["per_class"]) == set(reference)
    for c, (ap, npos) in reference.items():
        assert result["num_gt"][c] == npos, c
        assert result["per_class"][c] == pytest.approx(ap, abs=1e-9, rel=0), c
    assert result["mAP"] == pytest.approx(np.mean([ap for ap, _ in reference.values()]), abs=1e-9, rel=0)


@needs_sample
@pytest.mark.parametrize("use_07_metric", [False, True])
def test_sample_voc_ap_matches_devkit_port(use_07_metric):
    reference = devkit_evaluate_sample(use_07_metric)
    assert all(npos > 0 for _, npos in reference.values())  # every class present: no NaN here
    class_names = read_class_names(DET_DIR / "classes.txt")
    ground_truth = read_sample_ground_truth(class_names)
    detections = read_detection_folder(DET_DIR, ground_truth, len(class_names))
    result = compute_voc_ap(detections, ground_truth, class_names, use_07_metric=use_07_metric)
    assert_matches_devkit(result, reference)


@needs_sample
@pytest.mark.skipif(importlib.util.find_spec("diredi_sim.data.voc") is None, reason="VOC loader not written yet")
def test_sample_evaluate_detection_folder_matches_devkit_port():
    result = evaluate_detection_folder(VOC_SAMPLE, DET_DIR, DET_DIR / "classes.txt", image_set="val")
    assert_matches_devkit(result["voc"], devkit_evaluate_sample(use_07_metric=False))
    assert_matches_devkit(result["voc07"], devkit_evaluate_sample(use_07_metric=True))
    json.dumps(to_jsonable(result), allow_nan=False)


@needs_sample
def test_sample_coco_ap_is_sane():
    class_names = read_class_names(DET_DIR / "classes.txt")
    ground_truth = read_sample_ground_truth(class_names)
    detections = read_detection_folder(DET_DIR, ground_truth, len(class_names))
    coco = compute_coco_ap(detections, ground_truth, class_names)
    voc = compute_voc_ap(detections, ground_truth, class_names)
    assert 1.0 >= coco["AP50"] >= coco["AP75"] >= 0.0
    assert coco["AP50"] >= coco["AP"] >= 0.0
    assert all(0.0 <= ap <= 1.0 for ap in coco["per_class"].values())
    # COCO: 101-point interpolation, IoU >= 0.5, crowd-style difficult boxes; VOC: all-point, IoU > 0.5.
    assert abs(coco["AP50"] - voc["mAP"]) < 0.05
    # Perfect detections (the ground truth itself, difficult boxes included) give 1.
    perfect = {
        image_id: {"boxes": gt["boxes"], "scores": np.linspace(1.0, 0.5, len(gt["labels"])), "labels": gt["labels"]}
        for image_id, gt in ground_truth.items()
    }
    coco = compute_coco_ap(perfect, ground_truth, class_names)
    assert coco["AP"] == pytest.approx(1.0) and coco["AP50"] == pytest.approx(1.0)
    assert all(ap == pytest.approx(1.0) for ap in coco["per_class"].values())
    assert compute_voc_ap(perfect, ground_truth, class_names)["mAP"] == 1.0


def test_coco_per_class_follows_class_indices_order():
    gt = {"img": make_gt([BOX_A, BOX_B, FAR], [0, 1, 2])}
    det = {"img": make_det([BOX_A, BOX_B, FAR], [0.9, 0.8, 0.7], [0, 1, 0])}
    coco = compute_coco_ap(det, gt, CLASSES, class_indices=[2, 0])
    assert list(coco["per_class"]) == ["c", "a"]
    assert coco["per_class"]["a"] == pytest.approx(1.0) and coco["per_class"]["c"] == 0.0
    assert coco["AP"] == pytest.approx(0.5)
