"""The DiReDi customer as a Flower ClientApp (DESIGN.md section 6).

Downlink, in the message: the shared tutor (``tutor``) and this customer's deployed edge model
(``edge``) as ArrayRecords keyed by parameter name, and the run's settings (``config``, flat
keys). The customer loads its own data from its partition id, runs RD B and RD A through
:func:`diredi_sim.federation.customer_work`, and replies with the neck+head delta (``delta``,
an ArrayRecord keyed by parameter name) and a MetricRecord of scalars. Nothing else goes up.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from diredi_sim.deltas import select_neck_head
from diredi_sim.federation import build_population, customer_work, federation_from_flat, parse_faults

app = ClientApp()

# Keys the strategy adds to the round's config that are not settings of the run.
ROUND_KEYS = ("server-round",)


def read_partition_id(context: Context, num_customers: int) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("node_config has no 'partition-id': start each SuperNode with "
                         "--node-config 'partition-id=N num-partitions=M'")
    partition_id = int(context.node_config["partition-id"])
    if not 0 <= partition_id < num_customers:
        raise ValueError(f"partition-id {partition_id} is outside the population of {num_customers} customers "
                         "(population.customers + population.generated)")
    return partition_id


@app.train()
def train(msg: Message, context: Context) -> Message:
    """RD B and RD A on this customer's data; reply with the delta and scalar metrics."""
    settings = {k: v for k, v in msg.content["config"].items() if k not in ROUND_KEYS}
    config = federation_from_flat(settings, source="the round's config")
    population = build_population(config.population, config.pipeline.presumed_split)
    customer = population[read_partition_id(context, len(population))]
    fault = parse_faults(config.simulation.inject_faults).get(customer.partition_id)
    if fault == "raise":
        raise RuntimeError(f"injected fault: customer {customer.partition_id} raises")
    if fault == "hang":
        time.sleep(config.simulation.round_timeout + 15)  # answers too late: the round has gone on without it
    if fault == "malformed":  # no metrics, and a delta that lost a tensor
        zeros = {k: torch.zeros_like(v, dtype=torch.float32)
                 for k, v in select_neck_head(msg.content["tutor"].to_torch_state_dict()).items()}
        return Message(RecordDict({"delta": ArrayRecord(dict(list(zeros.items())[1:]))}), reply_to=msg)
    torch.set_num_threads(config.simulation.client_threads)
    result = customer_work(config, customer, len(population), msg.content["tutor"].to_torch_state_dict(),
                           msg.content["edge"].to_torch_state_dict(), progress=True)
    metrics = MetricRecord({**result["metrics"], "server-round": int(msg.content["config"].get("server-round", 0))})
    return Message(RecordDict({"delta": ArrayRecord(result["delta"]), "metrics": metrics}), reply_to=msg)
