"""Robust merging across customers against one poisoned customer, on a real (tiny, quickly
trained) tutor: three honest customers send small fine-tuning deltas, one attacker sends an
honest delta sign-flipped and scaled up a thousandfold. The plain mean carries the attack into
the shared tutor and verification must reject it; norm clipping plus trimmed mean, and Flower's
Multi-Krum selection, keep every presumed class's AP within pipeline.verify.max_ap_drop."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from diredi_sim.config import DataConfig, TrainConfig
from diredi_sim.data.splits import resolve_split
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.deltas import compute_delta, compute_norm
from diredi_sim.population import PopulationConfig, build_population
from diredi_sim.federation_config import FederationConfig, SimulationConfig
from diredi_sim.federation import merge_accepted
from diredi_sim.models import build_detector
from diredi_sim.datasets import DataSets
from diredi_sim.settings import ClassSets, PipelineConfig
from diredi_sim.runs import Run
from diredi_sim.train import Reporting, finetune, train_detector
from diredi_sim.verify import VerifyConfig

# Few, large, clean objects: the tutor learns the presumed classes in a few epochs. Verification
# evaluates on the training images (val_set = "train"): what the tutor knows, the attack must not
# take away.
EASY = SyntheticConfig(seed=5, num_train=40, num_val=4, num_test=4, min_objects=1, max_objects=2, min_object_size=40,
                       clutter=0.0, front_clutter=0.0, noise=2.0)
HONEST = TrainConfig(epochs=1, batch_size=4, lr=1e-4, warmup_steps=0, eval_every=100, hflip_prob=0.0)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("robust")
    config = FederationConfig(runs_dir=str(tmp / "runs"),
                              data=DataConfig(cache_dir=str(tmp / "data"), synthetic=EASY, val_set="train"),
                              pipeline=PipelineConfig(eval_batch_size=16, verify=VerifyConfig(max_ap_drop=0.05)),
                              population=PopulationConfig(customers=("exp1", "exp2", "exp1", "exp2"), generated=0))
    datasets = DataSets(config.data)
    records = datasets.records("train", "presumed", pool="all")
    presumed = ClassSets.indices(resolve_split("presumed"))
    torch.manual_seed(0)
    tutor = build_detector("tutor", "cpu")
    train_detector(tutor, records, records[:1], TrainConfig(epochs=15, batch_size=8, lr=0.003, warmup_steps=5, eval_every=100),
                   class_indices=presumed, report=Reporting(progress=False))
    honest = []
    for i in range(3):  # each honest customer fine-tunes on its own share of the images
        student = copy.deepcopy(tutor)
        finetune(student, records[i::3], records[:1], HONEST, class_indices=presumed, seed=i, report=Reporting(progress=False))
        honest.append(compute_delta(student.state_dict(), tutor.state_dict()))
    attacker = {k: -1000.0 * v for k, v in honest[0].items()}
    yield config, tutor, honest, attacker, datasets
    torch.set_num_threads(threads)


def worst_drop(report: dict) -> float:
    """The largest AP a presumed class lost, measured by the merge's own verification."""
    return max(report["ap_before"][c] - report["ap_after"][c] for c in report["ap_before"]
               if not math.isnan(report["ap_before"][c]))


def merge(federation, deltas, **simulation) -> tuple[dict | None, dict]:
    config, tutor, _, _, datasets = federation
    config = replace(config, simulation=SimulationConfig(**simulation))
    return merge_accepted(config, tutor, deltas, [100.0] * len(deltas), datasets)


def test_one_attacker_is_caught_by_the_plain_mean_and_kept_out_by_robust_merging(federation, tmp_path):
    config, tutor, honest, attacker, _ = federation
    limit = config.pipeline.verify.max_ap_drop
    deltas = honest + [attacker]
    honest_norm = sorted(compute_norm(d) for d in honest)[1]
    assert compute_norm(attacker) > 100 * honest_norm

    state, plain = merge(federation, deltas, merge="mean")
    assert plain["map_before"] > 0.2  # the tutor knows the presumed classes: there is something to lose
    assert state is None and not plain["accepted"] and worst_drop(plain) > limit, plain  # the attack reached the tutor

    state, honest_only = merge(federation, honest, merge="mean")  # the reference: what the honest customers make
    assert state is not None and worst_drop(honest_only) <= limit

    state, trimmed = merge(federation, deltas, merge="trimmed_mean", trim_fraction=0.25, clip_norm=honest_norm)
    assert state is not None and trimmed["accepted"] and worst_drop(trimmed) <= limit, trimmed

    # Flower's Multi-Krum (f = 1), as the strategy runs it before merging, then the plain mean
    from server.strategy import DiReDiStrategy

    krum = replace(config, runs_dir=str(tmp_path / "runs"),
                   simulation=SimulationConfig(merge="mean", select="multikrum", num_malicious=1))
    strategy = DiReDiStrategy(krum, build_population(krum.population), build_detector("edge", "cpu").state_dict(),
                              Run.create(krum.runs_dir, "robust-merge", krum))
    strategy.tutor_state = tutor.state_dict()  # as configure_train leaves it for the round
    selected, weights, selection = strategy._select(deltas, [100.0] * 4)
    assert selection["kept"] == [0, 1, 2]  # the attacker is left out
    state, kept = merge(federation, selected, merge="mean")
    assert state is not None and kept["accepted"] and worst_drop(kept) <= limit, kept
    print(f"presumed mAP {plain['map_before']:.3f}; worst class AP drop: plain mean {worst_drop(plain):.3f} (rejected), "
          f"honest only {worst_drop(honest_only):.3f}, clip + trimmed mean {worst_drop(trimmed):.3f}, "
          f"multikrum {worst_drop(kept):.3f}; limit {limit}")
