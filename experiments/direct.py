"""Direct training of one role on one split: the foundation's main job (and the paper's
"direct training" row later on)."""

from __future__ import annotations

import logging
import time

import torch

from diredi_sim.compute import configure_process
from diredi_sim.config import ExperimentConfig
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.sources import load_split_records, resolve_data_folder, split_class_indices
from diredi_sim.models import build_detector, count_parameters
from diredi_sim.runs import Run
from diredi_sim.runs import require_tensorboard
from diredi_sim.train import Reporting, evaluate_detector, summarize_eval, train_detector

logger = logging.getLogger(__name__)


def format_per_class_table(result: dict, title: str) -> str:
    voc, coco = result["voc"], result["coco"]
    lines = [title, f"  {'class':12} {'AP50':>6} {'COCO AP':>8} {'#gt':>5}"]
    for name, ap in voc["per_class"].items():
        coco_ap = coco["per_class"].get(name)
        lines.append(f"  {name:12} {_fmt(ap):>6} {_fmt(coco_ap):>8} {voc['num_gt'].get(name, 0):5d}")
    prf = result["prf"]
    lines.append(f"  {'mAP':12} {_fmt(voc['mAP']):>6} {_fmt(coco['AP']):>8}   (VOC07 11-pt {_fmt(result['voc07']['mAP'])}, "
                 f"COCO AP50 {_fmt(coco['AP50'])}, P {prf['precision']:.3f} R {prf['recall']:.3f} F1 {prf['f1']:.3f})")
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def run_direct_training(config: ExperimentConfig) -> Run:
    """Generate or read the data, train ``config.role`` on ``config.split``, evaluate on the
    test set, and write everything to a new run folder."""
    configure_process(device=config.device, threads=config.threads)
    if config.tensorboard:
        require_tensorboard()
    started = time.perf_counter()
    folder = resolve_data_folder(config.data)
    data_seconds = time.perf_counter() - started
    cfg = config.train
    train = load_split_records(config.data, config.data.train_set, config.split, limit=cfg.max_train_images)
    val = load_split_records(config.data, config.data.val_set, config.split, limit=cfg.max_eval_images)
    test = load_split_records(config.data, config.data.test_set, config.split, limit=cfg.max_eval_images)
    classes = split_class_indices(config.split)
    with Run.create(config.runs_dir, config.name, config) as run:
        torch.manual_seed(config.seed)
        detector = build_detector(config.role, config.preset, num_classes=len(VOC_CLASSES), weights=getattr(config.weights, config.role))
        params = count_parameters(detector)
        logger.info("data: %s (%d train / %d val / %d test images, ready in %.1f s)", folder, len(train), len(val), len(test),
                    data_seconds)
        logger.info("model: %s (%s preset, %s, %.2fM parameters); training %d epochs, batch %d; run folder %s", config.role,
                    config.preset, detector.spec.backbone, sum(params.values()) / 1e6, cfg.epochs, cfg.batch_size, run.folder)
        train_started = time.perf_counter()
        train_detector(detector, train, val, cfg, class_indices=classes, seed=config.seed,
                       report=Reporting(config.role, run, config))
        train_seconds = time.perf_counter() - train_started
        result = evaluate_detector(detector, test, classes, batch_size=cfg.batch_size * 2, score_threshold=cfg.score_threshold)
        summary = {"role": config.role, "preset": config.preset, "split": config.split, "test_images": len(test),
                   **summarize_eval(result), "train_seconds": round(train_seconds, 1), "data_seconds": round(data_seconds, 1),
                   "total_seconds": round(time.perf_counter() - started, 1)}
        run.write_json("results.json", {"summary": summary, "test": result})
        run.log({"stage": "test", **summary})
        logger.info("trained in %.0f s; results in %s", train_seconds, run.folder / "results.json",
                    extra={"console": False})  # the log file's last line; the console gets it on stdout below
    print(format_per_class_table(result, f"test set, {config.role} ({config.preset}), split {config.split}:"))
    print(f"trained in {train_seconds:.0f} s; results in {run.folder}/results.json", flush=True)
    return run
