"""The paper's whole flow for one customer, in one process (docs/design.md section 4): the reference
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

The steps live in their own modules: :mod:`diredi_sim.manufacturer` (1-2, cached),
:mod:`diredi_sim.flow` (3-7), :mod:`diredi_sim.table` (8), :mod:`diredi_sim.stages` (9), over
:mod:`diredi_sim.datasets` and :mod:`diredi_sim.settings`; this module runs them in one process
(:func:`run_pipeline`), as ``diredi-sim paper`` does. The federation runs the same calls on
each side of the boundary (:mod:`diredi_sim.federation`).

Plain torch; never imports flwr or ray.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diredi_sim.config import DataConfig
from diredi_sim.datasets import DataSets
from diredi_sim.flow import BASELINES, Step, count_customer_compute, run_customer, run_manufacturer_step, train_baseline
from diredi_sim.manufacturer import prepare_manufacturer
from diredi_sim.progress import Unit
from diredi_sim.runs import Run, atomic_write_bytes
from diredi_sim.seeds import Seeds
from diredi_sim.settings import ClassSets, PipelineConfig
from diredi_sim.stages import StageRecorder
from diredi_sim.table import evaluate_rows
from diredi_sim.verify import Verdict

logger = logging.getLogger(__name__)


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


def run_pipeline(pipeline: PipelineConfig, data: DataConfig, *, preset: str = "cpu", seed: int = 0, run: Run | None = None,
                 config: Any = None, progress: bool = True, seeds: Seeds | None = None) -> PipelineResult:
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
        logger.warning("the customer's split equals the presumed split; the delta carries nothing new")
    recorder = StageRecorder(run)
    common = dict(run=run, config=config, progress=progress)
    say = logger.info if progress else logger.debug

    with recorder.measure("data") as entry:
        datasets = DataSets(data)
        test = datasets.records(data.test_set, classes.union, pipeline.max_eval_images, pool="customer")
        entry.update(test_images=len(test), folder=str(datasets.folder))
    say(f"data: {datasets.folder}; customer classes {', '.join(classes.customer)} (private: {', '.join(classes.private) or '-'}, "
        f"dropped: {', '.join(classes.dropped) or '-'}); {len(test)} of the customer's test images")

    maker = prepare_manufacturer(pipeline, data, preset=preset, seed=seed, datasets=datasets, recorder=recorder, config=config,
                                 progress=progress)
    tutor, edge = maker.tutor, maker.edge
    models: dict[str, nn.Module] = {"teacher": maker.teacher, "tutor_original": tutor, "edge_original": edge}

    step = Step(pipeline, datasets, pipeline.customer, seeds, recorder=recorder, say=say, **common)
    update = run_customer(tutor, edge, step)
    models.update(tutor1=update.tutor1, tutor2=update.tutor2)
    delta, delta_info = update.delta, update.delta_info
    if run is not None:
        buffer = io.BytesIO()
        torch.save(delta, buffer)
        atomic_write_bytes(run.folder / "delta.pt", buffer.getvalue())

    review = run_manufacturer_step(tutor, edge, delta, step)
    models.update(tutor_updated=review.tutor_prime, **review.edges)
    if review.candidate is not None:
        models["tutor_rejected_candidate"] = review.candidate
    compute = train_baselines(models, update, review, step, preset)
    rows = evaluate_rows(models, test, classes, datasets, pipeline, recorder, say)
    settings = describe_settings(pipeline, preset=preset, seed=seed, classes=classes, test_images=len(test))
    settings.update(customer_seed=seeds.customer, training_images=compute)
    return PipelineResult(rows, review.verdict, delta, delta_info, recorder.stages, classes,
                          {"folder": str(maker.folder), "key": maker.key, "reused": maker.reused}, settings)


def plan_customer(pipeline: PipelineConfig) -> list[Unit]:
    """The stages of one customer's flow (:func:`run_pipeline` after the manufacturer) as progress
    units named by their stage, weighted by their epochs (a baseline at equal compute: the DiReDi
    customer's RD B + RD A + one Distill C; verification and evaluation: one each)."""
    rd, distill_c = pipeline.rd.epochs, pipeline.distill_c.epochs
    units = [Unit("rd_b", "RD B", rd), Unit("rd_a", "RD A", rd), Unit("verify", "verification")]
    for mode in pipeline.distill_c_modes:
        for loss in pipeline.distill_c_losses:
            units.append(Unit(f"distill_c_{mode}" + ("_score" if loss == "fgd+score" else ""), f"Distill C {mode} ({loss})", distill_c))
    for kind in BASELINES:
        epochs = 2 * rd + distill_c if pipeline.equal_compute else getattr(pipeline, kind).epochs
        units.append(Unit(kind, f"{kind} baseline", epochs))
    return units + [Unit("evaluate", "evaluation")]


def train_baselines(models: dict[str, nn.Module], update, review, step: Step, preset: str) -> dict:
    """Step 7: direct training and local fine-tuning at the DiReDi customer's image count (when
    ``pipeline.equal_compute``), added to ``models``; returns the image counts of every method."""
    compute = count_customer_compute(update, review, step.pipeline)
    compute["baselines"] = {}
    for kind in BASELINES:
        models[f"edge_{kind}"], compute["baselines"][f"edge_{kind}"] = train_baseline(
            kind, models["edge_original"], step, preset=preset,
            budget_images=compute["diredi"] if step.pipeline.equal_compute else None)
    step.say("training images per method (image-steps): DiReDi customer " + f"{compute['diredi']} (" +
             ", ".join(f"{k} {v}" for k, v in compute["parts"].items()) + "); " +
             ", ".join(f"{k} {v}" for k, v in compute["baselines"].items()))
    return compute


def describe_settings(pipeline: PipelineConfig, *, preset: str, seed: int, classes: ClassSets, test_images: int) -> dict:
    """The settings worth reporting beside a table."""
    return {
        "preset": preset, "seed": seed, "customer": list(classes.customer), "alpha": pipeline.alpha, "beta": pipeline.beta,
        "freeze_backbone": pipeline.freeze_backbone, "gamma": pipeline.gamma, "delta_weight": pipeline.delta_weight,
        "distill_c_score_weight": pipeline.distill_c_score_weight, "distill_c_temperature": pipeline.distill_c_temperature,
        "distill_c_modes": list(pipeline.distill_c_modes), "verify": asdict(pipeline.verify),
        "score_threshold": pipeline.score_threshold, "test_images": test_images,
        "epochs": {s: getattr(pipeline, s).epochs for s in ("teacher", "distill_a", "distill_b", "rd", "distill_c", "direct", "local")},
        "rd_customer_per_batch": pipeline.rd_customer_per_batch, "rd_score_weight": pipeline.rd_score_weight,
        "rd_response_weight": pipeline.rd_response_weight,
        "rd_align": pipeline.rd_align, "rd_align_init": pipeline.rd_align_init, "rd_customer_loss": pipeline.rd_customer_loss,
        "distill_c_losses": list(pipeline.distill_c_losses),
    }
