"""FedAvg, FedProx and the other Flower strategies of :data:`STRATEGIES` on the edge model,
with Flower's own implementations, on the same customers, splits and seeds as DiReDi. Their
parameters come from ``baselines.strategy_args`` (``fedadam.eta=0.01 krum.num_malicious_nodes=1``;
FedProx's mu from ``baselines.proximal_mu`` unless given there). Before the first round and after every round the global edge model
is evaluated at each customer, on its own test images, by Flower's federated evaluation (an
``evaluate`` message; the reply holds per-class AP and P/R/F1 as scalars): gain and
forgetting against the original edge, one row per round per customer in ``metrics.jsonl``. The
ServerApp's process reads no customer file."""

from __future__ import annotations

import inspect
import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flower

from diredi_sim.config import ConfigError, parse_pairs

from diredi_sim.population import build_population
from diredi_sim.federation_config import FederationConfig
from diredi_sim.federation import count_state_bytes, rows_from_metrics
from diredi_sim.manufacturer import prepare_manufacturer
from diredi_sim.table import compute_knowledge
from diredi_sim.runs import Run, to_jsonable
from diredi_sim.tidy import tidy_rows, write_results_csv
from server.engine import customer_settings, engine_of
from server.server_app import FederationOutcome

logger = logging.getLogger(__name__)

# Flower 1.41's strategies that aggregate whole models sent as ``arrays`` with ``num-examples``,
# by method name (QFedAvg, which needs the customers' training loss, and the DP and XGBoost
# wrappers are not offered).
STRATEGIES: dict[str, type] = {name.lower(): getattr(flower, name) for name in (
    "FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "FedMedian", "FedTrimmedAvg", "Krum",
    "MultiKrum", "Bulyan")}
# the strategy's parameters that the run sets itself: not settable in baselines.strategy_args
RUN_SETS = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
            "weighted_by_key", "arrayrecord_key", "configrecord_key", "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn")


def strategy_arguments(config: FederationConfig, method: str) -> dict:
    """``method``'s parameters from ``baselines.strategy_args`` (``STRATEGY.PARAMETER=VALUE``
    pairs, as ``--set`` reads values), checked against its constructor; ConfigError names the pair."""
    source = "baselines.strategy_args"
    pairs = parse_pairs(config.baselines.strategy_args, source=source)
    cls = STRATEGIES[method]
    params = inspect.signature(cls.__init__).parameters
    settable = [n for n, p in params.items() if n != "self" and n not in RUN_SETS
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    args = {"proximal_mu": config.baselines.proximal_mu} if method == "fedprox" else {}
    for key, value in pairs.items():
        name, _, param = key.partition(".")
        if name not in STRATEGIES or not param:
            raise ConfigError(f"{source}: {key!r} is not STRATEGY.PARAMETER, STRATEGY one of {sorted(STRATEGIES)}")
        if name != method:
            continue
        if param not in settable:
            raise ConfigError(f"{source}: {key!r}: {cls.__name__} has no parameter {param!r} to set here; it takes {settable}")
        args[param] = value
    missing = [n for n in settable if params[n].default is inspect.Parameter.empty and n not in args]
    if missing:
        raise ConfigError(f"{source}: {cls.__name__} needs {', '.join(f'{method}.{n}' for n in missing)}")
    return args


def build_strategy(config: FederationConfig, method: str, num_customers: int):
    """Flower's strategy named ``method`` with its parameters, recording per-customer evaluations."""
    if method not in STRATEGIES:
        raise ConfigError(f"method {method!r}: not a Flower strategy offered here; one of {sorted(STRATEGIES)}")
    sim = config.simulation
    common = dict(fraction_train=sim.fraction_train, fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=num_customers,
                  min_available_nodes=num_customers)
    args = strategy_arguments(config, method)
    try:
        return recording_evaluation(STRATEGIES[method])(**common, **args)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"baselines.strategy_args: {STRATEGIES[method].__name__}({args}) refused: {exc}") from None


def recording_evaluation(base: type) -> type:
    """``base`` (a Flower strategy) whose ``aggregate_evaluate`` hands every reply to
    ``self.on_evaluated(server_round, replies) -> MetricRecord``: per-customer rows, which
    Flower's own aggregation cannot take (each customer reports its own classes' keys). Its
    aggregated model keeps the dtypes of the model it sent (Flower's aggregation returns float64
    for integer buffers, and FedAdam, FedYogi and FedAdagrad for every entry): the global edge
    model stays the edge model's size on the wire."""

    class Recording(base):
        on_evaluated = None
        sent_dtypes: dict | None = None

        def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
            self.sent_dtypes = {k: v.dtype for k, v in arrays.to_torch_state_dict().items()}
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None and self.sent_dtypes:
                arrays = ArrayRecord({k: v.to(self.sent_dtypes[k]) for k, v in arrays.to_torch_state_dict().items()})
            return arrays, metrics

        def aggregate_evaluate(self, server_round: int, replies):
            return self.on_evaluated(server_round, list(replies))

    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


def run_baseline(grid: Grid, config: FederationConfig, method: str, outcome: FederationOutcome | None = None) -> FederationOutcome:
    """The Flower strategy ``method`` (a key of :data:`STRATEGIES`) for ``config.baselines.rounds`` rounds."""
    outcome = outcome or FederationOutcome()
    build_strategy(config, method, 1)  # a bad name or parameter stops here, before the run folder exists
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

    engine = engine_of(config)
    strategy = build_strategy(config, method, len(population))
    strategy.on_evaluated = on_evaluated
    settings = ConfigRecord({**customer_settings(config), "method": method})  # the ClientApp dispatches on it
    initial = ArrayRecord(maker.edge.state_dict())
    # round 0: the original edge at every customer (Flower's own evaluation starts after round 1)
    strategy.aggregate_evaluate(0, grid.send_and_receive(list(strategy.configure_evaluate(0, initial, settings, grid)),
                                                         timeout=engine.round_timeout))
    if len(reference) < len(population):
        raise RuntimeError(f"{len(population) - len(reference)} customer(s) did not evaluate the original edge model (round 0): "
                           "no reference for gains; see metrics.jsonl")
    strategy.start(grid, initial_arrays=initial, num_rounds=config.baselines.rounds, timeout=engine.round_timeout,
                   train_config=settings, evaluate_config=ConfigRecord({**customer_settings(config), "method": method}))
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
