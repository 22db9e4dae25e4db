"""``cema``: CEMA (cloud-edge elastic model adaptation, ICLR 2024) as a method of ``compare``
(:mod:`diredi_sim.cema`). Per customer: its train images, shifted by its corruption
(``cema.corruptions[partition id % n]`` at ``cema.severity``), stream through the deployed edge;
the images that pass the filters go up to the manufacturer as encoded images; the manufacturer
adapts its tutor and distils the edge, and sends the edge's norm-affine parameters down. The row:
mAP / P / R / F1 on the customer's shifted test images after adaptation, gain and forgetting
against the edge before adaptation on the same shifted images, and what left the customer."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from torch import nn

from diredi_sim.cema import run_cema, write_shifted
from diredi_sim.compute import configure_process
from diredi_sim.data.voc import ImageRecord
from diredi_sim.datasets import DataSets
from diredi_sim.population import build_population, pick_share
from diredi_sim.federation_config import FederationConfig
from diredi_sim.federation import evaluate_for_customer, load_model
from diredi_sim.manufacturer import prepare_manufacturer
from diredi_sim.runs import to_jsonable
from diredi_sim.settings import ClassSets, PipelineConfig
from diredi_sim.table import compute_knowledge, evaluate_row
from experiments.methods import Method, register


def evaluate_shifted(edge: nn.Module, test: list[ImageRecord], classes: ClassSets, pipeline: PipelineConfig,
                     reference: dict[str, float] | None = None) -> dict:
    """:func:`evaluate_for_customer` on the shifted test images ``test``."""
    row = evaluate_row(edge, test, classes.customer, classes.union, batch_size=pipeline.eval_batch_size,
                       score_threshold=pipeline.score_threshold)
    if reference is not None:
        row.update(compute_knowledge(row["per_class"], reference, classes))
    return to_jsonable(row)


def cema_customer_work(config: FederationConfig, partition_id: int, tutor_state: dict, edge_state: dict, threads: int = 0,
                       workdir: str | None = None) -> dict:
    """One customer's CEMA run and its row; plain arguments, for a worker process. The shifted
    copies of its images live in a temporary folder (under ``workdir`` when given) for the run."""
    configure_process(device=config.device, threads=threads)
    start = time.perf_counter()
    cfg, pipeline = config.cema, config.pipeline
    population = build_population(config.population, pipeline.presumed_split)
    customer = population[partition_id]
    classes = customer.class_sets(pipeline)
    corruption = cfg.corruptions[partition_id % len(cfg.corruptions)]
    seed = config.seeds(partition_id)("customer")
    datasets = DataSets(config.data)
    share = pick_share(config.population, partition_id, len(population))
    stream = share(datasets.records(config.data.train_set, customer.classes, cfg.max_stream_images, pool="customer"))
    test = datasets.records(config.data.test_set, classes.union, pipeline.max_eval_images, pool="customer")
    original = load_model("edge", config.preset, edge_state)
    clean = evaluate_for_customer(config, customer, original, datasets=datasets)
    with tempfile.TemporaryDirectory(prefix="cema-", dir=workdir) as folder:
        shifted_stream = write_shifted(stream, Path(folder) / "stream", corruption, cfg.severity, seed=seed)
        shifted_test = write_shifted(test, Path(folder) / "test", corruption, cfg.severity, seed=seed)
        before = evaluate_shifted(original, shifted_test, classes, pipeline)
        edge = load_model("edge", config.preset, edge_state)  # the customer's deployed edge; adapted by each downlink
        outcome = run_cema(load_model("tutor", config.preset, tutor_state), edge, shifted_stream, cfg, seed=seed)
        after = evaluate_shifted(edge, shifted_test, classes, pipeline, reference=before["per_class"])
    return {
        "partition_id": customer.partition_id, "customer": customer.name,
        **{k: after.get(k) for k in ("mAP", "precision", "recall", "f1", "gain", "forgetting", "per_class", "change")},
        "mAP_shift_before": before["mAP"], "mAP_clean_before": clean["mAP"],
        "corruption": corruption, "severity": cfg.severity,
        "evaluated_on": f"shifted by {corruption} at severity {cfg.severity}",  # compare pairs it with no clean row
        "uplink_bytes": outcome.uplink_bytes, "downlink_bytes": outcome.downlink_bytes,
        "stream_images": outcome.stream_images, "uploaded_images": len(outcome.uploaded),
        "uploaded_fraction": len(outcome.uploaded) / max(1, outcome.stream_images),
        "raw_data_leaves": True,  # the uploaded images themselves reach the manufacturer
        "cloud_steps": outcome.cloud_steps, "downlinks": outcome.downlinks, "train_images": outcome.edge_train_images,
        "customer_seconds": round(time.perf_counter() - start, 3),
    }


def run_cema_method(config: FederationConfig, shared: dict | None = None) -> tuple[list[dict], None]:
    """Every customer's CEMA run from the manufacturer's tutor and deployed edge, in parallel
    processes (one torch thread each), as ``local`` runs its customers."""
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed, progress=False)
    population = build_population(config.population, config.pipeline.presumed_split)
    tutor_state = {k: v.detach().clone() for k, v in maker.tutor.state_dict().items()}
    edge_state = {k: v.detach().clone() for k, v in maker.edge.state_dict().items()}
    workers = min(len(population), os.cpu_count() or 1)
    if workers <= 1:
        return [cema_customer_work(config, c.partition_id, tutor_state, edge_state) for c in population], None
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(cema_customer_work, config, c.partition_id, tutor_state, edge_state, threads) for c in population]
        return [future.result() for future in futures], None


register(Method("cema", "CEMA: the edge adapted under shift by entropy distillation from the customer's uploaded images "
                        "(raw images leave the customer)", run_cema_method))
