"""Uplink audit: what the customer's ClientApp sends is the neck+head delta (the tutor's own
parameter names and shapes, float32) and scalar metrics. No image, label, box or per-sample
value goes up. The ClientApp is called as Flower calls it, on tiny real data."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.client_app import app as client_app
from diredi_sim.config import DataConfig, TrainConfig
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.federation import FederationConfig, PopulationConfig, SimulationConfig, federation_to_flat
from diredi_sim.models import build_detector, part_of
from diredi_sim.pipeline import PipelineConfig

TINY = SyntheticConfig(seed=3, num_train=16, num_val=8, num_test=8, min_objects=3, max_objects=5, min_object_size=24)
STAGE = TrainConfig(epochs=1, batch_size=8, lr=0.01, warmup_steps=1)


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages need a run identity


def call_client(tmp_path, partition_id: int, **simulation) -> tuple[Message, dict]:
    torch.manual_seed(0)
    config = FederationConfig(data=DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY),
                              pipeline=PipelineConfig(rd=STAGE, eval_batch_size=8),
                              population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                              simulation=SimulationConfig(**simulation))
    tutor = build_detector("tutor", "cpu")
    edge = build_detector("edge", "cpu")
    content = RecordDict({"tutor": ArrayRecord(tutor.state_dict()), "edge": ArrayRecord(edge.state_dict()),
                          "config": ConfigRecord({**federation_to_flat(config), "server-round": 1})})
    message = Message(content=content, dst_node_id=5, message_type="train")
    context = Context(run_id=1, node_id=5, node_config={"partition-id": partition_id, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    reply = client_app(message, context)
    return reply, tutor.state_dict()


def test_the_uplink_holds_only_the_neck_head_delta_and_scalars(tmp_path):
    reply, tutor_state = call_client(tmp_path, partition_id=1)
    assert not reply.has_error()
    content = reply.content
    assert set(content.keys()) == {"delta", "metrics"}
    assert isinstance(content["delta"], ArrayRecord) and isinstance(content["metrics"], MetricRecord)
    delta = content["delta"].to_torch_state_dict()
    expected = {k: v for k, v in tutor_state.items() if part_of(k) in ("neck", "head") and v.is_floating_point()}
    assert set(delta) == set(expected) and delta  # neck and head parameters, by the tutor's own names
    for key, value in delta.items():
        assert value.shape == expected[key].shape and value.dtype == torch.float32, key
    assert not any(part_of(k) == "backbone" for k in delta)
    metrics = dict(content["metrics"])
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()), metrics  # scalars only
    assert metrics["partition-id"] == 1 and metrics["num-examples"] > 0 and metrics["server-round"] == 1
    sent_values = sum(v.numel() for v in delta.values()) + len(metrics)
    assert sent_values == sum(v.numel() for v in expected.values()) + len(metrics)  # nothing else rides along


def test_injected_faults_reach_the_reply(tmp_path):
    """The test-only fault switch: 'raise' surfaces as an exception Flower turns into an error
    reply; 'malformed' replies without metrics and with a tensor missing."""
    with pytest.raises(RuntimeError, match="injected fault: customer 0 raises"):
        call_client(tmp_path, partition_id=0, inject_faults="0:raise")
    reply, _ = call_client(tmp_path, partition_id=1, inject_faults="1:malformed")
    assert set(reply.content.keys()) == {"delta"}
