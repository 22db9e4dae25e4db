"""The customer of Flower's strategies (FedAvg, FedProx, FedAdam, Krum...): the handlers that the
one ClientApp (``clients.client_app.app``) calls for a message whose config's ``method`` is not
``diredi``. ``train``
fine-tunes the received edge model on this customer's data and sends the whole model back
(``arrays``) with ``num-examples``; FedProx's ``proximal-mu`` arrives in the round's config
(Flower's FedProx puts it there). ``evaluate`` evaluates the received edge model on this
customer's test images and replies with scalars only (per-class AP, P, R, F1)."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from clients.client_app import ROUND_KEYS, handling, read_partition_id
from diredi_sim.config import from_flat
from diredi_sim.population import build_population
from diredi_sim.federation_config import FederationConfig
from diredi_sim.federation import baseline_customer_work, customer_evaluate

def read_customer(msg: Message, context: Context):
    settings = {k: v for k, v in msg.content["config"].items() if k not in (*ROUND_KEYS, "proximal-mu")}
    config = from_flat(settings, FederationConfig, source="the round's config")
    population = build_population(config.population, config.pipeline.presumed_split)
    return config, population, population[read_partition_id(context, len(population))]


def train(msg: Message, context: Context) -> Message:
    round_config = msg.content["config"]
    config, population, customer = read_customer(msg, context)
    with handling(msg, config, customer):
        result = baseline_customer_work(config, customer, len(population), msg.content["arrays"].to_torch_state_dict(),
                                        proximal_mu=float(round_config.get("proximal-mu", 0.0)))
    return Message(RecordDict({"arrays": ArrayRecord(result["arrays"]), "metrics": MetricRecord(result["metrics"])}),
                   reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    config, _, customer = read_customer(msg, context)
    with handling(msg, config, customer):
        metrics = customer_evaluate(config, customer, {"edge": msg.content["arrays"].to_torch_state_dict()})
    return Message(RecordDict({"metrics": MetricRecord({**metrics, "partition-id": customer.partition_id,
                                                        "num-examples": int(metrics["edge/test_images"])})}), reply_to=msg)
