"""CEMA (cloud-edge elastic model adaptation by entropy distillation, ICLR 2024, chenyaofo/CEMA)
carried over to detection, in plain torch: the baseline in which raw images leave the customer.

The deployed edge model runs online on the customer's shifted images; an image is uploaded to the
manufacturer only when its entropy lies in (E_min, E_max) and its prediction is not too similar to
what was uploaded before. The manufacturer adapts its tutor (CEMA's foundation model) by weighted
entropy minimisation, distils the edge with alpha * entropy + beta * T^2 * KL + gamma * CE on the
new images and a replay of earlier ones, and sends down only the edge's norm-affine parameters.

- Shift: :func:`corrupt` (common corruptions, Hendrycks & Dietterich's severities 1-5, seeded by
  the image id and a seed), :func:`write_shifted` (shifted copies of records, as PNG files).
- Entropy of a detection image (:func:`compute_detection_entropy`): the mean, over the ``top_k``
  locations of the FCOS head with the highest class score, of the softmax entropy over the C
  class logits at that location. It lies in [0, ln C], like the entropy of CEMA's C-way
  classifier, so CEMA's thresholds carry over unchanged: E_max = 0.4 ln C (:func:`entropy_margins`).
  Why this one: (1) the locations a detector would report decide its output, and their class
  distribution is the classifier's prediction CEMA filters on; background locations (almost all
  of an image) would drown the signal in a mean over every location; (2) the per-class binary
  entropies of FCOS's sigmoid scores are near 0 at every confident background location and sum
  to at most C ln 2, a scale CEMA's 0.4 ln C was never set on; (3) top-k locations exist in every
  image, also one where nothing passes NMS's score threshold, and the quantity is differentiable,
  so the filter, the weights 1/exp(E - E_max) and the losses use one definition.
- :class:`EntropyFilter` (with CEMA's dynamic E_max after a warm-up), :class:`SimilarityFilter`
  (an EMA of the kept images' class profiles, :func:`compute_class_profile`), :class:`ReplayBuffer`.
- Only norm layers' trainable affine parameters adapt (:func:`norm_affine_names`: BatchNorm /
  GroupNorm / LayerNorm weights and biases; FrozenBatchNorm2d has buffers only and counts for
  nothing); every model stays in eval mode, so BatchNorm's running statistics do not move.
- :func:`run_cema`: the stream, the uploads, the manufacturer's steps and the downlinks.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.io import decode_jpeg, encode_jpeg, encode_png
from torchvision.transforms.functional import gaussian_blur

from diredi_sim.compute import on_device, to_device
from diredi_sim.data.voc import ImageRecord, decode_rgb_image
from diredi_sim.models import extract_features
from diredi_sim.train import NonFiniteLossError, build_loader

if TYPE_CHECKING:  # the config section lives with the federation's others
    from diredi_sim.federation_config import CEMAConfig

# ------------------------------------------------------------------------------ corruptions
# Severities 1-5 as in ImageNet-C (Hendrycks & Dietterich 2019, corruptions.py).
NOISE_STD = (0.08, 0.12, 0.18, 0.26, 0.38)  # gaussian_noise, on [0, 1] pixels
BLUR_SIGMA = (1.0, 2.0, 3.0, 4.0, 6.0)  # gaussian_blur, px
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)  # contrast: distance to the per-channel mean kept
JPEG_QUALITY = (25, 18, 15, 10, 7)  # jpeg


def compute_corruption_seed(seed: int, image_id: str, corruption: str, severity: int) -> int:
    """A seed for one image's corruption, from (seed, image id, corruption, severity) alone."""
    digest = hashlib.sha256(f"{seed}/{image_id}/{corruption}/{severity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _gaussian_noise(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    return x + NOISE_STD[severity - 1] * torch.randn(x.shape, generator=generator)


def _gaussian_blur(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    sigma = BLUR_SIGMA[severity - 1]
    size = 2 * math.ceil(3 * sigma) + 1
    size = min(size, 2 * (min(x.shape[-2:]) - 1) - 1)  # reflect padding needs the pad below the image side
    return gaussian_blur(x, [size, size], [sigma, sigma])


def _contrast(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return (x - mean) * CONTRAST[severity - 1] + mean


def _jpeg(x: Tensor, severity: int, generator: torch.Generator) -> Tensor:
    encoded = encode_jpeg(_to_uint8(x), quality=JPEG_QUALITY[severity - 1])
    return decode_jpeg(encoded).float() / 255.0


CORRUPTIONS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "gaussian_noise": _gaussian_noise, "gaussian_blur": _gaussian_blur, "contrast": _contrast, "jpeg": _jpeg,
}


def _to_uint8(x: Tensor) -> Tensor:
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def corrupt(image: Tensor, corruption: str, severity: int, *, seed: int, image_id: str) -> Tensor:
    """``image`` (uint8 (3, H, W)) under ``corruption`` at ``severity`` (1-5), uint8 of the same
    size; the same (image, corruption, severity, seed, image id) gives the same bytes."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption {corruption!r}: must be one of {sorted(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity {severity}: must be 1-5")
    generator = torch.Generator().manual_seed(compute_corruption_seed(seed, image_id, corruption, severity))
    return _to_uint8(CORRUPTIONS[corruption](image.float() / 255.0, severity, generator))


def write_shifted(records: Sequence[ImageRecord], folder: str | Path, corruption: str, severity: int, *,
                  seed: int) -> list[ImageRecord]:
    """Shifted copies of ``records``' images as PNG files in ``folder`` (lossless: what is
    written is exactly the shifted image), and the records pointing at them (boxes unchanged:
    every corruption keeps the geometry)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shifted = []
    for record in records:
        image = corrupt(decode_rgb_image(record.image_path), corruption, severity, seed=seed, image_id=record.image_id)
        path = folder / f"{record.image_id}.png"
        path.write_bytes(encode_png(image).numpy().tobytes())
        shifted.append(replace(record, image_path=path))
    return shifted


# -------------------------------------------------------------------------------- entropy


def entropy_margins(num_classes: int, ent_low: float, ent_high: float) -> tuple[float, float]:
    """(E_min, E_max) = (ent_low ln C, ent_high ln C), CEMA's thresholds (its 0.4 ln C)."""
    return ent_low * math.log(num_classes), ent_high * math.log(num_classes)


def select_locations(cls_logits: Tensor, top_k: int) -> Tensor:
    """(N, k) indices of each image's ``top_k`` locations by class score (the largest class
    logit, i.e. sigmoid score, at the location); no gradient flows through the choice."""
    return cls_logits.detach().amax(dim=2).topk(min(top_k, cls_logits.shape[1]), dim=1).indices


def gather_locations(cls_logits: Tensor, locations: Tensor) -> Tensor:
    """(N, A, C) logits at (N, k) location indices -> (N, k, C)."""
    return cls_logits.gather(1, locations.unsqueeze(-1).expand(-1, -1, cls_logits.shape[-1]))


def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, in nats."""
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def compute_detection_entropy(cls_logits: Tensor, top_k: int, locations: Tensor | None = None) -> Tensor:
    """(N,) the entropy of each image's detection: the mean over its ``top_k`` locations
    (:func:`select_locations`, or the ``locations`` given) of the softmax entropy over the C class
    logits there. In [0, ln C]; the module docstring says why this definition."""
    locations = select_locations(cls_logits, top_k) if locations is None else locations
    return softmax_entropy(gather_locations(cls_logits, locations)).mean(dim=1)


def compute_class_profile(cls_logits: Tensor, top_k: int) -> Tensor:
    """(N, C) each image's prediction as one class distribution: the mean softmax over its
    ``top_k`` locations (what the similarity filter compares)."""
    return gather_locations(cls_logits, select_locations(cls_logits, top_k)).softmax(-1).mean(dim=1)


# -------------------------------------------------------------------------------- filters


class EntropyFilter:
    """Keeps images with E_min < E < E_max(t). E_max(t) is E_max until ``warm_up`` images were
    seen, then E_max * (mean entropy so far / mean entropy at warm-up) * ``coeff`` (CEMA's
    dynamic margin; ``warm_up = 0`` keeps it fixed, as CEMA's released configuration does)."""

    def __init__(self, e_min: float, e_max: float, *, warm_up: int = 0, coeff: float = 0.6):
        self.e_min, self.e_max, self.warm_up, self.coeff = e_min, e_max, warm_up, coeff
        self.seen, self.total, self.warm_up_mean = 0, 0.0, None

    @property
    def threshold(self) -> float:
        if self.warm_up_mean is None:
            return self.e_max
        return self.e_max * (self.total / self.seen) / self.warm_up_mean * self.coeff

    def keep(self, entropies: Tensor) -> Tensor:
        """A bool mask over ``entropies`` (the running mean is updated first, as CEMA does)."""
        self.seen += entropies.numel()
        self.total += float(entropies.sum())
        if self.warm_up and self.warm_up_mean is None and self.seen >= self.warm_up:
            self.warm_up_mean = self.total / self.seen
        return (entropies > self.e_min) & (entropies < self.threshold)


class SimilarityFilter:
    """Drops an image whose class profile is too similar to the EMA (0.9) of the profiles kept
    so far: cosine similarity >= 1 - ``d_margin``. The first batch initialises the EMA and is kept."""

    def __init__(self, d_margin: float, momentum: float = 0.9):
        self.d_margin, self.momentum = d_margin, momentum
        self.history: Tensor | None = None

    def keep(self, profiles: Tensor) -> Tensor:
        if self.history is None:
            if len(profiles):
                self.history = profiles.mean(0)
            return torch.ones(len(profiles), dtype=torch.bool, device=profiles.device)
        similarity = F.cosine_similarity(self.history.unsqueeze(0), profiles, dim=1)
        mask = similarity < 1.0 - self.d_margin
        if mask.any():
            self.history = self.momentum * self.history + (1 - self.momentum) * profiles[mask].mean(0)
        return mask


class ReplayBuffer:
    """The manufacturer's uploaded images, the newest ``capacity``; ``sample`` draws without
    replacement from its own seeded generator."""

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.items: list[Tensor] = []
        self._random = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, images: Sequence[Tensor]) -> None:
        self.items.extend(images)
        del self.items[:max(0, len(self.items) - self.capacity)]

    def sample(self, n: int) -> list[Tensor]:
        return self._random.sample(self.items, min(n, len(self.items)))


# ------------------------------------------------------------------------- norm-affine only

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # _NormBase: BatchNorm*, InstanceNorm*, SyncBatchNorm


def norm_affine_names(detector: nn.Module) -> list[str]:
    """Names of the norm layers' affine parameters (weights and biases) of ``detector``.
    FrozenBatchNorm2d holds its affine as buffers: not trainable, not listed."""
    return [f"{module_name}.{name}" for module_name, module in detector.named_modules() if isinstance(module, NORM_LAYERS)
            for name, _ in module.named_parameters(recurse=False)]


def prepare_norm_adaptation(detector: nn.Module) -> list[nn.Parameter]:
    """Eval mode (BatchNorm uses and keeps its running statistics), gradients on the norm-affine
    parameters only; returns them."""
    detector.eval()
    detector.requires_grad_(False)
    params = dict(detector.named_parameters())
    chosen = [params[name] for name in norm_affine_names(detector)]
    for param in chosen:
        param.requires_grad_(True)
    return chosen


def extract_norm_affine(detector: nn.Module) -> dict[str, Tensor]:
    """The downlink: the norm-affine parameters by name, float32 CPU copies."""
    params = dict(detector.named_parameters())
    return {name: params[name].detach().float().cpu().clone() for name in norm_affine_names(detector)}


@torch.no_grad()
def apply_norm_affine(detector: nn.Module, payload: dict[str, Tensor]) -> None:
    """Write a downlink into ``detector``; a name that is not one of its norm-affine parameters is a KeyError."""
    params, allowed = dict(detector.named_parameters()), set(norm_affine_names(detector))
    for name, value in payload.items():
        if name not in allowed:
            raise KeyError(f"downlink: {name!r} is not a norm-affine parameter of the edge model")
        params[name].copy_(value)


# --------------------------------------------------------------------------------- losses


def weigh(entropies: Tensor, e_max: float) -> Tensor:
    """CEMA's per-sample weight 1 / exp(E - E_max), no gradient."""
    return torch.exp(-(entropies.detach() - e_max))


def compute_tutor_losses(tutor_logits: Tensor, *, e_max: float, top_k: int) -> dict[str, Tensor]:
    """The tutor's adaptation: its detection entropy, weighted per image by 1/exp(E - E_max)."""
    entropy = compute_detection_entropy(tutor_logits, top_k)
    return {"cema.tutor_entropy": (entropy * weigh(entropy, e_max)).mean()}


def compute_distillation_losses(edge_logits: Tensor, tutor_logits: Tensor, *, e_max: float, top_k: int, alpha: float,
                                beta: float, gamma: float, temperature: float) -> dict[str, Tensor]:
    """The edge's distillation, CEMA's three terms per image, each weighted per image:
    ``cema.entropy``: alpha x the edge's detection entropy (at its own top-k locations),
    weight from the edge's entropy; ``cema.kl``: beta x T^2 x KL(tutor || edge) of the softmax
    class scores at temperature T; ``cema.ce``: gamma x cross-entropy against the tutor's argmax
    class. KL and CE are averaged over the tutor's top-k locations (where it sees objects) and
    weighted by the tutor's entropy, as CEMA weighs them by the foundation model's."""
    if edge_logits.shape != tutor_logits.shape:
        raise ValueError(f"edge and tutor class scores differ in shape ({tuple(edge_logits.shape)} vs "
                         f"{tuple(tutor_logits.shape)}): give both the same image size and strides")
    edge_entropy = compute_detection_entropy(edge_logits, top_k)
    locations = select_locations(tutor_logits, top_k)
    tutor_at, edge_at = gather_locations(tutor_logits, locations), gather_locations(edge_logits, locations)
    tutor_weight = weigh(softmax_entropy(tutor_at).mean(1), e_max)
    kl = F.kl_div(F.log_softmax(edge_at / temperature, -1), F.softmax(tutor_at / temperature, -1), reduction="none").sum(-1)
    kl = kl.mean(1) * temperature ** 2
    ce = F.cross_entropy(edge_at.flatten(0, 1), tutor_at.argmax(-1).flatten(), reduction="none").view(edge_at.shape[:2]).mean(1)
    return {"cema.entropy": alpha * (edge_entropy * weigh(edge_entropy, e_max)).mean(),
            "cema.kl": beta * (kl * tutor_weight).mean(),
            "cema.ce": gamma * (ce * tutor_weight).mean()}


def _step(optimizer: torch.optim.Optimizer, losses: dict[str, Tensor], step: int) -> dict[str, float]:
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise NonFiniteLossError(f"CEMA step {step}: non-finite loss " + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items()))
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


# ---------------------------------------------------------------------------------- the run


@dataclass
class Decision:
    """One stream image at the customer: its entropy, the margins then, and what became of it."""

    image_id: str
    entropy: float
    e_min: float
    e_max: float
    uploaded: bool
    reason: str  # "uploaded", "entropy" (outside the margins) or "similar" (too close to the EMA)


@dataclass
class CEMAOutcome:
    stream_images: int
    uploaded: list[str]  # image ids, in upload order
    uplink_bytes: int  # the uploaded images' encoded (PNG) bytes
    downlinks: int  # times the edge's norm-affine parameters went down
    downlink_bytes: int
    cloud_steps: int  # the manufacturer's distillation steps
    edge_train_images: int  # images over all distillation steps (new + replayed)
    decisions: list[Decision] = field(default_factory=list)
    losses: list[dict[str, float]] = field(default_factory=list)  # each cloud step's terms
    last_downlink: dict[str, Tensor] = field(default_factory=dict)


def run_cema(tutor: nn.Module, edge: nn.Module, stream: Sequence[ImageRecord], cfg: CEMAConfig, *, seed: int) -> CEMAOutcome:
    """CEMA on one customer's ``stream`` (records of its shifted images, read in order, in
    batches of ``cfg.batch_size``). ``edge`` is the customer's deployed model: it filters the
    stream and receives each downlink (its norm-affine parameters, changed in place). ``tutor``
    is the manufacturer's, adapted in place; the manufacturer distils its own copy of the edge.
    Per stream batch: entropy filter, similarity filter, upload; at the manufacturer, for every
    ``batch_size`` uploaded images in its queue, one tutor step on them and one edge step on them
    plus ``replay_per_step`` replayed ones (once the buffer holds ``replay_start``); with no new
    batch, one replay-only step of ``batch_size + replay_per_step`` when the buffer is past
    ``replay_start`` (CEMA's rule). What is still queued when the stream ends makes one last
    step. After each batch with a step, the downlink."""
    run = _CEMARun(tutor, edge, stream, cfg, seed)
    with on_device([tutor, run.cloud_edge, edge]) as device:
        run.start(device)
        for images, targets in build_loader(stream, batch_size=cfg.batch_size, train=False):
            uploaded = run.upload(images, [t["image_id"] for t in targets])  # at the customer
            if run.manufacturer_steps(uploaded):  # at the manufacturer
                run.downlink()
        if run.queue:
            run.cloud_step(run.queue)
            run.downlink()
    return run.outcome


class _CEMARun:
    """The state of one customer's CEMA run: the customer's filters and edge, the manufacturer's
    tutor, its copy of the edge, optimizers, queue and replay buffer; :func:`run_cema` drives it."""

    def __init__(self, tutor: nn.Module, edge: nn.Module, stream: Sequence[ImageRecord], cfg: CEMAConfig, seed: int):
        self.tutor, self.edge, self.cfg = tutor, edge, cfg
        self.cloud_edge = copy.deepcopy(edge)
        edge.eval()
        self.e_min, e_max = entropy_margins(edge.head.classification_head.num_classes, cfg.ent_low, cfg.ent_high)
        self.entropy_filter = EntropyFilter(self.e_min, e_max, warm_up=cfg.warm_up_images, coeff=cfg.ent_high_coeff)
        self.similarity_filter = SimilarityFilter(cfg.d_margin)
        self.buffer = ReplayBuffer(cfg.replay_capacity, seed)
        self.outcome = CEMAOutcome(len(stream), [], 0, 0, 0, 0, 0)
        self.queue: list[Tensor] = []
        self.records = {r.image_id: r for r in stream}
        self.loss_settings = dict(e_max=e_max, top_k=cfg.top_k, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma,
                                  temperature=cfg.temperature)
        self.device = None

    def start(self, device) -> None:
        """Optimizers over the norm-affine parameters, once the models are on ``device``."""
        self.device = device
        self.tutor_optimizer = torch.optim.SGD(prepare_norm_adaptation(self.tutor), lr=self.cfg.tutor_lr, momentum=0.9)
        self.edge_optimizer = torch.optim.SGD(prepare_norm_adaptation(self.cloud_edge), lr=self.cfg.edge_lr, momentum=0.9)

    def upload(self, images: list[Tensor], ids: list[str]) -> list[Tensor]:
        """The customer's edge filters a stream batch (entropy, then similarity); every decision
        recorded; the kept images go up (their encoded bytes counted) and into the buffer."""
        cfg, outcome = self.cfg, self.outcome
        with torch.no_grad():
            logits = extract_features(self.edge, to_device(images, device=self.device)[0]).head["cls_logits"]
            entropies = compute_detection_entropy(logits, cfg.top_k).cpu()
            by_entropy = self.entropy_filter.keep(entropies)
            candidates = by_entropy.nonzero().flatten()
            similar_ok = self.similarity_filter.keep(compute_class_profile(logits[candidates.to(logits.device)], cfg.top_k).cpu())
        kept = set(candidates[similar_ok].tolist())
        for i, image_id in enumerate(ids):
            reason = "uploaded" if i in kept else ("entropy" if not by_entropy[i] else "similar")
            outcome.decisions.append(Decision(image_id, float(entropies[i]), self.e_min, self.entropy_filter.threshold, i in kept, reason))
        uploaded = [images[i] for i in sorted(kept)]
        outcome.uploaded += [ids[i] for i in sorted(kept)]
        outcome.uplink_bytes += sum(self.records[ids[i]].image_path.stat().st_size for i in kept)
        self.buffer.add(uploaded)
        return uploaded

    def manufacturer_steps(self, uploaded: list[Tensor]) -> bool:
        """One cloud step per full batch in the queue; with none, a replay-only step once the
        buffer is past ``replay_start``. True when a step was taken (a downlink follows)."""
        cfg = self.cfg
        self.queue += uploaded
        stepped = False
        while len(self.queue) >= cfg.batch_size:
            new, self.queue = self.queue[:cfg.batch_size], self.queue[cfg.batch_size:]
            self.cloud_step(new)
            stepped = True
        if not stepped and cfg.replay_per_step and len(self.buffer) > cfg.replay_start:
            self.distill_step(self.buffer.sample(cfg.batch_size + cfg.replay_per_step), {})
            stepped = True
        return stepped

    def cloud_step(self, new: list[Tensor]) -> None:
        """The tutor's weighted entropy step on the new images, then the edge's distillation step
        on them plus the replayed ones."""
        cfg = self.cfg
        logits = extract_features(self.tutor, to_device(new, device=self.device)[0]).head["cls_logits"]
        terms = _step(self.tutor_optimizer, compute_tutor_losses(logits, e_max=self.loss_settings["e_max"], top_k=cfg.top_k),
                      self.outcome.cloud_steps)
        replay = self.buffer.sample(cfg.replay_per_step) if len(self.buffer) >= cfg.replay_start and cfg.replay_per_step else []
        self.distill_step(new + replay, terms)

    def distill_step(self, images: list[Tensor], terms: dict[str, float]) -> None:
        images = to_device(images, device=self.device)[0]
        with torch.no_grad():
            tutor_logits = extract_features(self.tutor, images).head["cls_logits"]
        edge_logits = extract_features(self.cloud_edge, images).head["cls_logits"]
        losses = compute_distillation_losses(edge_logits, tutor_logits, **self.loss_settings)
        terms.update(_step(self.edge_optimizer, losses, self.outcome.cloud_steps))
        self.outcome.losses.append(terms)
        self.outcome.cloud_steps += 1
        self.outcome.edge_train_images += len(images)

    def downlink(self) -> None:
        """The manufacturer's edge's norm-affine parameters, into the customer's edge."""
        outcome = self.outcome
        outcome.last_downlink = extract_norm_affine(self.cloud_edge)
        apply_norm_affine(self.edge, outcome.last_downlink)
        outcome.downlinks += 1
        outcome.downlink_bytes += sum(v.numel() * v.element_size() for v in outcome.last_downlink.values())


__all__ = [
    "CORRUPTIONS", "corrupt", "write_shifted", "compute_corruption_seed", "entropy_margins", "select_locations",
    "compute_detection_entropy", "compute_class_profile", "softmax_entropy", "EntropyFilter", "SimilarityFilter",
    "ReplayBuffer", "norm_affine_names", "prepare_norm_adaptation", "extract_norm_affine", "apply_norm_affine",
    "compute_tutor_losses", "compute_distillation_losses", "run_cema", "CEMAOutcome", "Decision",
]
