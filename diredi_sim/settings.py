"""The pipeline's settings (:class:`PipelineConfig`: every stage's training settings and
loss weights, verification, the Distill C modes) and a customer's class sets (:class:`ClassSets`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


from diredi_sim.config import ConfigError, TrainConfig, WeightsConfig
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import resolve_split
from diredi_sim.losses import FGDConfig
from diredi_sim.train import ALIGN_INITS, RD_CUSTOMER_LOSSES
from diredi_sim.verify import VerifyConfig


DISTILL_C_MODES = ("public", "public+private")
DISTILL_C_LOSSES = ("fgd", "fgd+score")
RD_ALIGNS = {"student": "student", "edge": "teacher"}  # pipeline.rd_align -> the FGD align side (the edge is RD's teacher)

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
    distill_b: TrainConfig = field(default_factory=TrainConfig)  # tutor -> edge, the tutor of Distill A as teacher (paper: 100 epochs, batch 16)
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
    rd_score_weight: float = 0.0  # RD: class-score distillation from the edge on the presumed classes (ablation; 0: FGD only, as the paper)
    rd_response_weight: float = 0.0  # RD: box + centre-ness distillation from the edge, weighted by its presumed-class scores (ablation)
    # RD: FGD's 1x1 align conv maps the tutor copy's features into the edge's channels ("student", FGD's
    # own) or the edge's features into the tutor's ("edge"): the tutor's neck must then be an affine image
    # of the edge's features. Measured (bench/RESULTS.md): no difference with the backbone frozen; with
    # freeze_backbone = false, "edge" moves Tutor1 towards the edge and keeps more of the delta.
    rd_align: str = "student"
    rd_align_init: str = "lstsq"  # RD: FGD's align convs fitted by least squares on the first batch, or "random"
    # RD A's loss over a batch extended by the customer's images: "joint", one loss over the whole batch
    # (FCOS normalises by the batch's positives, so the presumed part weighs less than in Tutor1's batch);
    # "separate", the presumed part's loss (Tutor1's, term for term) plus the customer part's.
    rd_customer_loss: str = "joint"
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
    weights: WeightsConfig = field(default_factory=WeightsConfig)  # starting weights: the teacher's, Distill A's tutor, Distill B's and the direct baseline's edge
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
                    "distill_c_feature_weight", "distill_c_task_weight", "distill_c_score_weight", "rd_score_weight",
                    "rd_response_weight"):
            check(math.isfinite(getattr(self, key)) and getattr(self, key) >= 0, key, "must be finite and >= 0")
        check(self.rd_customer_per_batch >= 0, "rd_customer_per_batch", "must be >= 0")
        check(self.rd_align in RD_ALIGNS, "rd_align", f"must be one of {list(RD_ALIGNS)}")
        check(self.rd_align_init in ALIGN_INITS, "rd_align_init", "must be 'lstsq' or 'random'")
        check(self.rd_customer_loss in RD_CUSTOMER_LOSSES, "rd_customer_loss", f"must be one of {list(RD_CUSTOMER_LOSSES)}")
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
