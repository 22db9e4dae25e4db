"""Flower's strategies by name (issue 15): ``baselines.methods`` and flwr run's ``method`` name any
of server/baseline_app.py's STRATEGIES, with parameters from ``baselines.strategy_args``. The
strategy named is the one that aggregates: each is fed the same three customers' models (real
Messages) and its result is checked against what that rule computes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower

from diredi_sim.config import ConfigError
from diredi_sim.federation_config import BaselineConfig, FederationConfig
from server.baseline_app import STRATEGIES, build_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")

START = np.zeros(5, dtype=np.float32)
# three customers' models (one 5-vector each) and their example counts; the third is an outlier
MODELS = [np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32), np.array([1.2, 2.2, 2.8, 4.2, 5.2], np.float32),
          np.array([40.0, -30.0, 90.0, -10.0, 70.0], np.float32)]
EXAMPLES = [10, 30, 20]


class Nodes:
    """The part of Flower's Grid that configure_train uses."""

    def get_node_ids(self):
        return [1, 2, 3]


def config_with(args: str = "", **baselines) -> FederationConfig:
    return FederationConfig(baselines=BaselineConfig(strategy_args=args, **baselines))


def aggregate(strategy) -> np.ndarray:
    """One round: the downlink of START to three nodes, their models back, the strategy's result."""
    messages = list(strategy.configure_train(1, ArrayRecord({"w": torch.from_numpy(START)}), ConfigRecord({}), Nodes()))
    assert len(messages) == 3
    replies = [Message(RecordDict({"arrays": ArrayRecord({"w": torch.from_numpy(model)}), "metrics": MetricRecord({"num-examples": n})}),
                       reply_to=message) for message, model, n in zip(messages, MODELS, EXAMPLES)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["w"].dtype == "float32"  # the model sent, not Flower's float64
    return arrays["w"].numpy()


def test_each_named_strategy_is_flowers_and_aggregates_by_its_own_rule():
    assert set(STRATEGIES) >= {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedmedian",
                               "fedtrimmedavg", "krum", "multikrum", "bulyan"}
    results = {}
    for name, cls in STRATEGIES.items():
        strategy = build_strategy(config_with(), name, 3)
        assert isinstance(strategy, cls) and type(strategy).__mro__[1] is cls, name
        results[name] = aggregate(strategy)
    weighted = sum(n * m for n, m in zip(EXAMPLES, MODELS)) / sum(EXAMPLES)
    np.testing.assert_allclose(results["fedavg"], weighted, rtol=1e-6)
    np.testing.assert_allclose(results["fedprox"], weighted, rtol=1e-6)  # FedProx's term acts at the customer
    np.testing.assert_allclose(results["fedmedian"], np.median(np.stack(MODELS), axis=0), rtol=1e-6)
    # Krum: the one model nearest its n - f - 2 = 1 neighbour, one of the two close ones (a tie), never the outlier
    assert any(np.array_equal(results["krum"], m) for m in MODELS[:2]), results["krum"]
    # FedAdam's first step from START: eta * m / (sqrt(v) + tau) with bias correction = eta * sign(update), about 0.1 each
    assert np.all(np.abs(results["fedadam"]) < 0.2) and np.all(np.sign(results["fedadam"]) == np.sign(weighted))
    assert not np.allclose(results["fedadam"], weighted) and not np.allclose(results["fedyogi"], weighted)
    assert len({tuple(np.round(v, 4)) for v in results.values()}) >= 6  # the rules differ


def test_strategy_parameters_come_from_the_config_and_mistakes_name_the_pair():
    strategy = build_strategy(config_with("fedadam.eta=0.5 fedtrimmedavg.beta=0.3"), "fedadam", 3)
    assert strategy.eta == 0.5
    assert build_strategy(config_with("fedadam.eta=0.5 fedtrimmedavg.beta=0.3"), "fedtrimmedavg", 3).beta == 0.3
    small, large = (aggregate(build_strategy(config_with(f"fedadam.eta={eta}"), "fedadam", 3)) for eta in (0.01, 0.5))
    np.testing.assert_allclose(large, small * 50, rtol=1e-4)  # the first step scales with eta
    assert build_strategy(config_with(proximal_mu=0.3), "fedprox", 3).proximal_mu == 0.3
    assert build_strategy(config_with("fedprox.proximal_mu=0.7", proximal_mu=0.3), "fedprox", 3).proximal_mu == 0.7
    krum = build_strategy(config_with("krum.num_malicious_nodes=1"), "krum", 3)
    assert krum.num_malicious_nodes == 1
    for args, method, named in [("fedadam.etaa=0.1", "fedadam", "'fedadam.etaa': FedAdam has no parameter 'etaa'"),
                                ("fedadam.fraction_train=0.5", "fedadam", "no parameter 'fraction_train' to set here"),
                                ("adam.eta=0.1", "fedadam", "'adam.eta' is not STRATEGY.PARAMETER"),
                                ("eta=0.1", "fedadam", "'eta' is not STRATEGY.PARAMETER"),
                                ("fedadam", "fedadam", "baselines.strategy_args 'fedadam': expected KEY=VALUE"),
                                ("fedadam.eta='open", "fedadam", "baselines.strategy_args = "),
                                ("", "scaffold", "method 'scaffold': not a Flower strategy")]:
        with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
            build_strategy(config_with(args), method, 3)


def test_compare_checks_every_method_before_anything_runs(tmp_path):
    from experiments.compare import run_compare

    config = replace(config_with("krum.num_malicious_node=1", methods=("fedavg", "krum")), runs_dir=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="'krum.num_malicious_node': Krum has no parameter"):
        run_compare(config)
    assert not (tmp_path / "runs").exists()


def test_flwr_run_accepts_every_named_strategy_and_nothing_else():
    from server.server_app import read_run_config

    base = {"config-file": "experiments/configs/demo.toml", "set": ""}
    for name in ("fedadam", "krum", "bulyan"):
        assert read_run_config({**base, "method": name})[1] == name
    with pytest.raises(ConfigError, match="method = 'qfedavg'"):
        read_run_config({**base, "method": "qfedavg"})
    assert flower.QFedAvg not in STRATEGIES.values()
