"""FGD (Focal and Global Distillation, Yang et al., CVPR 2022) and the distillation losses.

Per FPN level (:class:`FGDLevelLoss`):

- focal distillation: the ground-truth boxes, scaled to the level, give a foreground mask
  (scale mask 1/(h*w) of the box in cells, the maximum where boxes overlap) and a background
  mask (1 outside every box, normalised by its sum); the teacher's spatial attention
  ``H*W*softmax(mean_c|F|/T)`` and channel attention ``C*softmax(mean_hw|F|/T)`` weight the
  squared feature difference: ``alpha * L_fg + beta * L_bg``;
- attention loss: ``gamma * (|A_s^S - A_t^S|_1 + |A_s^C - A_t^C|_1)``, the student's attention
  computed the same way from its (aligned) features;
- global distillation: a GcBlock per side (context pooling + channel transform) and
  ``lambda * |(S + Gc_s(S)) - (T + Gc_t(T))|^2``.

Sums are per image (divided by the batch size), as in the authors' code. A 1x1 conv aligns
student channels to the teacher's when they differ. The teacher's features are detached:
gradients reach the student, the align conv and the GcBlocks, never the teacher.

Box-to-cell convention: feature cell (i, j) covers pixels [j*s, (j+1)*s) x [i*s, (i+1)*s) of the
padded batch, s the level's stride; a box covers the cells its area touches:
``x from floor(x1/s) to ceil(x2/s) - 1``. Feature maps are indexed (H, W) = (y, x).

Defaults (the FGD authors' FCOS config): temperature 0.8, alpha 1.6e-3, beta 8e-4, gamma 8e-4,
lambda 8e-6.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class FGDConfig:
    temperature: float = 0.8
    alpha: float = 1.6e-3  # foreground
    beta: float = 8e-4  # background
    gamma: float = 8e-4  # attention masks
    lambda_: float = 8e-6  # global (relation)
    # Divide teacher and (aligned) student features by the teacher's per-image RMS before the
    # loss. The authors' coefficients and temperature assume features of a pretrained detector;
    # features of our from-scratch models reach |value| 5-7, which saturates the attention
    # softmax and makes FGD hundreds of times the task loss.
    normalize: bool = False

    def __post_init__(self):
        for name in ("temperature",):
            if getattr(self, name) <= 0:
                raise ValueError(f"fgd.{name} = {getattr(self, name)!r}: must be > 0")
        for name in ("alpha", "beta", "gamma", "lambda_"):
            if getattr(self, name) < 0:
                raise ValueError(f"fgd.{name} = {getattr(self, name)!r}: must be >= 0")


def compute_attention(features: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial (N, H, W) and channel (N, C) attention of (N, C, H, W) features."""
    n, c, h, w = features.shape
    value = features.abs()
    spatial = h * w * F.softmax((value.mean(dim=1) / temperature).reshape(n, -1), dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.reshape(n, h, w), channel


def build_focal_masks(boxes: list[Tensor], shape: tuple[int, int], stride: float) -> tuple[Tensor, Tensor]:
    """Foreground (scale) and normalised background masks, (N, H, W) each.

    ``boxes[i]`` are image i's boxes (x1, y1, x2, y2) in the pixel frame of the padded batch.
    """
    h, w = shape
    device = boxes[0].device if boxes else "cpu"
    fg = torch.zeros(len(boxes), h, w, device=device)
    for i, image_boxes in enumerate(boxes):
        if image_boxes.numel() == 0:
            continue
        cells = image_boxes.detach().float() / stride
        x0 = cells[:, 0].floor().clamp(0, w - 1).long()
        y0 = cells[:, 1].floor().clamp(0, h - 1).long()
        x1 = cells[:, 2].ceil().clamp(1, w).long().maximum(x0 + 1)
        y1 = cells[:, 3].ceil().clamp(1, h).long().maximum(y0 + 1)
        scale = 1.0 / ((y1 - y0) * (x1 - x0)).float()
        for j in range(len(cells)):
            region = fg[i, y0[j]:y1[j], x0[j]:x1[j]]
            torch.maximum(region, scale[j], out=region)
    bg = (fg == 0).float()
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)
    return fg, bg


class GcBlock(nn.Module):
    """Global context block (GCNet): attention-pooled context, then a channel transform."""

    def __init__(self, channels: int):
        super().__init__()
        self.context_mask = nn.Conv2d(channels, 1, kernel_size=1)
        hidden = max(channels // 2, 1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1), nn.LayerNorm([hidden, 1, 1]), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.context_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)  # the block starts as the identity
        nn.init.zeros_(self.channel_add[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        weights = F.softmax(self.context_mask(x).reshape(n, 1, h * w), dim=2)  # (N, 1, HW)
        context = torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2)).reshape(n, c, 1, 1)
        return x + self.channel_add(context)


ALIGN_SIDES = ("student", "teacher")  # which model's features the 1x1 align conv maps (FGDLevelLoss)


class FGDLevelLoss(nn.Module):
    """FGD on one feature level; returns named, weighted terms.

    ``align`` says which side a 1x1 conv maps when the channel counts differ: ``"student"``
    (FGD's own) maps the student's features into the teacher's channels; ``"teacher"`` maps the
    (detached) teacher's features into the student's, so that the student must reproduce an affine
    image of the teacher's features (reverse distillation's emulation of a smaller teacher)."""

    def __init__(self, student_channels: int, teacher_channels: int, cfg: FGDConfig = FGDConfig(), align: str = "student"):
        super().__init__()
        if align not in ALIGN_SIDES:
            raise ValueError(f"FGD align {align!r}: must be one of {list(ALIGN_SIDES)}")
        self.cfg, self.align_side = cfg, align
        source, target = (student_channels, teacher_channels) if align == "student" else (teacher_channels, student_channels)
        self.align = nn.Conv2d(source, target, 1) if student_channels != teacher_channels else None
        self.gc_student = GcBlock(target)
        self.gc_teacher = GcBlock(target)

    def forward(self, student: Tensor, teacher: Tensor, fg: Tensor, bg: Tensor) -> dict[str, Tensor]:
        cfg = self.cfg
        teacher = teacher.detach()
        if self.align is not None:
            if self.align_side == "student":
                student = self.align(student)
            else:
                teacher = self.align(teacher)
        if student.shape != teacher.shape:
            raise ValueError(f"FGD: student features {tuple(student.shape)} do not match teacher features {tuple(teacher.shape)}")
        if cfg.normalize:
            scale = teacher.detach().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
            teacher, student = teacher / scale, student / scale
        n = student.shape[0]
        spatial_t, channel_t = compute_attention(teacher, cfg.temperature)
        spatial_s, channel_s = compute_attention(student, cfg.temperature)
        # (N, C, H, W), from the teacher; constants of the loss (as the scale above), also when the
        # teacher's side is aligned: else the align conv lowers the loss by moving the weights
        weight = (spatial_t.unsqueeze(1) * channel_t[:, :, None, None]).detach()
        diff = (student - teacher).pow(2) * weight
        fg_loss = (diff * fg.unsqueeze(1)).sum() / n
        bg_loss = (diff * bg.unsqueeze(1)).sum() / n
        mask_loss = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / n
        global_loss = (self.gc_student(student) - self.gc_teacher(teacher)).pow(2).sum() / n
        return {"fg": cfg.alpha * fg_loss, "bg": cfg.beta * bg_loss, "mask": cfg.gamma * mask_loss, "global": cfg.lambda_ * global_loss}


class FGDLoss(nn.Module):
    """FGD summed over FPN levels. ``strides[k]`` is level k's stride in the padded batch frame."""

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int = 3, cfg: FGDConfig = FGDConfig(),
                 align: str = "student"):
        super().__init__()
        self.levels = nn.ModuleList(FGDLevelLoss(student_channels, teacher_channels, cfg, align) for _ in range(num_levels))

    def forward(self, student: list[Tensor], teacher: list[Tensor], boxes: list[Tensor], batch_shape: tuple[int, int]) -> dict[str, Tensor]:
        if len(student) != len(self.levels) or len(teacher) != len(self.levels):
            raise ValueError(f"FGD: expected {len(self.levels)} levels, got {len(student)} student / {len(teacher)} teacher")
        terms: dict[str, Tensor] = {}
        for level, s, t in zip(self.levels, student, teacher):
            stride = batch_shape[0] / t.shape[-2]
            fg, bg = build_focal_masks(boxes, tuple(t.shape[-2:]), stride)
            for key, value in level(s, t, fg.to(t.dtype), bg.to(t.dtype)).items():
                terms[key] = terms.get(key, 0) + value
        return terms


def _positives(num_foreground: int | Tensor, dtype: torch.dtype) -> Tensor | int:
    if isinstance(num_foreground, Tensor):
        return num_foreground.clamp(min=1).to(dtype)
    return max(1, int(num_foreground))


def _columns(values: Tensor, classes: Sequence[int]) -> Tensor:
    """``values``' last dimension restricted to ``classes`` (label indices); all of it when empty."""
    if not classes:
        return values
    return values.index_select(-1, torch.as_tensor(list(classes), device=values.device))


def compute_score_distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.5, *,
                               num_foreground: int | Tensor, classes: Sequence[int] = ()) -> Tensor:
    """Class-score distillation for sigmoid classifiers (FCOS), normalised as FCOS normalises
    its own losses: summed over every location and class of the batch, divided by the number
    of positive locations.

    With logits of shape (N, A, K), ``p = sigmoid(teacher / T)`` and ``q = sigmoid(student / T)``::

        L = T^2 / max(1, num_foreground) * sum_{n, a, k} KL(Bernoulli(p) || Bernoulli(q))
        KL = p log(p / q) + (1 - p) log((1 - p) / (1 - q))

    ``num_foreground`` is the number of positive (matched) locations in the batch, e.g.
    ``sum((m >= 0).sum() for m in matched_idxs)`` of the student's
    :class:`~diredi_sim.models.DetectorOutputs`; torchvision's ``FCOSHead.compute_loss`` divides
    its focal loss (summed over locations and classes) by the same ``max(1, num_foreground)``.
    Zero when the student's logits equal the teacher's; the teacher's logits are detached.
    ``classes`` (label indices) limits the sum to those columns (reverse distillation: the
    classes the edge was trained on); empty: every class.
    """
    t = temperature
    student_logits, teacher_logits = _columns(student_logits, classes), _columns(teacher_logits, classes)
    teacher_logits = teacher_logits.detach() / t
    target = torch.sigmoid(teacher_logits)
    cross = F.binary_cross_entropy_with_logits(student_logits / t, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none")
    return (cross - entropy).sum() / _positives(num_foreground, cross.dtype) * t * t


def compute_response_distillation(student_head: dict[str, Tensor], teacher_head: dict[str, Tensor], *,
                                  num_foreground: int | Tensor, classes: Sequence[int] = ()) -> Tensor:
    """Box and centre-ness distillation (the rest of FCOS's head response beside the class
    scores): at every location, the L1 distance between the student's and the teacher's
    box regression (torchvision's size-normalised ltrb offsets, comparable between two FCOS
    models with the same strides) plus the Bernoulli KL of their centre-ness, weighted by the
    teacher's highest class probability there (over ``classes``; empty: every class), summed
    and divided by the student's positive locations as FCOS's losses are. Zero when the
    student's outputs equal the teacher's; the teacher's are detached."""
    weight = torch.sigmoid(_columns(teacher_head["cls_logits"].detach().float(), classes)).max(dim=-1).values  # (N, A)
    box = (student_head["bbox_regression"] - teacher_head["bbox_regression"].detach()).abs().sum(dim=-1)
    teacher_ctr = teacher_head["bbox_ctrness"].detach().squeeze(-1)
    target = torch.sigmoid(teacher_ctr)
    ctr = (F.binary_cross_entropy_with_logits(student_head["bbox_ctrness"].squeeze(-1), target, reduction="none")
           - F.binary_cross_entropy_with_logits(teacher_ctr, target, reduction="none"))
    return ((box + ctr) * weight).sum() / _positives(num_foreground, box.dtype)
