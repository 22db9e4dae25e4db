"""Training images/s of the cpu-preset roles under each precision and memory format, side by side.

    python bench/precision.py [--work teacher tutor edge rd] [--steps 5] [--repeats 3] [--threads N] [--device cpu]
    python bench/precision.py --work edge --compile    # fp32 + channels_last, eager vs torch.compile'd

Each work is the project's own training step, run the way ``fit`` runs it (``on_device`` with the
stage's ``channels_last``, ``backbone_precision`` with its ``precision``, ``train_one_epoch``):
``teacher`` / ``tutor`` / ``edge`` train on FCOS's task losses; ``rd`` is reverse distillation
(the edge frozen as the teacher, a tutor copy with a frozen backbone as the student, FGD + task).
Real synthetic images of the manufacturer's public pool through the real loader, batch 16.
The four settings of a work run interleaved, ``--repeats`` times, in one process (these
machines are noisy: compare the ratios); each figure is the median over the repeats. The first
two steps of each run are warm-up, not timed.

``--compile``: instead of the four settings, fp32 + channels_last eager against the same with the
detector's backbone + FPN, then also its head, compiled in place (``nn.Module.compile``, inductor);
the first warm-up of each (the compilation) is timed and printed.
"""
import argparse
import statistics
import time

import torch

from diredi_sim.compute import configure_process, on_device
from diredi_sim.config import DataConfig, TrainConfig
from diredi_sim.datasets import DataSets
from diredi_sim.models import backbone_precision, build_detector
from diredi_sim.train import Distiller, build_loader, build_optimizer, compute_task_losses, train_one_epoch

SETTINGS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))
COMPILED = (("fp32", True, ()), ("fp32", True, ("backbone",)), ("fp32", True, ("backbone", "head")))


def build_work(work: str):
    torch.manual_seed(0)
    if work == "rd":
        edge, tutor = build_detector("edge", "cpu"), build_detector("tutor", "cpu")
        distiller = Distiller(edge, tutor, freeze_student_backbone=True)
        return distiller, distiller, distiller.trainable_parameters()
    detector = build_detector(work, "cpu")
    return detector, compute_task_losses(detector), list(detector.parameters())


def measure(work: str, precision: str, channels_last: bool, records, steps: int, compiled: tuple[str, ...] = (),
            warmups: list[float] | None = None) -> float:
    module, losses, params = build_work(work)
    loader = build_loader(records, batch_size=16, train=True)
    cfg = TrainConfig(lr=1e-3)
    with on_device(module, channels_last=channels_last), backbone_precision(precision):
        for name in compiled:  # the detector's submodules, in place (their state_dict keys unchanged)
            getattr(module, name).compile()
        optimizer = build_optimizer(params, cfg)
        start = time.perf_counter()
        train_one_epoch(module, losses, optimizer, loader, epoch=0, progress=False, max_steps=2)  # warm-up
        if warmups is not None:
            warmups.append(time.perf_counter() - start)
        stats = train_one_epoch(module, losses, optimizer, loader, epoch=1, progress=False, max_steps=steps)
    return stats.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", nargs="+", default=["teacher", "tutor", "edge", "rd"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="eager vs torch.compile, fp32 + channels_last")
    args = parser.parse_args()
    device = configure_process(device=args.device, threads=args.threads)
    records = DataSets(DataConfig()).records("train", "teacher", 16 * (args.steps + 2), pool="public")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), batch 16, 128 px, "
          f"{args.steps} timed steps, median of {args.repeats}")
    if args.compile:
        return compare_compiled(args, records)
    print("| work | fp32 img/s | fp32 + channels_last | bf16 | bf16 + channels_last | best / fp32 |")
    print("|---|---|---|---|---|---|")
    for work in args.work:
        runs: dict[tuple, list[float]] = {s: [] for s in SETTINGS}
        start = time.perf_counter()
        for _ in range(args.repeats):
            for setting in SETTINGS:
                runs[setting].append(measure(work, *setting, records, args.steps))
        median = {s: statistics.median(v) for s, v in runs.items()}
        best = max(median, key=median.get)
        cells = " | ".join(f"{median[s]:.1f}" for s in SETTINGS)
        print(f"| {work} | {cells} | {median[best] / median[SETTINGS[0]]:.2f}x ({label(best)}) |", flush=True)
        every = ", ".join(label(s) + " " + "/".join(f"{x:.0f}" for x in v) for s, v in runs.items())
        print(f"  ({work}, every run: {every}; {time.perf_counter() - start:.0f} s)", flush=True)


def compare_compiled(args, records) -> None:
    """Eager vs compiled parts, fp32 + channels_last, interleaved; the first warm-up is the compilation."""
    print("| work | eager img/s | backbone + FPN compiled | + head compiled | best / eager | first warm-ups (s) |")
    print("|---|---|---|---|---|---|")
    for work in args.work:
        runs: dict[tuple, list[float]] = {s: [] for s in COMPILED}
        warmups: dict[tuple, list[float]] = {s: [] for s in COMPILED}
        for _ in range(args.repeats):
            for precision, channels_last, parts in COMPILED:
                key = (precision, channels_last, parts)
                runs[key].append(measure(work, precision, channels_last, records, args.steps, parts, warmups[key]))
        median = {s: statistics.median(v) for s, v in runs.items()}
        eager = median[COMPILED[0]]
        cells = " | ".join(f"{median[s]:.1f}" for s in COMPILED)
        first = " / ".join(f"{warmups[s][0]:.1f}" for s in COMPILED)
        print(f"| {work} | {cells} | {max(median.values()) / eager:.2f}x | {first} |", flush=True)
        every = ", ".join("+".join(s[2]) or "eager" for s in COMPILED)
        print(f"  ({work}, every run in the order {every}: "
              + "; ".join("/".join(f"{x:.0f}" for x in runs[s]) for s in COMPILED) + ")", flush=True)


def label(setting: tuple[str, bool]) -> str:
    return setting[0] + (" + channels_last" if setting[1] else "")


if __name__ == "__main__":
    main()
