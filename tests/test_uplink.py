"""Uplink audit: what the customer's ClientApp sends is the neck+head delta (the tutor's own
parameter names and shapes, float32) and scalar metrics. No image, label, box or per-sample
value goes up. The ClientApp is called as Flower calls it, on tiny real data."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from clients.client_app import app as client_app
from diredi_sim.config import DataConfig, TrainConfig, to_flat
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.deltas import check_delta, compress_delta, compute_norm, decompress_delta, count_state_bytes, select_neck_head
from diredi_sim.population import PopulationConfig
from diredi_sim.federation_config import FederationConfig, SimulationConfig
from diredi_sim.federation import privatize_delta
from diredi_sim.models import build_detector, part_of
from diredi_sim.settings import PipelineConfig
from server.strategy import DiReDiStrategy

TINY = SyntheticConfig(seed=3, num_train=16, num_val=8, num_test=8, min_objects=3, max_objects=5, min_object_size=24)
STAGE = TrainConfig(epochs=1, batch_size=8, lr=0.01, warmup_steps=1)


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages need a run identity


def tiny_config(tmp_path, **simulation) -> FederationConfig:
    return FederationConfig(data=DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY),
                            pipeline=PipelineConfig(rd=STAGE, distill_c=STAGE, eval_batch_size=8),
                            population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                            simulation=SimulationConfig(**simulation))


def send(config: FederationConfig, partition_id: int, kind: str, records: dict, app=client_app) -> Message:
    """One message of type ``kind`` through the ClientApp (``app``), as Flower delivers it."""
    content = RecordDict({**records, "config": ConfigRecord({**to_flat(config), "server-round": 1})})
    message = Message(content=content, dst_node_id=5, message_type=kind)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": partition_id, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    return app(message, context)


def call_client(tmp_path, partition_id: int, **simulation) -> tuple[Message, dict]:
    torch.manual_seed(0)
    tutor = build_detector("tutor", "cpu")
    edge = build_detector("edge", "cpu")
    reply = send(tiny_config(tmp_path, **simulation), partition_id, "train",
                 {"tutor": ArrayRecord(tutor.state_dict()), "edge": ArrayRecord(edge.state_dict())})
    return reply, tutor.state_dict()


def audit_uplink(reply: Message, tutor_state: dict, partition_id: int) -> dict:
    """The reply holds the neck+head delta (by the tutor's names, shapes, float32) and scalars only."""
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
    assert metrics["partition-id"] == partition_id and metrics["num-examples"] > 0 and metrics["server-round"] == 1
    sent_values = sum(v.numel() for v in delta.values()) + len(metrics)
    assert sent_values == sum(v.numel() for v in expected.values()) + len(metrics)  # nothing else rides along
    return delta


def test_the_uplink_holds_only_the_neck_head_delta_and_scalars(tmp_path):
    reply, tutor_state = call_client(tmp_path, partition_id=1)
    audit_uplink(reply, tutor_state, 1)


def test_with_local_dp_the_uplink_is_the_clipped_noised_delta_and_nothing_more(tmp_path):
    """simulation.dp_clip_norm / dp_noise_multiplier: the same audit holds, and what goes up is
    exactly the delta without DP, clipped to the norm, plus the seeded noise (delta-norm is the
    sent delta's: no statistic of the raw delta goes up)."""
    plain = audit_uplink(*call_client(tmp_path, partition_id=1), 1)
    reply, tutor_state = call_client(tmp_path, partition_id=1, dp_clip_norm=0.01, dp_noise_multiplier=0.001)
    sent = audit_uplink(reply, tutor_state, 1)
    config = FederationConfig(population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                              simulation=SimulationConfig(dp_clip_norm=0.01, dp_noise_multiplier=0.001))
    assert compute_norm(plain) > 0.01  # so the clipping bites
    expected = privatize_delta(config, 1, plain, server_round=1)
    assert all(torch.equal(sent[k], expected[k]) for k in plain)
    reported = dict(reply.content["metrics"])["delta-norm"]  # computed here from the raw delta, independently of the reply
    assert reported == pytest.approx(compute_norm(expected), rel=1e-5) and reported != pytest.approx(compute_norm(plain), rel=0.05)
    clipped_only = audit_uplink(call_client(tmp_path, partition_id=1, dp_clip_norm=0.01)[0], tutor_state, 1)
    assert compute_norm(clipped_only) == pytest.approx(0.01, rel=1e-4)


def test_injected_faults_reach_the_reply_and_only_the_test_app_has_them(tmp_path):
    """The test-only fault injection (experiments/faults.py): 'raise' surfaces as an exception
    Flower turns into an error reply; 'malformed' replies without metrics and with a tensor
    missing; other customers and other message types pass through to the production handlers.
    The production ClientApp has no fault code: the same message is answered normally."""
    from experiments.faults import faulty_client_app, parse_faults

    torch.manual_seed(0)
    tutor, edge = build_detector("tutor", "cpu"), build_detector("edge", "cpu")
    records = {"tutor": ArrayRecord(tutor.state_dict()), "edge": ArrayRecord(edge.state_dict())}
    faulty = faulty_client_app("0:raise,1:malformed", hang_seconds=0)
    config = tiny_config(tmp_path)
    with pytest.raises(RuntimeError, match="injected fault: customer 0 raises"):
        send(config, 0, "train", records, app=faulty)
    assert set(send(config, 1, "train", records, app=faulty).content.keys()) == {"delta"}
    assert set(send(config, 1, "train", records).content.keys()) == {"delta", "metrics"}  # the production app
    with pytest.raises(ValueError, match="'2:explode'"):
        parse_faults("1:raise,2:explode")


def test_a_compressed_uplink_is_the_private_delta_encoded_and_the_strategy_reads_it_back(tmp_path):
    """simulation.uplink_compression: what goes up is the (DP'd) delta encoded by compress_delta,
    under the neck/head names only; uplink-bytes counts it; the strategy decodes it before any check."""
    plain = audit_uplink(*call_client(tmp_path, partition_id=1), 1)
    settings = dict(dp_clip_norm=0.01, dp_noise_multiplier=0.001, uplink_compression="topk-int8", topk_fraction=0.1)
    reply, tutor_state = call_client(tmp_path, partition_id=1, **settings)
    assert set(reply.content.keys()) == {"delta", "metrics"}
    payload = reply.content["delta"].to_torch_state_dict()
    expected_names = set(select_neck_head(tutor_state))
    assert {k.partition("::")[0] for k in payload} == expected_names
    assert {k.partition("::")[2] for k in payload} == {"index", "value", "scale"}
    config = FederationConfig(population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                              simulation=SimulationConfig(**settings))
    encoded = compress_delta(privatize_delta(config, 1, plain, server_round=1), "topk-int8", topk_fraction=0.1)
    assert set(payload) == set(encoded) and all(torch.equal(payload[k], encoded[k]) for k in encoded)  # DP first, then encoding
    metrics = dict(reply.content["metrics"])
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    assert metrics["uplink-bytes"] == count_state_bytes(payload) and 7 * metrics["uplink-bytes"] < metrics["delta-bytes-fp32"]
    strategy = SimpleNamespace(config=config, population=[None, "customer-1"], tutor_state=tutor_state, partition_of_node={},
                               deployed_edges={}, original_edge={}, train_bytes_down={},
                               neck_head_bytes=sum(v.numel() * 4 for v in select_neck_head(tutor_state).values()),
                               _bind=lambda node, partition_id: None)
    job = DiReDiStrategy._read_reply(strategy, reply)
    assert check_delta(job["delta"], tutor_state) == []
    decoded = decompress_delta(encoded, select_neck_head(tutor_state))
    assert all(torch.equal(job["delta"][k], decoded[k]) for k in decoded)
    name = next(iter(sorted(payload)))
    del reply.content["delta"][name]
    with pytest.raises(ValueError, match=name.partition("::")[0]):  # the strategy records it as a malformed reply
        DiReDiStrategy._read_reply(strategy, reply)


def audit_scalars(metrics: MetricRecord) -> dict:
    values = dict(metrics)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()), values  # scalars only
    return values


def test_the_distill_c_reply_holds_only_the_new_edge_model_and_scalars(tmp_path):
    """train.distill_c: down tutor' and the customer's edge; up the edge it distilled on its own
    data (the edge's own names, shapes and dtypes: no other tensor) and scalars."""
    torch.manual_seed(0)
    tutor, edge = build_detector("tutor", "cpu"), build_detector("edge", "cpu")
    reply = send(tiny_config(tmp_path), 1, "train.distill_c",
                 {"tutor": ArrayRecord(tutor.state_dict()), "edge": ArrayRecord(edge.state_dict())})
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"edge_distill_c_public_private", "metrics"}
    sent = reply.content["edge_distill_c_public_private"].to_torch_state_dict()
    expected = edge.state_dict()
    assert set(sent) == set(expected)
    for key, value in sent.items():
        assert value.shape == expected[key].shape and value.dtype == expected[key].dtype, key
    assert any(not torch.equal(sent[k], expected[k]) for k in expected)  # it trained
    metrics = audit_scalars(reply.content["metrics"])
    assert set(metrics) == {"partition-id", "edge_distill_c_public_private/train-images", "seconds", "server-round"}
    assert metrics["server-round"] == 1  # the round it answers
    assert metrics["partition-id"] == 1 and metrics["edge_distill_c_public_private/train-images"] > 0


def test_the_evaluate_reply_holds_per_class_scalars_only(tmp_path):
    """evaluate: down the round's models; up, per model, its headline figures and per-class AP
    and ground-truth counts: a bounded number of scalars, nothing per image."""
    from diredi_sim.data import VOC_CLASSES
    from diredi_sim.federation import rows_from_metrics

    torch.manual_seed(0)
    tutor, edge = build_detector("tutor", "cpu"), build_detector("edge", "cpu")
    reply = send(tiny_config(tmp_path), 0, "evaluate",
                 {"tutor_original": ArrayRecord(tutor.state_dict()), "edge_original": ArrayRecord(edge.state_dict())})
    assert not reply.has_error() and set(reply.content.keys()) == {"metrics"}
    metrics = audit_scalars(reply.content["metrics"])
    rows = rows_from_metrics(metrics)
    assert set(rows) == {"tutor_original", "edge_original"}
    assert len(metrics) <= 2 + 2 * (12 + 2 * len(VOC_CLASSES))  # partition id, round + per row: 12 figures, AP and count per class
    assert metrics["server-round"] == 1
    assert rows["edge_original"]["test_images"] > 0 and set(rows["edge_original"]["per_class"]) <= set(VOC_CLASSES)
