"""SD-Dist (SQMD's similarity- and quality-based messenger distillation, gyed/SQMD
``framework/ours.py``) adapted to detection, in plain torch. No weights travel: every customer
computes its edge model's outputs on a public reference set, the manufacturer (the server) scores
each customer's quality on the labelled reference set, keeps the best ``q``, and returns to each
customer the mean of the outputs of its ``k`` nearest peers among them; the customer then trains
on ``(1 - rho) * task + rho * KL`` against that mean. Customers may run edge models of different
widths.

What travels (the wire format):

- **up** (:func:`build_upload`): ``{"outputs": float16 (R, L, C)}``: for each of the R reference
  images (the manufacturer's public images, in the order it published them), the edge model's
  class logits at L fixed positions: each FPN level's ``cls_logits`` map, cut to the image (not
  the batch padding) and average-pooled to a fixed grid (``image_size / stride`` cells a side:
  16, 8 and 4 for the ``cpu`` preset's 128 px, L = 336), for the C = 20 classes. The shape does
  not depend on the model's width, only on the reference set and the image size.
- **down**: ``{"peer_mean": float16 (R, L, C)}``: the mean of the chosen peers' logits.

Distances and the distillation loss treat each (location, class) score as FCOS does, a sigmoid
(a Bernoulli probability), not a softmax over classes: FCOS's background is all classes low, and
a softmax, blind to a shift of all logits, would call "background everywhere" and "every class
confident" the same. :func:`compute_bernoulli_kl` is the analog of SQMD's
``kl_div(..., reduction="batchmean")``: the per-class Bernoulli KLs of a location summed (SQMD
sums over the classes of a sample), averaged over locations and images (a location is FCOS's
sample). Its argument order is SQMD's: SQMD's ``kl_div(log_softmax(own / T), softmax(peer / T))``
computes KL(peer || own), and so do :func:`compute_distance` and the distillation loss
(KL(peer mean || own)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from diredi_sim.data.voc import DetectionDataset, ImageRecord
from diredi_sim.models import STRIDES, build_detector, extract_features, split_head_by_level
from diredi_sim.train import LossFn

UPLOAD_KEYS = ("outputs",)
DOWNLOAD_KEYS = ("peer_mean",)


# ------------------------------------------------------------------------- outputs on the reference set


def reference_grid(image_size: int) -> tuple[int, ...]:
    """Cells a side of each level's fixed grid: the level's map size for a square image."""
    return tuple(max(1, image_size // stride) for stride in STRIDES)


def pool_head_output(head_output: Tensor, features: list[Tensor], image_sizes: Sequence[tuple[int, int]],
                     grid: Sequence[int]) -> Tensor:
    """An (N, A, X) head output as (N, L, X) at fixed positions: each level's map cut to the
    image's own cells (padding left out) and average-pooled to ``grid[level]`` a side."""
    levels = split_head_by_level(head_output, features)
    per_image = []
    for i, (h, w) in enumerate(image_sizes):
        cells = []
        for level, (maps, stride, side) in enumerate(zip(levels, STRIDES, grid)):
            crop = maps[i, :, :math.ceil(h / stride), :math.ceil(w / stride)]
            cells.append(F.adaptive_avg_pool2d(crop, side).flatten(1).T)  # (side * side, X)
        per_image.append(torch.cat(cells))
    return torch.stack(per_image)


def compute_reference_logits(edge: nn.Module, images: list[Tensor], grid: Sequence[int]) -> Tensor:
    """The edge model's class logits on ``images`` at fixed positions, (N, L, C) float32; keeps
    the graph (the distillation loss uses it) unless called under no_grad."""
    out = extract_features(edge, images)
    return pool_head_output(out.head["cls_logits"], out.features, out.image_sizes, grid)


def load_reference_images(records: Sequence[ImageRecord]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The reference set's images and labelled targets, in order, without augmentation."""
    dataset = DetectionDataset(list(records), include_difficult=True, hflip_prob=0.0)
    pairs = [dataset[i] for i in range(len(dataset))]
    return [image for image, _ in pairs], [target for _, target in pairs]


@torch.no_grad()
def build_upload(edge: nn.Module, images: list[Tensor], grid: Sequence[int], *, batch_size: int = 16) -> dict[str, Tensor]:
    """What a customer sends up: its edge model's reference logits as float16, in eval mode."""
    was_training = edge.training
    edge.eval()
    device = next(edge.parameters()).device
    try:
        chunks = [compute_reference_logits(edge, [im.to(device) for im in images[i:i + batch_size]], grid).cpu()
                  for i in range(0, len(images), batch_size)]
    finally:
        edge.train(was_training)
    return {"outputs": torch.cat(chunks).half()}


def count_message_bytes(message: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in message.values())


# ------------------------------------------------------------------------------------ the server


@torch.no_grad()
def build_reference_targets(detector: nn.Module, images: list[Tensor], targets: list[dict[str, Tensor]],
                            grid: Sequence[int], num_classes: int) -> Tensor:
    """The labelled reference set as soft class targets at the uploads' positions, (R, L, C):
    FCOS's own location-to-box matching (centre sampling, scale ranges) gives each location's
    one-hot class (all zero for background), pooled exactly like the logits. ``detector`` only
    lends its anchors and resizing (any FCOS of the same strides and image size)."""
    out = extract_features(detector, images, targets)
    one_hot = []
    for matched, target in zip(out.matched_idxs, out.targets):
        onehot = F.one_hot(target["labels"][matched.clamp(min=0)], num_classes).float()
        one_hot.append(onehot * (matched >= 0).unsqueeze(1))
    return pool_head_output(torch.stack(one_hot), out.features, out.image_sizes, grid)


def compute_quality_loss(outputs: Tensor, reference_targets: Tensor, class_indices: Sequence[int]) -> float:
    """A customer's loss on the labelled reference set (lower is better; SQMD's ``calculate_ref_loss``):
    FCOS's sigmoid focal loss of its uploaded logits against the reference targets, on the classes
    the reference set is labelled with only (an unlabelled class's absence is no evidence),
    normalised by the targets' foreground mass."""
    columns = list(class_indices)
    logits, targets = outputs.float()[..., columns], reference_targets[..., columns]
    return float(sigmoid_focal_loss(logits, targets, reduction="sum") / targets.sum().clamp(min=1.0))


def compute_bernoulli_kl(target_logits: Tensor, logits: Tensor, temperature: float) -> Tensor:
    """KL(sigmoid(target / T) || sigmoid(logits / T)) per Bernoulli score, summed over classes
    (the last axis), averaged over everything else."""
    t, s = target_logits.float() / temperature, logits.float() / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return kl.sum(-1).mean()


def compute_distance(own: Tensor, peer: Tensor, temperature: float) -> float:
    """SQMD's ``calculate_distance(own, peer)``: KL(peer || own) on the reference outputs."""
    return float(compute_bernoulli_kl(peer, own, temperature))


def select_peers(outputs: Mapping[int, Tensor], quality_losses: Mapping[int, float], *, q: int, k: int,
                 temperature: float) -> dict[int, list[int]]:
    """For every customer, its ``k`` nearest peers (by :func:`compute_distance`, ties by id)
    among the ``q`` customers of lowest quality loss (ties by id), itself left out; SQMD's
    ``update_top_Q_client`` + ``get_K_Neighbor(method="ref_loss_with_distance")``."""
    if not 1 <= k < q <= len(outputs):
        raise ValueError(f"q = {q}, k = {k} with {len(outputs)} customers: need 1 <= k < q <= customers")
    top = sorted(quality_losses, key=lambda c: (quality_losses[c], c))[:q]
    peers = {}
    for client in outputs:
        distances = sorted((compute_distance(outputs[client], outputs[peer], temperature), peer) for peer in top if peer != client)
        peers[client] = [peer for _, peer in distances[:k]]
    return peers


def average_peer_outputs(outputs: Mapping[int, Tensor], peers: Sequence[int]) -> dict[str, Tensor]:
    """What a customer receives: the mean of its peers' logits, float16 (SQMD's ``send_avg_logits_to_clients``,
    without its in-place sum that changed the first peer's stored logits)."""
    return {"peer_mean": torch.stack([outputs[p].float() for p in peers]).mean(0).half()}


def run_server_round(uploads: Mapping[int, Mapping[str, Tensor]], reference_targets: Tensor, class_indices: Sequence[int],
                     *, q: int, k: int, temperature: float) -> tuple[dict[int, dict[str, Tensor]], dict]:
    """One round of the manufacturer: each customer's quality, the top ``q``, each one's ``k``
    peers and their mean. Returns the downloads per customer and what it decided."""
    for client, upload in uploads.items():
        if set(upload) != set(UPLOAD_KEYS) or upload["outputs"].shape != reference_targets.shape:
            raise ValueError(f"customer {client}: an upload holds {UPLOAD_KEYS} of shape {tuple(reference_targets.shape)}, got "
                             f"{ {key: tuple(v.shape) for key, v in upload.items()} }")
    outputs = {c: u["outputs"] for c, u in uploads.items()}
    losses = {c: compute_quality_loss(o, reference_targets, class_indices) for c, o in outputs.items()}
    peers = select_peers(outputs, losses, q=q, k=k, temperature=temperature)
    downloads = {c: average_peer_outputs(outputs, peers[c]) for c in outputs}
    return downloads, {"quality_loss": losses, "peers": peers}


# ------------------------------------------------------------------------------------ a customer


def build_customer_edge(deployed: nn.Module, width: float, preset: str, num_classes: int) -> nn.Module:
    """The customer's edge model: the deployed one (copied) at its own width; at another
    MobileNetV2 width a new model that starts from the deployed one's parameters wherever a
    name has the same shape (the head and the FPN's 3x3 convs; the trunk and the FPN's lateral
    1x1 convs start random)."""
    edge = build_detector("edge", preset, num_classes=num_classes, width_mult=width)
    deployed_state = deployed.state_dict()
    own = edge.state_dict()
    edge.load_state_dict({**own, **{n: v for n, v in deployed_state.items() if n in own and own[n].shape == v.shape}})
    return edge


def compute_peer_losses(edge: nn.Module, reference_images: list[Tensor], peer_mean: Tensor | None, *, rho: float,
                        temperature: float, grid: Sequence[int], batch_size: int, seed: int) -> LossFn:
    """A customer's loss on a batch of its own data: ``(1 - rho)`` times FCOS's task losses plus
    ``rho`` times KL(peer mean || own) on a random batch of reference images (SQMD's
    ``train_local_model_with_ref``). Without a peer mean (the first round) the task losses alone."""
    generator = torch.Generator().manual_seed(seed)
    task_weight = 1.0 - rho if peer_mean is not None else 1.0

    def losses(images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        out = extract_features(edge, images, targets)
        terms = {f"task.{key}": task_weight * value for key, value in out.losses.items()}
        if peer_mean is not None:
            picked = torch.randint(len(reference_images), (min(batch_size, len(reference_images)),), generator=generator)
            device = images[0].device
            own = compute_reference_logits(edge, [reference_images[i].to(device) for i in picked.tolist()], grid)
            terms["distill.peers"] = rho * compute_bernoulli_kl(peer_mean[picked].to(device), own, temperature)
        return terms

    return losses


__all__ = [
    "UPLOAD_KEYS", "DOWNLOAD_KEYS", "reference_grid", "pool_head_output", "compute_reference_logits", "load_reference_images",
    "build_upload", "count_message_bytes", "build_reference_targets", "compute_quality_loss", "compute_bernoulli_kl",
    "compute_distance", "select_peers", "average_peer_outputs", "run_server_round", "build_customer_edge",
    "compute_peer_losses",
]
