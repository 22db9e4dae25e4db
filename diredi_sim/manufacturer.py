"""The manufacturer's models: teacher, Distill A (tutor), Distill B (edge), on its public
images, cached on disk and keyed by everything that determines their weights
(:func:`prepare_manufacturer`)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diredi_sim.config import DataConfig, TrainConfig
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import resolve_split
from diredi_sim.data.synthetic import default_cache_dir
from diredi_sim.datasets import DataSets
from diredi_sim.compute import current_device
from diredi_sim.models import build_detector, describe_weights
from diredi_sim.progress import Tracker, Unit, skip_stage
from diredi_sim.runs import CheckpointError, atomic_write_json, load_detector_weights, save_checkpoint, to_jsonable
from diredi_sim.seeds import derive_seed
from diredi_sim.settings import ClassSets, PipelineConfig
from diredi_sim.stages import StageRecorder
from diredi_sim.train import KDLoss, Reporting, distill, train_detector

logger = logging.getLogger(__name__)


MANUFACTURER_CACHE_FORMAT = 2  # 2: public pool only, Distill B from the tutor; bump when the manufacturer's training code changes what it produces

# Training-config fields that do not change the trained weights (left out of the cache key).
_EVAL_ONLY_FIELDS = ("eval_every", "max_eval_images", "score_threshold")



@dataclass
class Manufacturer:
    """The manufacturer's artefacts: the teacher, the tutor after Distill A, the edge after Distill B."""

    teacher: nn.Module
    tutor: nn.Module
    edge: nn.Module
    folder: Path
    key: str
    reused: bool
    description: dict


def describe_manufacturer(pipeline: PipelineConfig, data: DataConfig, *, preset: str, seed: int) -> dict:
    """Everything that determines the manufacturer's weights (the cache key is its hash)."""

    def train_settings(cfg: TrainConfig) -> dict:
        settings = {k: v for k, v in asdict(cfg).items() if k not in _EVAL_ONLY_FIELDS}
        for key in ("channels_last", "max_steps"):  # off: keys written before the setting existed stay valid
            if not settings[key]:
                del settings[key]
        return settings

    if data.source == "synthetic":
        source = {"source": "synthetic", "synthetic": asdict(data.synthetic)}
    else:
        source = {"source": "voc", "voc_root": str(Path(data.voc_root).expanduser().resolve()), "year": data.year}
    if data.manufacturer_root:  # the manufacturer's images come from there
        source["manufacturer_root"] = str(Path(data.manufacturer_root).expanduser().resolve())
    # Models trained on a GPU differ in their bits from the CPU's: a GPU-trained manufacturer is
    # cached apart (the CPU's keys stay those written before the device setting existed).
    device = {"device": current_device().type} if current_device().type != "cpu" else {}
    # Starting weights, when given (absent otherwise: keys written before the setting stay valid).
    weights = {f"{role}_weights": describe_weights(getattr(pipeline.weights, role)) for role in ("teacher", "tutor", "edge")
               if getattr(pipeline.weights, role)}
    return to_jsonable({
        **device,
        **weights,
        "format": MANUFACTURER_CACHE_FORMAT,
        "preset": preset,
        "seed": seed,
        "data": {**source, "train_set": data.train_set, "val_set": data.val_set, "public_fraction": data.public_fraction},
        "teacher_split": list(resolve_split(pipeline.teacher_split)),
        "teacher": train_settings(pipeline.teacher),
        "presumed_split": list(resolve_split(pipeline.presumed_split)),
        "distill_a": train_settings(pipeline.distill_a),
        "distill_b": train_settings(pipeline.distill_b),
        "fgd": asdict(pipeline.fgd),
        "distill": {"feature_weight": pipeline.distill_feature_weight, "task_weight": pipeline.distill_task_weight,
                    "score_weight": pipeline.distill_score_weight, "temperature": pipeline.distill_temperature},
    })


# The part of the manufacturer's description that determines the teacher alone: the teacher is
# cached on its own, so that changing how the tutor and the edge are distilled does not retrain it.
_TEACHER_KEYS = ("device", "teacher_weights", "format", "preset", "seed", "data", "teacher_split", "teacher")


def compute_manufacturer_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def describe_teacher(description: dict) -> dict:
    return {k: description[k] for k in _TEACHER_KEYS if k in description}


def resolve_cache_dir(pipeline: PipelineConfig) -> Path:
    return Path(pipeline.cache_dir).expanduser() if pipeline.cache_dir else default_cache_dir()


def trained_with() -> dict:
    """What the cache key leaves out but changes a training's bits (the order of floating-point
    sums): the torch version and its thread count, written beside each stage in the manifest."""
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def _cached_manifest(folder: Path, key: str) -> dict | None:
    """The cache folder's manifest when it is there and names ``key`` (it is written last: the
    models beside it are complete); OSError or ValueError when it cannot be read."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return manifest if manifest.get("key") == key else None


def manufacturer_is_cached(pipeline: PipelineConfig, data: DataConfig, *, preset: str = "cpu", seed: int = 0) -> bool:
    """Whether :func:`prepare_manufacturer` would load these settings' models from the cache
    rather than train them (as far as the manifest tells: unreadable weights are trained again)."""
    key = compute_manufacturer_key(describe_manufacturer(pipeline, data, preset=preset, seed=seed))
    try:
        return _cached_manifest(resolve_cache_dir(pipeline) / f"manufacturer-{key}", key) is not None
    except (OSError, ValueError):
        return False


def _load_cached(folder: Path, key: str, preset: str, roles=("teacher", "tutor", "edge")) -> tuple[dict[str, nn.Module], dict] | None:
    """The ``roles``' models saved in ``folder`` under ``key`` and its manifest, or None when
    there is none (or it names another key); unreadable files are reported and give None too."""
    try:
        manifest = _cached_manifest(folder, key)
        if manifest is None:
            return None
        models = {}
        for role in roles:
            detector = build_detector(role, preset, num_classes=len(VOC_CLASSES))
            load_detector_weights(detector, folder / f"{role}.pt")
            models[role] = detector
        return models, manifest
    except (OSError, ValueError, CheckpointError) as exc:
        logger.warning("cached %s in %s unusable (%s); training again", " and ".join(roles), folder, exc)
        return None


MANUFACTURER_STAGES = (("teacher", "teacher"), ("distill_a", "Distill A"), ("distill_b", "Distill B"))


def plan_manufacturer(pipeline: PipelineConfig) -> list[Unit]:
    """The manufacturer's training stages as progress units, weighted by their epochs."""
    return [Unit(stage, label, getattr(pipeline, stage).epochs) for stage, label in MANUFACTURER_STAGES]


def prepare_manufacturer(pipeline: PipelineConfig, data: DataConfig, *, preset: str = "cpu", seed: int = 0,
                         datasets: DataSets | None = None, recorder: StageRecorder | None = None, config: Any = None,
                         progress: bool = True) -> Manufacturer:
    """Teacher, Distill A (tutor) and Distill B (edge): loaded from the cache when a previous run
    with the same description saved them, trained (and cached) otherwise. ``recorder`` times the
    stages; its run (if any) also gets the metrics rows and checkpoints of what is trained.

    The cache is ``<cache_dir>/manufacturer-<key>/{teacher,tutor,edge}.pt`` plus
    ``manifest.json`` (the description and the training times), written last: a folder without
    a matching manifest is never used. The teacher is also cached alone, in
    ``<cache_dir>/teacher-<key>/``, keyed by the settings that determine it, so that new
    distillation settings reuse it.
    """
    recorder = recorder or StageRecorder()
    description = describe_manufacturer(pipeline, data, preset=preset, seed=seed)
    key = compute_manufacturer_key(description)
    folder = resolve_cache_dir(pipeline) / f"manufacturer-{key}"
    with recorder.measure("manufacturer_cache_load", folder=str(folder)) as entry:
        cached = _load_cached(folder, key, preset)
        entry["hit"] = cached is not None
    if cached is not None:
        models, manifest = cached
        for stage in manifest.get("stages", []):
            recorder.stages.append({**stage, "cached": True, "seconds_when_trained": stage.get("seconds_when_trained", stage.get("seconds")),
                                    "seconds": 0.0})
        (logger.info if progress else logger.debug)("manufacturer: reusing teacher, tutor and edge from %s", folder)
        return Manufacturer(models["teacher"], models["tutor"], models["edge"], folder, key, True, description)

    for role in ("teacher", "tutor", "edge"):  # a bad weights file fails now, not after hours of training
        if getattr(pipeline.weights, role):
            build_detector(role, preset, num_classes=len(VOC_CLASSES), weights=getattr(pipeline.weights, role))
    datasets = datasets or DataSets.manufacturer(data)
    report = Reporting(run=recorder.run, config=config, progress=progress)
    with Tracker("manufacturer", plan_manufacturer(pipeline), enabled=progress):  # its stages finish its units
        return _train_manufacturer(pipeline, datasets, description, preset=preset, seed=seed, recorder=recorder, report=report)


def _train_manufacturer(pipeline: PipelineConfig, datasets: DataSets, description: dict, *, preset: str, seed: int,
                        recorder: StageRecorder, report: Reporting) -> Manufacturer:
    """Teacher (from its own cache when there), Distill A and Distill B, then the cache written."""
    key = compute_manufacturer_key(description)
    folder = resolve_cache_dir(pipeline) / f"manufacturer-{key}"
    teacher, entry = _prepare_teacher(pipeline, datasets, describe_teacher(description), preset=preset, seed=seed,
                                      recorder=recorder, report=report)
    trained = [entry]
    kd = KDLoss(pipeline.distill_feature_weight, pipeline.distill_task_weight, pipeline.distill_score_weight,
                pipeline.distill_temperature, pipeline.fgd)
    presumed = pipeline.presumed_split
    students = {}
    # Distill A: teacher -> tutor; Distill B: tutor -> edge (the tutor is the edge's teacher, paper
    # section III-A, IV-A: "the tutor model is used to distill knowledge in the same manner").
    for stage, role, source in (("distill_a", "tutor", "teacher"), ("distill_b", "edge", "tutor")):
        cfg = getattr(pipeline, stage)
        train = datasets.train(presumed, cfg, pool="public")
        source_model = teacher if source == "teacher" else copy.deepcopy(students["tutor"])
        with recorder.measure(stage, cached=False, train_images=len(train), epochs=cfg.epochs, teacher=source) as entry:
            torch.manual_seed(derive_seed(seed, stage))
            student = build_detector(role, preset, num_classes=len(VOC_CLASSES), weights=getattr(pipeline.weights, role))
            distill(source_model, student, train, datasets.val(presumed, cfg, pool="public"), cfg,
                    class_indices=ClassSets.indices(resolve_split(presumed)), seed=derive_seed(seed, stage), loss=kd,
                    report=replace(report, name=f"{role}_{stage}"))
        entry.update(trained_with())  # the teacher's entry got its own in _prepare_teacher (or keeps its cache's)
        trained.append(entry)
        students[role] = student

    with recorder.measure("manufacturer_cache_save", folder=str(folder)):
        for role, detector in (("teacher", teacher), ("tutor", students["tutor"]), ("edge", students["edge"])):
            save_checkpoint(folder / f"{role}.pt", detector, config=description, cache_key=key)
        atomic_write_json(folder / "manifest.json", {"key": key, "description": description, "stages": trained,
                                                     "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    teacher.requires_grad_(True)  # Distill A/B froze it; leave the caller a plain model
    return Manufacturer(teacher, students["tutor"], students["edge"], folder, key, False, description)


def _prepare_teacher(pipeline: PipelineConfig, datasets: DataSets, description: dict, *, preset: str, seed: int,
                     recorder: StageRecorder, report: Reporting) -> tuple[nn.Module, dict]:
    """The teacher, from its own cache (``<cache_dir>/teacher-<key>/``, keyed by the settings that
    determine it) or trained on the teacher split and cached there; and its stage entry."""
    key = compute_manufacturer_key(description)
    folder = resolve_cache_dir(pipeline) / f"teacher-{key}"
    cached = _load_cached(folder, key, preset, roles=("teacher",))
    if cached is not None:
        manifest = cached[1]
        recorder.stages.append({**manifest["stage"], "cached": True, "seconds_when_trained": manifest["stage"].get("seconds"),
                                "seconds": 0.0})
        (logger.info if report.progress else logger.debug)("manufacturer: reusing the teacher from %s", folder)
        skip_stage("teacher")
        return cached[0]["teacher"], recorder.stages[-1]
    cfg, split = pipeline.teacher, pipeline.teacher_split
    train = datasets.train(split, cfg, pool="public")
    with recorder.measure("teacher", cached=False, train_images=len(train), epochs=cfg.epochs) as entry:
        torch.manual_seed(derive_seed(seed, "teacher"))
        teacher = build_detector("teacher", preset, num_classes=len(VOC_CLASSES), weights=pipeline.weights.teacher)
        train_detector(teacher, train, datasets.val(split, cfg, pool="public"), cfg, class_indices=ClassSets.indices(resolve_split(split)),
                       seed=derive_seed(seed, "teacher"), report=replace(report, name="teacher"))
    save_checkpoint(folder / "teacher.pt", teacher, config=description, cache_key=key)
    entry.update(trained_with())
    atomic_write_json(folder / "manifest.json", {"key": key, "description": description, "stage": entry,
                                                 "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    return teacher, entry
