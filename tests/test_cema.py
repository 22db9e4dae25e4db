"""CEMA carried over to detection (diredi_sim/cema.py, experiments/methods/cema.py): corruptions,
the entropy of a detection and its thresholds, the upload filters, and real runs on tiny data
(models at random initialisation, their class scores sharpened so that entropies spread)."""

from __future__ import annotations

import math

import pytest
import torch

from diredi_sim.cema import (CORRUPTIONS, EntropyFilter, SimilarityFilter, compute_class_profile, compute_detection_entropy, corrupt,
                             entropy_margins, norm_affine_names, run_cema, write_shifted)
from diredi_sim.config import ConfigError, DataConfig
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.datasets import DataSets
from diredi_sim.population import PopulationConfig
from diredi_sim.federation_config import CEMAConfig, FederationConfig
from diredi_sim.models import build_detector, extract_features
from diredi_sim.train import build_loader

TINY = SyntheticConfig(seed=3, num_train=24, num_val=8, num_test=16, min_objects=3, max_objects=5, min_object_size=24, clutter=2.0)


def sharpened(role: str, seed: int) -> torch.nn.Module:
    """A random detector whose class logits vary enough between locations and images for
    entropies and class profiles to differ (at random initialisation they are all near ln C)."""
    torch.manual_seed(seed)
    detector = build_detector(role, "cpu")
    with torch.no_grad():
        detector.head.classification_head.cls_logits.weight.mul_(30.0)
    return detector


def state_of(detector: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in detector.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cema-data")
    return DataConfig(cache_dir=str(folder), synthetic=TINY), folder


def test_corruptions_are_deterministic_from_the_seed_and_grow_with_severity():
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(3, 16, 16, generator=generator)
    image = (torch.nn.functional.interpolate(base[None], size=(64, 64), mode="bilinear")[0] * 255).to(torch.uint8)
    for name in CORRUPTIONS:
        distances = []
        for severity in range(1, 6):
            shifted = corrupt(image, name, severity, seed=7, image_id="000001")
            assert shifted.dtype == torch.uint8 and shifted.shape == image.shape
            assert torch.equal(shifted, corrupt(image, name, severity, seed=7, image_id="000001")), (name, severity)
            distances.append(float((shifted.float() - image.float()).abs().mean()))
        assert all(a < b for a, b in zip(distances, distances[1:])), (name, distances)
    noisy = corrupt(image, "gaussian_noise", 3, seed=7, image_id="000001")
    assert not torch.equal(noisy, corrupt(image, "gaussian_noise", 3, seed=8, image_id="000001"))  # another seed
    assert not torch.equal(noisy, corrupt(image, "gaussian_noise", 3, seed=7, image_id="000002"))  # another image
    with pytest.raises(ValueError, match="fog"):
        corrupt(image, "fog", 3, seed=7, image_id="000001")
    with pytest.raises(ConfigError, match="cema.severity"):
        CEMAConfig(severity=6)
    with pytest.raises(ConfigError, match="cema.corruptions"):
        CEMAConfig(corruptions=("gaussian_noise", "fog"))


def test_entropy_thresholds_scale_with_ln_c():
    for classes in (20, 80):
        e_min, e_max = entropy_margins(classes, 0.1, 0.4)
        assert e_min == pytest.approx(0.1 * math.log(classes)) and e_max == pytest.approx(0.4 * math.log(classes))
        flat = torch.zeros(2, 50, classes)  # every location uniform over the C classes: the largest entropy
        assert compute_detection_entropy(flat, 5) == pytest.approx(torch.full((2,), math.log(classes)))
        peaked = flat.clone()
        peaked[:, :, 3] = 30.0
        assert float(compute_detection_entropy(peaked, 5).max()) < 1e-6
    # the top-k locations are those of the highest class score: a confident location among uniform ones decides
    logits = torch.zeros(1, 50, 20)
    logits[0, 17, 4] = 40.0
    assert float(compute_detection_entropy(logits, 1)) < 1e-6
    assert float(compute_detection_entropy(logits, 2)) == pytest.approx(math.log(20) / 2, rel=1e-4)


def test_dynamic_e_max_follows_the_mean_entropy_after_warm_up():
    fixed = EntropyFilter(0.0, 1.0)
    assert fixed.keep(torch.tensor([0.5, 1.5, 0.0])).tolist() == [True, False, False]  # E_min < E < E_max, strictly
    dynamic = EntropyFilter(0.0, 1.0, warm_up=4, coeff=0.6)
    dynamic.keep(torch.tensor([0.8, 0.8]))
    assert dynamic.threshold == 1.0  # 2 images seen: still warming up
    dynamic.keep(torch.tensor([0.8, 0.8]))  # warm-up mean 0.8
    assert dynamic.threshold == pytest.approx(0.6)
    kept = dynamic.keep(torch.tensor([0.2, 0.2, 0.2, 0.2]))  # mean 0.5 -> E_max 1.0 * 0.5 / 0.8 * 0.6
    assert dynamic.threshold == pytest.approx(0.375) and kept.all()


def test_similarity_filter_drops_a_near_duplicate():
    def image(peak: int) -> torch.Tensor:
        logits = torch.zeros(1, 30, 20)
        logits[0, :5, peak] = 6.0
        return logits

    similarity = SimilarityFilter(d_margin=0.05)
    first = compute_class_profile(image(3), 5)
    assert similarity.keep(first).tolist() == [True]  # the first batch starts the EMA
    near = compute_class_profile(image(3) + 0.01 * torch.randn(1, 30, 20, generator=torch.Generator().manual_seed(0)), 5)
    other = compute_class_profile(image(11), 5)
    assert similarity.keep(torch.cat([near, other])).tolist() == [False, True]
    assert torch.nn.functional.cosine_similarity(near, first).item() > 0.95


def test_cema_run_uploads_within_the_margins_and_adapts_only_norm_affine_parameters(tiny_data, tmp_path):
    data, _ = tiny_data
    torch.set_num_threads(1)
    records = DataSets(data).records("train", "all", pool="all")
    stream = write_shifted(records, tmp_path / "stream", "gaussian_noise", 3, seed=5)
    edge, tutor = sharpened("edge", 0), sharpened("tutor", 1)
    edge_before, tutor_before = state_of(edge), state_of(tutor)
    images = [build_loader(stream, batch_size=len(stream), train=False).dataset[i][0] for i in range(len(stream))]
    edge.eval()
    with torch.no_grad():
        entropies = compute_detection_entropy(extract_features(edge, images).head["cls_logits"], 10)
    low, high = (float(torch.quantile(entropies, q)) / math.log(20) for q in (0.15, 0.85))
    cfg = CEMAConfig(ent_low=low, ent_high=high, batch_size=6, replay_per_step=4, replay_start=4, top_k=10,
                     edge_lr=0.05, tutor_lr=0.05)
    outcome = run_cema(tutor, edge, stream, cfg, seed=5)

    decisions = {d.image_id: d for d in outcome.decisions}
    assert len(decisions) == len(stream) == outcome.stream_images
    uploaded = [decisions[i] for i in outcome.uploaded]
    assert uploaded and all(d.uploaded and d.e_min < d.entropy < d.e_max for d in uploaded)
    assert {d.reason for d in decisions.values()} >= {"uploaded", "entropy"}
    assert all(not (d.e_min < d.entropy < d.e_max) for d in decisions.values() if d.reason == "entropy")
    for i, record in enumerate(stream[:cfg.batch_size]):  # the first batch was filtered by the deployed edge itself
        assert decisions[record.image_id].entropy == pytest.approx(float(entropies[i]), abs=1e-5)
    assert outcome.uplink_bytes == sum(r.image_path.stat().st_size for r in stream if r.image_id in set(outcome.uploaded))
    assert outcome.cloud_steps >= 1 and outcome.downlinks >= 1
    assert any(len(step) == 4 for step in outcome.losses)  # a step with the tutor's and the edge's terms
    assert all(math.isfinite(v) for step in outcome.losses for v in step.values())

    for name, before, after in (("edge", edge_before, state_of(edge)), ("tutor", tutor_before, state_of(tutor))):
        norm = set(norm_affine_names(edge if name == "edge" else tutor))
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and changed <= norm, (name, sorted(changed - norm)[:3])  # running statistics included: untouched
    down = outcome.last_downlink
    assert set(down) == set(norm_affine_names(edge)) and all(k.endswith((".weight", ".bias")) for k in down)
    params = dict(edge.named_parameters())
    assert all(torch.equal(down[k], params[k].detach()) for k in down)  # the customer's edge holds the last downlink
    assert outcome.downlink_bytes == outcome.downlinks * sum(v.numel() * 4 for v in down.values())


def test_cema_customer_row_says_what_left_the_customer(tiny_data):
    from experiments.methods import REGISTRY
    from experiments.methods.cema import cema_customer_work

    data, folder = tiny_data
    torch.set_num_threads(1)
    config = FederationConfig(data=data, population=PopulationConfig(customers=("exp1",), generated=0),
                              cema=CEMAConfig(corruptions=("contrast",), severity=4, ent_high=0.5, batch_size=4, replay_per_step=0))
    row = cema_customer_work(config, 0, state_of(sharpened("tutor", 1)), state_of(sharpened("edge", 0)), workdir=str(folder))
    assert "cema" in REGISTRY and row["raw_data_leaves"] is True and row["corruption"] == "contrast"
    assert row["stream_images"] == 9 and 1 <= row["uploaded_images"] <= row["stream_images"]
    assert row["uploaded_fraction"] == pytest.approx(row["uploaded_images"] / row["stream_images"])
    assert row["uplink_bytes"] > 0 and row["downlink_bytes"] > 0 and row["train_images"] >= row["uploaded_images"]
    for key in ("mAP", "precision", "recall", "f1", "mAP_shift_before", "mAP_clean_before"):
        assert 0.0 <= row[key] <= 1.0, key
    assert not list(folder.glob("cema-*"))  # the shifted copies are gone
