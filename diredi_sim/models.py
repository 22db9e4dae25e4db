"""Detectors for the three roles, assembled from torchvision parts.

Every role is an FCOS detector (torchvision.models.detection.FCOS) over a backbone + FPN
(torchvision's BackboneWithFPN, i.e. IntermediateLayerGetter feature extraction and
FeaturePyramidNetwork) with exactly three levels, P3-P5 at strides 8/16/32, as in the paper
and FCOS-Lite. Parameter names therefore split cleanly:

    backbone.body.*   backbone  (ResNet / MobileNetV2 trunk)
    backbone.fpn.*    neck      (FPN)
    head.*            head      (FCOS classification / regression / centerness towers)

Only neck + head travel between customer and manufacturer (deltas), so this partition matters.

Presets:
- ``paper``: teacher ResNet101, tutor ResNet50, edge MobileNetV2 (FCOS-Lite); 256-channel FPN
  for teacher and tutor, 128 for the edge; 512 px images.
- ``cpu``: the same families narrowed until the whole flow runs in minutes on 2 cores: teacher
  ResNet34, tutor ResNet18, edge MobileNetV2 x0.5, narrow FPNs and two-conv heads, 128 px
  images. Sizes were chosen from ``bench/train_step.py`` measurements (README).

Nothing is downloaded unless a user asks: every model starts from random initialisation, or from
weights a config names (:func:`load_initial_weights`: a local file, or a torchvision weights name
that torchvision downloads). Backbones use trainable BatchNorm (not the
FrozenBatchNorm of ImageNet-pretrained torchvision detectors) since they are trained from
scratch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, resnet18, resnet34, resnet50, resnet101
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

ROLES = ("teacher", "tutor", "edge")
PARTS = ("backbone", "neck", "head")
STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class DetectorSpec:
    """The architecture of one detector. Presets hold one per role."""

    backbone: str  # resnet18 | resnet34 | resnet50 | resnet101 | mobilenet_v2
    fpn_channels: int
    head_convs: int = 4
    head_norm_groups: int = 32  # GroupNorm groups in the head towers (torchvision's default is 32)
    width_mult: float = 1.0  # MobileNetV2 only
    image_size: int = 128  # images are resized so that their longer side is this
    score_thresh: float = 0.05  # low, for AP; precision/recall apply their own threshold
    detections_per_img: int = 100


PRESETS: dict[str, dict[str, DetectorSpec]] = {
    "paper": {
        "teacher": DetectorSpec("resnet101", fpn_channels=256, head_convs=4, image_size=512),
        "tutor": DetectorSpec("resnet50", fpn_channels=256, head_convs=4, image_size=512),
        "edge": DetectorSpec("mobilenet_v2", fpn_channels=128, head_convs=4, image_size=512),
    },
    "cpu": {
        "teacher": DetectorSpec("resnet34", fpn_channels=96, head_convs=2, image_size=128),
        "tutor": DetectorSpec("resnet18", fpn_channels=64, head_convs=2, image_size=128),
        "edge": DetectorSpec("mobilenet_v2", fpn_channels=32, head_convs=2, width_mult=0.5, image_size=128),
    },
}

_RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet101": resnet101}


class NoExtraLevels(ExtraFPNBlock):
    """An FPN extra block that adds nothing: the neck keeps exactly P3-P5."""

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        return results, names


def get_spec(role: str, preset: str = "cpu", **overrides: Any) -> DetectorSpec:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if role not in PRESETS[preset]:
        raise ValueError(f"unknown role {role!r}; choose one of {list(ROLES)}")
    return replace(PRESETS[preset][role], **overrides)


def build_backbone(spec: DetectorSpec) -> BackboneWithFPN:
    """Trunk + three-level FPN (strides 8/16/32), randomly initialised."""
    if spec.backbone in _RESNETS:
        trunk = _RESNETS[spec.backbone](weights=None, norm_layer=nn.BatchNorm2d)
        return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
        del trunk.fc, trunk.avgpool  # unused; keeps every parameter inside a part
    elif spec.backbone == "mobilenet_v2":
        # features[6] ends stride 8, features[13] stride 16, features[17] stride 32 (before the
        # 1x1 expansion to 1280 channels, which FCOS-Lite does not need).
        trunk = mobilenet_v2(weights=None, width_mult=spec.width_mult).features[:18]
        return_layers = {"6": "0", "13": "1", "17": "2"}
    else:
        raise ValueError(f"unknown backbone {spec.backbone!r}; choose one of {sorted(_RESNETS) + ['mobilenet_v2']}")
    in_channels = _probe_channels(trunk, list(return_layers))
    return BackboneWithFPN(trunk, return_layers, in_channels, spec.fpn_channels, extra_blocks=NoExtraLevels())


def _probe_channels(trunk: nn.Module, layer_names: list[str]) -> list[int]:
    """Channel count of each returned layer, read off the last conv/norm inside it."""
    modules = dict(trunk.named_children())
    channels = []
    for name in layer_names:
        last = [m for m in modules[name].modules() if isinstance(m, (nn.BatchNorm2d, nn.Conv2d))][-1]
        channels.append(last.num_features if isinstance(last, nn.BatchNorm2d) else last.out_channels)
    return channels


def build_detector(role: str, preset: str = "cpu", num_classes: int = 20, *, weights: str = "", **overrides: Any) -> FCOS:
    """An FCOS detector for ``role`` (teacher / tutor / edge) in ``preset`` (cpu / paper),
    randomly initialised, or started from ``weights`` (:func:`load_initial_weights`).

    ``overrides`` replace fields of the preset's DetectorSpec (e.g. ``image_size=256``).
    The spec is kept on the model as ``detector.spec`` so checkpoints can describe it.
    """
    spec = get_spec(role, preset, **overrides)
    backbone = build_backbone(spec)
    anchor_generator = AnchorGenerator(sizes=tuple((s,) for s in STRIDES), aspect_ratios=((1.0,),) * len(STRIDES))
    head = FCOSHead(backbone.out_channels, num_anchors=1, num_classes=num_classes, num_convs=spec.head_convs)
    if spec.head_norm_groups != 32:  # FCOSHead does not pass a norm layer on; its towers do take one
        norm = partial(nn.GroupNorm, spec.head_norm_groups)
        head.classification_head = FCOSClassificationHead(backbone.out_channels, 1, num_classes, spec.head_convs, norm_layer=norm)
        head.regression_head = FCOSRegressionHead(backbone.out_channels, 1, spec.head_convs, norm_layer=norm)
    detector = FCOS(
        backbone,
        num_classes,
        min_size=spec.image_size,
        max_size=spec.image_size,
        anchor_generator=anchor_generator,
        head=head,
        score_thresh=spec.score_thresh,
        detections_per_img=spec.detections_per_img,
    )
    detector.spec = spec
    detector.role = role
    detector.preset = preset
    if weights:
        load_initial_weights(detector, weights, key=f"weights.{role}")
    return detector


class WeightsError(ValueError):
    """Starting weights that cannot be read or do not fit the model; the message names the source."""


def read_weights(source: str, *, key: str = "weights") -> dict[str, Tensor]:
    """The state dict ``source`` names: a local file (``torch.save`` of a state dict, or a
    checkpoint with a ``state_dict`` entry, e.g. this project's), or ``torchvision:<name>``, a
    torchvision weights enum such as ``torchvision:ResNet50_Weights.IMAGENET1K_V2`` (torchvision
    downloads it into its cache on a machine that allows it). ``key`` names the config key."""
    if source.startswith("torchvision:"):
        from torchvision.models import get_weight

        name = source.split(":", 1)[1]
        try:
            weights = get_weight(name)
        except (ValueError, AttributeError, KeyError) as exc:
            raise WeightsError(f"{key} = {source!r}: torchvision has no weights named {name!r} ({exc})") from None
        try:
            return weights.get_state_dict(progress=False)
        except Exception as exc:  # noqa: BLE001 - no network, a broken download: say which weights
            raise WeightsError(f"{key} = {source!r}: torchvision could not fetch {weights.url} ({exc}); "
                               "download it where the network allows and give the local file instead") from None
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsError(f"{key} = {source!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors alike
        first = next((line for line in str(exc).splitlines() if line.strip()), "")[:200]  # torch's messages run to many lines
        raise WeightsError(f"{key} = {source!r}: not a torch weights file ({type(exc).__name__}: {first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{key} = {source!r}: expected a state dict (names -> tensors)")
    return state


def load_initial_weights(detector: FCOS, source: str, *, key: str = "weights") -> str:
    """Start ``detector`` from ``source`` (see :func:`read_weights`): a whole detector's state
    dict (keys ``backbone.body.*``, ``backbone.fpn.*``, ``head.*``) replaces every weight; a
    classification model's (torchvision's ResNet or MobileNetV2 keys: ``conv1.weight``,
    ``features.0.0.weight``...) replaces the backbone trunk only, its classifier ignored. Every
    trunk weight must be there with its shape. Returns ``"detector"`` or ``"backbone"``."""
    state = read_weights(source, key=key)
    if any(k.startswith(("backbone.", "head.")) for k in state):
        target, what, wanted = detector, "detector", detector.state_dict()
    else:
        target, what, wanted = detector.backbone.body, "backbone", detector.backbone.body.state_dict()
        if detector.spec.backbone == "mobilenet_v2":  # the trunk is features[:18]: "features.3.conv..." -> "3.conv..."
            state = {k.removeprefix("features."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k in wanted}  # fc.*, classifier.*, features.18.* are not in the trunk
    missing = [k for k in wanted if k not in state]
    if missing:
        raise WeightsError(f"{key} = {source!r}: {len(missing)} of the {detector.role} {what}'s {len(wanted)} weights are "
                           f"missing (first: {missing[:3]}); is it a {detector.spec.backbone} checkpoint?")
    unexpected = [k for k in state if k not in wanted]
    if unexpected:
        raise WeightsError(f"{key} = {source!r}: weights the {detector.role} {what} does not have: {unexpected[:3]}")
    for name, value in state.items():
        if value.shape != wanted[name].shape:
            raise WeightsError(f"{key} = {source!r}: {name} has shape {tuple(value.shape)}, the {detector.role} "
                               f"{what} ({detector.spec.backbone}) needs {tuple(wanted[name].shape)}")
    target.load_state_dict(state)
    return what


def describe_weights(source: str) -> dict:
    """What determines weights read from ``source``, for a cache key: the file's content hash
    (not its name), or the torchvision weights name."""
    if not source or source.startswith("torchvision:"):
        return {"source": source}
    path = Path(source).expanduser()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
    return {"file_sha256": digest}


# The dtype the backbone + FPN run in under autocast inside extract_features (None: no autocast).
_BACKBONE_AUTOCAST: ContextVar[torch.dtype | None] = ContextVar("backbone_autocast", default=None)


@contextmanager
def backbone_precision(precision: str) -> Iterator[None]:
    """Run every :func:`extract_features` inside the block with the backbone + FPN under bf16
    autocast (``precision="bf16"``) and the head, the losses and the features handed out in
    fp32; ``"fp32"`` changes nothing. Autocast over the whole detector froze FCOS's box loss
    (box decoding in bf16); this split kept fp32's loss curve."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: must be 'fp32' or 'bf16'")
    token = _BACKBONE_AUTOCAST.set(torch.bfloat16 if precision == "bf16" else None)
    try:
        yield
    finally:
        _BACKBONE_AUTOCAST.reset(token)


@dataclass
class DetectorOutputs:
    """What one explicit forward pass yields, in train and eval mode alike."""

    features: list[Tensor]  # neck (FPN) output per level, P3..P5, (N, C, H, W)
    head: dict[str, Tensor]  # cls_logits (N, A, K), bbox_regression (N, A, 4), bbox_ctrness (N, A, 1)
    image_sizes: list[tuple[int, int]]  # (H, W) of each image after resizing, before padding
    batch_shape: tuple[int, int]  # (H, W) of the padded batch the features were computed on
    targets: list[dict[str, Tensor]] | None  # targets with boxes in the resized frame
    losses: dict[str, Tensor] | None  # FCOS task losses, when targets were given
    # Per image, (A,) int64: the index of the target box each location is matched to (FCOS's
    # centre sampling + scale ranges), -1 for background; when targets were given.
    matched_idxs: list[Tensor] | None = None

    @property
    def num_foreground(self) -> int:
        """Positive (matched) locations over the batch: FCOS's loss normaliser before max(1, .)."""
        if self.matched_idxs is None:
            raise ValueError("num_foreground needs targets: extract_features was called without them")
        return sum(int((m >= 0).sum()) for m in self.matched_idxs)


def extract_features(detector: FCOS, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> DetectorOutputs:
    """Neck features per level and head outputs (and the task losses when ``targets`` are given).

    This is FCOS's own forward up to the head, written out so that features, head outputs and
    losses are all available whatever the mode (torchvision returns losses in train mode and
    detections in eval mode, never features). Anchors are only built when losses are needed;
    then the location-to-box matching FCOS's losses use is returned too (``matched_idxs``).
    """
    batch, targets = detector.transform(images, targets)
    dtype = _BACKBONE_AUTOCAST.get()
    if dtype is None:
        features = list(detector.backbone(batch.tensors).values())
    else:
        with torch.autocast(batch.tensors.device.type, dtype=dtype):
            features = list(detector.backbone(batch.tensors).values())
        features = [f.float() for f in features]
    head = detector.head(features)
    losses = matched_idxs = None
    if targets is not None:
        anchors = detector.anchor_generator(batch, features)
        num_anchors_per_level = [f.size(2) * f.size(3) for f in features]
        matched_idxs = match_locations(detector, targets, head, anchors, num_anchors_per_level)
        losses = detector.head.compute_loss(targets, head, anchors, matched_idxs)  # what FCOS.compute_loss returns
    return DetectorOutputs(features, head, list(batch.image_sizes), tuple(batch.tensors.shape[-2:]), targets, losses, matched_idxs)


def match_locations(detector: FCOS, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: list[Tensor],
                    num_anchors_per_level: list[int]) -> list[Tensor]:
    """FCOS's location-to-box matching, per image an (A,) int64 tensor (-1: background).

    torchvision computes it inside ``FCOS.compute_loss`` and hands it straight to
    ``self.head.compute_loss``; it has no function of its own. Rather than copy it, this runs
    torchvision's ``FCOS.compute_loss`` on a stand-in ``self`` that carries the detector's
    ``center_sampling_radius`` and a head whose ``compute_loss`` returns the ``matched_idxs``
    it is given. Should torchvision's method come to read other attributes it fails loudly;
    tests/test_models.py checks that the losses built on these match equal
    ``detector.compute_loss``'s exactly.
    """
    recorder = SimpleNamespace(
        center_sampling_radius=detector.center_sampling_radius,
        head=SimpleNamespace(compute_loss=lambda targets, head_outputs, anchors, matched_idxs: matched_idxs),
    )
    return FCOS.compute_loss(recorder, targets, head_outputs, anchors, num_anchors_per_level)  # type: ignore[arg-type]


def split_head_by_level(head_output: Tensor, features: list[Tensor]) -> list[Tensor]:
    """Split an (N, A, X) head output into per-level (N, X, H, W) maps matching ``features``."""
    sizes = [f.shape[-2] * f.shape[-1] for f in features]
    chunks = head_output.split(sizes, dim=1)
    return [c.permute(0, 2, 1).reshape(c.shape[0], c.shape[2], *f.shape[-2:]) for c, f in zip(chunks, features)]


def part_of(name: str) -> str:
    """The part ('backbone', 'neck' or 'head') a parameter or buffer name belongs to."""
    if name.startswith("backbone.body."):
        return "backbone"
    if name.startswith("backbone.fpn."):
        return "neck"
    if name.startswith("head."):
        return "head"
    raise KeyError(f"parameter {name!r} is in none of backbone.body / backbone.fpn / head")


def partition_parameters(detector: nn.Module, *, include_buffers: bool = False) -> dict[str, list[str]]:
    """Parameter names (and buffer names, if asked) grouped by part: backbone / neck / head."""
    names = [n for n, _ in detector.named_parameters()]
    if include_buffers:
        names += [n for n, _ in detector.named_buffers()]
    parts: dict[str, list[str]] = OrderedDict((p, []) for p in PARTS)
    for name in names:
        parts[part_of(name)].append(name)
    return dict(parts)


def count_parameters(detector: nn.Module) -> dict[str, int]:
    params = dict(detector.named_parameters())
    return {part: sum(params[n].numel() for n in names) for part, names in partition_parameters(detector).items()}


@torch.inference_mode()
def detect(detector: FCOS, images: list[Tensor]) -> list[dict[str, Tensor]]:
    """Detections (boxes in the input images' frame, scores, labels) in eval mode."""
    was_training = detector.training
    detector.eval()
    try:
        return detector(images)
    finally:
        detector.train(was_training)
