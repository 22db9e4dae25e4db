"""The DiReDi strategy against mock replies, without a simulation: downlink per customer,
failures and malformed replies recorded, accepted deltas merged into the shared tutor by name,
rejected ones left out, per-customer edge models deployed."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from diredi_sim.config import DataConfig
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.deltas import select_neck_head
from diredi_sim.federation import FederationConfig, PopulationConfig, SimulationConfig, build_population, federation_to_flat
from diredi_sim.models import build_detector
from diredi_sim.settings import PipelineConfig
from diredi_sim.runs import Run, read_jsonl
from server.strategy import DiReDiStrategy, InlineExecutor

TINY = SyntheticConfig(seed=3, num_train=16, num_val=8, num_test=8, min_objects=3, max_objects=5, min_object_size=24)


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages need a run identity


def answer_as_customer(message: Message, partition_id: int) -> Message:
    """A stand-in customer for the round's later exchanges: ``train.distill_c`` is answered with
    an edge model whose every float tensor is 100 + partition id (to recognise it later),
    ``evaluate`` with no rows, ``query.partition`` by the ClientApp's own handler."""
    kind = message.metadata.message_type
    if kind == "train.distill_c":
        edge = {k: (torch.full_like(v, 100.0 + partition_id) if v.is_floating_point() else v)
                for k, v in message.content["edge"].to_torch_state_dict().items()}
        return Message(RecordDict({"edge_distill_c_public_private": ArrayRecord(edge),
                                   "metrics": MetricRecord({"partition-id": partition_id})}), reply_to=message)
    if kind == "evaluate":
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id})}), reply_to=message)
    from flwr.app import Context

    from clients.client_app import partition
    return partition(message, Context(run_id=1, node_id=message.metadata.dst_node_id, state=RecordDict(), run_config={},
                                      node_config={"partition-id": partition_id}))


class FakeGrid:
    """The part of Flower's Grid that the strategy uses; nodes answer as ``partition_of`` says."""

    def __init__(self, node_ids, partition_of=None):
        self.node_ids = list(node_ids)
        self.partition_of = dict(partition_of or {})
        self.sent: list[tuple[str, int]] = []

    def get_node_ids(self):
        return self.node_ids

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent += [(m.metadata.message_type, m.metadata.dst_node_id) for m in messages]
        return [answer_as_customer(m, self.partition_of[m.metadata.dst_node_id]) for m in messages
                if m.metadata.dst_node_id in self.partition_of]


def stub_review(config, customer, tutor_state, edge_state, delta, threads=0):
    """The manufacturer's review replaced by a rule: partition 2 is rejected."""
    accepted = customer.partition_id != 2
    return {"verdict": {"accepted": accepted, "reasons": [] if accepted else ["stub: bus lost 0.2 AP"], "delta_norm": 1.0},
            "tutor_prime": tutor_state, "candidate": None, "edges": {}, "manufacturer_rows": {}, "train_images": {},
            "stages": [], "seconds": 0.5}


def stub_edge_check(config, customer, current_state, candidate_state, threads=0):
    """The manufacturer's check of a customer's edge, replaced: every edge passes."""
    return {"verdict": {"accepted": True, "reasons": [], "delta_norm": 1.0}, "manufacturer_row": {}}


def stub_strategy(config, run, edge_state, review=stub_review) -> DiReDiStrategy:
    return DiReDiStrategy(config, build_population(config.population), edge_state, run, executor=InlineExecutor(),
                          review_step=review, edge_step=stub_edge_check)


@pytest.fixture()
def setup(tmp_path):
    torch.manual_seed(0)
    config = FederationConfig(
        runs_dir=str(tmp_path / "runs"), data=DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY),
        pipeline=PipelineConfig(eval_batch_size=8),
        population=PopulationConfig(customers=("exp1", "exp2", "aeroplane+bus+dog", "bus+cat"), generated=0),
        simulation=SimulationConfig(merge="mean", server_workers=1))
    tutor = build_detector("tutor", "cpu")
    edge = build_detector("edge", "cpu")
    run = Run.create(config.runs_dir, "strategy-test", config)
    strategy = stub_strategy(config, run, edge.state_dict())
    return config, strategy, tutor, edge, run


def reply_to(message: Message, partition_id: int, delta: dict, num_examples: int) -> Message:
    metrics = MetricRecord({"partition-id": partition_id, "num-examples": num_examples, "delta-bytes-fp32": 4 * 10, "seconds": 1.0})
    return Message(RecordDict({"delta": ArrayRecord(delta), "metrics": metrics}), reply_to=message)


def test_strategy_merges_accepted_deltas_and_records_everything_else(setup):
    config, strategy, tutor, edge, run = setup
    tutor_state = {k: v.clone() for k, v in tutor.state_dict().items()}
    grid = FakeGrid([11, 12, 13, 14, 15, 16], {11: 0, 12: 1, 13: 2, 14: 3, 15: 0, 16: 3})
    arrays = ArrayRecord(tutor.state_dict())
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(federation_to_flat(config)), grid))
    assert len(messages) == 6
    for message in messages:  # the downlink: tutor, this customer's edge, the settings
        assert set(message.content.keys()) == {"tutor", "edge", "config"}
        assert message.content["config"]["server-round"] == 1
    by_node = {m.metadata.dst_node_id: m for m in messages}

    neck_head = select_neck_head(tutor_state)
    delta0 = {k: torch.full_like(v, 0.01, dtype=torch.float32) for k, v in neck_head.items()}
    delta1 = {k: torch.full_like(v, 0.04, dtype=torch.float32) for k, v in neck_head.items()}
    smuggled = {**delta0, "backbone.body.conv1.weight": torch.zeros_like(tutor_state["backbone.body.conv1.weight"])}
    replies = [
        reply_to(by_node[11], 0, delta0, num_examples=300),
        reply_to(by_node[12], 1, delta1, num_examples=100),
        reply_to(by_node[13], 2, delta1, num_examples=100),  # rejected by verification (stub)
        Message(Error(code=0, reason="ClientApp raised: out of memory"), reply_to=by_node[14]),
        Message(RecordDict({"delta": ArrayRecord(delta0)}), reply_to=by_node[15]),  # no metrics
        reply_to(by_node[16], 3, smuggled, num_examples=100),  # backbone weights smuggled in
        reply_to(by_node[16], 0, delta1, num_examples=100),  # a second reply for partition 0
    ]
    new_arrays, metrics = strategy.aggregate_train(1, replies)

    # accepted: partitions 0 and 1 (weighted by num-examples: 0.75 * 0.01 + 0.25 * 0.04 = 0.0175)
    new_state = new_arrays.to_torch_state_dict()
    for key, value in new_state.items():
        if key in neck_head and value.is_floating_point():
            assert torch.allclose(value, tutor_state[key] + 0.0175, atol=1e-6), key
        else:
            assert torch.equal(value, tutor_state[key]), key  # backbone and buffers untouched
    assert dict(metrics) == {"replies": 6, "failures": 3, "accepted": 2, "tutor-updated": 1}

    rows = read_jsonl(run.metrics_path)
    failures = [r for r in rows if r.get("event") == "customer_failed"]
    assert sorted(f["node"] for f in failures) == [14, 15, 16]
    assert any("out of memory" in f["reason"] for f in failures) and any("second reply" in f["reason"] for f in failures)
    customers = {(r["partition_id"], r["verdict"]) for r in rows if r.get("event") == "customer"}
    assert customers == {(0, "accepted"), (1, "accepted"), (2, "rejected"), (3, "rejected")}
    smuggled_row = json.loads((run.folder / "round1" / "customer3.json").read_text())
    assert smuggled_row["verdict"] == "rejected" and any("backbone" in r for r in smuggled_row["reasons"])
    report = json.loads((run.folder / "rounds.json").read_text())[0]
    assert report["accepted_customers"] == 2 and report["shared_tutor_updated"] is True
    assert report["merge"]["merged"] == 2 and report["merge"]["accepted"] is True and report["merge"]["rule"] == "mean"

    # deployed edges: the accepted customers get their Distill C model next round; partition 2 keeps the original
    assert set(strategy.deployed_edges) == {0, 1}
    again = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, new_arrays, ConfigRecord({}), grid)}
    assert float(again[11].content["edge"].to_torch_state_dict()["head.classification_head.cls_logits.weight"][0, 0, 0, 0]) == 100.0
    assert float(again[12].content["edge"].to_torch_state_dict()["head.classification_head.cls_logits.weight"][0, 0, 0, 0]) == 101.0
    original = edge.state_dict()["head.classification_head.cls_logits.weight"]
    assert torch.equal(again[13].content["edge"].to_torch_state_dict()["head.classification_head.cls_logits.weight"], original)
    assert (run.folder / "checkpoints" / "tutor_round1.pt").is_file()


def test_a_round_without_accepted_deltas_keeps_the_tutor(setup):
    config, strategy, tutor, edge, run = setup
    grid = FakeGrid([21, 22, 23, 24], {21: 0, 22: 1, 23: 2, 24: 3})  # sampling waits until the whole population is connected
    message = list(strategy.configure_train(1, ArrayRecord(tutor.state_dict()), ConfigRecord({}), grid))[0]
    delta = {k: torch.full_like(v, 0.5, dtype=torch.float32) for k, v in select_neck_head(tutor.state_dict()).items()}
    new_arrays, metrics = strategy.aggregate_train(1, [reply_to(message, 2, delta, 10)])
    assert new_arrays is None and metrics["accepted"] == 0 and metrics["tutor-updated"] == 0
    assert strategy.deployed_edges == {}


def test_krum_keeps_a_poisoned_delta_out_of_the_shared_tutor(setup, tmp_path):
    """Three honest customers send similar small deltas, one sends a large one that passed its
    own verification (the stub accepts it): Flower's Krum selection keeps it out of the merge."""
    config, _, tutor, edge, run = setup
    from dataclasses import replace

    krum = replace(config, simulation=replace(config.simulation, select="multikrum", num_malicious=1))
    strategy = stub_strategy(krum, run, edge.state_dict(), review=lambda *args: {
        **stub_review(*args), "verdict": {"accepted": True, "reasons": [], "delta_norm": 1.0}})
    tutor_state = {k: v.clone() for k, v in tutor.state_dict().items()}
    grid = FakeGrid([31, 32, 33, 34], {31: 0, 32: 1, 33: 2, 34: 3})
    by_node = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord(tutor.state_dict()), ConfigRecord({}), grid)}
    neck_head = select_neck_head(tutor_state)
    honest = [{k: torch.full_like(v, value, dtype=torch.float32) for k, v in neck_head.items()} for value in (0.010, 0.011, 0.012)]
    poisoned = {k: torch.full_like(v, -5.0, dtype=torch.float32) for k, v in neck_head.items()}
    replies = [reply_to(by_node[31 + i], i, delta, 100) for i, delta in enumerate(honest)]
    replies.append(reply_to(by_node[34], 3, poisoned, 100))
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    report = json.loads((run.folder / "rounds.json").read_text())[-1]
    assert report["merge"]["selection"]["kept"] == [0, 1, 2]
    new_state = new_arrays.to_torch_state_dict()
    key = next(iter(neck_head))
    assert torch.allclose(new_state[key], tutor_state[key] + 0.011, atol=1e-6)
