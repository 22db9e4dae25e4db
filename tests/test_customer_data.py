"""Who holds which images, and how Tutor1's and Tutor2's batches are built from them.

The manufacturer's public pool and the customers' pool are disjoint; Tutor2 (RD A) trains on
exactly Tutor1's presumed batches (same images, order and flips; its dropped classes' boxes
removed) plus the customer's own images, so that the delta carries the customer's data only.
"""
import pytest
import torch

from diredi_sim.config import DataConfig, TrainConfig
from diredi_sim.data import VOC_CLASSES
from diredi_sim.data.splits import keep_classes
from diredi_sim.data.synthetic import SyntheticConfig
from diredi_sim.datasets import DataSets, pool_of, select_customer_data
from diredi_sim.settings import PipelineConfig
from diredi_sim.train import MixedLoader, build_loader

SMALL = SyntheticConfig(seed=5, num_train=80, num_val=24, num_test=24, min_objects=2, max_objects=4, min_object_size=20)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return DataSets(DataConfig(cache_dir=str(tmp_path_factory.mktemp("data")), synthetic=SMALL))


def test_public_and_customer_pools_are_disjoint_and_cover_every_image(datasets):
    for image_set in ("train", "val", "test"):
        every = {r.image_id for r in datasets.records(image_set, "all", pool="all")}
        public = {r.image_id for r in datasets.records(image_set, "all", pool="public")}
        customer = {r.image_id for r in datasets.records(image_set, "all", pool="customer")}
        assert public and customer
        assert not public & customer, image_set
        assert public | customer == every
    ids = [f"{i:06d}" for i in range(1, 4001)]
    share = sum(pool_of(i, 0.5) == "public" for i in ids) / len(ids)
    assert 0.47 < share < 0.53  # a hash of the id: about the configured fraction
    assert [pool_of(i, 0.25) for i in ids] == [pool_of(i, 0.25) for i in ids]  # depends on the id alone
    with pytest.raises(ValueError, match="pool 'private'"):
        datasets.records("train", "all", pool="private")


def test_customer_data_keeps_the_presumed_images_and_removes_only_the_dropped_boxes(datasets):
    pipeline = PipelineConfig(customer="exp2")
    data = select_customer_data(datasets, pipeline, "exp2", TrainConfig())
    horse = VOC_CLASSES.index("horse")
    assert [r.image_id for r in data.presumed_kept] == [r.image_id for r in data.presumed]
    assert any(horse in r.labels for r in data.presumed)
    assert not any(horse in r.labels for r in data.presumed_kept)
    public = {r.image_id for r in datasets.records("train", "all", pool="public")}
    assert {r.image_id for r in data.presumed} <= public
    assert not {r.image_id for r in data.own} & public  # the customer's own images are not the manufacturer's
    assert data.combined == data.presumed_kept + data.own
    kept = keep_classes(data.presumed, ["aeroplane"])
    assert len(kept) == len(data.presumed)  # images without boxes left stay (as negatives)


def test_tutor2_batches_are_tutor1_batches_plus_the_customers_images(datasets):
    data = select_customer_data(datasets, PipelineConfig(customer="exp2"), "exp2", TrainConfig())
    batch, extra = 4, 3

    def batches(presumed, own, per_batch):
        loader = MixedLoader(build_loader(presumed, batch_size=batch, train=True, seed=11, hflip_prob=0.5), own,
                             extra_per_batch=per_batch, seed=11, hflip_prob=0.5)
        out = []
        for epoch in (1, 2):
            loader.dataset.set_epoch(epoch)  # as fit() does
            out += list(loader)
        return out, sum(len(images) for images, _ in out)

    tutor1, images1 = batches(data.presumed, (), 0)
    tutor2, images2 = batches(data.presumed_kept, data.own, extra)
    assert len(tutor1) == len(tutor2) > 2
    own_ids = {r.image_id for r in data.own}
    for (images_a, targets_a), (images_b, targets_b) in zip(tutor1, tutor2):
        assert len(images_b) == len(images_a) + extra
        assert [t["image_id"] for t in targets_b[:len(images_a)]] == [t["image_id"] for t in targets_a]
        assert all(torch.equal(a, b) for a, b in zip(images_a, images_b))  # same pixels: same flips
        assert {t["image_id"] for t in targets_b[len(images_a):]} <= own_ids
    assert images2 == images1 + extra * len(tutor2)


def test_separate_customer_loss_gives_tutor2_tutor1s_presumed_loss_plus_the_customers():
    """RD A's "separate" loss: the presumed part of Tutor2's batch is weighed as Tutor1's whole
    batch (FCOS normalises by the batch's positives), the customer's images apart. "joint"
    (one loss over the extended batch) weighs the presumed part differently."""
    from diredi_sim.models import build_detector
    from diredi_sim.train import Distiller, KDLoss, SplitLosses

    torch.manual_seed(0)
    tutor, edge = build_detector("tutor", "cpu"), build_detector("edge", "cpu")
    distiller = Distiller(edge, tutor, KDLoss(feature_weight=1.0, task_weight=1.0)).eval()
    data = select_customer_data(DataSets(DataConfig(synthetic=SMALL)), PipelineConfig(customer="exp1"), "exp1", TrainConfig())
    presumed = build_loader(data.presumed, batch_size=4, train=True, seed=3)
    images1, targets1 = next(iter(presumed))
    images2, targets2 = next(iter(MixedLoader(build_loader(data.presumed, batch_size=4, train=True, seed=3), data.own,
                                              extra_per_batch=2, seed=3)))
    with torch.no_grad():
        tutor1 = distiller(list(images1), list(targets1))
        separate = SplitLosses(distiller, 2)(list(images2), list(targets2))
        own_alone = distiller(list(images2[4:]), list(targets2[4:]))
        joint = distiller(list(images2), list(targets2))
    assert list(separate) == list(tutor1)
    for term, value in tutor1.items():
        assert torch.allclose(separate[term] - own_alone[term], value, rtol=1e-5, atol=1e-6), term
    task = [k for k in tutor1 if k.startswith("task.")]
    assert any(not torch.allclose(joint[k], separate[k], rtol=1e-3) for k in task)
