"""FedAvg and FedProx on the edge model, with Flower's own strategies, on the same customers,
splits and seeds as DiReDi. After every round (and before the first) the global edge model is
evaluated on each customer's test images: per-class AP, gain and forgetting against the
original edge, one row per round per customer in ``metrics.jsonl``."""

from __future__ import annotations

import sys

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from diredi_sim.federation import (FederationConfig, build_population, count_state_bytes, evaluate_for_customer,
                                   federation_to_flat, load_model)
from diredi_sim.pipeline import DataSets, compute_knowledge, prepare_manufacturer
from diredi_sim.runs import Run, to_jsonable
from server.server_app import FederationOutcome


def run_baseline(grid: Grid, config: FederationConfig, method: str, outcome: FederationOutcome | None = None) -> FederationOutcome:
    """FedAvg (``method="fedavg"``) or FedProx (``"fedprox"``) for ``config.baselines.rounds`` rounds."""
    outcome = outcome or FederationOutcome()
    run = Run.create(config.runs_dir, f"{config.name}-{method}", config)
    outcome.folder = run.folder
    print(f"diredi-sim: {method} run folder {run.folder}", file=sys.stderr, flush=True)
    population = build_population(config.population, config.pipeline.presumed_split)
    maker = prepare_manufacturer(config.pipeline, config.data, preset=config.preset, seed=config.seed)
    datasets = DataSets(config.data)
    model_bytes = count_state_bytes(maker.edge.state_dict())
    rows: list[dict] = []
    reference: dict[int, dict] = {}  # per-class AP of the original edge model: round 0's evaluation

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round > 0 and not reference:
            raise RuntimeError("Flower's strategy did not evaluate the initial edge model (round 0): no reference for gains")
        edge = load_model("edge", config.preset, arrays.to_torch_state_dict())
        maps = []
        for customer in population:
            if server_round == 0:  # the original edge model, against itself: every later round's reference
                row = evaluate_for_customer(config, customer, edge, datasets=datasets)
                reference[customer.partition_id] = row["per_class"]
                row.update(to_jsonable(compute_knowledge(row["per_class"], row["per_class"], customer.class_sets(config.pipeline))))
            else:
                row = evaluate_for_customer(config, customer, edge, reference[customer.partition_id], datasets)
            record = {"event": "customer", "method": method, "round": server_round, "partition_id": customer.partition_id,
                      "customer": customer.name, "uplink_bytes": model_bytes * server_round,
                      "downlink_bytes": model_bytes * server_round, **row}
            rows.append(record)
            run.log(record)
            maps.append(row["mAP"])
        return MetricRecord({"mean-map": sum(maps) / len(maps)})

    sim = config.simulation
    common = dict(fraction_train=sim.fraction_train, fraction_evaluate=0.0, min_train_nodes=1,
                  min_available_nodes=len(population))
    strategy = FedProx(proximal_mu=config.baselines.proximal_mu, **common) if method == "fedprox" else FedAvg(**common)
    strategy.start(grid, initial_arrays=ArrayRecord(maker.edge.state_dict()), num_rounds=config.baselines.rounds,
                   timeout=sim.round_timeout, train_config=ConfigRecord(federation_to_flat(config)), evaluate_fn=evaluate)
    last = max(r["round"] for r in rows)
    outcome.summary = [r for r in rows if r["round"] == last]
    run.write_json("summary.json", to_jsonable({"method": method, "customers": outcome.summary, "rounds": rows}))
    return outcome


def make_baseline_app(config: FederationConfig, method: str, outcome: FederationOutcome | None = None) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_baseline(grid, config, method, outcome)

    return server_app


__all__ = ["run_baseline", "make_baseline_app"]
