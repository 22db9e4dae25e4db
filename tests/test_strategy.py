"""The DiReDi strategy against mock replies, without a simulation: downlink per customer,
failures and malformed replies recorded, accepted deltas merged into the shared tutor by name,
rejected ones left out, per-customer edge models deployed."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from diredi_sim.config import DataConfig, to_flat
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.deltas import select_neck_head
from diredi_sim.population import PopulationConfig, build_population
from diredi_sim.federation_config import SimulationConfig
from server.engine import EngineConfig, RunConfig
from diredi_sim.models import build_detector
from diredi_sim.settings import PipelineConfig
from diredi_sim.runs import Run, read_jsonl
from flwr.serverapp.strategy.multikrum import select_multikrum

from server.strategy import DiReDiStrategy, InlineExecutor

TINY = SyntheticConfig(seed=3, num_train=16, num_val=8, num_test=8, min_objects=3, max_objects=5, min_object_size=24)


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # Messages need a run identity


def answering(message: Message) -> int:
    """The round a message belongs to (its settings' server-round), which a reply repeats."""
    return int(message.content["config"].get("server-round", 0))


def answer_as_customer(message: Message, partition_id: int) -> Message:
    """A stand-in customer for the round's later exchanges: ``train.distill_c`` is answered with
    an edge model whose every float tensor is 100 + partition id (to recognise it later),
    ``evaluate`` with no rows, ``query.partition`` by the ClientApp's own handler."""
    kind = message.metadata.message_type
    if kind == "train.distill_c":
        edge = {k: (torch.full_like(v, 100.0 + partition_id) if v.is_floating_point() else v)
                for k, v in message.content["edge"].to_torch_state_dict().items()}
        return Message(RecordDict({"edge_distill_c_public_private": ArrayRecord(edge),
                                   "metrics": MetricRecord({"partition-id": partition_id, "server-round": answering(message)})}),
                       reply_to=message)
    if kind == "evaluate":
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id, "server-round": answering(message)})}),
                       reply_to=message)
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
    config = RunConfig(
        runs_dir=str(tmp_path / "runs"), data=DataConfig(cache_dir=str(tmp_path / "data"), synthetic=TINY),
        pipeline=PipelineConfig(eval_batch_size=8),
        population=PopulationConfig(customers=("exp1", "exp2", "aeroplane+bus+dog", "bus+cat"), generated=0),
        simulation=SimulationConfig(merge="mean"), engine=EngineConfig(server_workers=1))
    tutor = build_detector("tutor", "cpu")
    edge = build_detector("edge", "cpu")
    run = Run.create(config.runs_dir, "strategy-test", config)
    strategy = stub_strategy(config, run, edge.state_dict())
    return config, strategy, tutor, edge, run


def reply_to(message: Message, partition_id: int, delta: dict, num_examples: int) -> Message:
    metrics = MetricRecord({"partition-id": partition_id, "num-examples": num_examples, "delta-bytes-fp32": 4 * 10, "seconds": 1.0,
                            "server-round": answering(message)})
    return Message(RecordDict({"delta": ArrayRecord(delta), "metrics": metrics}), reply_to=message)


def test_strategy_merges_accepted_deltas_and_records_everything_else(setup):
    config, strategy, tutor, edge, run = setup
    tutor_state = {k: v.clone() for k, v in tutor.state_dict().items()}
    # the greeting (the first round's query) is answered by 11-13; 14-16, which fail below, do not answer it
    grid = FakeGrid([11, 12, 13, 14, 15, 16], {11: 0, 12: 1, 13: 2})
    arrays = ArrayRecord(tutor.state_dict())
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(to_flat(config)), grid))
    assert len(messages) == 6 and sorted(grid.sent) == [("query.partition", n) for n in range(11, 17)]
    assert strategy.partition_of_node == {11: 0, 12: 1, 13: 2}  # a node that does not answer is still sent its train message
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

    # accepted: partitions 0 and 1, equal weights (what they say about their data does not count): 0.025
    new_state = new_arrays.to_torch_state_dict()
    for key, value in new_state.items():
        if key in neck_head and value.is_floating_point():
            assert torch.allclose(value, tutor_state[key] + 0.025, atol=1e-6), key
        else:
            assert torch.equal(value, tutor_state[key]), key  # backbone and buffers untouched
    assert dict(metrics) == {"replies": 6, "failures": 3, "accepted": 2, "tutor-updated": 1}

    rows = read_jsonl(run.metrics_path)
    failures = [r for r in rows if r.get("event") == "customer_failed"]
    assert sorted(f["node"] for f in failures) == [14, 15, 16]
    assert any("out of memory" in f["reason"] for f in failures)
    assert any("node 16 answered as partition 3 before" in f["reason"] for f in failures)  # it cannot become partition 0
    customers = {(r["partition_id"], r["verdict"]) for r in rows if r.get("event") == "customer"}
    assert customers == {(0, "accepted"), (1, "accepted"), (2, "rejected"), (3, "rejected")}
    smuggled_row = json.loads((run.folder / "round1" / "customer3.json").read_text())
    assert smuggled_row["verdict"] == "rejected" and any("backbone" in r for r in smuggled_row["reasons"])
    report = json.loads((run.folder / "rounds.json").read_text())[0]
    assert report["accepted_customers"] == 2 and report["shared_tutor_updated"] is True
    assert report["merge"]["merged"] == 2 and report["merge"]["rule"] == "mean"
    values = sum(v.numel() for v in neck_head.values())  # the merged delta: 0.025 on every neck/head value
    assert report["merge"]["norm"] == pytest.approx(0.025 * values ** 0.5, rel=1e-5)

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


def test_hostile_replies_are_rejected_with_their_reason_and_the_round_goes_on(setup):
    """Nothing a customer sends stops the round: metrics that are not finite numbers, a
    partition that is not one, a reply to another round, a payload larger than the tutor's neck
    and head (refused before it is decoded), a delta that is not an ArrayRecord; each is a
    rejected reply with its reason, and the honest customer's delta is merged."""
    config, strategy, tutor, edge, run = setup
    grid = FakeGrid([11, 12, 13, 14, 15, 16, 17], {11: 0, 12: 1, 13: 2, 14: 3, 15: 1, 16: 2, 17: 3})
    by_node = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord(tutor.state_dict()), ConfigRecord({}), grid)}
    neck_head = select_neck_head(tutor.state_dict())
    delta = {k: torch.full_like(v, 0.01, dtype=torch.float32) for k, v in neck_head.items()}
    huge = {**delta, "head.extra": torch.zeros(4_000_000)}  # 16 MB more than the neck and head hold

    def reply(node, metrics, records=None):
        base = {"partition-id": 0, "num-examples": 10, "server-round": 1, "seconds": 1.0}
        return Message(RecordDict({"delta": ArrayRecord(delta), **(records or {}), "metrics": MetricRecord({**base, **metrics})}),
                       reply_to=by_node[node])

    replies = [reply(11, {}),  # honest: partition 0
               reply(12, {"partition-id": 1, "num-examples": float("nan")}),
               reply(13, {"partition-id": 2.5}),
               reply(14, {"partition-id": 3, "server-round": 7}),
               reply(15, {"partition-id": 1}, {"delta": ArrayRecord(huge)}),
               reply(16, {"partition-id": 2}, {"delta": MetricRecord({"x": 1.0})}),
               reply(17, {"partition-id": 3, "num-examples": -5})]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["accepted"] == 1 and metrics["tutor-updated"] == 1
    reasons = {f["node"]: f["reason"] for f in read_jsonl(run.metrics_path) if f.get("event") == "customer_failed"}
    assert "'num-examples' = nan: not a finite number" in reasons[12]
    assert "partition-id 2.5 is not a partition" in reasons[13]
    assert "answers round 7, this is round 1" in reasons[14]
    assert "more than the" in reasons[15] and "neck and head" in reasons[15]
    assert "not an ArrayRecord" in reasons[16]
    assert "num-examples = -5: negative" in reasons[17]
    key = next(iter(neck_head))
    assert torch.allclose(new_arrays.to_torch_state_dict()[key], tutor.state_dict()[key] + 0.01, atol=1e-6)


def test_merge_weights_are_equal_or_bounded_examples(setup):
    """merge = mean: equal weights by default; with merge_weights = "examples" a customer's
    reported count is clipped to max_examples, so a claim of a billion images weighs 200."""
    from dataclasses import replace

    config, _, tutor, edge, run = setup
    bounded = replace(config, simulation=replace(config.simulation, merge_weights="examples", max_examples=200))
    strategy = stub_strategy(bounded, run, edge.state_dict())
    grid = FakeGrid([11, 12, 13, 14], {11: 0, 12: 1, 13: 2, 14: 3})
    by_node = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord(tutor.state_dict()), ConfigRecord({}), grid)}
    neck_head = select_neck_head(tutor.state_dict())
    small = {k: torch.full_like(v, 0.01, dtype=torch.float32) for k, v in neck_head.items()}
    large = {k: torch.full_like(v, 0.04, dtype=torch.float32) for k, v in neck_head.items()}
    new_arrays, _ = strategy.aggregate_train(1, [reply_to(by_node[11], 0, small, num_examples=10**9),
                                                 reply_to(by_node[12], 1, large, num_examples=100)])
    key = next(iter(neck_head))  # (200 * 0.01 + 100 * 0.04) / 300 = 0.02
    assert torch.allclose(new_arrays.to_torch_state_dict()[key], tutor.state_dict()[key] + 0.02, atol=1e-6)


def test_krum_scores_deltas_in_the_merges_key_order(setup):
    """A customer that sends its delta's tensors in another order gets the same Krum selection:
    deltas are compared in the tutor's neck+head key order, the order the merge uses."""
    from dataclasses import replace

    config, _, tutor, edge, run = setup
    krum = replace(config, simulation=replace(config.simulation, select="multikrum", num_malicious=1))
    strategy = stub_strategy(krum, run, edge.state_dict())
    strategy.tutor_state = tutor.state_dict()
    keys = list(select_neck_head(strategy.tutor_state))
    shapes = {k: strategy.tutor_state[k].shape for k in keys}
    big = max(keys, key=lambda k: strategy.tutor_state[k].numel())  # the honest deltas move this tensor most
    honest = [{k: torch.full(shapes[k], 1.0 if k == big else 0.0) + 0.001 * i for k in keys} for i in range(3)]
    outlier = {k: torch.full(shapes[k], 1.0 if k == big else 0.1) for k in keys}
    deltas = honest + [outlier]
    assert strategy._select(deltas, [1.0] * 4)[2]["kept"] == [0, 1, 2]
    shuffled = [dict(reversed(list(d.items()))) if i == 1 else d for i, d in enumerate(deltas)]  # customer 1's own order
    assert strategy._select(shuffled, [1.0] * 4)[2]["kept"] == [0, 1, 2]
    # compared in the order each customer sent (Flower's Multi-Krum flattens records as they are), customer 1 looks far
    contents = [RecordDict({"delta": ArrayRecord(d)}) for d in shuffled]
    chosen = select_multikrum(contents, 1, 3)
    kept_naive = [i for i, content in enumerate(contents) if any(content is c for c in chosen)]
    assert kept_naive == [0, 2, 3]  # the order matters: the honest customer 1 would be left out, the outlier kept


def test_a_node_is_who_it_first_said_it_was(setup):
    """A node that claims a partition bound to another connected node is rejected and recorded,
    and never receives that customer's deployed edge; a node cannot change its partition; the
    bindings are saved with the round (state.json) for a resumed run."""
    config, strategy, tutor, edge, run = setup
    grid = FakeGrid([11, 12, 13, 14], {11: 0, 12: 1})  # 13 and 14 do not answer the greeting
    by_node = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, ArrayRecord(tutor.state_dict()), ConfigRecord({}), grid)}
    delta = {k: torch.full_like(v, 0.01, dtype=torch.float32) for k, v in select_neck_head(tutor.state_dict()).items()}
    strategy.aggregate_train(1, [reply_to(by_node[11], 0, delta, 10), reply_to(by_node[12], 1, delta, 10)])
    assert strategy.partition_of_node == {11: 0, 12: 1} and set(strategy.deployed_edges) == {0, 1}
    by_node = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, ArrayRecord(tutor.state_dict()), ConfigRecord({}), grid)}
    _, metrics = strategy.aggregate_train(2, [reply_to(by_node[13], 0, delta, 10),  # node 13 claims customer 0's partition
                                              reply_to(by_node[12], 3, delta, 10)])  # node 12 was partition 1
    assert metrics["replies"] == 2 and metrics["failures"] == 4  # the two claims, and nodes 11 and 14 did not answer
    reasons = [f["reason"] for f in read_jsonl(run.metrics_path) if f.get("event") == "customer_failed"]
    assert any("partition-id 0 is bound to node 11" in r for r in reasons)
    assert any("node 12 answered as partition 1 before" in r for r in reasons)
    assert strategy.partition_of_node == {11: 0, 12: 1}
    key = "head.classification_head.cls_logits.weight"
    third = {m.metadata.dst_node_id: m for m in strategy.configure_train(3, ArrayRecord(tutor.state_dict()), ConfigRecord({}), grid)}
    assert float(third[11].content["edge"].to_torch_state_dict()[key].flatten()[0]) == 100.0  # customer 0's own edge
    assert torch.equal(third[13].content["edge"].to_torch_state_dict()[key], edge.state_dict()[key])  # not customer 0's
    assert json.loads((run.folder / "state.json").read_text())["nodes"] == {"11": 0, "12": 1}
