"""Training images/s of each cpu-preset role in fp32 and with bf16 backbone + FPN, side by side.

    python bench/precision.py [--roles teacher tutor edge] [--steps 8] [--threads N]

The steps are the project's own (``extract_features`` + FCOS losses + AdamW), on real synthetic
images of the manufacturer's public pool through the real loader; ``train.precision = "bf16"``
runs the backbone + FPN under bf16 autocast and the head and the losses in fp32. The two
precisions of a role run back to back in one process (these machines are noisy: compare the
ratio, not the absolute figures). The first two steps are warm-up, not timed.
"""
import argparse
import time

import torch

from diredi_sim.config import DataConfig
from diredi_sim.models import backbone_precision, build_detector
from diredi_sim.datasets import DataSets
from diredi_sim.train import build_loader, compute_task_losses


def measure(role: str, precision: str, records, steps: int) -> tuple[float, float]:
    torch.manual_seed(0)
    detector = build_detector(role, "cpu").train()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-3)
    losses = compute_task_losses(detector)
    loader = build_loader(records, batch_size=16, train=True)
    start, images = None, 0
    with backbone_precision(precision):
        for step, (batch, targets) in enumerate(loader):
            if step == 2:
                start, images = time.perf_counter(), 0
            if step == steps + 2:
                break
            loss = sum(losses(batch, targets).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(batch)
    return images / (time.perf_counter() - start), float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", nargs="+", default=["teacher", "tutor", "edge"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = DataSets(DataConfig()).records("train", "teacher", 16 * (args.steps + 2), pool="public")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch 16, 128 px")
    print("| role | fp32 img/s | bf16 img/s | bf16 / fp32 | last loss fp32 / bf16 |")
    print("|---|---|---|---|---|")
    for role in args.roles:
        fp32, loss32 = measure(role, "fp32", records, args.steps)
        bf16, loss16 = measure(role, "bf16", records, args.steps)
        print(f"| {role} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f}x | {loss32:.3f} / {loss16:.3f} |", flush=True)


if __name__ == "__main__":
    main()
