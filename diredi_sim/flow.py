"""The paper's Fig. 2 as calls (docs/design.md section 4): the customer's update (:func:`run_customer`:
RD B, RD A, the delta), the manufacturer's review of it (:func:`review_update`), Distill C
(:func:`redistill`, at the manufacturer or at the customer), both manufacturer steps in one process
(:func:`run_manufacturer_step`), and the customer-side baselines (:func:`train_baseline`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import resolve_split
from diredi_sim.data.voc import ImageRecord
from diredi_sim.datasets import CustomerData, DataSets, select_customer_data
from diredi_sim.deltas import apply_delta, compute_delta, compute_norm, count_bytes
from diredi_sim.models import build_detector
from diredi_sim.runs import Run
from diredi_sim.seeds import Seeds
from diredi_sim.settings import RD_ALIGNS, ClassSets, PipelineConfig
from diredi_sim.stages import StageRecorder
from diredi_sim.table import distill_c_row
from diredi_sim.train import (CustomerMix, KDLoss, RDSettings, Reporting, distill, evaluate_detector, finetune, reverse_distill,
                              train_detector)
from diredi_sim.verify import Verdict, verify_update


def copy_for_training(detector: nn.Module) -> nn.Module:
    """A deep copy that can be trained: a Distiller freezes the teacher it is given (no
    gradients, eval mode), and a copy of a frozen model would inherit that."""
    return copy.deepcopy(detector).requires_grad_(True).train()


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


@dataclass
class Step:
    """What the calls of one customer's flow share, handed whole: the settings, the data (the
    side's :class:`DataSets`), the customer's classes and seeds, its share of its split's images,
    and where results go (stage times, run folder, progress)."""

    pipeline: PipelineConfig
    datasets: DataSets
    customer: Sequence[str] | str  # the customer's split: a preset name or class names
    seeds: Seeds
    recorder: StageRecorder | None = None  # None: a new one, writing to ``run``
    share: Callable[[list[ImageRecord]], list[ImageRecord]] = lambda records: records
    say: Callable[[str], None] = lambda text: None
    run: Run | None = None
    config: Any = None  # embedded in checkpoints
    progress: bool = True

    def __post_init__(self):
        self.recorder = self.recorder or StageRecorder(self.run)

    def report(self, name: str) -> Reporting:
        """Where a training call of this step reports, under ``name``."""
        return Reporting(name, self.run, self.config, self.progress)

    def classes(self, mode: str) -> tuple[str, ...]:
        """The classes a model is validated on in Distill C data ``mode``: the presumed ones
        (``public``) or the customer's (``public+private``)."""
        return resolve_split(self.pipeline.presumed_split if mode == "public" else self.customer)


def run_customer(tutor: nn.Module, edge: nn.Module, step: Step) -> CustomerUpdate:
    """The customer's side (steps 3-4): RD B and RD A from copies of ``tutor`` with ``edge`` as
    the frozen teacher, then the delta, on ``step``'s data with its seeds.

    Tutor1 (RD B) trains on the presumed images; Tutor2 (RD A) on the same presumed batches, in
    the same order with the same flips, the boxes of the dropped classes removed, each batch
    extended by ``rd_customer_per_batch`` of the customer's own images. Both start from the same
    weights and seed and take the same optimizer steps on the same schedule: they differ by the
    customer's data only, which is what the delta carries."""
    pipeline, recorder, seeds = step.pipeline, step.recorder, step.seeds
    cfg = pipeline.rd
    data = select_customer_data(step.datasets, pipeline, step.customer, cfg, step.share)
    presumed_classes = ClassSets.indices(resolve_split(pipeline.presumed_split))
    # the score and response terms over the classes the edge was trained on: it scores the rest as background
    rd_loss = KDLoss(feature_weight=pipeline.alpha, task_weight=pipeline.beta, score_weight=pipeline.rd_score_weight,
                     fgd=pipeline.fgd, response_weight=pipeline.rd_response_weight, classes=tuple(presumed_classes),
                     align=RD_ALIGNS[pipeline.rd_align])
    plans = (("tutor1", "rd_b", data.presumed, (), 0, data.presumed_val, presumed_classes),
             ("tutor2", "rd_a", data.presumed_kept, data.own, pipeline.rd_customer_per_batch, data.own_val,
              ClassSets.indices(resolve_split(step.customer))))
    trained, counts = {}, {}
    for key, stage, presumed, own, per_batch, val, classes in plans:
        with recorder.measure(stage, presumed_images=len(presumed), own_images=len(own), epochs=cfg.epochs) as entry:
            torch.manual_seed(seeds("rd"))
            student = copy_for_training(tutor)
            settings = RDSettings(rd_loss, pipeline.freeze_backbone, pipeline.rd_align_init,
                                  CustomerMix(own, per_batch, pipeline.rd_customer_loss))
            result = reverse_distill(edge, student, presumed, val, cfg, settings, class_indices=classes, seed=seeds("rd"),
                                     report=step.report(f"{key}_{stage}"))
            entry.update(train_images=result["train_images"], train_steps=result["train_steps"])
        counts[stage] = result["train_images"]
        trained[key] = student
    with recorder.measure("delta") as entry:
        delta = compute_delta(trained["tutor2"].state_dict(), trained["tutor1"].state_dict(), pipeline.gamma)
        delta_info = describe_delta(delta, pipeline.gamma)
        entry.update({k: delta_info[k] for k in ("bytes_fp32", "bytes_fp16")})
    step.say(f"delta: {delta_info['tensors']} neck/head tensors, {delta_info['values']} values, norm {delta_info['norm']:.4g}, "
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


def redistill(tutor_prime: nn.Module, edge: nn.Module, train: list[ImageRecord], val: list[ImageRecord], step: Step, *,
              mode: str, loss: str) -> tuple[nn.Module, int]:
    """Step 6, Distill C: tutor' -> a new edge model, starting from the weights of ``edge``, on
    ``train`` (validated on ``val``, AP over :meth:`Step.classes` of ``mode``). As the paper: FGD
    at its attention temperature (``distill_c_temperature``, the paper's 1.5) + the edge's task
    loss; ``loss = "fgd+score"`` adds class-score distillation from tutor' (an ablation); ``mode``
    names the data mode (the row is :func:`distill_c_row`). Returns the new edge model and the
    images it trained on. The same call runs at the manufacturer (public mode) and at the
    customer (public+private mode)."""
    pipeline, seed = step.pipeline, step.seeds("distill_c")
    cfg = pipeline.distill_c
    fgd = replace(pipeline.fgd, temperature=pipeline.distill_c_temperature)
    score_weight = pipeline.distill_c_score_weight if loss == "fgd+score" else 0.0
    key, stage = distill_c_row(mode, loss), f"distill_c_{mode}" + ("_score" if loss == "fgd+score" else "")
    with step.recorder.measure(stage, epochs=cfg.epochs, score_weight=score_weight, temperature=pipeline.distill_c_temperature) as entry:
        torch.manual_seed(seed)
        student = copy_for_training(edge)
        kd = KDLoss(pipeline.distill_c_feature_weight, pipeline.distill_c_task_weight, score_weight, pipeline.distill_c_temperature, fgd)
        result = distill(copy.deepcopy(tutor_prime), student, train, val, cfg, loss=kd, class_indices=ClassSets.indices(step.classes(mode)),
                         seed=seed, report=step.report(key))
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


def run_manufacturer_step(tutor: nn.Module, edge: nn.Module, delta: dict[str, Tensor], step: Step, *,
                          distill_rejected: bool = True) -> ManufacturerStep:
    """Steps 5 and 6 in one process (the ``paper`` flow): :func:`review_update`, then
    :func:`redistill` per data mode and loss. The public+private mode reads the customer's data:
    in the federation it runs at the customer instead (``clients/``), and this function is not
    used there. With ``distill_rejected`` False a rejected update gets no Distill C (the customer
    keeps its edge model); True distils from the unchanged tutor anyway."""
    pipeline = step.pipeline
    verdict, tutor_prime, candidate = review_update(tutor, delta, pipeline, step.datasets, recorder=step.recorder, say=step.say)
    edges, counts = {}, {}
    data = select_customer_data(step.datasets, pipeline, step.customer, pipeline.distill_c, step.share)
    for mode in (pipeline.distill_c_modes if verdict.accepted or distill_rejected else ()):
        train, val = distill_c_training_data(data, mode)
        for loss in pipeline.distill_c_losses:
            key = distill_c_row(mode, loss)
            edges[key], counts[key] = redistill(tutor_prime, edge, train, val, step, mode=mode, loss=loss)
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


def train_baseline(kind: str, edge: nn.Module, step: Step, *, preset: str, budget_images: int | None) -> tuple[nn.Module, int]:
    """A customer-side baseline on the customer's whole data (the presumed images without its
    dropped classes' boxes + its own): ``direct``, a fresh edge model trained from scratch
    (``pipeline.direct``; ``edge`` is not used), or ``local``, a copy of the deployed ``edge``
    fine-tuned (``pipeline.local``). With ``budget_images`` it trains on that many images (as
    many optimizer steps as fill it at its batch size, the last batch counted whole), else for
    its configured epochs. Returns the model and the images it actually trained on."""
    if kind not in BASELINES:
        raise ValueError(f"baseline {kind!r}: must be one of {list(BASELINES)}")
    cfg = step.pipeline.direct if kind == "direct" else step.pipeline.local
    data = select_customer_data(step.datasets, step.pipeline, step.customer, cfg, step.share)
    if budget_images:
        cfg = replace(cfg, max_steps=math.ceil(budget_images / cfg.batch_size))
    settings = dict(class_indices=ClassSets.indices(resolve_split(step.customer)), seed=step.seeds(kind),
                    report=step.report(f"edge_{kind}"))
    with step.recorder.measure(kind, epochs=cfg.epochs, budget_images=budget_images) as entry:
        torch.manual_seed(step.seeds(kind))
        if kind == "direct":
            student = build_detector("edge", preset, num_classes=len(VOC_CLASSES), weights=step.pipeline.weights.edge)
            result = train_detector(student, data.combined, data.own_val, cfg, **settings)
        else:
            student = copy_for_training(edge)
            result = finetune(student, data.combined, data.own_val, cfg, **settings)
        entry.update(train_images=result["train_images"], train_steps=result["train_steps"])
    return student, result["train_images"]
