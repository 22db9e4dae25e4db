"""The paper preset on one GPU: training images/s and peak GPU memory of each stage's work, and the
Exp 1 flow's time at the paper's epochs extrapolated from them. One prepared command:

    python bench/gpu.py                      # on a machine with a CUDA GPU (a few minutes)
    python bench/gpu.py --device cpu --preset cpu --steps 2 --warmup 1   # a dry run of the script on a CPU

Works (the project's own training steps, run as ``fit`` runs them: ``on_device``,
``backbone_precision``, ``train_one_epoch``), paper preset at 512 px:
- ``rd``: reverse distillation, the edge (MobileNetV2 FCOS-Lite) frozen as the teacher, a tutor
  copy (ResNet50) with a frozen backbone as the student, FGD + task loss; batch 16 (RD A and RD B).
- ``distill_c``: tutor' -> edge, FGD + task; batch 8 (the paper's Distill C).
- ``distill_a``: teacher (ResNet101) -> tutor; batch 16.
- ``teacher``: the teacher's own training on its task loss; batch 16.
Each in fp32 and in bf16 (backbone + FPN) with channels_last, side by side in one process.

The extrapolation multiplies each stage's epochs (the paper's: KD and RD 100, Distill C 20; the
teacher's are not in the paper: ``--teacher-epochs``) by its images per epoch and divides by the
measured images/s. Images per epoch default to what the paper's own figures imply: RD A took
about 19 h for 100 epochs, i.e. about 8 900 images per epoch at the 13 img/s the issue derives;
give the real counts of your split with ``--images-per-epoch``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from diredi_sim.compute import configure_process, on_device
from diredi_sim.config import TrainConfig
from diredi_sim.data.synthetic import SyntheticConfig, ensure_synthetic
from diredi_sim.data.voc import load_annotations
from diredi_sim.models import backbone_precision, build_detector
from diredi_sim.train import Distiller, build_loader, build_optimizer, compute_task_losses, train_one_epoch

WORKS = {  # work: (batch size, paper epochs)
    "rd": (16, 100),
    "distill_c": (8, 20),
    "distill_a": (16, 100),
    "teacher": (16, None),
}
SETTINGS = (("fp32", False), ("bf16", True))
PAPER_RD_IMAGES_PER_S = 13.0  # the reading of the paper's RD A: about 19 h for 100 epochs on an RTX 3090


def build_work(work: str, preset: str):
    torch.manual_seed(0)
    if work == "rd":
        distiller = Distiller(build_detector("edge", preset), build_detector("tutor", preset), freeze_student_backbone=True)
    elif work == "distill_c":
        distiller = Distiller(build_detector("tutor", preset), build_detector("edge", preset))
    elif work == "distill_a":
        distiller = Distiller(build_detector("teacher", preset), build_detector("tutor", preset))
    else:
        detector = build_detector("teacher", preset)
        return detector, compute_task_losses(detector), list(detector.parameters())
    return distiller, distiller, distiller.trainable_parameters()


def measure(work: str, precision: str, channels_last: bool, records, args) -> tuple[float, float]:
    """Images/s over ``args.steps`` steps after ``args.warmup`` warm-up steps, and peak GPU memory (GiB)."""
    module, losses, params = build_work(work, args.preset)
    batch = WORKS[work][0]
    loader = build_loader(records, batch_size=batch, train=True)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with on_device(module, channels_last=channels_last), backbone_precision(precision):
        optimizer = build_optimizer(params, TrainConfig(lr=1e-4))
        train_one_epoch(module, losses, optimizer, loader, epoch=0, progress=False, max_steps=args.warmup)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        stats = train_one_epoch(module, losses, optimizer, loader, epoch=1, progress=False, max_steps=args.steps)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del module, optimizer
    return stats.images / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--works", nargs="+", default=list(WORKS), choices=list(WORKS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--images-per-epoch", type=int, default=8900, help="training images per epoch of every stage")
    parser.add_argument("--teacher-epochs", type=int, default=100)
    args = parser.parse_args()
    device = configure_process(device=args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({name}), preset {args.preset}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats}", flush=True)
    records = load_annotations(ensure_synthetic(".cache/diredi-sim-bench", SyntheticConfig(seed=5, num_train=64, num_val=1, num_test=1),
                                                workers=1), "train")
    print("| work | batch | fp32 img/s | bf16 + channels_last img/s | ratio | peak GPU GiB fp32 / bf16+cl |")
    print("|---|---|---|---|---|---|")
    best: dict[str, float] = {}
    for work in args.works:
        figures = {s: [measure(work, *s, records, args) for _ in range(args.repeats)] for s in SETTINGS}
        speed = {s: statistics.median(f[0] for f in runs) for s, runs in figures.items()}
        peak = {s: max(f[1] for f in runs) for s, runs in figures.items()}
        best[work] = max(speed.values())
        print(f"| {work} | {WORKS[work][0]} | {speed[SETTINGS[0]]:.1f} | {speed[SETTINGS[1]]:.1f} | "
              f"{speed[SETTINGS[1]] / speed[SETTINGS[0]]:.2f}x | {peak[SETTINGS[0]]:.1f} / {peak[SETTINGS[1]]:.1f} |", flush=True)
    if "rd" in best:
        print(f"\nRD: {best['rd']:.0f} img/s = {best['rd'] / PAPER_RD_IMAGES_PER_S:.1f}x the paper's implied "
              f"{PAPER_RD_IMAGES_PER_S:.0f} img/s (target >= 260 img/s, 20x)")
    print(f"\nExp 1 at the paper's epochs, {args.images_per_epoch} images per epoch, best setting of each work:")
    hours = {}
    for stage, work, epochs in (("teacher", "teacher", args.teacher_epochs), ("Distill A", "distill_a", 100),
                                ("Distill B", "distill_a", 100), ("RD A", "rd", 100), ("RD B", "rd", 100), ("Distill C", "distill_c", 20)):
        if work in best:
            hours[stage] = epochs * args.images_per_epoch / best[work] / 3600
            note = " (timed as Distill A: teacher -> tutor; tutor -> edge is lighter)" if stage == "Distill B" else ""
            print(f"  {stage}: {epochs} epochs -> {hours[stage]:.2f} h{note}")
    customer = sum(hours.get(s, 0.0) for s in ("RD A", "RD B", "Distill C"))
    print(f"  a customer's round (RD A + RD B + Distill C): {customer:.2f} h; the paper's on an RTX 3090: about 44 h "
          f"(RD A 19 h, RD B 21 h, Distill C 4 h)")


if __name__ == "__main__":
    main()
