"""Training loops as free functions (torchvision references/detection style).

``train_one_epoch`` runs any loss: it takes a ``compute_losses(images, targets)`` callable that
returns a named dict of loss terms (``task.*`` for FCOS's own losses; the distillation loops
add ``distill.*`` terms), sums them, steps the optimizer and logs every term. A non-finite loss
raises :class:`NonFiniteLossError` naming the step and the terms (never exits the process: a
Ray worker must not die silently). ``train_detector`` is direct training of any role on any
split, with evaluation every few epochs, checkpoints that embed their config, and metrics as
JSON lines in a run folder.
"""

from __future__ import annotations

import logging
import hashlib
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from diredi_sim.compute import on_device, to_device
from diredi_sim.config import TrainConfig
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.voc import DetectionDataset, ImageRecord, collate_detection
from diredi_sim.evaluate import collect_detections, evaluate_detections
from diredi_sim.losses import FGDConfig, FGDLoss, compute_response_distillation, compute_score_distillation
from diredi_sim.models import backbone_precision, extract_features
from diredi_sim.progress import format_duration, open_epoch_bar
from diredi_sim.runs import Run, save_checkpoint

logger = logging.getLogger(__name__)

LossFn = Callable[[list[Tensor], list[dict[str, Tensor]]], dict[str, Tensor]]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the step and every loss term."""


def compute_task_losses(detector: nn.Module) -> LossFn:
    """FCOS's own detection losses, prefixed ``task.``."""

    def losses(images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        out = extract_features(detector, images, targets)
        return {f"task.{k}": v for k, v in out.losses.items()}

    return losses


def freeze(detector: nn.Module) -> nn.Module:
    """Freeze a teacher explicitly: no gradients, norm layers (all layers) in eval mode."""
    detector.requires_grad_(False)
    return detector.eval()


def freeze_backbone(detector: nn.Module) -> None:
    """Freeze the trunk (backbone.body): no gradients, BatchNorm statistics fixed.

    Call again after every ``.train()``: ``train_one_epoch`` does so through ``keep_frozen``."""
    detector.backbone.body.requires_grad_(False)
    detector.backbone.body.eval()


@dataclass(frozen=True)
class KDLoss:
    """The loss of a distillation (:class:`Distiller`): the weights of its terms, the class-score
    term's temperature and FGD's settings. In reverse distillation ``feature_weight`` is alpha
    (L_RD) and ``task_weight`` beta (L_task)."""

    feature_weight: float = 1.0  # FGD on the neck features
    task_weight: float = 1.0  # the student's FCOS losses
    score_weight: float = 0.0  # class-score distillation (0: off)
    temperature: float = 1.5  # of the class-score distillation
    fgd: FGDConfig = FGDConfig()
    response_weight: float = 0.0  # box + centre-ness distillation, weighted by the teacher's scores (0: off)
    classes: tuple[int, ...] = ()  # label indices the score and response terms cover (): every class
    align: str = "student"  # FGD's 1x1 conv maps the student's features ("student", FGD's) or the teacher's ("teacher")


class Distiller(nn.Module):
    """One object owns teacher, student and the loss (mmrazor style).

    Losses (:class:`KDLoss`): ``task.*`` (the student's FCOS losses, times ``task_weight``),
    ``distill.fg/bg/mask/global`` (FGD on the neck features, times ``feature_weight``) and, when
    ``score_weight > 0``, ``distill.score`` (class-score distillation at ``temperature``, summed
    over locations and divided by the student's positive locations, as FCOS's own losses) and,
    when ``response_weight > 0``, ``distill.response`` (box + centre-ness distillation weighted
    by the teacher's scores); both over the loss's ``classes`` (every class when empty).
    The teacher is frozen here and runs under ``no_grad``. Used for Distill A/B/C (teacher ->
    student) and for reverse distillation (edge as the teacher, a tutor copy as the student:
    ``feature_weight = alpha``, ``task_weight = beta``).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, loss: KDLoss = KDLoss(), *, freeze_student_backbone: bool = False):
        super().__init__()
        self.teacher = freeze(teacher)
        self.student = student
        self.fgd = FGDLoss(student.backbone.out_channels, teacher.backbone.out_channels, num_levels=3, cfg=loss.fgd,
                           align=loss.align)
        self.feature_weight, self.task_weight = loss.feature_weight, loss.task_weight
        self.score_weight, self.temperature = loss.score_weight, loss.temperature
        self.response_weight, self.classes = loss.response_weight, loss.classes
        self.freeze_student_backbone = freeze_student_backbone

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode
        if self.freeze_student_backbone:
            freeze_backbone(self.student)
        return self

    @torch.no_grad()
    def fit_align(self, images: list[Tensor]) -> dict[int, float]:
        """Initialise FGD's 1x1 align convs by least squares on one batch: with the student's
        features ``s`` mapped (FGD's side), ``W, b = argmin ||W s + b - t||^2``; with the teacher's
        ``t`` mapped, ``argmin ||W t + b - s||^2`` (+ a 1e-6 relative ridge), over every location
        of each level, so that L_RD starts from the best linear map between the two models'
        features, not from a random projection. Both models run in eval mode (no BatchNorm
        statistics move). Returns each level's relative residual ``||W x + b - y|| / ||y||``."""
        was_training = self.student.training
        self.student.eval()
        try:
            teacher = extract_features(self.teacher, images).features
            student = extract_features(self.student, images).features
        finally:
            self.train(was_training)
        residuals = {}
        for index, (level, s, t) in enumerate(zip(self.fgd.levels, student, teacher)):
            if level.align is None:
                continue
            source, target = (s, t) if level.align_side == "student" else (t, s)
            x = source.permute(0, 2, 3, 1).reshape(-1, source.shape[1])
            y = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1).double()
            # Normal equations with a tiny ridge, solved in float64: torch.linalg.lstsq gave
            # different bits in different processes on rank-deficient features (dead channels).
            gram = x.T @ x
            gram += 1e-6 * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            solution = torch.linalg.solve(gram, x.T @ y.double()).float()  # (C_s + 1, C_t)
            level.align.weight.copy_(solution[:-1].T[:, :, None, None])
            level.align.bias.copy_(solution[-1])
            residuals[index] = float((x.float() @ solution - y).norm() / y.norm().clamp_min(1e-12))
        return residuals

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in list(self.student.parameters()) + list(self.fgd.parameters()) if p.requires_grad]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        with torch.no_grad():
            teacher_out = extract_features(self.teacher, images)
        student_out = extract_features(self.student, images, targets)
        if student_out.batch_shape != teacher_out.batch_shape:
            raise ValueError(f"teacher and student see different input sizes ({teacher_out.batch_shape} vs {student_out.batch_shape}): "
                             "give both the same image_size")
        losses = {f"task.{k}": self.task_weight * v for k, v in student_out.losses.items()}
        boxes = [t["boxes"] for t in student_out.targets]
        fgd_terms = self.fgd(student_out.features, teacher_out.features, boxes, student_out.batch_shape)
        losses.update({f"distill.{k}": self.feature_weight * v for k, v in fgd_terms.items()})
        if self.score_weight > 0:
            losses["distill.score"] = self.score_weight * compute_score_distillation(
                student_out.head["cls_logits"], teacher_out.head["cls_logits"], self.temperature,
                num_foreground=student_out.num_foreground, classes=self.classes)
        if self.response_weight > 0:
            losses["distill.response"] = self.response_weight * compute_response_distillation(
                student_out.head, teacher_out.head, num_foreground=student_out.num_foreground, classes=self.classes)
        return losses


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warm-up, then cosine decay to 5% of the base rate."""
    warmup = min(cfg.warmup_steps, max(total_steps // 4, 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total_steps - warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Progress:
    """Progress of one epoch: loss terms, images/s and ETA.

    On a terminal, a bar on the process's live display (:mod:`diredi_sim.progress`: below the
    run's overall bar, if one is open; started on ``stream``, default stderr, if none is); at
    the end of the epoch its last state stays printed above the display and goes to the log
    (the run's log file; not to the console, where it is printed). Elsewhere (a pipe, a file, a
    Ray actor), whole lines through logging every ``log_every`` steps and at the end of the
    epoch, every loss term under its full name (``task.bbox_regression``)."""

    def __init__(self, total: int, desc: str, stream=None, log_every: int = 50, enabled: bool = True):
        self.total, self.desc, self.log_every, self.enabled = total, desc, log_every, enabled
        self.bar = open_epoch_bar(desc, total, stream) if enabled else None
        self.start = time.perf_counter()
        self.images = 0

    def update(self, step: int, images: int, terms: dict[str, float]) -> None:
        self.images += images
        if not self.enabled or not (self.bar is not None or step % self.log_every == 0 or step == self.total):
            return
        elapsed = time.perf_counter() - self.start
        rate = self.images / max(elapsed, 1e-9)
        if self.bar is not None:
            eta = elapsed / step * (self.total - step)
            loss_text = " ".join(f"{k.split('.', 1)[-1][:5]} {v:.3f}" for k, v in terms.items())
            self.bar.update(step, f"{step}/{self.total} loss {sum(terms.values()):.3f} ({loss_text}) {rate:.1f} img/s "
                                  f"ETA {format_duration(eta)}")
            if step == self.total:
                line = self.describe(step, terms, rate, elapsed)
                self.bar.close(line)
                self.bar = None
                logger.info(line, extra={"console": False})
            return
        logger.info(self.describe(step, terms, rate, elapsed))

    def close(self) -> None:
        """Take the bar off the display (an epoch cut short, or stopped by an error)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def describe(self, step: int, terms: dict[str, float], rate: float, elapsed: float) -> str:
        """One whole line: where the epoch is, the total loss and every term by its full name."""
        eta = elapsed / step * (self.total - step)
        loss_text = ", ".join(f"{k} {v:.4f}" for k, v in terms.items())
        return (f"{self.desc}: step {step}/{self.total}, loss {sum(terms.values()):.4f} ({loss_text}), {rate:.1f} img/s, "
                f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta)}")


@dataclass
class EpochStats:
    losses: dict[str, float]  # mean of each term over the epoch
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class Optimization:
    """What follows each backward pass: gradients clipped to ``grad_clip`` (0: not clipped) over
    the optimizer's parameters, the optimizer's step, then the scheduler's (if any)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    grad_clip: float = 0.0


def train_one_epoch(
    modules: nn.Module | Sequence[nn.Module],
    compute_losses: LossFn,
    optimization: Optimization | torch.optim.Optimizer,
    loader: DataLoader,
    *,
    epoch: int,
    desc: str = "train",
    progress: bool = True,
    max_steps: int | None = None,
) -> EpochStats:
    """One pass over ``loader`` (its first ``max_steps`` batches, when given). ``modules`` are set
    to train mode (frozen teachers stay as the caller left them); a bare optimizer is an
    :class:`Optimization` without scheduler or clipping."""
    if isinstance(optimization, torch.optim.Optimizer):
        optimization = Optimization(optimization)
    optimizer, scheduler, grad_clip = optimization.optimizer, optimization.scheduler, optimization.grad_clip
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        module.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums: dict[str, float] = defaultdict(float)
    num_steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    bar = Progress(num_steps, f"{desc} epoch {epoch}", enabled=progress)
    start = time.perf_counter()
    images_seen = 0
    try:
        for step, (images, targets) in enumerate(loader, 1):
            if step > num_steps:
                break
            images, targets = to_device(images, targets)
            losses = compute_losses(images, targets)
            total = sum(losses.values())
            if not torch.isfinite(total):
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise NonFiniteLossError(f"{desc}: non-finite loss at epoch {epoch} step {step}: {terms}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            values = {k: v.item() for k, v in losses.items()}
            for k, v in values.items():
                sums[k] += v
            images_seen += len(images)
            bar.update(step, len(images), values)
    finally:
        bar.close()
    steps = max(num_steps, 1)
    return EpochStats({k: v / steps for k, v in sums.items()}, images_seen, time.perf_counter() - start)


def records_to_ground_truth(records: Sequence[ImageRecord]) -> dict[str, dict]:
    return {r.image_id: {"boxes": r.boxes, "labels": r.labels, "difficult": r.difficult} for r in records}


@torch.inference_mode()
def predict(detector: nn.Module, loader: DataLoader) -> dict[str, dict]:
    """Detections for every image of ``loader``, keyed by image id, in eval mode."""
    was_training = detector.training
    detector.eval()
    detections: dict[str, dict] = {}
    try:
        with on_device(detector) as device:  # the batches follow the model to this process's device
            for images, targets in loader:
                outputs = detector(to_device(images, device=device)[0])
                detections.update(collect_detections(outputs, [t["image_id"] for t in targets]))
    finally:
        detector.train(was_training)
    return detections


# The last few prediction passes, by (model fingerprint, batch size, images): a round evaluates the
# same model on the same images once per customer (the manufacturer's current tutor on its
# verification images; the round's original tutor and edge on its test images). The detections of
# an eval-mode pass depend on nothing else, so a hit is bit-identical.
_PREDICTIONS: OrderedDict[tuple, dict[str, dict]] = OrderedDict()
_PREDICTIONS_KEPT = 8


def fingerprint(detector: nn.Module) -> str:
    """A hash of the model's state (names, dtypes, bytes) and its detection settings."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(getattr(detector, "spec", None)).encode())
    for name, tensor in detector.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def predict_records(detector: nn.Module, records: Sequence[ImageRecord], *, batch_size: int, num_workers: int = 0) -> dict[str, dict]:
    """:func:`predict` on ``records`` in file order, remembered for the same model and images."""
    key = (fingerprint(detector), batch_size, tuple((r.image_id, str(r.image_path)) for r in records))
    if key in _PREDICTIONS:
        _PREDICTIONS.move_to_end(key)
        return _PREDICTIONS[key]
    detections = predict(detector, build_loader(records, batch_size=batch_size, train=False, num_workers=num_workers))
    for entry in detections.values():  # shared by every later hit: nobody may change them
        for array in entry.values():
            array.flags.writeable = False
    _PREDICTIONS[key] = detections
    while len(_PREDICTIONS) > _PREDICTIONS_KEPT:
        _PREDICTIONS.popitem(last=False)
    return detections


def evaluate_detector(
    detector: nn.Module,
    records: Sequence[ImageRecord],
    class_indices: Sequence[int],
    *,
    batch_size: int = 32,
    score_threshold: float = 0.3,
    num_workers: int = 0,
) -> dict:
    """VOC / COCO AP, per-class AP and P/R/F1 of ``detector`` on ``records`` for ``class_indices``."""
    detections = predict_records(detector, records, batch_size=batch_size, num_workers=num_workers)
    return evaluate_detections(
        detections, records_to_ground_truth(records), VOC_CLASSES, class_indices=list(class_indices), score_threshold=score_threshold
    )


def build_loader(
    records: Sequence[ImageRecord], *, batch_size: int, train: bool, seed: int = 0, hflip_prob: float = 0.0, num_workers: int = 0
) -> DataLoader:
    dataset = DetectionDataset(list(records), include_difficult=not train, hflip_prob=hflip_prob if train else 0.0, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > batch_size,
        collate_fn=collate_detection,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


class MixedLoader:
    """Batches of ``primary`` in its own seeded order, each extended by ``extra_per_batch``
    images of ``extra`` (cycled in their own seeded order, reshuffled each pass).

    Reverse distillation trains Tutor1 on the presumed images and Tutor2 on the same presumed
    batches, in the same order with the same flips, plus the customer's images: the two
    students take the same number of steps with the same schedule and differ by the customer's
    data only. ``extra_per_batch = 0`` yields ``primary``'s batches unchanged."""

    def __init__(self, primary: DataLoader, extra: Sequence[ImageRecord] = (), *, extra_per_batch: int = 0, seed: int = 0,
                 hflip_prob: float = 0.0):
        self.primary = primary
        self.dataset = primary.dataset
        self.extra_per_batch = extra_per_batch if len(extra) else 0
        self._extra = DetectionDataset(list(extra), include_difficult=False, hflip_prob=hflip_prob, seed=seed + 1) if self.extra_per_batch else None
        self._generator = torch.Generator().manual_seed(seed + 1)
        self._order: list[int] = []
        self._passes = 0

    def __len__(self) -> int:
        return len(self.primary)

    def _next_extra(self) -> tuple[Tensor, dict]:
        if not self._order:
            self._passes += 1
            self._extra.set_epoch(self._passes)
            self._order = torch.randperm(len(self._extra), generator=self._generator).tolist()
        return self._extra[self._order.pop()]

    def __iter__(self):
        for images, targets in self.primary:
            if self.extra_per_batch:
                extra = [self._next_extra() for _ in range(self.extra_per_batch)]
                images = list(images) + [image for image, _ in extra]
                targets = list(targets) + [target for _, target in extra]
            yield images, targets


def summarize_eval(result: dict) -> dict[str, float]:
    """The headline numbers of an evaluation, for one metrics row."""
    return {
        "mAP50": result["voc"]["mAP"],
        "coco_AP": result["coco"]["AP"],
        "precision": result["prf"]["precision"],
        "recall": result["prf"]["recall"],
        "f1": result["prf"]["f1"],
    }


def epoch_row(name: str, epoch: int, stats: EpochStats, lr: float) -> dict:
    """One epoch's metrics row: every loss term, and their sums by kind as weighted in the loss:
    ``task`` (the student's FCOS losses: beta * L_task in reverse distillation) and ``distill``
    (alpha * L_RD; the KD terms of Distill A/B/C)."""
    kinds = {kind: sum(v for k, v in stats.losses.items() if k.startswith(kind + ".")) for kind in ("task", "distill")}
    return {"stage": name, "epoch": epoch, "images_per_s": round(stats.images_per_second, 2), "seconds": round(stats.seconds, 2),
            "lr": lr, **{f"loss.{k}": v for k, v in stats.losses.items()},
            **{f"loss_sum.{k}": v for k, v in kinds.items() if any(t.startswith(k + ".") for t in stats.losses)}}


@dataclass(frozen=True)
class Reporting:
    """Where a training run (:func:`fit`) reports, under ``name``: its epoch bar on the display
    (``progress``), a row per epoch in ``run``'s metrics.jsonl and its final weights in
    ``checkpoints/<name>.pt`` with ``config`` embedded (no ``run``: neither)."""

    name: str = "model"
    run: Run | None = None
    config: Any = None
    progress: bool = True


def fit(detector: nn.Module, compute_losses: LossFn, train: Sequence[ImageRecord] | DataLoader | MixedLoader,
        val_records: Sequence[ImageRecord], cfg: TrainConfig, *, class_indices: Sequence[int], seed: int = 0,
        report: Reporting = Reporting()) -> dict:
    """Train with ``compute_losses`` and evaluate ``detector``; returns the last evaluation.

    ``train``: records (batched here, in a seeded order) or a ready loader (reverse
    distillation's :class:`MixedLoader`). ``cfg.max_steps`` > 0 trains for exactly that many
    optimizer steps instead of ``cfg.epochs`` epochs (the last epoch cut short): baselines at a
    given compute. The result carries ``train_images`` and ``train_steps``: the images and steps
    actually trained.

    A ``compute_losses`` that is a module (a :class:`Distiller`) is put in train mode each epoch
    and its trainable parameters optimised (its student and FGD align convs, its teacher
    frozen); otherwise the detector's are. Each epoch appends a row (every loss term, images/s,
    and the validation metrics when evaluated) to the report's run (:class:`Reporting`).
    """
    loader = train if isinstance(train, (DataLoader, MixedLoader)) else build_loader(
        train, batch_size=cfg.batch_size, train=True, seed=seed, hflip_prob=cfg.hflip_prob, num_workers=cfg.num_workers)
    steps_per_epoch = max(len(loader), 1)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    epochs = max(math.ceil(total / steps_per_epoch), 1)
    modules = compute_losses if isinstance(compute_losses, nn.Module) else detector
    name, run, progress = report.name, report.run, report.progress
    with on_device(modules, channels_last=cfg.channels_last):
        optimizer = build_optimizer(modules.parameters(), cfg)
        scheduler = build_scheduler(optimizer, cfg, total)
        result, done, images = {}, 0, 0
        for epoch in range(1, epochs + 1):
            if hasattr(loader.dataset, "set_epoch"):  # a MixedLoader's dataset is its presumed part's
                loader.dataset.set_epoch(epoch)
            with backbone_precision(cfg.precision):
                stats = train_one_epoch(modules, compute_losses, Optimization(optimizer, scheduler, cfg.grad_clip), loader,
                                        epoch=epoch, desc=name, progress=progress, max_steps=total - done)
            done += min(total - done, steps_per_epoch)
            images += stats.images
            row = epoch_row(name, epoch, stats, scheduler.get_last_lr()[0])
            if epoch % cfg.eval_every == 0 or epoch == epochs:
                result = evaluate_detector(detector, val_records, class_indices, batch_size=cfg.batch_size * 2,
                                           score_threshold=cfg.score_threshold, num_workers=cfg.num_workers)
                row.update({f"val.{k}": v for k, v in summarize_eval(result).items()})
                (logger.info if progress else logger.debug)("%s epoch %d: val mAP50 %.3f COCO AP %.3f F1 %.3f", name, epoch,
                                                            result["voc"]["mAP"], result["coco"]["AP"], result["prf"]["f1"])
            if run is not None:
                run.log(row)
    if run is not None:
        save_checkpoint(run.checkpoint_path(name), detector, config=report.config, epoch=epochs)
    return {**result, "train_images": images, "train_steps": done}


def train_detector(detector: nn.Module, train_records, val_records, cfg: TrainConfig, **kwargs) -> dict:
    """Direct training of any role on any split: FCOS's task losses only."""
    return fit(detector, compute_task_losses(detector), train_records, val_records, cfg, **kwargs)


def distill(teacher: nn.Module, student: nn.Module, train_records, val_records, cfg: TrainConfig, *,
            loss: KDLoss = KDLoss(), **kwargs) -> dict:
    """Distill A / B / C: FGD on neck features (+ optional class-score distillation) + the
    student's task loss (:class:`KDLoss`). The teacher is frozen. Evaluates the student."""
    return fit(student, Distiller(teacher, student, loss), train_records, val_records, cfg, **kwargs)


RD_CUSTOMER_LOSSES = ("joint", "separate")  # CustomerMix.loss
ALIGN_INITS = ("lstsq", "random")  # RDSettings.align_init


@dataclass(frozen=True)
class CustomerMix:
    """The customer's images in reverse distillation's batches: ``per_batch`` of ``records``
    added to each presumed batch (:class:`MixedLoader`), and how the loss treats them: ``"joint"``,
    one loss over the extended batch; ``"separate"``, the presumed part's loss plus the customer
    part's, each normalised by its own positives as FCOS normalises, so that the presumed part
    weighs in Tutor2's loss exactly as Tutor1's whole batch does in Tutor1's."""

    records: Sequence[ImageRecord] = ()
    per_batch: int = 0
    loss: str = "joint"


class SplitLosses(nn.Module):
    """``distiller``'s losses over a batch's first part and its last ``extra_per_batch`` images
    apart, summed term by term (:class:`CustomerMix`'s ``"separate"``). A module around the
    distiller, so that :func:`fit` trains what the distiller trains."""

    def __init__(self, distiller: nn.Module, extra_per_batch: int):
        super().__init__()
        self.distiller, self.extra_per_batch = distiller, extra_per_batch

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        split = len(images) - self.extra_per_batch
        out = self.distiller(images[:split], targets[:split])
        for k, v in self.distiller(images[split:], targets[split:]).items():
            out[k] = out[k] + v if k in out else v
        return out


@dataclass(frozen=True)
class RDSettings:
    """How reverse distillation trains a tutor copy (:func:`reverse_distill`)."""

    loss: KDLoss = KDLoss()  # alpha * L_RD + beta * L_task: feature_weight = alpha, task_weight = beta
    freeze_backbone: bool = True  # only neck and head move: all that travels
    align_init: str = "lstsq"  # FGD's align convs fitted by least squares on the first batch, or "random"
    mix: CustomerMix = CustomerMix()  # the customer's images in the batches (Tutor2) or none (Tutor1)


def reverse_distill(edge: nn.Module, tutor_copy: nn.Module, train_records, val_records, cfg: TrainConfig,
                    settings: RDSettings = RDSettings(), *, seed: int = 0, **kwargs) -> dict:
    """Reverse distillation: the edge model is the frozen teacher, a copy of the tutor the
    student; loss ``alpha * L_RD + beta * L_task`` with L_RD the FGD loss on neck features
    (plus, when the loss's ``score_weight > 0``, class-score distillation from the edge: an
    ablation). With ``freeze_backbone`` (the default) only the tutor's neck and head move, so the
    delta that travels matches the manufacturer's backbone exactly.

    Batches are ``train_records``' in a seeded order, each extended by ``settings.mix``'s
    customer images (:class:`CustomerMix`): Tutor1 gets none, Tutor2 the customer's images.
    ``align_init="lstsq"`` fits FGD's align convs on the first batch of ``train_records`` (the
    same batch for Tutor1 and Tutor2); ``"random"`` keeps their random initialisation."""
    align_init, mix = settings.align_init, settings.mix
    if align_init not in ALIGN_INITS:
        raise ValueError(f"align_init {align_init!r}: must be 'lstsq' or 'random'")
    if mix.loss not in RD_CUSTOMER_LOSSES:
        raise ValueError(f"customer loss {mix.loss!r}: must be one of {list(RD_CUSTOMER_LOSSES)}")
    distiller = Distiller(edge, tutor_copy, settings.loss, freeze_student_backbone=settings.freeze_backbone)
    primary = build_loader(train_records, batch_size=cfg.batch_size, train=True, seed=seed, hflip_prob=cfg.hflip_prob,
                           num_workers=cfg.num_workers)
    loader = MixedLoader(primary, mix.records, extra_per_batch=mix.per_batch, seed=seed, hflip_prob=cfg.hflip_prob)
    if align_init == "lstsq":
        first = build_loader(list(train_records)[:cfg.batch_size], batch_size=cfg.batch_size, train=False)
        images, _ = next(iter(first))
        with on_device(distiller):
            distiller.fit_align(to_device(images)[0])
    separate = mix.loss == "separate" and loader.extra_per_batch > 0
    losses = SplitLosses(distiller, loader.extra_per_batch) if separate else distiller
    return fit(tutor_copy, losses, loader, val_records, cfg, seed=seed, **kwargs)


def compute_proximal_losses(detector: nn.Module, reference: dict[str, Tensor], mu: float) -> LossFn:
    """FCOS's task losses plus FedProx's proximal term ``mu / 2 * ||w - w_reference||^2`` over
    the trainable parameters (``proximal``; left out when ``mu`` is 0)."""
    task = compute_task_losses(detector)
    anchors = {name: reference[name].detach().clone() for name, p in detector.named_parameters() if p.requires_grad}

    def losses(images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        out = task(images, targets)
        if mu > 0:
            for n, p in detector.named_parameters():  # the anchors follow the model to its device once
                if n in anchors and anchors[n].device != p.device:
                    anchors[n] = anchors[n].to(p.device)
            out["proximal"] = 0.5 * mu * sum((p - anchors[n]).pow(2).sum() for n, p in detector.named_parameters()
                                             if n in anchors)
        return out

    return losses


def finetune(detector: nn.Module, train_records, val_records, cfg: TrainConfig, *, proximal_mu: float = 0.0,
             **kwargs) -> dict:
    """Fine-tune a trained model on new data (local fine-tuning, a FedAvg / FedProx customer's
    step): the task losses, plus the proximal term towards the starting weights when
    ``proximal_mu`` > 0 (FedProx)."""
    start = {k: v.detach().clone() for k, v in detector.state_dict().items()}
    return fit(detector, compute_proximal_losses(detector, start, proximal_mu), train_records, val_records, cfg, **kwargs)

