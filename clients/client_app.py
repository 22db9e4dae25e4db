"""The DiReDi customer as a Flower ClientApp (docs/design.md section 6). Its images and labels are
read here only (from its partition id); what goes up is the list below, nothing else.

- ``train``: down the shared tutor (``tutor``) and this customer's deployed edge model
  (``edge``), ArrayRecords keyed by parameter name, and the run's settings (``config``, flat
  keys). It runs RD B and RD A (:func:`diredi_sim.federation.customer_work`) and replies with
  the neck+head delta (``delta``, by parameter name) and a MetricRecord of scalars.
- ``train.distill_c``: down tutor' (``tutor``) and its edge (``edge``). It runs Distill C on
  its whole data (:func:`diredi_sim.federation.customer_redistill`) and replies with the new
  edge model under its row key (``edge_distill_c_public_private``, and ``..._score`` when that
  loss is configured) and scalars; the manufacturer checks it before deploying it.
- ``evaluate``: down the round's models, one ArrayRecord per table row. It evaluates each on
  its own test images and replies with per-class AP, P, R, F1 as scalars (``metrics``).
- ``query.partition``: answered with the node's partition id alone.

The same app serves Flower's strategies (FedAvg, FedProx, FedAdam, Krum...:
:mod:`clients.baseline_app`): a ``train`` or ``evaluate`` message whose config has a ``method``
other than ``diredi`` goes to their handlers, so ``flwr run`` needs one ClientApp for every
federated method.

With ``simulation.dp_clip_norm`` > 0, :func:`local_dp_mod` clips that delta and adds Gaussian
noise before the reply leaves (local differential privacy). Flower's own ``LocalDpMod`` does not
fit this reply: it reads the legacy ``fitins.parameters`` / ``fitres.parameters`` records, takes
the update as the returned model minus the received one (here the reply is already a delta, of
neck and head only, and the message carries two models), and draws its noise from NumPy's
global, unseeded generator.

Then :func:`uplink_compression_mod` encodes the delta by ``simulation.uplink_compression``
(:func:`diredi_sim.deltas.compress_delta`: fp16, int8 or top-k entries; none by default) and
records the bytes actually sent as the ``uplink-bytes`` metric.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from diredi_sim.compute import configure_process
from diredi_sim.deltas import compress_delta, compute_norm, count_state_bytes
from diredi_sim.config import from_flat
from diredi_sim.population import Customer, build_population
from diredi_sim.federation_config import FederationConfig
from diredi_sim.federation import customer_evaluate, customer_redistill, customer_work, privatize_delta
from diredi_sim.logs import customer_tag, ensure_logging
from diredi_sim.runs import release_memory

# Keys the strategies add to the round's config that are not the algorithm's settings: the round,
# the method, and the torch threads the engine gives a customer actor (server.engine).
ROUND_KEYS = ("server-round", "method", "client-threads")


def baseline_mod(msg: Message, context: Context, call_next) -> Message:
    """A ``train`` or ``evaluate`` message of a Flower strategy (its config's ``method`` is not
    ``diredi``) goes to :mod:`clients.baseline_app`'s handler of that type; the rest to this app's."""
    kind = msg.metadata.message_type
    if kind not in ("train", "evaluate") or str(msg.content["config"].get("method", "diredi")) == "diredi":
        return call_next(msg, context)
    from clients import baseline_app  # it imports this module

    return getattr(baseline_app, kind)(msg, context)


def read_partition_id(context: Context, num_customers: int) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("node_config has no 'partition-id': start each SuperNode with "
                         "--node-config 'partition-id=N num-partitions=M'")
    partition_id = int(context.node_config["partition-id"])
    if not 0 <= partition_id < num_customers:
        raise ValueError(f"partition-id {partition_id} is outside the population of {num_customers} customers "
                         "(population.customers + population.generated)")
    return partition_id


@contextmanager
def handling(msg: Message, config: FederationConfig, customer: Customer) -> Iterator[None]:
    """The body of a handler of ``customer``'s message: logging set up in this actor (the level
    of the process that started Ray), every record tagged ``customer <partition-id> (<name>)``, the
    config's device with the threads the message gives (``client-threads``), and the work's
    memory released when it is done (the actor waits for its next customer without its peak)."""
    ensure_logging()
    with customer_tag(customer.partition_id, customer.name):
        configure_process(device=config.device, threads=int(msg.content["config"].get("client-threads", 1)))
        yield
        release_memory()


def read_config(msg: Message) -> FederationConfig:
    settings = {k: v for k, v in msg.content["config"].items() if k not in ROUND_KEYS}
    return from_flat(settings, FederationConfig, source="the round's config")


def local_dp_mod(msg: Message, context: Context, call_next) -> Message:
    """Local differential privacy on the reply's ``delta`` (simulation.dp_clip_norm and
    dp_noise_multiplier; nothing when dp_clip_norm is 0): the whole delta clipped to the norm,
    then Gaussian noise added. The reply's ``delta-norm`` becomes the norm of what is sent."""
    reply = call_next(msg, context)
    if reply.has_error() or "delta" not in reply.content:
        return reply
    config = read_config(msg)
    if config.simulation.dp_clip_norm <= 0:
        return reply
    partition_id = int(context.node_config["partition-id"])  # checked by train() before it replied
    delta = privatize_delta(config, partition_id, reply.content["delta"].to_torch_state_dict(),
                            int(msg.content["config"].get("server-round", 1)))
    reply.content["delta"] = ArrayRecord(delta)
    if "metrics" in reply.content:
        reply.content["metrics"]["delta-norm"] = compute_norm(delta)
    return reply


def uplink_compression_mod(msg: Message, context: Context, call_next) -> Message:
    """The reply's ``delta`` as it goes on the wire (simulation.uplink_compression; listed before
    :func:`local_dp_mod`, so it compresses the privatized delta), and ``uplink-bytes``: the bytes
    of the tensors actually sent."""
    reply = call_next(msg, context)
    if reply.has_error() or "delta" not in reply.content:
        return reply
    sim = read_config(msg).simulation
    payload = reply.content["delta"].to_torch_state_dict()
    if sim.uplink_compression != "none":
        payload = compress_delta(payload, sim.uplink_compression, topk_fraction=sim.topk_fraction)
        reply.content["delta"] = ArrayRecord(payload)
    if "metrics" in reply.content:
        reply.content["metrics"]["uplink-bytes"] = count_state_bytes(payload)
    return reply


# the first mod is the outermost: a baseline's message leaves at once; DiReDi's delta gets DP, then compression
MODS = (baseline_mod, uplink_compression_mod, local_dp_mod)
app = ClientApp(mods=list(MODS))


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """Which customer this node is: the strategy asks the nodes in its first round (a greeting,
    which starts a simulation's actors before the timed train exchange), and nodes it does not
    know yet while some customer's deployed edge model has no node (a resumed run: node ids are new)."""
    partition_id = int(context.node_config.get("partition-id", -1))
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """RD B and RD A on this customer's data; reply with the delta and scalar metrics."""
    config, population, customer = read_customer(msg, context)
    with handling(msg, config, customer):
        result = customer_work(config, customer, len(population), msg.content["tutor"].to_torch_state_dict(),
                               msg.content["edge"].to_torch_state_dict(), progress=True)
    return reply(msg, result["metrics"], delta=ArrayRecord(result["delta"]))


def read_customer(msg: Message, context: Context):
    config = read_config(msg)
    population = build_population(config.population, config.pipeline.presumed_split)
    return config, population, population[read_partition_id(context, len(population))]


def reply(msg: Message, metrics: dict, **records: ArrayRecord) -> Message:
    """The reply to ``msg``: ``records`` and the scalar ``metrics``, with the round's number."""
    metrics = {**metrics, "server-round": int(msg.content["config"].get("server-round", 0))}
    return Message(RecordDict({**records, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train("distill_c")
def distill_c(msg: Message, context: Context) -> Message:
    """Distill C public+private here, on this customer's data; reply with the new edge model(s)."""
    config, population, customer = read_customer(msg, context)
    with handling(msg, config, customer):
        result = customer_redistill(config, customer, len(population), msg.content["tutor"].to_torch_state_dict(),
                                    msg.content["edge"].to_torch_state_dict())
    return reply(msg, result["metrics"], **{key: ArrayRecord(state) for key, state in result["edges"].items()})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Every model of the message on this customer's test images; reply with scalars only."""
    config, _, customer = read_customer(msg, context)
    with handling(msg, config, customer):
        models = {key: record.to_torch_state_dict() for key, record in msg.content.items() if isinstance(record, ArrayRecord)}
        metrics = customer_evaluate(config, customer, models)
    return reply(msg, {**metrics, "partition-id": customer.partition_id})
