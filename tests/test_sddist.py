"""SD-Dist (diredi_sim/sddist.py, experiments/methods/sddist.py): what travels, the server's choice
of peers, heterogeneous widths, the distillation loss and the settings, on tiny real computations."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diredi_sim.config import ConfigError, DataConfig, config_from_dict, from_flat, to_flat
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.datasets import DataSets, pool_of
from diredi_sim.population import PopulationConfig
from diredi_sim.federation_config import FederationConfig, SDDistConfig
from diredi_sim.models import build_detector, count_parameters
from diredi_sim.sddist import (build_customer_edge, build_reference_targets, build_upload, compute_bernoulli_kl, compute_distance,
                               compute_peer_losses, compute_reference_logits, count_message_bytes, load_reference_images,
                               reference_grid, run_server_round, select_peers)
from experiments.methods.sddist import build_reference_set, check_sddist

TINY = SyntheticConfig(seed=3, num_train=24, num_val=16, num_test=16, min_objects=3, max_objects=5, min_object_size=24, clutter=2.0)
GRID = reference_grid(128)  # 16, 8, 4 cells a side: 336 positions
POSITIONS = 16 * 16 + 8 * 8 + 4 * 4


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> FederationConfig:
    data = DataConfig(cache_dir=str(tmp_path_factory.mktemp("data")), synthetic=TINY)
    return FederationConfig(data=data, population=PopulationConfig(customers=("exp1", "exp2"), generated=0),
                            sddist=SDDistConfig(q=2, k=1, reference_images=4))


def test_the_upload_holds_only_outputs_on_public_reference_images(tiny_config):
    reference = build_reference_set(tiny_config)
    assert len(reference) == 4
    customers = DataSets(tiny_config.data)
    private = {r.image_id for image_set in ("train", "val", "test") for r in customers.records(image_set, "all", pool="customer")}
    assert private and all(pool_of(r.image_id, tiny_config.data.public_fraction) == "public" for r in reference)
    assert not private & {r.image_id for r in reference}  # the reference set shares no image with any customer's pool

    torch.manual_seed(0)
    edge = build_detector("edge", "cpu")
    images, _ = load_reference_images(reference)
    upload = build_upload(edge, images, GRID, batch_size=3)  # two batches: 3 + 1
    assert list(upload) == ["outputs"]
    outputs = upload["outputs"]
    assert outputs.dtype == torch.float16 and outputs.shape == (4, POSITIONS, 20)
    assert count_message_bytes(upload) == 4 * POSITIONS * 20 * 2
    assert count_message_bytes(upload) < sum(count_parameters(edge).values()) * 4 / 20  # nothing the size of the weights
    # exactly the edge model's class logits on the reference images, at the fixed positions
    edge.eval()
    with torch.no_grad():
        expected = compute_reference_logits(edge, images, GRID)
    assert torch.equal(outputs, expected.half())
    # the first level's grid is the cls_logits map itself for a 128 px square image
    with torch.no_grad():
        cls = edge.head(list(edge.backbone(edge.transform(images[:1])[0].tensors).values()))["cls_logits"]
    assert torch.allclose(outputs[0, :256].float(), cls[0, :256], atol=1e-2, rtol=1e-2)


def test_two_edge_widths_send_uploads_of_one_shape():
    torch.manual_seed(0)
    deployed = build_detector("edge", "cpu")  # width 0.5
    wide = build_customer_edge(deployed, 0.75, "cpu", 20)
    assert wide.spec.width_mult == 0.75 and count_parameters(wide)["backbone"] > count_parameters(deployed)["backbone"]
    assert torch.equal(wide.state_dict()["head.classification_head.cls_logits.weight"],
                       deployed.state_dict()["head.classification_head.cls_logits.weight"])  # the head starts from the deployed one's
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128), torch.rand(3, 128, 80)]  # the padding is cut off
    narrow_up, wide_up = build_upload(deployed, images, GRID), build_upload(wide, images, GRID)
    assert narrow_up["outputs"].shape == wide_up["outputs"].shape == (3, POSITIONS, 20)
    assert compute_distance(narrow_up["outputs"], wide_up["outputs"], 3.0) > 0.0


def test_the_k_peers_are_the_nearest_by_kl_among_the_top_q_by_quality():
    # client c outputs the constant logit value[c]; the top 4 by quality loss are 5, 1, 3, 0 (2 and 4 are worst)
    value = {0: 0.0, 1: 0.4, 2: 0.8, 3: 1.2, 4: 1.6, 5: 2.0}
    outputs = {c: torch.full((2, 5, 3), v) for c, v in value.items()}
    losses = {0: 0.4, 1: 0.2, 2: 0.9, 3: 0.3, 4: 0.8, 5: 0.1}
    peers = select_peers(outputs, losses, q=4, k=2, temperature=3.0)
    # nearest by value among {0, 1, 3, 5} without itself; a tie in value gap is taken whole by k = 2
    assert {c: set(p) for c, p in peers.items()} == {0: {1, 3}, 1: {0, 3}, 2: {1, 3}, 3: {1, 5}, 4: {3, 5}, 5: {1, 3}}
    for client, chosen in peers.items():  # listed nearest first
        distances = [compute_distance(outputs[client], outputs[p], 3.0) for p in chosen]
        assert distances == sorted(distances)
    assert select_peers(outputs, losses, q=6, k=1, temperature=3.0)[2] in ([1], [3])  # 2 and 4 may be peers once q = 6
    assert all(select_peers(outputs, losses, q=6, k=1, temperature=3.0)[c] == [c + 1 if c < 5 else 4] for c in (0, 5))
    with pytest.raises(ValueError, match="k < q"):
        select_peers(outputs, losses, q=2, k=2, temperature=3.0)


def test_the_server_scores_quality_on_the_labelled_reference_set_and_averages_the_chosen_peers():
    torch.manual_seed(0)
    deployed = build_detector("edge", "cpu")
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 72.0, 72.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[30.0, 20.0, 120.0, 110.0]]), "labels": torch.tensor([14])}]
    reference = build_reference_targets(deployed, images, targets, GRID, 20)
    assert reference.shape == (2, POSITIONS, 20) and reference[..., 3].sum() > 0 and reference[..., 14].sum() > 0
    assert reference.sum(-1).max() <= 1.0 and reference[..., [0, 1, 2]].sum() == 0  # a location's mass is one class at most
    perfect = torch.where(reference > 0.5, 6.0, -6.0)
    noise = torch.randn(reference.shape)
    # quality from best to worst: 0, 1, 2 (ever noisier versions of the labels), 3 (the labels inverted)
    uploads = {c: {"outputs": (perfect + scale * noise).half()} for c, scale in ((0, 0.5), (1, 2.0), (2, 4.0))}
    uploads[3] = {"outputs": (-perfect).half()}
    downloads, decided = run_server_round(uploads, reference, [3, 14], q=3, k=2, temperature=3.0)
    losses = decided["quality_loss"]
    assert losses[0] < losses[1] < losses[2] < losses[3]
    assert all(3 not in peers for peers in decided["peers"].values())  # the worst is nobody's peer
    assert len(decided["peers"][3]) == 2 and set(decided["peers"][3]) <= {0, 1, 2}
    assert sorted(decided["peers"][0]) == [1, 2]
    for client, download in downloads.items():
        assert list(download) == ["peer_mean"] and download["peer_mean"].dtype == torch.float16
        chosen = decided["peers"][client]
        mean = (uploads[chosen[0]]["outputs"].float() + uploads[chosen[1]]["outputs"].float()) / 2
        assert torch.equal(download["peer_mean"], mean.half())
    assert torch.equal(uploads[0]["outputs"], (perfect + 0.5 * noise).half())  # averaging left the uploads as they were
    with pytest.raises(ValueError, match="upload holds"):
        run_server_round({**uploads, 4: {"outputs": uploads[0]["outputs"], "weights": torch.zeros(3)}}, reference, [3], q=3, k=2,
                         temperature=3.0)


def test_the_distillation_loss_pulls_the_outputs_toward_the_peer_mean():
    torch.manual_seed(0)
    own_images = [torch.rand(3, 128, 128) for _ in range(2)]
    own_targets = [{"boxes": torch.tensor([[10.0, 10.0, 70.0, 70.0]]), "labels": torch.tensor([7])},
                   {"boxes": torch.tensor([[40.0, 30.0, 110.0, 120.0]]), "labels": torch.tensor([11])}]
    reference_images = [torch.rand(3, 128, 128) for _ in range(3)]
    start = build_detector("edge", "cpu").state_dict()
    # the peers' mean: scores far from a fresh model's (its prior is sigmoid(-4.6) = 0.01 everywhere)
    peer_mean = torch.full((3, POSITIONS, 20), -1.0).half()

    def kl_to_peer_mean(rho: float, steps: int) -> float:
        """KL(peer mean || own) of the uploaded outputs (eval mode) after ``steps`` real steps."""
        torch.manual_seed(1)
        edge = build_detector("edge", "cpu")
        edge.load_state_dict(start)
        losses = compute_peer_losses(edge, reference_images, peer_mean, rho=rho, temperature=3.0, grid=GRID, batch_size=2, seed=0)
        optimizer = torch.optim.AdamW(edge.parameters(), lr=3e-3)
        edge.train()
        for _ in range(steps):
            terms = losses(own_images, own_targets)
            assert set(terms) == {"task.classification", "task.bbox_regression", "task.bbox_ctrness", "distill.peers"}
            optimizer.zero_grad()
            sum(terms.values()).backward()
            optimizer.step()
        return float(compute_bernoulli_kl(peer_mean, build_upload(edge, reference_images, GRID)["outputs"], 3.0))

    before, distilled, task_only = kl_to_peer_mean(0.9, 0), kl_to_peer_mean(0.9, 5), kl_to_peer_mean(0.0, 5)
    print(f"KL(peer mean || own): {before:.4g} at the start, {distilled:.4g} after 5 steps with rho 0.9, {task_only:.4g} with rho 0")
    assert distilled < 0.5 * before and distilled < 0.5 * task_only


def test_the_first_round_trains_on_the_task_alone():
    edge = build_detector("edge", "cpu")
    images = [torch.rand(3, 128, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 70.0, 70.0]]), "labels": torch.tensor([7])}]
    terms = compute_peer_losses(edge, images, None, rho=0.9, temperature=3.0, grid=GRID, batch_size=1, seed=0)(images, targets)
    assert set(terms) == {"task.classification", "task.bbox_regression", "task.bbox_ctrness"}


def test_the_settings_are_checked_and_travel_in_the_flat_form(tiny_config):
    for changes, key in (({"q": 1, "k": 1}, "sddist.q"), ({"q": 3, "k": 3}, "sddist.k"), ({"k": 0}, "sddist.k"),
                         ({"temperature": 0.0}, "sddist.temperature"), ({"rho": 1.5}, "sddist.rho"),
                         ({"reference_images": 0}, "sddist.reference_images"), ({"edge_widths": "0.5,wide"}, "sddist.edge_widths"),
                         ({"edge_widths": "0.5,0"}, "sddist.edge_widths")):
        with pytest.raises(ConfigError, match=key):
            SDDistConfig(**changes)
    with pytest.raises(ConfigError, match="sddist.k"):
        config_from_dict(FederationConfig, {"sddist": {"q": 2, "k": 2}})
    assert SDDistConfig(edge_widths="0.5, 0.75").widths == (0.5, 0.75) and SDDistConfig().widths == ()
    with pytest.raises(ConfigError, match=r"sddist.q = 3: must be <= the number of customers \(2\)"):
        check_sddist(replace(tiny_config, sddist=SDDistConfig(q=3, k=2)))
    check_sddist(tiny_config)
    config = replace(tiny_config, sddist=SDDistConfig(q=2, k=1, edge_widths="0.5,0.75"))
    assert from_flat(to_flat(config), FederationConfig) == config


def test_at_equal_compute_own_and_reference_batches_fill_the_budget():
    from experiments.methods.sddist import steps_per_round

    assert steps_per_round(None, 16, 3) is None and steps_per_round(0, 16, 3) is None
    # 3 rounds: round 1 own batches only, rounds 2 and 3 own + reference: 5 batches of 16 per step index
    assert steps_per_round(2960, 16, 3) == 37  # 37 * 16 * 5 = 2960
    assert steps_per_round(2961, 16, 3) == 38 and steps_per_round(1, 16, 3) == 1
    assert steps_per_round(160, 16, 1) == 10  # one round: no reference batch


def test_compare_runs_sddist_with_two_widths_and_counts_what_travelled(tiny_config, tmp_path):
    import json

    from diredi_sim.config import TrainConfig
    from diredi_sim.federation_config import BaselineConfig
    from diredi_sim.settings import PipelineConfig
    from experiments.compare import run_compare

    stage = TrainConfig(epochs=1, batch_size=8, lr=0.01, warmup_steps=1, max_train_images=8, max_eval_images=4)
    pipeline = PipelineConfig(teacher=stage, distill_a=stage, distill_b=stage, rd=stage, distill_c=stage, direct=stage, local=stage,
                              cache_dir=str(tmp_path / "manufacturer"), eval_batch_size=16, max_eval_images=8)
    config = replace(tiny_config, runs_dir=str(tmp_path / "runs"), pipeline=pipeline,
                     baselines=BaselineConfig(methods=("sddist",), rounds=2, local=stage),
                     sddist=SDDistConfig(q=2, k=1, reference_images=3, edge_widths="0.5,0.75"))
    torch.set_num_threads(1)
    results = json.loads((run_compare(config) / "compare.json").read_text())["results"]
    assert [(r["method"], r["customer"], r["edge_width"]) for r in results] == [("sddist", "exp1", 0.5), ("sddist", "exp2", 0.75)]
    for row in results:
        # one upload and one download (after round 1 of 2): 3 reference images x 336 positions x 20 classes in float16
        assert row["uplink_bytes"] == row["downlink_bytes"] == 3 * POSITIONS * 20 * 2
        # two rounds of 8 presumed + 8 own images (max_train_images caps each), and round 2's two
        # steps each carry a reference batch of min(8, 3) images
        assert row["reference_images"] == 2 * 3 and row["train_images"] == 2 * (8 + 8) + 2 * 3
        assert [entry["peers"] for entry in row["peers"]] == [[1 - row["partition_id"]]]  # the other one, its only peer
        assert 0.0 <= row["mAP"] <= 1.0 and "gain" in row and "forgetting" in row
