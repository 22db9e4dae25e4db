"""The paper's whole flow for one customer, in one process (DESIGN.md section 4): the reference
that the Flower simulation must reproduce.

Data: every image set is dealt into the manufacturer's public pool and the customers' pool
(:class:`DataSets`, disjoint by image id).

Manufacturer (cached on disk, keyed by everything that determines the weights), public images:
  1. train the teacher on the ``teacher`` split;
  2. Distill A: teacher -> tutor, then Distill B: tutor -> edge (the tutor is the edge's teacher,
     paper section III-A), both with FGD on the ``presumed`` split.
Customer (:func:`run_customer`):
  3. Tutor1 = RD B: ``reverse_distill(edge, copy of tutor, presumed images)``; Tutor2 = RD A: the
     same presumed batches (same order, flips, steps and seed; the dropped classes' boxes
     removed), each extended by the customer's own images. Loss ``alpha * L_RD + beta * L_task``
     with the edge as the frozen teacher; FGD's align convs fitted by least squares first;
  4. delta = gamma * (Tutor2 - Tutor1) over neck + head; its size at fp32 and fp16.
Manufacturer (:func:`run_manufacturer_step`):
  5. verify ``tutor + delta_weight * delta`` on its held-out presumed data (public val images):
     AP and, at the deployment score threshold, precision / recall / F1 of every critical class;
     tutor' is the updated tutor if accepted, the unchanged tutor if not;
  6. Distill C: tutor' -> a new edge model (starting from the deployed edge's weights) per data
     mode, ``public`` (the manufacturer's presumed images) and ``public+private`` (the customer's
     whole data), and per loss: ``fgd`` (FGD at attention temperature 1.5 + task: the paper) and
     ``fgd+score`` (+ class-score distillation normalised by positives: an ablation).
Baselines (:func:`train_baseline`), on the customer's whole data, at the DiReDi customer's
  image count (RD B + RD A + Distill C public+private; ``equal_compute``):
  7. direct training of a fresh edge model, and local fine-tuning of the deployed edge.
Evaluation (:func:`evaluate_rows`):
  8. every model on the customer's test images (customers' pool) filtered to the union of its
     and the presumed classes: mAP@0.5, P, R, F1 over the customer's classes, per-class AP,
     private-class and dropped-class AP, knowledge gain and forgetting against the row's
     reference (tutor rows vs the original tutor, edge rows vs the original edge); and on the
     manufacturer's test images of the presumed classes (public pool): ``presumed_map``, one
     image set for every row.
  9. time and peak memory per stage. Memory is the process's peak resident set size so far
     (``ru_maxrss``): the figure after a stage is the peak up to then, and ``peak_rss_growth_mb``
     how much that peak rose during the stage (0 when the stage stayed below an earlier peak).

Plain torch; never imports flwr or ray.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diredi_sim.config import ConfigError, DataConfig, TrainConfig, config_from_dict
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.sources import resolve_data_folder
from diredi_sim.data.splits import filter_split, keep_classes, resolve_split
from diredi_sim.data.synthetic import default_cache_dir
from diredi_sim.data.voc import ImageRecord, load_annotations, resolve_voc_folder
from diredi_sim.deltas import apply_delta, compute_delta, compute_norm, count_bytes
from diredi_sim.evaluate import compute_voc_ap, evaluate_detections
from diredi_sim.losses import FGDConfig
from diredi_sim.models import build_detector
from diredi_sim.seeds import Seeds, derive_seed
from diredi_sim.runs import (CheckpointError, Run, atomic_write_bytes, atomic_write_json, load_detector_weights,
                             save_checkpoint, to_jsonable)
from diredi_sim.train import (build_loader, distill, evaluate_detector, finetune, predict, records_to_ground_truth,
                              reverse_distill, train_detector)
from diredi_sim.verify import Verdict, VerifyConfig, verify_update

DISTILL_C_MODES = ("public", "public+private")
DISTILL_C_LOSSES = ("fgd", "fgd+score")
MANUFACTURER_CACHE_FORMAT = 2  # 2: public pool only, Distill B from the tutor; bump when the manufacturer's training code changes what it produces

# Training-config fields that do not change the trained weights (left out of the cache key).
_EVAL_ONLY_FIELDS = ("eval_every", "max_eval_images", "score_threshold")

@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the paper's flow (the ``[pipeline]`` section of an experiment config).

    The run seed, the model preset and the data come from the experiment config around it.
    Each stage has its own :class:`TrainConfig` (epochs, batch, optimiser, lr, caps on images);
    a partly given table keeps TrainConfig's defaults for the rest. The paper's values: KD
    (Distill A/B) and RD 100 epochs, batch 16; Distill C 20 epochs, batch 8, temperature 1.5;
    learning rates and RD's alpha/beta are not in the paper's text (settings here).
    """

    customer: str | tuple[str, ...] = ""  # the customer's split: a preset (exp1, exp2) or class names; "" = the experiment's name
    teacher_split: str | tuple[str, ...] = "teacher"  # the teacher's classes
    presumed_split: str | tuple[str, ...] = "presumed"  # the manufacturer's data (Distill A/B, RD B, Distill C public)
    teacher: TrainConfig = field(default_factory=TrainConfig)  # teacher training on teacher_split
    distill_a: TrainConfig = field(default_factory=TrainConfig)  # teacher -> tutor (paper: 100 epochs, batch 16)
    distill_b: TrainConfig = field(default_factory=TrainConfig)  # teacher -> edge (paper: 100 epochs, batch 16)
    rd: TrainConfig = field(default_factory=TrainConfig)  # RD A and RD B alike (paper: 100 epochs, batch 16)
    distill_c: TrainConfig = field(default_factory=TrainConfig)  # tutor' -> edge (paper: 20 epochs, batch 8)
    direct: TrainConfig = field(default_factory=TrainConfig)  # the "training" baseline: fresh edge on the customer's data
    fgd: FGDConfig = field(default_factory=FGDConfig)  # FGD weights for every feature-distillation loss
    distill_feature_weight: float = 1.0  # Distill A/B: weight of the FGD terms
    distill_task_weight: float = 1.0  # Distill A/B: weight of the student's FCOS loss
    distill_score_weight: float = 0.0  # Distill A/B: class-score distillation (0: FGD + task only)
    distill_temperature: float = 1.5  # Distill A/B: temperature of the score distillation, when on
    local: TrainConfig = field(default_factory=TrainConfig)  # local fine-tuning of the deployed edge on the customer's data
    equal_compute: bool = True  # direct and local baselines train on as many images as the DiReDi customer (RD B + RD A + Distill C)
    alpha: float = 1.0  # RD: weight of L_RD (FGD on neck features, edge as the frozen teacher)
    beta: float = 1.0  # RD: weight of the tutor copy's task loss
    rd_customer_per_batch: int = 8  # RD A: the customer's images added to each of Tutor1's presumed batches
    rd_score_weight: float = 0.0  # RD: class-score distillation from the edge (ablation; 0: FGD only, as the paper)
    rd_align_init: str = "lstsq"  # RD: FGD's align convs fitted by least squares on the first batch, or "random"
    freeze_backbone: bool = True  # RD: freeze the tutor copies' backbone (only neck + head travel)
    gamma: float = 1.0  # delta = gamma * (Tutor2 - Tutor1) (paper: 1)
    delta_weight: float = 1.0  # tutor' = tutor + delta_weight * delta (paper: 1)
    distill_c_feature_weight: float = 1.0  # Distill C: weight of the FGD terms
    distill_c_task_weight: float = 1.0  # Distill C: weight of the edge model's FCOS loss
    distill_c_score_weight: float = 1.0  # Distill C "fgd+score": weight of the class-score distillation from tutor'
    distill_c_temperature: float = 1.5  # Distill C: FGD's attention temperature (paper: 1.5), and the score loss's
    distill_c_modes: tuple[str, ...] = DISTILL_C_MODES  # data of Distill C: public and/or public+private
    distill_c_losses: tuple[str, ...] = ("fgd",)  # "fgd": FGD + task (the paper); "fgd+score": + class-score distillation (ablation)
    verify: VerifyConfig = field(default_factory=VerifyConfig)  # critical classes () = every presumed class
    cache_dir: str = ""  # manufacturer artefacts: <cache_dir>/manufacturer-<hash>/; "" = the data cache (.cache/diredi-sim)
    eval_batch_size: int = 32
    score_threshold: float = 0.5  # for precision / recall / F1
    max_eval_images: int = 0  # caps the test and verification image sets (0 = all)

    def __post_init__(self):
        def check(ok: bool, key: str, requirement: str) -> None:
            if not ok:
                raise ConfigError(f"pipeline.{key} = {getattr(self, key)!r}: {requirement}")

        for key in ("customer", "teacher_split", "presumed_split"):
            value = getattr(self, key)
            if key == "customer" and value == "":
                continue
            try:
                resolve_split(value)
            except ValueError as exc:
                raise ConfigError(f"pipeline.{key} = {value!r}: {exc}") from None
        for key in ("alpha", "beta", "distill_feature_weight", "distill_task_weight", "distill_score_weight",
                    "distill_c_feature_weight", "distill_c_task_weight", "distill_c_score_weight", "rd_score_weight"):
            check(math.isfinite(getattr(self, key)) and getattr(self, key) >= 0, key, "must be finite and >= 0")
        check(self.rd_customer_per_batch >= 0, "rd_customer_per_batch", "must be >= 0")
        check(self.rd_align_init in ("lstsq", "random"), "rd_align_init", "must be 'lstsq' or 'random'")
        check(all(loss in DISTILL_C_LOSSES for loss in self.distill_c_losses) and len(set(self.distill_c_losses)) == len(self.distill_c_losses)
              and len(self.distill_c_losses) > 0, "distill_c_losses", f"must be distinct values among {list(DISTILL_C_LOSSES)}")
        for key in ("distill_temperature", "distill_c_temperature"):
            check(getattr(self, key) > 0, key, "must be > 0")
        for key in ("distill_temperature", "distill_c_temperature"):
            check(math.isfinite(getattr(self, key)), key, "must be finite")
        check(math.isfinite(self.gamma), "gamma", "must be finite")
        check(math.isfinite(self.delta_weight), "delta_weight", "must be finite")
        check(all(m in DISTILL_C_MODES for m in self.distill_c_modes) and len(set(self.distill_c_modes)) == len(self.distill_c_modes),
              "distill_c_modes", f"must be distinct values among {list(DISTILL_C_MODES)}")
        check(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        check(0 <= self.score_threshold <= 1, "score_threshold", "must be in [0, 1]")
        check(self.max_eval_images >= 0, "max_eval_images", "must be >= 0")


def load_pipeline_config(table: dict, prefix: str = "pipeline.") -> PipelineConfig:
    """A PipelineConfig from a TOML table; unknown keys and wrong types name the key."""
    try:
        return config_from_dict(PipelineConfig, table, prefix=prefix)
    except ConfigError:
        raise
    except ValueError as exc:  # VerifyConfig and FGDConfig check their values with ValueError
        raise ConfigError(f"{prefix}{exc}") from None


# ------------------------------------------------------------------------------------ classes


@dataclass(frozen=True)
class ClassSets:
    """The class bookkeeping of one customer, every tuple in VOC order."""

    customer: tuple[str, ...]  # the customer's target classes (headline metrics)
    presumed: tuple[str, ...]
    teacher: tuple[str, ...]
    private: tuple[str, ...]  # customer - presumed: knowledge gain
    kept: tuple[str, ...]  # presumed & customer: forgetting
    dropped: tuple[str, ...]  # presumed - customer: reported apart
    union: tuple[str, ...]  # customer | presumed: the test images and the per-class APs

    @staticmethod
    def of(customer, presumed, teacher="teacher") -> "ClassSets":
        c, p, t = set(resolve_split(customer)), set(resolve_split(presumed)), set(resolve_split(teacher))
        order = lambda names: tuple(n for n in VOC_CLASSES if n in names)  # noqa: E731
        return ClassSets(order(c), order(p), order(t), order(c - p), order(c & p), order(p - c), order(c | p))

    @staticmethod
    def indices(names: Sequence[str]) -> list[int]:
        return [VOC_CLASSES.index(n) for n in names]


# ------------------------------------------------------------------------------- measurement


def read_peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class StageRecorder:
    """Wall time and peak memory of each stage, in order; each also goes to the run's metrics."""

    def __init__(self, run: Run | None = None):
        self.run = run
        self.stages: list[dict] = []

    @contextmanager
    def measure(self, name: str, **info: Any):
        entry: dict[str, Any] = {"stage": name, **info}
        peak_before = read_peak_rss_mb()
        start = time.perf_counter()
        try:
            yield entry
        finally:
            peak_after = read_peak_rss_mb()
            entry["seconds"] = round(time.perf_counter() - start, 3)
            entry["peak_rss_mb"] = round(peak_after, 1)
            entry["peak_rss_growth_mb"] = round(peak_after - peak_before, 1)
            self.stages.append(entry)
            if self.run is not None:
                self.run.log({"pipeline_stage": name, **{k: v for k, v in entry.items() if k != "stage"}})


# ------------------------------------------------------------------------------------- data


POOLS = ("public", "customer", "all")


class PrivacyError(RuntimeError):
    """A process asked for data its side of the federation must not read."""


def pool_of(image_id: str, public_fraction: float) -> str:
    """The pool an image belongs to: ``public`` (the manufacturer's) or ``customer``, from a hash
    of its id alone, so that the split does not depend on the order or the number of images."""
    digest = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    return "public" if digest / 2**64 < public_fraction else "customer"


class DataSets:
    """Each image set's annotations read once; pools and splits are filtered in memory.

    Every image set is dealt into two disjoint pools (``data.public_fraction``): the
    manufacturer's ``public`` images (teacher, Distill A/B, its verification and its test
    images; also shipped to customers as the presumed data of reverse distillation) and the
    ``customer`` images, which only customers hold. No image id is in both."""

    def __init__(self, data: DataConfig, *, folder: Path | None = None, pools: Sequence[str] = POOLS):
        self.data = data
        self.folder = folder if folder is not None else resolve_data_folder(data)
        self.pools = tuple(pools)
        self._records: dict[tuple[str, str], list[ImageRecord]] = {}

    @classmethod
    def manufacturer(cls, data: DataConfig) -> "DataSets":
        """The manufacturer's view: its public pool only, read from ``data.manufacturer_root``
        when set (a folder that holds nothing else), else from the data source. Asking it for
        the customers' pool is a :class:`PrivacyError`."""
        folder = resolve_voc_folder(data.manufacturer_root) if data.manufacturer_root else None
        return cls(data, folder=folder, pools=("public",))

    def records(self, image_set: str, split, limit: int = 0, *, pool: str) -> list[ImageRecord]:
        if pool not in POOLS:
            raise ValueError(f"pool {pool!r}: must be one of {list(POOLS)}")
        if pool not in self.pools:
            raise PrivacyError(f"the {pool!r} pool of image set {image_set!r} was asked for where only {list(self.pools)} "
                               f"may be read (the manufacturer's process never reads a customer's images or labels)")
        if (image_set, "all") not in self._records:
            on_problem = "warn" if self.data.source == "voc" else "raise"
            every = load_annotations(self.folder, image_set, on_problem=on_problem)
            self._records[(image_set, "all")] = every
            for name in ("public", "customer"):
                self._records[(image_set, name)] = [r for r in every if pool_of(r.image_id, self.data.public_fraction) == name]
        kept = filter_split(self._records[(image_set, pool)], split)
        return kept[:limit] if limit else kept

    def train(self, split, cfg: TrainConfig, *, pool: str) -> list[ImageRecord]:
        return self.records(self.data.train_set, split, cfg.max_train_images, pool=pool)

    def val(self, split, cfg: TrainConfig, *, pool: str) -> list[ImageRecord]:
        return self.records(self.data.val_set, split, cfg.max_eval_images, pool=pool)


def export_pool(data: DataConfig, destination: str | Path, pool: str = "public") -> dict[str, int]:
    """Copy one pool of the data source (train, val and test image sets) into a new VOC folder
    ``destination``: its images, its annotation files and image-set lists holding its ids only,
    in the source's order. ``data.manufacturer_root = destination`` then gives the manufacturer
    the same records as the source's public pool, with no other file in reach. Returns the
    images per image set. Refuses a destination that already holds files."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination}: not empty; export_pool writes into a new folder")
    datasets = DataSets(data)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (destination / sub).mkdir(parents=True, exist_ok=True)
    counts = {}
    for image_set in dict.fromkeys((data.train_set, data.val_set, data.test_set)):
        records = datasets.records(image_set, "all", pool=pool)
        for record in records:
            shutil.copy2(record.image_path, destination / "JPEGImages" / record.image_path.name)
            shutil.copy2(datasets.folder / "Annotations" / f"{record.image_id}.xml", destination / "Annotations")
        (destination / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{r.image_id}\n" for r in records))
        counts[image_set] = len(records)
    return counts


def copy_for_training(detector: nn.Module) -> nn.Module:
    """A deep copy that can be trained: a Distiller freezes the teacher it is given (no
    gradients, eval mode), and a copy of a frozen model would inherit that."""
    return copy.deepcopy(detector).requires_grad_(True).train()


# ------------------------------------------------------------------------------ manufacturer


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
        return {k: v for k, v in asdict(cfg).items() if k not in _EVAL_ONLY_FIELDS}

    if data.source == "synthetic":
        source = {"source": "synthetic", "synthetic": asdict(data.synthetic)}
    else:
        source = {"source": "voc", "voc_root": str(Path(data.voc_root).expanduser().resolve()), "year": data.year}
    if data.manufacturer_root:  # the manufacturer's images come from there
        source["manufacturer_root"] = str(Path(data.manufacturer_root).expanduser().resolve())
    return to_jsonable({
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
_TEACHER_KEYS = ("format", "preset", "seed", "data", "teacher_split", "teacher")


def compute_manufacturer_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def describe_teacher(description: dict) -> dict:
    return {k: description[k] for k in _TEACHER_KEYS}


def _load_cached_teacher(folder: Path, key: str, preset: str) -> tuple[nn.Module, dict] | None:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("key") != key:
            return None
        teacher = build_detector("teacher", preset, num_classes=len(VOC_CLASSES))
        load_detector_weights(teacher, folder / "teacher.pt")
        return teacher, manifest
    except (OSError, ValueError, CheckpointError) as exc:
        print(f"diredi-sim: cached teacher in {folder} unusable ({exc}); training it again", file=sys.stderr, flush=True)
        return None


def resolve_cache_dir(pipeline: PipelineConfig) -> Path:
    return Path(pipeline.cache_dir).expanduser() if pipeline.cache_dir else default_cache_dir()


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


def _load_cached(folder: Path, key: str, preset: str) -> tuple[dict[str, nn.Module], dict] | None:
    try:
        manifest = _cached_manifest(folder, key)
        if manifest is None:
            return None
        models = {}
        for role in ("teacher", "tutor", "edge"):
            detector = build_detector(role, preset, num_classes=len(VOC_CLASSES))
            load_detector_weights(detector, folder / f"{role}.pt")
            models[role] = detector
        return models, manifest
    except (OSError, ValueError, CheckpointError) as exc:
        print(f"diredi-sim: cached manufacturer artefacts in {folder} unusable ({exc}); training them again",
              file=sys.stderr, flush=True)
        return None


def prepare_manufacturer(
    pipeline: PipelineConfig,
    data: DataConfig,
    *,
    preset: str = "cpu",
    seed: int = 0,
    datasets: DataSets | None = None,
    recorder: StageRecorder | None = None,
    run: Run | None = None,
    config: Any = None,
    progress: bool = True,
) -> Manufacturer:
    """Teacher, Distill A (tutor) and Distill B (edge): loaded from the cache when a previous run
    with the same description saved them, trained (and cached) otherwise.

    The cache is ``<cache_dir>/manufacturer-<key>/{teacher,tutor,edge}.pt`` plus
    ``manifest.json`` (the description and the training times), written last: a folder without
    a matching manifest is never used. The teacher is also cached alone, in
    ``<cache_dir>/teacher-<key>/``, keyed by the settings that determine it, so that new
    distillation settings reuse it.
    """
    recorder = recorder or StageRecorder(run)
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
        if progress:
            print(f"manufacturer: reusing teacher, tutor and edge from {folder}", file=sys.stderr, flush=True)
        return Manufacturer(models["teacher"], models["tutor"], models["edge"], folder, key, True, description)

    datasets = datasets or DataSets.manufacturer(data)
    teacher_split, presumed = pipeline.teacher_split, pipeline.presumed_split
    teacher_classes = ClassSets.indices(resolve_split(teacher_split))
    presumed_classes = ClassSets.indices(resolve_split(presumed))
    trained: list[dict] = []
    common = dict(run=run, config=config, progress=progress)

    teacher_description = describe_teacher(description)
    teacher_key = compute_manufacturer_key(teacher_description)
    teacher_folder = resolve_cache_dir(pipeline) / f"teacher-{teacher_key}"
    cached_teacher = _load_cached_teacher(teacher_folder, teacher_key, preset)
    if cached_teacher is not None:
        teacher, teacher_manifest = cached_teacher
        entry = {**teacher_manifest["stage"], "cached": True, "seconds_when_trained": teacher_manifest["stage"].get("seconds"),
                 "seconds": 0.0}
        recorder.stages.append(entry)
        if progress:
            print(f"manufacturer: reusing the teacher from {teacher_folder}", file=sys.stderr, flush=True)
    else:
        cfg = pipeline.teacher
        train = datasets.train(teacher_split, cfg, pool="public")
        with recorder.measure("teacher", cached=False, train_images=len(train), epochs=cfg.epochs) as entry:
            torch.manual_seed(derive_seed(seed, "teacher"))
            teacher = build_detector("teacher", preset, num_classes=len(VOC_CLASSES))
            train_detector(teacher, train, datasets.val(teacher_split, cfg, pool="public"), cfg, class_indices=teacher_classes,
                           seed=derive_seed(seed, "teacher"), name="teacher", **common)
        save_checkpoint(teacher_folder / "teacher.pt", teacher, config=teacher_description, cache_key=teacher_key)
        atomic_write_json(teacher_folder / "manifest.json", {"key": teacher_key, "description": teacher_description,
                                                             "stage": entry, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    trained.append(entry)

    distill_settings = dict(feature_weight=pipeline.distill_feature_weight, task_weight=pipeline.distill_task_weight,
                            score_weight=pipeline.distill_score_weight, temperature=pipeline.distill_temperature, fgd=pipeline.fgd)
    students = {}
    # Distill A: teacher -> tutor; Distill B: tutor -> edge (the tutor is the edge's teacher, paper
    # section III-A, IV-A: "the tutor model is used to distill knowledge in the same manner").
    for stage, role, source in (("distill_a", "tutor", "teacher"), ("distill_b", "edge", "tutor")):
        cfg = getattr(pipeline, stage)
        train = datasets.train(presumed, cfg, pool="public")
        source_model = teacher if source == "teacher" else copy.deepcopy(students["tutor"])
        with recorder.measure(stage, cached=False, train_images=len(train), epochs=cfg.epochs, teacher=source) as entry:
            torch.manual_seed(derive_seed(seed, stage))
            student = build_detector(role, preset, num_classes=len(VOC_CLASSES))
            distill(source_model, student, train, datasets.val(presumed, cfg, pool="public"), cfg, class_indices=presumed_classes,
                    seed=derive_seed(seed, stage), name=f"{role}_{stage}", **distill_settings, **common)
        trained.append(entry)
        students[role] = student

    with recorder.measure("manufacturer_cache_save", folder=str(folder)):
        for role, detector in (("teacher", teacher), ("tutor", students["tutor"]), ("edge", students["edge"])):
            save_checkpoint(folder / f"{role}.pt", detector, config=description, cache_key=key)
        atomic_write_json(folder / "manifest.json", {"key": key, "description": description, "stages": trained,
                                                     "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    teacher.requires_grad_(True)  # Distill A/B froze it; leave the caller a plain model
    return Manufacturer(teacher, students["tutor"], students["edge"], folder, key, False, description)


# -------------------------------------------------------------------------------- evaluation


def evaluate_row(detector: nn.Module, records: Sequence[ImageRecord], target: Sequence[str], union: Sequence[str], *,
                 batch_size: int = 32, score_threshold: float = 0.3) -> dict:
    """One table row's numbers: mAP@0.5 (VOC all-point), VOC07 mAP, COCO AP, precision, recall
    and F1 over ``target`` classes; per-class AP (and ground-truth counts) of every ``union``
    class. One prediction pass; AP per class does not depend on which classes are selected,
    so ``mAP`` is the mean of ``per_class`` over the target classes that have ground truth."""
    loader = build_loader(records, batch_size=batch_size, train=False)
    detections = predict(detector, loader)
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
    ("edge_distill_c_public", "edge after Distill C (public)", "edge", "edge_original", None),
    ("edge_distill_c_public_private", "edge after Distill C (public+private)", "edge", "edge_original", None),
    ("edge_distill_c_public_score", "edge after Distill C (public, + score KD)", "edge", "edge_original", None),
    ("edge_distill_c_public_private_score", "edge after Distill C (public+private, + score KD)", "edge", "edge_original", None),
)
DISTILL_C_ROW = {"public": "edge_distill_c_public", "public+private": "edge_distill_c_public_private"}


def distill_c_row(mode: str, loss: str = "fgd") -> str:
    """The table row of Distill C in data ``mode`` with ``loss``: edge_distill_c_public(_private)(_score)."""
    return DISTILL_C_ROW[mode] + ("_score" if loss == "fgd+score" else "")


# ---------------------------------------------------------------------------------- pipeline


@dataclass
class PipelineResult:
    rows: list[dict]  # one per model row, in table order
    verdict: Verdict
    delta: dict[str, Tensor]  # the neck+head delta that travelled (float32, by name)
    delta_info: dict  # norm, tensors, values, bytes at fp32 / fp16
    stages: list[dict]  # time and peak memory per stage
    classes: ClassSets
    manufacturer: dict  # cache folder, key, reused
    settings: dict = field(default_factory=dict)  # settings worth reporting with the table

    def row(self, key: str) -> dict:
        for row in self.rows:
            if row["key"] == key:
                return row
        raise KeyError(f"no row {key!r}; rows: {[r['key'] for r in self.rows]}")


@dataclass
class CustomerUpdate:
    """What a customer computes: Tutor1 (RD B), Tutor2 (RD A) and the neck+head delta that travels."""

    tutor1: nn.Module
    tutor2: nn.Module
    delta: dict[str, Tensor]
    delta_info: dict  # gamma, norm, tensors, values, bytes at fp32 / fp16
    train_images: dict[str, int]  # images trained on per RD stage (Tutor2's count includes the customer's images)


def describe_delta(delta: dict[str, Tensor], gamma: float = 1.0) -> dict:
    return {"gamma": gamma, "norm": compute_norm(delta), "tensors": len(delta), "values": sum(v.numel() for v in delta.values()),
            "bytes_fp32": count_bytes(delta, torch.float32), "bytes_fp16": count_bytes(delta, torch.float16)}


@dataclass(frozen=True)
class CustomerData:
    """What one customer trains on, chosen once.

    ``presumed``: the manufacturer's presumed images (public pool, presumed classes), which the
    manufacturer ships with its models: Tutor1's data. ``presumed_kept``: the same images in the
    same order, with the boxes of the classes the customer drops removed (the objects stay in the
    pixels, as background): Tutor2's presumed part. ``own``: the customer's own images (customer
    pool, its classes, its share), which never leave it. ``combined`` = presumed_kept + own: the
    customer's whole training set (Distill C public+private, direct training, local fine-tuning).
    """

    presumed: list[ImageRecord]
    presumed_kept: list[ImageRecord]
    own: list[ImageRecord]
    own_val: list[ImageRecord]
    presumed_val: list[ImageRecord]

    @property
    def combined(self) -> list[ImageRecord]:
        return self.presumed_kept + self.own


def select_customer_data(datasets: DataSets, pipeline: PipelineConfig, customer, cfg: TrainConfig,
                         share: Callable[[list[ImageRecord]], list[ImageRecord]] = lambda r: r) -> CustomerData:
    """The customer's data for a stage with settings ``cfg`` (its image caps). ``share`` picks the
    customer's part of the customer pool (all of it by default)."""
    presumed = datasets.train(pipeline.presumed_split, cfg, pool="public")
    kept = resolve_split(customer)
    return CustomerData(presumed, keep_classes(presumed, kept), share(datasets.train(customer, cfg, pool="customer")),
                        share(datasets.val(customer, cfg, pool="customer")), datasets.val(pipeline.presumed_split, cfg, pool="public"))


def run_customer(
    tutor: nn.Module,
    edge: nn.Module,
    pipeline: PipelineConfig,
    datasets: DataSets,
    customer,
    *,
    seeds: Seeds,
    recorder: StageRecorder | None = None,
    say: Callable[[str], None] = lambda text: None,
    records: Callable[[list[ImageRecord]], list[ImageRecord]] = lambda r: r,
    run: Run | None = None,
    config: Any = None,
    progress: bool = True,
) -> CustomerUpdate:
    """The customer's side (steps 3-4): RD B and RD A from copies of ``tutor`` with ``edge`` as
    the frozen teacher, then the delta. ``seeds`` are the customer's; ``records`` picks the
    customer's share of the customer pool.

    Tutor1 (RD B) trains on the presumed images; Tutor2 (RD A) on the same presumed batches, in
    the same order with the same flips, the boxes of the dropped classes removed, each batch
    extended by ``rd_customer_per_batch`` of the customer's own images. Both start from the same
    weights and seed and take the same optimizer steps on the same schedule: they differ by the
    customer's data only, which is what the delta carries."""
    recorder = recorder or StageRecorder(run)
    common = dict(run=run, config=config, progress=progress)
    cfg = pipeline.rd
    data = select_customer_data(datasets, pipeline, customer, cfg, records)
    rd_settings = dict(alpha=pipeline.alpha, beta=pipeline.beta, freeze_backbone=pipeline.freeze_backbone, fgd=pipeline.fgd,
                       score_weight=pipeline.rd_score_weight, align_init=pipeline.rd_align_init)
    presumed_classes = ClassSets.indices(resolve_split(pipeline.presumed_split))
    plans = (("tutor1", "rd_b", data.presumed, (), 0, data.presumed_val, presumed_classes),
             ("tutor2", "rd_a", data.presumed_kept, data.own, pipeline.rd_customer_per_batch, data.own_val,
              ClassSets.indices(resolve_split(customer))))
    trained, counts = {}, {}
    for key, stage, presumed, own, per_batch, val, classes in plans:
        with recorder.measure(stage, presumed_images=len(presumed), own_images=len(own), epochs=cfg.epochs) as entry:
            torch.manual_seed(seeds("rd"))
            student = copy_for_training(tutor)
            result = reverse_distill(edge, student, presumed, val, cfg, class_indices=classes, seed=seeds("rd"),
                                     extra_records=own, extra_per_batch=per_batch, name=f"{key}_{stage}", **rd_settings, **common)
            entry.update(train_images=result["train_images"], train_steps=result["train_steps"])
        counts[stage] = result["train_images"]
        trained[key] = student
    with recorder.measure("delta") as entry:
        delta = compute_delta(trained["tutor2"].state_dict(), trained["tutor1"].state_dict(), pipeline.gamma)
        delta_info = describe_delta(delta, pipeline.gamma)
        entry.update({k: delta_info[k] for k in ("bytes_fp32", "bytes_fp16")})
    say(f"delta: {delta_info['tensors']} neck/head tensors, {delta_info['values']} values, norm {delta_info['norm']:.4g}, "
        f"{delta_info['bytes_fp32'] / 2**20:.2f} MiB at fp32 / {delta_info['bytes_fp16'] / 2**20:.2f} MiB at fp16")
    return CustomerUpdate(trained["tutor1"], trained["tutor2"], delta, delta_info, counts)


def review_update(tutor: nn.Module, delta: dict[str, Tensor], pipeline: PipelineConfig, datasets: DataSets, *,
                  recorder: StageRecorder | None = None,
                  say: Callable[[str], None] = lambda text: None) -> tuple[Verdict, nn.Module, nn.Module | None]:
    """Step 5, on the manufacturer's own data: substitute ``tutor + delta_weight * delta`` and
    verify it on the held-out presumed images (public val). Returns (verdict, tutor', the
    rejected candidate or None): tutor' is the updated tutor if accepted, a copy of the
    unchanged tutor if not; ``tutor`` itself is never changed."""
    recorder = recorder or StageRecorder()
    presumed = ClassSets.indices(resolve_split(pipeline.presumed_split))
    verify_records = datasets.records(datasets.data.val_set, pipeline.presumed_split, pipeline.max_eval_images, pool="public")
    with recorder.measure("verify", verify_images=len(verify_records)) as entry:
        def evaluate_presumed(model: nn.Module) -> dict:
            return evaluate_detector(model, verify_records, presumed, batch_size=pipeline.eval_batch_size,
                                     score_threshold=pipeline.score_threshold)

        verdict, updated_state = verify_update(tutor, delta, evaluate_presumed, pipeline.verify, weight=pipeline.delta_weight)
        entry["accepted"] = verdict.accepted
    say(f"verification: {'accepted' if verdict.accepted else 'REJECTED'} (presumed mAP {verdict.map_before:.3f} -> "
        f"{verdict.map_after:.3f}){''.join(chr(10) + '  ' + r for r in verdict.reasons)}")
    tutor_prime, candidate = copy.deepcopy(tutor), None  # a rejected update leaves the tutor untouched
    if verdict.accepted:
        tutor_prime.load_state_dict(updated_state)
    else:
        try:
            candidate = copy.deepcopy(tutor)
            candidate.load_state_dict(apply_delta(tutor.state_dict(), delta, pipeline.delta_weight))
        except (ValueError, RuntimeError, KeyError):
            candidate = None  # a malformed delta has no candidate to show
    return verdict, tutor_prime, candidate


def distill_c_training_data(data: CustomerData, mode: str) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Distill C's (train, val) images in data ``mode``: the manufacturer's presumed images
    (``public``), or the customer's whole data, validated on its own images (``public+private``)."""
    return (data.presumed, data.presumed_val) if mode == "public" else (data.combined, data.own_val)


def redistill(tutor_prime: nn.Module, edge: nn.Module, train: list[ImageRecord], val: list[ImageRecord],
              classes: Sequence[str], pipeline: PipelineConfig, *, mode: str, loss: str, seeds: Seeds,
              recorder: StageRecorder | None = None, **common) -> tuple[nn.Module, int]:
    """Step 6, Distill C: tutor' -> a new edge model, starting from the weights of ``edge``, on
    ``train`` (validated on ``val``, AP over ``classes``). As the paper: FGD at its attention
    temperature (``distill_c_temperature``, the paper's 1.5) + the edge's task loss; ``loss =
    "fgd+score"`` adds class-score distillation from tutor' (an ablation); ``mode`` names the
    data mode (the row is :func:`distill_c_row`). Returns the new edge model and the images it trained on. The same
    call runs at the manufacturer (public mode) and at the customer (public+private mode)."""
    recorder = recorder or StageRecorder(common.get("run"))
    cfg = pipeline.distill_c
    fgd = replace(pipeline.fgd, temperature=pipeline.distill_c_temperature)
    score_weight = pipeline.distill_c_score_weight if loss == "fgd+score" else 0.0
    key, stage = distill_c_row(mode, loss), f"distill_c_{mode}" + ("_score" if loss == "fgd+score" else "")
    with recorder.measure(stage, epochs=cfg.epochs, score_weight=score_weight, temperature=pipeline.distill_c_temperature) as entry:
        torch.manual_seed(seeds("distill_c"))
        student = copy_for_training(edge)
        result = distill(copy.deepcopy(tutor_prime), student, train, val, cfg, class_indices=ClassSets.indices(classes),
                         feature_weight=pipeline.distill_c_feature_weight, task_weight=pipeline.distill_c_task_weight,
                         score_weight=score_weight, temperature=pipeline.distill_c_temperature, fgd=fgd,
                         seed=seeds("distill_c"), name=key, **common)
        entry.update(train_images=result["train_images"], train_steps=result["train_steps"])
    return student, result["train_images"]


@dataclass
class ManufacturerStep:
    """What the manufacturer makes of one customer's delta (steps 5-6)."""

    verdict: Verdict
    tutor_prime: nn.Module  # the updated tutor if accepted, the unchanged tutor if not
    candidate: nn.Module | None  # the rejected tutor + delta (shown apart, never deployed)
    edges: dict[str, nn.Module]  # Distill C's edge model per row key (data mode and loss, distill_c_row)
    train_images: dict[str, int] = field(default_factory=dict)  # images each Distill C trained on


def run_manufacturer_step(
    tutor: nn.Module,
    edge: nn.Module,
    delta: dict[str, Tensor],
    pipeline: PipelineConfig,
    datasets: DataSets,
    customer,
    *,
    seeds: Seeds,
    recorder: StageRecorder | None = None,
    say: Callable[[str], None] = lambda text: None,
    records: Callable[[list[ImageRecord]], list[ImageRecord]] = lambda r: r,
    distill_rejected: bool = True,
    **common,
) -> ManufacturerStep:
    """Steps 5 and 6 in one process (the ``paper`` flow): :func:`review_update`, then
    :func:`redistill` per data mode and loss. The public+private mode reads the customer's data:
    in the federation it runs at the customer instead (``clients/``), and this function is not
    used there. ``seeds`` are the customer's; ``records`` picks the customer's share of its
    split's images. With ``distill_rejected`` False a rejected update gets no Distill C (the
    customer keeps its edge model); True distils from the unchanged tutor anyway."""
    recorder = recorder or StageRecorder(common.get("run"))
    verdict, tutor_prime, candidate = review_update(tutor, delta, pipeline, datasets, recorder=recorder, say=say)
    edges, counts = {}, {}
    data = select_customer_data(datasets, pipeline, customer, pipeline.distill_c, records)
    for mode in (pipeline.distill_c_modes if verdict.accepted or distill_rejected else ()):
        train, val = distill_c_training_data(data, mode)
        classes = resolve_split(pipeline.presumed_split if mode == "public" else customer)
        for loss in pipeline.distill_c_losses:
            key = distill_c_row(mode, loss)
            edges[key], counts[key] = redistill(tutor_prime, edge, train, val, classes, pipeline, mode=mode, loss=loss, seeds=seeds,
                                                recorder=recorder, **common)
    return ManufacturerStep(verdict, tutor_prime, candidate, edges, counts)


def count_customer_compute(update: CustomerUpdate, step: ManufacturerStep, pipeline: PipelineConfig) -> dict:
    """The images a DiReDi customer trains on in total (image-steps): RD B + RD A + its Distill C
    (public+private, the paper's setting, FGD loss; the public mode's when only that one ran)."""
    parts = dict(update.train_images)
    for mode in ("public+private", "public"):
        key = distill_c_row(mode, pipeline.distill_c_losses[0])
        if key in step.train_images:
            parts[key] = step.train_images[key]
            break
    return {"diredi": sum(parts.values()), "parts": parts}


BASELINES = ("direct", "local")


def train_baseline(kind: str, edge: nn.Module, pipeline: PipelineConfig, datasets: DataSets, customer, *, seeds: Seeds, preset: str,
                   budget_images: int | None, recorder: StageRecorder | None = None,
                   records: Callable[[list[ImageRecord]], list[ImageRecord]] = lambda r: r, **common) -> tuple[nn.Module, int]:
    """A customer-side baseline on the customer's whole data (the presumed images without its
    dropped classes' boxes + its own): ``direct``, a fresh edge model trained from scratch
    (``pipeline.direct``; ``edge`` is not used), or ``local``, a copy of the deployed ``edge``
    fine-tuned (``pipeline.local``). With ``budget_images`` it trains on that many images (as
    many optimizer steps as fill it at its batch size, the last batch counted whole), else for
    its configured epochs. Returns the model and the images it actually trained on."""
    if kind not in BASELINES:
        raise ValueError(f"baseline {kind!r}: must be one of {list(BASELINES)}")
    recorder = recorder or StageRecorder(common.get("run"))
    cfg = pipeline.direct if kind == "direct" else pipeline.local
    data = select_customer_data(datasets, pipeline, customer, cfg, records)
    steps = math.ceil(budget_images / cfg.batch_size) if budget_images else None
    settings = dict(class_indices=ClassSets.indices(resolve_split(customer)), seed=seeds(kind), name=f"edge_{kind}",
                    total_steps=steps, **common)
    with recorder.measure(kind, epochs=cfg.epochs, budget_images=budget_images) as entry:
        torch.manual_seed(seeds(kind))
        if kind == "direct":
            student = build_detector("edge", preset, num_classes=len(VOC_CLASSES))
            result = train_detector(student, data.combined, data.own_val, cfg, **settings)
        else:
            student = copy_for_training(edge)
            result = finetune(student, data.combined, data.own_val, cfg, **settings)
        entry.update(train_images=result["train_images"], train_steps=result["train_steps"])
    return student, result["train_images"]


def run_pipeline(
    pipeline: PipelineConfig,
    data: DataConfig,
    *,
    preset: str = "cpu",
    seed: int = 0,
    run: Run | None = None,
    config: Any = None,
    progress: bool = True,
    seeds: Seeds | None = None,
) -> PipelineResult:
    """The whole flow for one customer (module docstring). ``run`` (optional) receives every
    stage's metrics rows and checkpoints; ``config`` is embedded in those checkpoints.
    ``seeds`` seed the customer's stages, Distill C and the direct and local baselines (default:
    ``Seeds(seed)``, partition 0 of replicate 0); the manufacturer's stages always use ``seed``
    (replicates share one manufacturer)."""
    seeds = seeds or Seeds(seed)
    if pipeline.customer == "":
        raise ValueError("pipeline.customer is empty: name the customer's split (a preset such as exp1, or class names)")
    classes = ClassSets.of(pipeline.customer, pipeline.presumed_split, pipeline.teacher_split)
    if not classes.private and not classes.dropped:
        print("diredi-sim: warning: the customer's split equals the presumed split; the delta carries nothing new",
              file=sys.stderr)
    recorder = StageRecorder(run)
    common = dict(run=run, config=config, progress=progress)
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)

    with recorder.measure("data") as entry:
        datasets = DataSets(data)
        test = datasets.records(data.test_set, classes.union, pipeline.max_eval_images, pool="customer")
        entry.update(test_images=len(test), folder=str(datasets.folder))
    say(f"data: {datasets.folder}; customer classes {', '.join(classes.customer)} (private: {', '.join(classes.private) or '-'}, "
        f"dropped: {', '.join(classes.dropped) or '-'}); {len(test)} of the customer's test images")

    maker = prepare_manufacturer(pipeline, data, preset=preset, seed=seed, datasets=datasets, recorder=recorder,
                                 progress=progress, **{k: v for k, v in common.items() if k != "progress"})
    tutor, edge = maker.tutor, maker.edge
    models: dict[str, nn.Module] = {"teacher": maker.teacher, "tutor_original": tutor, "edge_original": edge}

    update = run_customer(tutor, edge, pipeline, datasets, pipeline.customer, seeds=seeds, recorder=recorder, say=say,
                          **common)
    models.update(tutor1=update.tutor1, tutor2=update.tutor2)
    delta, delta_info = update.delta, update.delta_info
    if run is not None:
        buffer = io.BytesIO()
        torch.save(delta, buffer)
        atomic_write_bytes(run.folder / "delta.pt", buffer.getvalue())

    step = run_manufacturer_step(tutor, edge, delta, pipeline, datasets, pipeline.customer, seeds=seeds, recorder=recorder,
                                 say=say, **common)
    verdict = step.verdict
    models["tutor_updated"] = step.tutor_prime
    if step.candidate is not None:
        models["tutor_rejected_candidate"] = step.candidate
    models.update(step.edges)

    compute = count_customer_compute(update, step, pipeline)
    compute["baselines"] = {}
    for kind in BASELINES:
        models[f"edge_{kind}"], compute["baselines"][f"edge_{kind}"] = train_baseline(
            kind, edge, pipeline, datasets, pipeline.customer, seeds=seeds, preset=preset, recorder=recorder,
            budget_images=compute["diredi"] if pipeline.equal_compute else None, **common)
    say("training images per method (image-steps): DiReDi customer " + f"{compute['diredi']} (" +
        ", ".join(f"{k} {v}" for k, v in compute["parts"].items()) + "); " +
        ", ".join(f"{k} {v}" for k, v in compute["baselines"].items()))

    rows = evaluate_rows(models, test, classes, datasets, pipeline, recorder, say)
    settings = {
        "preset": preset, "seed": seed, "customer": list(classes.customer), "alpha": pipeline.alpha, "beta": pipeline.beta,
        "freeze_backbone": pipeline.freeze_backbone, "gamma": pipeline.gamma, "delta_weight": pipeline.delta_weight,
        "distill_c_score_weight": pipeline.distill_c_score_weight, "distill_c_temperature": pipeline.distill_c_temperature,
        "distill_c_modes": list(pipeline.distill_c_modes), "verify": asdict(pipeline.verify),
        "score_threshold": pipeline.score_threshold, "test_images": len(test),
        "epochs": {s: getattr(pipeline, s).epochs for s in ("teacher", "distill_a", "distill_b", "rd", "distill_c", "direct", "local")},
        "rd_customer_per_batch": pipeline.rd_customer_per_batch, "rd_score_weight": pipeline.rd_score_weight,
        "rd_align_init": pipeline.rd_align_init, "distill_c_losses": list(pipeline.distill_c_losses),
        "customer_seed": seeds.customer, "training_images": compute,
    }
    return PipelineResult(rows, verdict, delta, delta_info, recorder.stages, classes,
                          {"folder": str(maker.folder), "key": maker.key, "reused": maker.reused}, settings)


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
    """A row's numbers on the manufacturer's test images (its side, public pool): ``presumed_map``
    over the presumed classes (the same images for every row); the teacher's row also ``own``,
    its classes on those images."""
    settings = dict(batch_size=pipeline.eval_batch_size, score_threshold=pipeline.score_threshold)
    maker_test = datasets.records(datasets.data.test_set, classes.presumed, pipeline.max_eval_images, pool="public")
    row = {"presumed_map": evaluate_row(model, maker_test, classes.presumed, classes.presumed, **settings)["mAP"],
           "presumed_test_images": len(maker_test)}
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


__all__ = [
    "PipelineConfig", "PipelineResult", "ClassSets", "Manufacturer", "StageRecorder", "DataSets", "ROWS",
    "load_pipeline_config", "prepare_manufacturer", "manufacturer_is_cached", "describe_manufacturer", "describe_teacher", "compute_manufacturer_key",
    "run_pipeline", "run_customer", "run_manufacturer_step", "train_baseline", "select_customer_data", "CustomerData", "CustomerUpdate", "ManufacturerStep", "describe_delta",
    "evaluate_row", "compute_knowledge", "read_peak_rss_mb", "copy_for_training", "review_update", "redistill",
    "distill_c_training_data", "measure_on_customer", "measure_on_manufacturer", "assemble_rows", "export_pool", "PrivacyError",
]
