import pytest
import torch

from diredi_sim.losses import (FGDConfig, FGDLevelLoss, FGDLoss, build_focal_masks, compute_attention,
                               compute_score_distillation)


def test_masks_on_a_non_square_map_index_rows_by_y_and_columns_by_x():
    # map 4 rows (H) x 8 columns (W), stride 8: the batch is 32 px high, 64 px wide
    box = torch.tensor([[16.0, 8.0, 40.0, 16.0]])  # x 16..40 -> cols 2..4, y 8..16 -> row 1
    fg, bg = build_focal_masks([box], (4, 8), stride=8)
    assert fg.shape == (1, 4, 8)
    rows, cols = torch.nonzero(fg[0], as_tuple=True)
    assert sorted(set(rows.tolist())) == [1] and sorted(set(cols.tolist())) == [2, 3, 4]
    assert torch.allclose(fg[0, 1, 2:5], torch.full((3,), 1 / 3))  # scale mask 1/(h*w) = 1/(1*3)
    assert bg[0, 1, 2:5].sum() == 0
    assert torch.isclose(bg.sum(), torch.tensor(1.0))  # normalised by its sum
    assert torch.allclose(bg[0][bg[0] > 0], torch.full((29,), 1 / 29))


def test_overlapping_boxes_keep_the_larger_scale_value():
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 16.0, 16.0]])  # 4x4 cells and 1 cell
    fg, _ = build_focal_masks([boxes], (6, 5), stride=8)
    assert fg[0, 1, 1] == 1.0 and fg[0, 0, 0] == pytest.approx(1 / 16) and fg[0, 5, 4] == 0


def test_image_without_boxes_is_all_background():
    fg, bg = build_focal_masks([torch.zeros(0, 4)], (3, 5), stride=8)
    assert fg.sum() == 0 and torch.allclose(bg, torch.full((1, 3, 5), 1 / 15))


def test_attention_is_a_scaled_softmax():
    torch.manual_seed(0)
    features = torch.randn(2, 6, 3, 4)
    spatial, channel = compute_attention(features, 0.8)
    assert spatial.shape == (2, 3, 4) and channel.shape == (2, 6)
    assert torch.allclose(spatial.sum(dim=(1, 2)), torch.full((2,), 12.0))
    assert torch.allclose(channel.sum(dim=1), torch.full((2,), 6.0))


def _features(channels, seed, shapes=((8, 12), (4, 6), (2, 3))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, h, w, generator=g) for h, w in shapes]


def test_zero_loss_when_student_equals_teacher():
    loss = FGDLoss(16, 16)
    teacher = _features(16, 0)
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0]]), torch.zeros(0, 4)]
    terms = loss([t.clone() for t in teacher], teacher, boxes, (64, 96))
    assert set(terms) == {"fg", "bg", "mask", "global"}
    assert all(abs(v.item()) < 1e-9 for v in terms.values())
    different = loss(_features(16, 1), teacher, boxes, (64, 96))
    assert all(v.item() > 0 for v in different.values())


def test_gradients_reach_student_align_and_gcblocks_never_teacher():
    torch.manual_seed(0)
    loss = FGDLoss(8, 16, cfg=FGDConfig(alpha=1, beta=1, gamma=1, lambda_=1))
    student = [f.requires_grad_() for f in _features(8, 2)]
    teacher = [f.requires_grad_() for f in _features(16, 3)]
    boxes = [torch.tensor([[0.0, 0.0, 50.0, 40.0]]), torch.tensor([[30.0, 10.0, 90.0, 60.0]])]
    # two steps: the GcBlocks' zero-initialised last conv gets a gradient, then feeds one back
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        sum(loss(student, teacher, boxes, (64, 96)).values()).backward()
        optimizer.step()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert loss.levels[0].align is not None


def test_mismatched_shapes_are_an_error():
    level = FGDLevelLoss(8, 8)
    with pytest.raises(ValueError, match="do not match"):
        level(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 5), torch.zeros(1, 4, 5), torch.ones(1, 4, 5) / 20)


def test_score_distillation_is_zero_at_equality_and_positive_otherwise():
    logits = torch.randn(2, 10, 20)
    assert compute_score_distillation(logits.clone(), logits).abs() < 1e-6
    student = torch.randn(2, 10, 20, requires_grad=True)
    loss = compute_score_distillation(student, logits)
    loss.backward()
    assert loss > 0 and student.grad.abs().sum() > 0


def test_normalized_fgd_is_invariant_to_the_feature_scale():
    loss = FGDLoss(16, 16, cfg=FGDConfig(normalize=True))
    student, teacher = _features(16, 4), _features(16, 5)
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0]]), torch.tensor([[10.0, 20.0, 60.0, 50.0]])]
    small = loss(student, teacher, boxes, (64, 96))
    large = loss([6 * s for s in student], [6 * t for t in teacher], boxes, (64, 96))
    for key in small:
        assert torch.isclose(small[key], large[key], rtol=1e-4), key
    plain = FGDLoss(16, 16)(student, teacher, boxes, (64, 96))
    assert plain["fg"] > 0 and not torch.isclose(plain["fg"], FGDLoss(16, 16)([6 * s for s in student], [6 * t for t in teacher], boxes, (64, 96))["fg"])
    assert all(abs(v.item()) < 1e-9 for v in loss([t.clone() for t in teacher], teacher, boxes, (64, 96)).values())
