import pytest
import torch
from torch import Tensor

from diredi_sim.losses import (FGDConfig, FGDLevelLoss, FGDLoss, build_focal_masks, compute_attention,
                               compute_response_distillation, compute_score_distillation)


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
        assert p.grad is not None, name
        if name.endswith("context_mask.bias"):
            continue  # shifts every softmax logit alike: its gradient is zero but for rounding
        assert p.grad.abs().sum() > 0, name
    assert loss.levels[0].align is not None


def test_aligning_the_teacher_holds_the_student_to_the_teachers_features():
    """RD's teacher (the edge) is smaller than its student. FGD's own alignment maps the student's
    8 channels onto the teacher's 4: a student with information beyond the teacher's still reaches
    zero loss. Mapping the teacher's 4 channels onto the student's 8 (``align="teacher"``) leaves
    that student a loss no align conv removes, the same student as an affine image of the
    teacher's features none; gradients reach the student and the align conv, never the teacher."""
    torch.manual_seed(0)
    fg = torch.ones(2, 6, 6) / 36
    bg = torch.zeros(2, 6, 6)
    teacher = torch.randn(2, 4, 6, 6)
    rich = torch.randn(2, 8, 6, 6)  # 8 independent channels
    teacher_of_rich = torch.einsum("oc,nchw->nohw", torch.randn(4, 8), rich)  # the teacher a linear map of it
    image = torch.einsum("oc,nchw->nohw", torch.randn(8, 4), teacher) + 0.5  # an affine image of the teacher

    def fitted_fg(align: str, student: Tensor, teacher: Tensor) -> float:
        level = FGDLevelLoss(8, 4, FGDConfig(normalize=True), align=align)
        assert tuple(level.align.weight.shape[:2]) == ((4, 8) if align == "student" else (8, 4))
        optimizer = torch.optim.Adam(level.align.parameters(), lr=0.05)
        for _ in range(600):
            optimizer.zero_grad()
            loss = level(student, teacher, fg, bg)["fg"]
            loss.backward()
            optimizer.step()
        return float(loss.detach()) / FGDConfig().alpha

    assert fitted_fg("student", rich, teacher_of_rich) < 1e-3
    assert fitted_fg("teacher", rich, teacher_of_rich) > 0.1
    assert fitted_fg("teacher", image, teacher) < 1e-3
    student, source = rich.clone().requires_grad_(), teacher.clone().requires_grad_()
    level = FGDLevelLoss(8, 4, align="teacher")
    sum(level(student, source, fg, bg).values()).backward()
    assert student.grad.abs().sum() > 0 and level.align.weight.grad.abs().sum() > 0 and source.grad is None
    with pytest.raises(ValueError, match="align 'edge'"):
        FGDLevelLoss(8, 4, align="edge")


def test_mismatched_shapes_are_an_error():
    level = FGDLevelLoss(8, 8)
    with pytest.raises(ValueError, match="do not match"):
        level(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 5), torch.zeros(1, 4, 5), torch.ones(1, 4, 5) / 20)


def test_score_distillation_is_zero_at_equality_and_positive_otherwise():
    logits = torch.randn(2, 10, 20)
    assert compute_score_distillation(logits.clone(), logits, num_foreground=3).abs() < 1e-6
    student = torch.randn(2, 10, 20, requires_grad=True)
    loss = compute_score_distillation(student, logits, num_foreground=3)
    loss.backward()
    assert loss > 0 and student.grad.abs().sum() > 0


def test_score_distillation_over_given_classes_ignores_the_other_columns():
    teacher, student = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    changed = student.clone()
    changed[..., 3] += 5.0  # a class outside the given ones
    kept = compute_score_distillation(student, teacher, num_foreground=2, classes=[0, 2])
    assert torch.isclose(compute_score_distillation(changed, teacher, num_foreground=2, classes=[0, 2]), kept)
    assert torch.isclose(kept, compute_score_distillation(student[..., [0, 2]], teacher[..., [0, 2]], num_foreground=2))


def _head(n=2, a=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"cls_logits": torch.randn(n, a, k, generator=g), "bbox_regression": torch.rand(n, a, 4, generator=g) * 3,
            "bbox_ctrness": torch.randn(n, a, 1, generator=g)}


def test_response_distillation_is_the_score_weighted_box_and_centreness_gap():
    teacher, student = _head(seed=0), _head(seed=1)
    assert compute_response_distillation({k: v.clone() for k, v in teacher.items()}, teacher, num_foreground=2).abs() < 1e-6
    weight = torch.sigmoid(teacher["cls_logits"][..., [1, 3]]).max(-1).values
    box = (student["bbox_regression"] - teacher["bbox_regression"]).abs().sum(-1)
    p, q = torch.sigmoid(teacher["bbox_ctrness"][..., 0].double()), torch.sigmoid(student["bbox_ctrness"][..., 0].double())
    ctr = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    expected = ((box.double() + ctr) * weight.double()).sum() / 5
    loss = compute_response_distillation(student, teacher, num_foreground=5, classes=[1, 3])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    student = {k: v.clone().requires_grad_() for k, v in student.items()}
    compute_response_distillation(student, teacher, num_foreground=5).backward()
    assert student["bbox_regression"].grad.abs().sum() > 0 and student["bbox_ctrness"].grad.abs().sum() > 0
    assert student["cls_logits"].grad is None  # the class scores only weigh; the score term is its own


def _bernoulli_kl(student_logits, teacher_logits, t):
    """KL(Bernoulli(p) || Bernoulli(q)) per element, written out, in float64."""
    p = torch.sigmoid(teacher_logits.double() / t)
    q = torch.sigmoid(student_logits.double() / t)
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


def test_score_distillation_is_the_kl_sum_times_t2_over_the_positive_count():
    teacher = torch.tensor([[[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]], [[0.2, 0.3, -0.4], [1.5, -2.0, 0.0]]])  # (N=2, A=2, K=3)
    student = torch.tensor([[[0.0, 1.0, -0.5], [-1.0, 0.5, 2.0]], [[-0.2, 0.1, 0.4], [0.5, -1.0, 1.0]]])
    t = 2.0
    expected = _bernoulli_kl(student, teacher, t).sum() * t * t / 3
    loss = compute_score_distillation(student, teacher, t, num_foreground=3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a tensor count normalises the same; zero positives divide by 1, as FCOS's max(1, num_foreground)
    assert torch.isclose(compute_score_distillation(student, teacher, t, num_foreground=torch.tensor(3)), loss)
    assert compute_score_distillation(student, teacher, t, num_foreground=0).item() == pytest.approx(3 * expected.item(), rel=1e-5)
    assert torch.isclose(compute_score_distillation(student, teacher, t, num_foreground=1),
                         compute_score_distillation(student, teacher, t, num_foreground=0))


def test_score_distillation_is_not_divided_by_the_number_of_locations():
    g = torch.Generator().manual_seed(0)
    positives = torch.randn(1, 4, 5, generator=g)  # 4 positive locations where student and teacher agree
    background_t = torch.randn(1, 30, 5, generator=g)
    background_s = background_t + torch.randn(1, 30, 5, generator=g)  # they differ on the background only

    def loss(teacher_bg, student_bg):
        return compute_score_distillation(torch.cat([positives, student_bg], 1), torch.cat([positives, teacher_bg], 1),
                                          num_foreground=4)

    base = loss(background_t, background_s)
    assert base > 0
    # twice the disagreeing background, same positives: twice the loss (a mean over locations
    # would give (34 / 64) * 2 = 1.06 times)
    doubled = loss(background_t.repeat(1, 2, 1), background_s.repeat(1, 2, 1))
    assert torch.isclose(doubled, 2 * base, rtol=1e-5)
    # twice the background, the added half agreeing: the loss does not change (a mean would drop)
    padded = loss(background_t.repeat(1, 2, 1), torch.cat([background_s, background_t], 1))
    assert torch.isclose(padded, base, rtol=1e-5)


def test_distiller_divides_the_score_loss_by_the_students_positive_locations():
    from diredi_sim.models import build_detector, extract_features
    from diredi_sim.train import Distiller, KDLoss

    torch.manual_seed(0)
    teacher, student = build_detector("edge", "cpu"), build_detector("edge", "cpu")
    distiller = Distiller(teacher, student, KDLoss(score_weight=0.5, temperature=2.0)).train()
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 70.0, 120.0, 126.0]]), "labels": torch.tensor([3, 14])},
               {"boxes": torch.tensor([[5.0, 5.0, 90.0, 80.0]]), "labels": torch.tensor([7])}]
    with torch.no_grad():
        losses = distiller(images, targets)
        student_out = extract_features(student, images, targets)
        teacher_out = extract_features(teacher, images)
    num_foreground = sum(int((m >= 0).sum()) for m in student_out.matched_idxs)
    assert num_foreground > 1
    expected = 0.5 * compute_score_distillation(student_out.head["cls_logits"], teacher_out.head["cls_logits"], 2.0,
                                                num_foreground=num_foreground)
    assert torch.isclose(losses["distill.score"], expected, rtol=1e-5)


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
