"""Many customers, one manufacturer: the work of each side, in plain torch (docs/design.md
sections 4 and 7). ``clients/`` and ``server/`` wrap these in Flower's ClientApp and ServerApp;
nothing here imports flwr or ray. The federation's config is :mod:`diredi_sim.federation_config`,
its customers :mod:`diredi_sim.population`.

- :func:`customer_work`: the customer's step (RD B, RD A, delta) on its own data;
  :func:`privatize_delta`: local differential privacy on that delta, when configured.
- The two sides' work after a delta came up, each on its own data (plain arguments in, plain
  results out, so that the server can run them in worker processes): the manufacturer's
  :func:`manufacturer_review` (verification, Distill C public, its half of each table row) and
  :func:`review_edge` (its check of an edge a customer distilled); the customer's
  :func:`customer_redistill` (Distill C public+private) and :func:`customer_evaluate` (its half
  of each row, as scalars); :func:`combine_round` joins the halves, and
  :func:`round_in_one_process` runs them all in one process (benches, tests).
- :func:`merge_accepted`: the accepted deltas merged into the shared tutor by the configured
  rule, itself verified before it replaces the tutor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor, nn

from diredi_sim.compute import configure_process
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import resolve_split
from diredi_sim.datasets import DataSets, select_customer_data
from diredi_sim.federation_config import FederationConfig
from diredi_sim.deltas import check_delta, compute_norm, count_state_bytes, merge_deltas, privatize
from diredi_sim.flow import Step, distill_c_training_data, redistill, review_update, run_customer
from diredi_sim.logs import customer_tag
from diredi_sim.models import build_detector
from diredi_sim.population import Customer, pick_share
from diredi_sim.runs import to_jsonable
from diredi_sim.settings import ClassSets, PipelineConfig
from diredi_sim.stages import StageRecorder
from diredi_sim.table import (assemble_rows, compute_knowledge, distill_c_row, evaluate_row, measure_on_customer, measure_on_manufacturer)
from diredi_sim.train import Reporting, evaluate_detector, finetune
from diredi_sim.verify import Verdict, verify_model, verify_update

logger = logging.getLogger(__name__)


def effective_pipeline(config: FederationConfig, customer: Customer) -> PipelineConfig:
    """The pipeline settings for one customer: its split, and verification that does not hold
    against it the presumed classes it drops on purpose (it declares its classes, not its data)."""
    classes = customer.class_sets(config.pipeline)
    critical = config.pipeline.verify.critical_classes or classes.presumed
    verify = replace(config.pipeline.verify, critical_classes=tuple(c for c in critical if c not in classes.dropped))
    return replace(config.pipeline, customer=customer.classes, verify=verify)


# ------------------------------------------------------------------------------------- work


def load_model(role: str, preset: str, state: dict[str, Tensor]) -> nn.Module:
    model = build_detector(role, preset, num_classes=len(VOC_CLASSES))
    model.load_state_dict(state)
    return model


def customer_step(config: FederationConfig, customer: Customer, num_customers: int, datasets: DataSets, **settings) -> Step:
    """The :class:`diredi_sim.flow.Step` of one customer's calls in the federation: its settings
    (verification sparing the classes it drops), its classes, seeds and share of the images;
    ``datasets`` is the side's view (the manufacturer's refuses the customers' pool). No progress
    bars (many customers at once)."""
    return Step(effective_pipeline(config, customer), datasets, customer.classes, config.seeds(customer.partition_id),
                share=pick_share(config.population, customer.partition_id, num_customers), progress=False, **settings)


def customer_work(config: FederationConfig, customer: Customer, num_customers: int, tutor_state: dict[str, Tensor],
                  edge_state: dict[str, Tensor], *, datasets: DataSets | None = None, progress: bool = False) -> dict:
    """The customer's step on its own data: RD B, RD A, the delta. Returns the delta (float32,
    neck + head, by name) and scalar metrics only: nothing per image leaves this function."""
    with customer_tag(customer.partition_id, customer.name):  # wherever it runs, its log lines name the customer
        start = time.perf_counter()
        say = logger.info if progress else logger.debug
        datasets = datasets or DataSets(config.data)
        pipeline = effective_pipeline(config, customer)
        tutor, edge = load_model("tutor", config.preset, tutor_state), load_model("edge", config.preset, edge_state)
        recorder = StageRecorder()
        say(f"RD B (presumed data) and RD A ({', '.join(customer.classes)}), {pipeline.rd.epochs} epoch(s) each")
        update = run_customer(tutor, edge, customer_step(config, customer, num_customers, datasets, recorder=recorder, say=say))
        metrics = {
            "partition-id": customer.partition_id,
            "num-examples": update.train_images["rd_a"],
            "rd-b-images": update.train_images["rd_b"],
            "delta-norm": update.delta_info["norm"],
            "delta-bytes-fp32": update.delta_info["bytes_fp32"],
            "delta-bytes-fp16": update.delta_info["bytes_fp16"],
            "seconds": round(time.perf_counter() - start, 3),
        }
        for stage in recorder.stages:
            metrics[f"{stage['stage'].replace('_', '-')}-seconds"] = stage["seconds"]
        say(f"done in {metrics['seconds']:.0f} s (RD B {metrics.get('rd-b-seconds', 0):.0f} s, RD A {metrics.get('rd-a-seconds', 0):.0f} s)")
        return {"delta": {k: v.detach().float().contiguous() for k, v in update.delta.items()}, "metrics": metrics}


def privatize_delta(config: FederationConfig, partition_id: int, delta: dict[str, Tensor],
                    server_round: int = 1) -> dict[str, Tensor]:
    """The customer's delta as it goes up under simulation.dp_clip_norm / dp_noise_multiplier
    (unchanged when dp_clip_norm is 0): clipped, plus noise seeded by the customer and round."""
    sim = config.simulation
    return privatize(delta, sim.dp_clip_norm, sim.dp_noise_multiplier, seed=config.seeds(partition_id)("dp", server_round))


# The manufacturer's side works on DataSets.manufacturer(config.data): its public pool only (a
# PrivacyError otherwise). The customer's side works on DataSets(config.data): the presumed
# images the manufacturer ships, and its own.

def _as_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def manufacturer_review(config: FederationConfig, customer: Customer, tutor_state: dict[str, Tensor],
                        edge_state: dict[str, Tensor], delta: dict[str, Tensor], threads: int = 0) -> dict:
    """The manufacturer's step for one customer's delta, on its own data only: substitution and
    verification (:func:`review_update`), Distill C ``public`` from tutor' (when configured, and
    the update accepted or ``simulation.distill_rejected``), and the manufacturer's half of each
    table row (presumed-class mAP on its test images). Plain arguments in, plain results out
    (state dicts, JSON-able values), so that it can run in a worker process."""
    configure_process(device=config.device, threads=threads)
    start = time.perf_counter()
    datasets = DataSets.manufacturer(config.data)
    pipeline = effective_pipeline(config, customer)
    classes = customer.class_sets(config.pipeline)
    tutor, edge = load_model("tutor", config.preset, tutor_state), load_model("edge", config.preset, edge_state)
    step = customer_step(config, customer, 1, datasets)  # the manufacturer never takes a share of the customers' pool
    recorder = step.recorder
    verdict, tutor_prime, candidate = review_update(tutor, delta, pipeline, datasets, recorder=recorder)
    models = {"tutor_original": tutor, "tutor_updated": tutor_prime, "edge_original": edge}
    if candidate is not None:
        models["tutor_rejected_candidate"] = candidate
    counts = {}
    if "public" in pipeline.distill_c_modes and (verdict.accepted or config.simulation.distill_rejected):
        presumed = resolve_split(pipeline.presumed_split)
        train, val = datasets.train(presumed, pipeline.distill_c, pool="public"), datasets.val(presumed, pipeline.distill_c, pool="public")
        for loss in pipeline.distill_c_losses:
            key = distill_c_row("public", loss)
            models[key], counts[key] = redistill(tutor_prime, edge, train, val, step, mode="public", loss=loss)
    with recorder.measure("evaluate_manufacturer"):
        halves = {key: measure_on_manufacturer(key, model, classes, datasets, pipeline) for key, model in models.items()}
    return {
        "partition_id": customer.partition_id,
        "verdict": verdict_to_dict(verdict),
        "tutor_prime": _as_state(tutor_prime),
        "candidate": _as_state(candidate) if candidate is not None else None,
        "edges": {key: _as_state(model) for key, model in models.items() if key.startswith("edge_distill_c")},
        "manufacturer_rows": to_jsonable(halves),
        "train_images": counts,
        "stages": recorder.stages,
        "seconds": round(time.perf_counter() - start, 3),
    }


def customer_redistill(config: FederationConfig, customer: Customer, num_customers: int, tutor_state: dict[str, Tensor],
                       edge_state: dict[str, Tensor], *, datasets: DataSets | None = None) -> dict:
    """Distill C ``public+private`` at the customer, on its whole data (the shipped presumed
    images without its dropped classes' boxes, and its own): tutor' (``tutor_state``, sent down
    by the manufacturer) -> a new edge model from ``edge_state``, per configured loss. Returns
    the new edge models by row key and scalar metrics; nothing per image leaves."""
    start = time.perf_counter()
    datasets = datasets or DataSets(config.data)
    pipeline = effective_pipeline(config, customer)
    tutor, edge = load_model("tutor", config.preset, tutor_state), load_model("edge", config.preset, edge_state)
    step = customer_step(config, customer, num_customers, datasets)
    train, val = distill_c_training_data(select_customer_data(datasets, pipeline, customer.classes, pipeline.distill_c, step.share),
                                         "public+private")
    edges, metrics = {}, {"partition-id": customer.partition_id}
    for loss in pipeline.distill_c_losses:
        key = distill_c_row("public+private", loss)
        student, images = redistill(tutor, edge, train, val, step, mode="public+private", loss=loss)
        edges[key] = _as_state(student)
        metrics[f"{key}/train-images"] = images
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return {"edges": edges, "metrics": metrics}


def review_edge(config: FederationConfig, customer: Customer, current_state: dict[str, Tensor],
                candidate_state: dict[str, Tensor], threads: int = 0) -> dict:
    """The manufacturer's check of an edge model a customer distilled, before it is deployed
    (nothing deploys unchecked): :func:`verify_model` against the edge the customer runs now, on
    the manufacturer's held-out presumed images, with the customer's verification settings.
    Also the manufacturer's half of the edge's table row."""
    configure_process(device=config.device, threads=threads)
    datasets = DataSets.manufacturer(config.data)
    pipeline = effective_pipeline(config, customer)
    presumed = ClassSets.indices(resolve_split(pipeline.presumed_split))
    records = datasets.records(config.data.val_set, pipeline.presumed_split, pipeline.max_eval_images, pool="public")

    def evaluate_presumed(model: nn.Module) -> dict:
        return evaluate_detector(model, records, presumed, batch_size=pipeline.eval_batch_size, score_threshold=pipeline.score_threshold)

    verdict, candidate = verify_model(load_model("edge", config.preset, current_state), candidate_state, evaluate_presumed,
                                      pipeline.verify)
    half = measure_on_manufacturer("edge", candidate, customer.class_sets(config.pipeline), datasets, pipeline) \
        if candidate is not None else {}
    return {"verdict": verdict_to_dict(verdict), "manufacturer_row": to_jsonable(half)}


def customer_evaluate(config: FederationConfig, customer: Customer, models: dict[str, dict[str, Tensor]],
                      *, datasets: DataSets | None = None) -> dict[str, float]:
    """The customer's half of each table row, on its own test images: the models it was sent
    (row key -> state; the role from the key) evaluated, as flat scalars
    (:func:`rows_to_metrics`): what goes up in the evaluate reply."""
    datasets = datasets or DataSets(config.data)
    classes = customer.class_sets(config.pipeline)
    test = datasets.records(config.data.test_set, classes.union, config.pipeline.max_eval_images, pool="customer")
    rows = {}
    for key, state in models.items():
        role = "tutor" if key.startswith("tutor") else "edge"
        rows[key] = measure_on_customer(load_model(role, config.preset, state), test, classes, config.pipeline)
        rows[key]["test_images"] = len(test)
    return rows_to_metrics(rows)


_ROW_SCALARS = ("mAP", "mAP_voc07", "coco_AP", "precision", "recall", "f1", "tp", "fp", "fn", "private_ap", "dropped_ap",
                "test_images")


def rows_to_metrics(rows: dict[str, dict]) -> dict[str, float]:
    """Rows as flat scalars (``<row>/<measure>``, ``<row>/ap/<class>``, ``<row>/num_gt/<class>``),
    a MetricRecord's content. None (no such class) is left out."""
    flat = {}
    for key, row in rows.items():
        for measure in _ROW_SCALARS:
            if row.get(measure) is not None:
                flat[f"{key}/{measure}"] = row[measure]
        for name, ap in row["per_class"].items():
            flat[f"{key}/ap/{name}"] = float(ap)
        for name, count in row["num_gt"].items():
            flat[f"{key}/num_gt/{name}"] = int(count)
    return flat


def rows_from_metrics(metrics: dict[str, Any]) -> dict[str, dict]:
    """Inverse of :func:`rows_to_metrics`; ValueError names a key it cannot place."""
    rows: dict[str, dict] = {}
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) == 2 and parts[1] in _ROW_SCALARS:
            rows.setdefault(parts[0], {"per_class": {}, "num_gt": {}})[parts[1]] = value
        elif len(parts) == 3 and parts[1] in ("ap", "num_gt") and parts[2] in VOC_CLASSES:
            rows.setdefault(parts[0], {"per_class": {}, "num_gt": {}})["per_class" if parts[1] == "ap" else "num_gt"][parts[2]] = value
        elif name not in ("partition-id", "server-round", "seconds", "num-examples"):
            raise ValueError(f"evaluate reply: unexpected metric {name!r}")
    for row in rows.values():
        for measure in ("private_ap", "dropped_ap"):
            row.setdefault(measure, None)
    return rows


def combine_round(config: FederationConfig, customer: Customer, review: dict, customer_rows: dict[str, dict],
                  customer_edges: dict[str, dict]) -> dict:
    """One customer's round from both sides' halves: ``review`` (:func:`manufacturer_review`),
    ``customer_rows`` (:func:`rows_from_metrics` of its evaluate reply) and ``customer_edges``
    (row key -> :func:`review_edge`'s result for each edge the customer distilled). Returns the
    verdict, the table rows, the edge models that may be deployed per data mode (the tutor's
    update accepted, and a customer's edge also passing its check) and the stages."""
    classes = customer.class_sets(config.pipeline)
    halves = {**review["manufacturer_rows"], **{k: v["manufacturer_row"] for k, v in customer_edges.items()}}
    measured = {key: {**row, **halves.get(key, {})} for key, row in customer_rows.items()}
    rows = assemble_rows(measured, classes)
    deployable = {}
    if review["verdict"]["accepted"]:
        loss = config.pipeline.distill_c_losses[0]
        public_key, private_key = distill_c_row("public", loss), distill_c_row("public+private", loss)
        if public_key in review["edges"]:
            deployable["public"] = review["edges"][public_key]
        if private_key in customer_edges and customer_edges[private_key]["verdict"]["accepted"]:
            deployable["public+private"] = customer_edges[private_key]["state"]
    verdict = dict(review["verdict"])
    verdict["edge_checks"] = {k: v["verdict"] for k, v in customer_edges.items()}
    train_images = {**review.get("train_images", {}), **{k: v["train_images"] for k, v in customer_edges.items() if "train_images" in v}}
    return {"partition_id": customer.partition_id, "verdict": verdict, "rows": to_jsonable(rows), "edges": deployable,
            "stages": review["stages"], "seconds": review["seconds"], "train_images": train_images}


def round_in_one_process(config: FederationConfig, customer: Customer, num_customers: int, tutor_state: dict[str, Tensor],
                         edge_state: dict[str, Tensor], delta: dict[str, Tensor]) -> dict:
    """Everything after the customer's delta, both sides in this process, in the federation's
    order: the manufacturer's review, the customer's Distill C and its check, the customer's
    evaluation, combined (:func:`combine_round`). For benches and tests; the Flower strategy
    runs the same calls on each side of the boundary."""
    review = manufacturer_review(config, customer, tutor_state, edge_state, delta)
    models = evaluation_models(tutor_state, edge_state, review)
    customer_edges = {}
    if "public+private" in config.pipeline.distill_c_modes and (review["verdict"]["accepted"] or config.simulation.distill_rejected):
        made = customer_redistill(config, customer, num_customers, review["tutor_prime"], edge_state)
        for key, state in made["edges"].items():
            customer_edges[key] = {**review_edge(config, customer, edge_state, state), "state": state,
                                   "train_images": made["metrics"][f"{key}/train-images"]}
            models[key] = state
    rows = rows_from_metrics(customer_evaluate(config, customer, models))
    return combine_round(config, customer, review, rows, customer_edges)


def evaluation_models(tutor_state: dict[str, Tensor], edge_state: dict[str, Tensor], review: dict) -> dict[str, dict]:
    """The models of a customer's evaluate message (row key -> state), as far as the
    manufacturer made them: the round's tutor, tutor', the rejected candidate, the edge the
    customer ran, and Distill C public's edges. The customer adds its own Distill C edges."""
    models = {"tutor_original": tutor_state, "tutor_updated": review["tutor_prime"], "edge_original": edge_state}
    if review["candidate"] is not None:
        models["tutor_rejected_candidate"] = review["candidate"]
    models.update(review["edges"])
    return models


def baseline_customer_work(config: FederationConfig, customer: Customer, num_customers: int, edge_state: dict[str, Tensor],
                           *, proximal_mu: float = 0.0, datasets: DataSets | None = None) -> dict:
    """A FedAvg / FedProx customer's step: fine-tune the edge model on
    the customer's whole data (the shipped presumed images without its dropped classes' boxes,
    and its own images), with FedProx's proximal term when
    ``proximal_mu`` > 0. Returns the whole edge model (what FedAvg sends up) and scalar metrics."""
    start = time.perf_counter()
    datasets = datasets or DataSets(config.data)
    cfg = config.baselines.local
    pick = pick_share(config.population, customer.partition_id, num_customers)
    edge = load_model("edge", config.preset, edge_state)
    data = select_customer_data(datasets, config.pipeline, customer.classes, cfg, pick)
    train = data.combined
    seed = config.seeds(customer.partition_id)("fedavg")
    torch.manual_seed(seed)
    finetune(edge, train, data.own_val, cfg, class_indices=ClassSets.indices(customer.classes),
             proximal_mu=proximal_mu, seed=seed, report=Reporting(f"edge_customer{customer.partition_id}", progress=False))
    state = {k: v.detach().clone() for k, v in edge.state_dict().items()}
    return {"arrays": state, "metrics": {"partition-id": customer.partition_id, "num-examples": len(train),
                                         "seconds": round(time.perf_counter() - start, 3)}}


def evaluate_for_customer(config: FederationConfig, customer: Customer, edge: nn.Module,
                          reference: dict[str, float] | None = None, datasets: DataSets | None = None) -> dict:
    """One edge model on the customer's test images: mAP / P / R / F1 over its classes, per-class
    AP of its classes and the presumed ones, and gain / forgetting against ``reference``
    (per-class AP of the original edge) when given."""
    datasets = datasets or DataSets(config.data)
    classes = customer.class_sets(config.pipeline)
    pipeline = config.pipeline
    test = datasets.records(config.data.test_set, classes.union, pipeline.max_eval_images, pool="customer")
    row = evaluate_row(edge, test, classes.customer, classes.union, batch_size=pipeline.eval_batch_size,
                       score_threshold=pipeline.score_threshold)
    if reference is not None:
        row.update(compute_knowledge(row["per_class"], reference, classes))
    return to_jsonable(row)


def verdict_to_dict(verdict: Verdict) -> dict:
    return to_jsonable(asdict(verdict))


def merge_accepted(config: FederationConfig, tutor: nn.Module, deltas: Sequence[dict[str, Tensor]],
                   weights: Sequence[float], datasets: DataSets | None = None) -> tuple[dict[str, Tensor] | None, dict]:
    """Merge the accepted deltas by the configured rule and verify the shared tutor they make
    against every critical class (no customer's dropped classes spared: the shared tutor serves
    them all). Returns (the new tutor state or None when it stays, a report)."""
    sim = config.simulation
    if not deltas:
        return None, {"merged": 0, "accepted": False, "reasons": ["no accepted delta this round"]}
    merged = merge_deltas(list(deltas), sim.merge, weights=list(weights) if sim.merge == "mean" else None,
                          max_norm=sim.clip_norm or None, trim_fraction=sim.trim_fraction)
    datasets = datasets or DataSets.manufacturer(config.data)
    pipeline = config.pipeline
    presumed = ClassSets.indices(resolve_split(pipeline.presumed_split))
    records = datasets.records(config.data.val_set, pipeline.presumed_split, pipeline.max_eval_images, pool="public")

    def evaluate_presumed(model: nn.Module) -> dict:
        return evaluate_detector(model, records, presumed, batch_size=pipeline.eval_batch_size,
                                 score_threshold=pipeline.score_threshold)

    verdict, state = verify_update(tutor, merged, evaluate_presumed, pipeline.verify, weight=pipeline.delta_weight)
    report = {"merged": len(deltas), "rule": sim.merge, "norm": compute_norm(merged), **verdict_to_dict(verdict)}
    return (state if verdict.accepted else None), report


def merge_round(config: FederationConfig, tutor_state: dict[str, Tensor], deltas: Sequence[dict[str, Tensor]],
                weights: Sequence[float], threads: int = 0) -> tuple[dict[str, Tensor] | None, dict]:
    """:func:`merge_accepted` on plain arguments (the shared tutor's state), for a worker process."""
    configure_process(device=config.device, threads=threads)
    return merge_accepted(config, load_model("tutor", config.preset, tutor_state), deltas, weights)


def reply_problems(delta: dict[str, Tensor], tutor_state: dict[str, Tensor]) -> list[str]:
    """Why a customer's delta cannot even be verified (keys, shapes, dtypes, values); [] if it can."""
    return check_delta(delta, tutor_state)


__all__ = [
    "effective_pipeline", "customer_work", "privatize_delta", "manufacturer_review", "merge_accepted",
    "customer_redistill", "review_edge", "customer_evaluate", "rows_to_metrics", "rows_from_metrics", "combine_round",
    "round_in_one_process", "evaluation_models", "reply_problems", "verdict_to_dict", "baseline_customer_work",
    "evaluate_for_customer", "count_state_bytes", "load_model", "customer_step", "merge_round",
]
