"""Customer-side baselines without any federation: ``direct`` (a fresh edge model trained on the
customer's data) and ``local`` (the deployed edge fine-tuned on it), at the DiReDi customer's
training images when DiReDi ran first in the replicate (``pipeline.equal_compute``)."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial


from diredi_sim.compute import configure_process
from diredi_sim.datasets import DataSets
from diredi_sim.population import build_population
from diredi_sim.federation_config import FederationConfig
from diredi_sim.federation import customer_step, evaluate_for_customer, load_model
from diredi_sim.flow import train_baseline
from diredi_sim.manufacturer import prepare_manufacturer
from experiments.methods import Method, equal_compute_budgets, register


def local_customer_work(config: FederationConfig, method: str, partition_id: int, edge_state: dict, threads: int = 0,
                        budget_images: int | None = None) -> dict:
    """One customer's ``direct`` or ``local`` model and its row; plain arguments, for a worker process.
    The model is trained by the pipeline's own baseline step (``train_baseline``), on
    ``budget_images`` images when given (the DiReDi customer's count), else for its epochs."""
    configure_process(device=config.device, threads=threads)
    population = build_population(config.population, config.pipeline.presumed_split)
    customer = population[partition_id]
    datasets = DataSets(config.data)
    original = load_model("edge", config.preset, edge_state)
    reference = evaluate_for_customer(config, customer, original, datasets=datasets)["per_class"]
    edge, images = train_baseline(method, original, customer_step(config, customer, len(population), datasets), preset=config.preset,
                                  budget_images=budget_images)
    row = evaluate_for_customer(config, customer, edge, reference, datasets)
    return {"partition_id": customer.partition_id, "customer": customer.name, "uplink_bytes": 0, "downlink_bytes": 0,
            "train_images": images, **{k: row.get(k) for k in ("mAP", "precision", "recall", "f1", "gain", "forgetting", "per_class", "change")}}


def run_local(config: FederationConfig, method: str, budgets: dict[int, int] | None = None) -> list[dict]:
    """``direct``: a fresh edge model trained on the customer's data (pipeline.direct);
    ``local``: the deployed edge fine-tuned on it (pipeline.local). ``budgets`` (partition id ->
    images) gives each customer the DiReDi customer's image count (equal compute); without it
    each trains for its configured epochs. The customers run in parallel processes, one torch
    thread each, as many as there are cores."""
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed, progress=False)
    population = build_population(config.population, config.pipeline.presumed_split)
    edge_state = {k: v.detach().clone() for k, v in maker.edge.state_dict().items()}
    budgets = budgets or {}
    workers = min(len(population), os.cpu_count() or 1)
    if workers <= 1:
        return [local_customer_work(config, method, c.partition_id, edge_state, budget_images=budgets.get(c.partition_id))
                for c in population]
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(local_customer_work, config, method, c.partition_id, edge_state, threads, budgets.get(c.partition_id))
                   for c in population]
        return [future.result() for future in futures]


def run_local_method(config: FederationConfig, shared: dict | None = None, *, method: str) -> tuple[list[dict], None]:
    return run_local(config, method, equal_compute_budgets(config, shared)), None


register(Method("direct", "direct training: a fresh edge model on the customer's data", partial(run_local_method, method="direct")))
register(Method("local", "local fine-tuning: the deployed edge fine-tuned on the customer's data",
                partial(run_local_method, method="local")))
