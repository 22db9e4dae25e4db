import pytest
import torch

from diredi_sim.models import (PARTS, PRESETS, ROLES, build_detector, count_parameters, detect, extract_features,
                               part_of, partition_parameters, split_head_by_level)


def _targets(n=2):
    return [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 70.0, 120.0, 126.0]]), "labels": torch.tensor([3, 14])}
            for _ in range(n)]


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("role", ROLES)
def test_every_parameter_lands_in_exactly_one_part(role, preset):
    detector = build_detector(role, preset)
    parts = partition_parameters(detector, include_buffers=True)
    names = [n for n, _ in detector.named_parameters()] + [n for n, _ in detector.named_buffers()]
    flat = [n for part in PARTS for n in parts[part]]
    assert sorted(flat) == sorted(names) and len(flat) == len(set(flat))
    assert all(parts[p] for p in PARTS)  # no part is empty
    assert all(n.startswith("backbone.fpn.") for n in parts["neck"])


def test_part_of_rejects_foreign_names():
    with pytest.raises(KeyError, match="transform.weight"):
        part_of("transform.weight")


@pytest.mark.parametrize("role", ROLES)
def test_cpu_preset_has_three_levels_at_strides_8_16_32(role):
    detector = build_detector(role, "cpu").eval()
    out = extract_features(detector, [torch.rand(3, 128, 128), torch.rand(3, 96, 128)])
    assert [tuple(f.shape[-2:]) for f in out.features] == [(16, 16), (8, 8), (4, 4)]
    channels = detector.spec.fpn_channels
    assert all(f.shape[:2] == (2, channels) for f in out.features)
    anchors = sum(f.shape[-1] * f.shape[-2] for f in out.features)
    assert out.head["cls_logits"].shape == (2, anchors, 20)
    assert out.head["bbox_regression"].shape == (2, anchors, 4)
    assert out.losses is None


def test_extract_features_in_train_mode_gives_losses_that_train():
    torch.manual_seed(0)
    detector = build_detector("edge", "cpu").train()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    out = extract_features(detector, images, _targets())
    assert set(out.losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert out.targets[0]["boxes"].shape == (2, 4)
    # the same losses as torchvision's own forward in train mode
    reference = detector(images, _targets())
    for key, value in reference.items():
        assert torch.allclose(out.losses[key], value)
    # the features are the ones the head saw: gradients reach backbone, neck and head
    sum(out.losses.values()).backward()
    grads = {part: any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in detector.named_parameters() if part_of(n) == part)
             for part in PARTS}
    assert grads == {"backbone": True, "neck": True, "head": True}


def test_extract_features_losses_equal_torchvisions_compute_loss_exactly():
    torch.manual_seed(1)
    detector = build_detector("edge", "cpu").train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 70.0, 120.0, 126.0]]), "labels": torch.tensor([3, 14])},
               {"boxes": torch.tensor([[5.0, 5.0, 90.0, 80.0]]), "labels": torch.tensor([7])}]
    out = extract_features(detector, images, targets)
    # torchvision's own FCOS.compute_loss (its matching, then FCOSHead.compute_loss) on the same head outputs
    batch, _ = detector.transform(images, targets)
    anchors = detector.anchor_generator(batch, out.features)
    reference = detector.compute_loss(out.targets, out.head, anchors, [f.size(2) * f.size(3) for f in out.features])
    assert set(out.losses) == set(reference)
    for key, value in reference.items():
        assert torch.equal(out.losses[key], value), key
    # the exposed matching is the one the losses used
    again = detector.head.compute_loss(out.targets, out.head, anchors, out.matched_idxs)
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_matched_idxs_has_one_entry_per_image_and_location():
    detector = build_detector("edge", "cpu").eval()
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128), torch.rand(3, 128, 128)]
    targets = _targets(2) + [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    out = extract_features(detector, images, targets)
    anchors = out.head["cls_logits"].shape[1]
    assert len(out.matched_idxs) == 3
    assert all(m.shape == (anchors,) and m.dtype == torch.int64 for m in out.matched_idxs)
    for m, target in zip(out.matched_idxs[:2], out.targets[:2]):
        assert (m >= 0).any() and set(m.unique().tolist()) <= {-1, 0, 1}
    assert (out.matched_idxs[2] == -1).all()  # no boxes: all background
    assert out.num_foreground == sum(int((m >= 0).sum()) for m in out.matched_idxs) > 0
    # positives lie inside their box: location centres of level 0 (stride 8) at (x, y) = (8j + 4, 8i + 4)
    level0 = out.matched_idxs[0][:16 * 16].reshape(16, 16)
    for i, j in torch.nonzero(level0 >= 0).tolist():
        x1, y1, x2, y2 = out.targets[0]["boxes"][level0[i, j]].tolist()
        assert x1 < 8 * j + 4 < x2 and y1 < 8 * i + 4 < y2
    assert extract_features(detector, images).matched_idxs is None


def test_split_head_by_level_matches_feature_maps():
    detector = build_detector("edge", "cpu").eval()
    out = extract_features(detector, [torch.rand(3, 128, 128)])
    maps = split_head_by_level(out.head["cls_logits"], out.features)
    assert [m.shape for m in maps] == [torch.Size([1, 20, 16, 16]), torch.Size([1, 20, 8, 8]), torch.Size([1, 20, 4, 4])]
    # position (y=2, x=5) of level 0 is anchor index 2*16+5 in FCOS's flattened order
    assert torch.equal(maps[0][0, :, 2, 5], out.head["cls_logits"][0, 2 * 16 + 5])


def test_detect_returns_boxes_in_input_frame_and_restores_mode():
    detector = build_detector("edge", "cpu").train()
    result = detect(detector, [torch.rand(3, 256, 200)])
    assert detector.training
    boxes = result[0]["boxes"]
    assert boxes.shape[1] == 4 and (boxes[:, 2] <= 200 + 1e-3).all() and (boxes[:, 3] <= 256 + 1e-3).all()


def test_sizes_are_ordered_teacher_tutor_edge():
    for preset in PRESETS:
        sizes = [sum(count_parameters(build_detector(r, preset)).values()) for r in ROLES]
        assert sizes[0] > sizes[1] > sizes[2], (preset, sizes)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="preset 'gpu'"):
        build_detector("edge", "gpu")
    with pytest.raises(ValueError, match="role 'student'"):
        build_detector("student", "cpu")
