"""FedAvg and FedProx on the edge model, with Flower's own strategies, on the same customers,
splits and seeds as DiReDi. Before the first round and after every round the global edge model
is evaluated at each customer, on its own test images, by Flower's federated evaluation (an
``evaluate`` message; the reply holds per-class AP and P/R/F1 as scalars): gain and
forgetting against the original edge, one row per round per customer in ``metrics.jsonl``. The
ServerApp's process reads no customer file."""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from diredi_sim.federation import (FederationConfig, build_population, count_state_bytes, federation_to_flat,
                                   rows_from_metrics)
from diredi_sim.manufacturer import prepare_manufacturer
from diredi_sim.table import compute_knowledge
from diredi_sim.runs import Run, to_jsonable
from diredi_sim.tidy import tidy_rows, write_results_csv
from server.server_app import FederationOutcome

logger = logging.getLogger(__name__)


def recording_evaluation(base: type) -> type:
    """``base`` (a Flower strategy) whose ``aggregate_evaluate`` hands every reply to
    ``self.on_evaluated(server_round, replies) -> MetricRecord``: per-customer rows, which
    Flower's own aggregation cannot take (each customer reports its own classes' keys)."""

    class Recording(base):
        on_evaluated = None

        def aggregate_evaluate(self, server_round: int, replies):
            return self.on_evaluated(server_round, list(replies))

    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


def run_baseline(grid: Grid, config: FederationConfig, method: str, outcome: FederationOutcome | None = None) -> FederationOutcome:
    """FedAvg (``method="fedavg"``) or FedProx (``"fedprox"``) for ``config.baselines.rounds`` rounds."""
    outcome = outcome or FederationOutcome()
    with Run.create(config.runs_dir, f"{config.name}-{method}", config) as run:
        outcome.folder = run.folder
        logger.info("%s run folder %s", method, run.folder)
        _run_rounds(grid, config, method, outcome, run)
    return outcome


def _run_rounds(grid: Grid, config: FederationConfig, method: str, outcome: FederationOutcome, run: Run) -> None:
    population = build_population(config.population, config.pipeline.presumed_split)
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed)
    model_bytes = count_state_bytes(maker.edge.state_dict())
    rows: list[dict] = []
    reference: dict[int, dict] = {}  # per-class AP of the original edge model: round 0's evaluation

    def on_evaluated(server_round: int, replies: list[Message]) -> MetricRecord:
        maps = []
        for reply in replies:
            if reply.has_error():
                run.log({"event": "customer_failed", "method": method, "round": server_round,
                         "node": reply.metadata.src_node_id, "reason": f"evaluate: {reply.error.reason}"})
                continue
            metrics = dict(reply.content["metrics"])
            customer = population[int(metrics["partition-id"])]
            row = rows_from_metrics(metrics)["edge"]
            if server_round == 0:  # the original edge model, against itself: every later round's reference
                reference[customer.partition_id] = row["per_class"]
            classes = customer.class_sets(config.pipeline)
            row.update(compute_knowledge(row["per_class"], reference[customer.partition_id], classes))
            record = {"event": "customer", "method": method, "round": server_round, "partition_id": customer.partition_id,
                      "customer": customer.name, "uplink_bytes": model_bytes * server_round,
                      "downlink_bytes": model_bytes * server_round, **to_jsonable(row)}
            rows.append(record)
            run.log(record)
            maps.append(row["mAP"])
        return MetricRecord({"mean-map": sum(maps) / len(maps) if maps else float("nan")})

    sim = config.simulation
    common = dict(fraction_train=sim.fraction_train, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=len(population),
                  min_available_nodes=len(population))
    strategy = recording_evaluation(FedProx)(proximal_mu=config.baselines.proximal_mu, **common) if method == "fedprox" \
        else recording_evaluation(FedAvg)(**common)
    strategy.on_evaluated = on_evaluated
    settings = ConfigRecord({**federation_to_flat(config), "method": method})  # the ClientApp dispatches on it
    initial = ArrayRecord(maker.edge.state_dict())
    # round 0: the original edge at every customer (Flower's own evaluation starts after round 1)
    strategy.aggregate_evaluate(0, grid.send_and_receive(list(strategy.configure_evaluate(0, initial, settings, grid)),
                                                         timeout=sim.round_timeout))
    if len(reference) < len(population):
        raise RuntimeError(f"{len(population) - len(reference)} customer(s) did not evaluate the original edge model (round 0): "
                           "no reference for gains; see metrics.jsonl")
    strategy.start(grid, initial_arrays=initial, num_rounds=config.baselines.rounds, timeout=sim.round_timeout,
                   train_config=settings, evaluate_config=ConfigRecord({**federation_to_flat(config), "method": method}))
    last = max(r["round"] for r in rows)
    outcome.summary = [r for r in rows if r["round"] == last]
    run.write_json("summary.json", to_jsonable({"method": method, "customers": outcome.summary, "rounds": rows}))
    seed = config.seed + config.replicate
    write_results_csv(run.folder / "results.csv", [tidy for r in rows for tidy in tidy_rows(
        r, method=method, seed=seed, round=r["round"], customer=r["customer"], partition_id=r["partition_id"])])


def make_baseline_app(config: FederationConfig, method: str, outcome: FederationOutcome | None = None) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_baseline(grid, config, method, outcome)

    return server_app


__all__ = ["run_baseline", "make_baseline_app"]
