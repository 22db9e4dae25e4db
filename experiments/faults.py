"""Test-only fault injection, never on the production path: :func:`faulty_client_app` is the
customers' ClientApp with one more Flower mod in front, which makes chosen customers fail their
``train`` message: ``raise`` (the ClientApp raises), ``hang`` (answers after the round's
timeout) or ``malformed`` (a reply without metrics, whose delta lost a tensor). Only
``run_simulate(config, faults=...)`` (the tests) builds it; ``diredi-sim`` and ``flwr run`` run
:data:`clients.client_app.app`, which has no such code."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from diredi_sim.deltas import select_neck_head

FAULTS = ("raise", "hang", "malformed")


def parse_faults(spec: str) -> dict[int, str]:
    """``"1:raise,2:hang"`` -> {1: "raise", 2: "hang"}; ValueError names a bad item."""
    faults = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        partition, _, fault = item.partition(":")
        if not partition.isdigit() or fault not in FAULTS:
            raise ValueError(f"faults: {item!r}: expected <partition id>:<fault> with fault one of {list(FAULTS)}")
        faults[int(partition)] = fault
    return faults


def faulty_client_app(spec: str, hang_seconds: float) -> ClientApp:
    """The production ClientApp's handlers and mods behind a fault-injecting mod (``spec`` as
    :func:`parse_faults` reads it; a hanging customer sleeps ``hang_seconds`` first)."""
    from clients import client_app as production

    faults = parse_faults(spec)

    def inject(msg: Message, context: Context, call_next) -> Message:
        fault = faults.get(int(context.node_config.get("partition-id", -1)))
        if msg.metadata.message_type != "train" or fault is None:
            return call_next(msg, context)
        if fault == "raise":
            raise RuntimeError(f"injected fault: customer {context.node_config['partition-id']} raises")
        if fault == "hang":
            time.sleep(hang_seconds)  # answers too late: the round has gone on without it
            return call_next(msg, context)
        zeros = {k: torch.zeros_like(v, dtype=torch.float32)  # malformed: no metrics, and a delta that lost a tensor
                 for k, v in select_neck_head(msg.content["tutor"].to_torch_state_dict()).items()}
        return Message(RecordDict({"delta": ArrayRecord(dict(list(zeros.items())[1:]))}), reply_to=msg)

    app = ClientApp(mods=[inject, *production.MODS])
    app.train()(production.train)
    app.train("distill_c")(production.distill_c)
    app.evaluate()(production.evaluate)
    app.query("partition")(production.partition)
    return app


__all__ = ["FAULTS", "parse_faults", "faulty_client_app"]
