"""Is training bound by the input pipeline? Images/s of a real training epoch (JPEG decode, VOC
annotations, resize, flip, collate: diredi_sim's DataLoader) against the same model's forward +
backward + step on the same batches already decoded in memory.

    python bench/input_pipeline.py [--config experiments/configs/demo.toml] [--role edge] [--images 320]
                                   [--workers 0] [--threads N]

Both loops run the same number of steps in one process, side by side, twice each in
alternation (ABAB), and the better of the two of each is kept. Target: ratio at least 0.9.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diredi_sim.config import load_config  # noqa: E402
from server.engine import RunConfig  # noqa: E402
from diredi_sim.models import build_detector  # noqa: E402
from diredi_sim.datasets import DataSets
from diredi_sim.train import build_loader  # noqa: E402


def step(detector, optimizer, images, targets) -> None:
    loss = sum(detector(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "experiments/configs/demo.toml"))
    parser.add_argument("--role", default="edge", choices=["teacher", "tutor", "edge"])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, cls=RunConfig)
    records = DataSets(config.data).records(config.data.train_set, "all", args.images, pool="all")
    loader = build_loader(records, batch_size=args.batch, train=True, hflip_prob=0.5, num_workers=args.workers)
    torch.manual_seed(0)
    detector = build_detector(args.role, config.preset).train()
    optimizer = torch.optim.SGD(detector.parameters(), lr=1e-4, momentum=0.9)
    batches = list(loader)  # decoded once, for the in-memory loop
    for images, targets in batches[:2]:  # warm-up
        step(detector, optimizer, images, targets)
    n = sum(len(images) for images, _ in batches)

    def real() -> float:
        start = time.perf_counter()
        for images, targets in loader:
            step(detector, optimizer, images, targets)
        return n / (time.perf_counter() - start)

    def memory() -> float:
        start = time.perf_counter()
        for images, targets in batches:
            step(detector, optimizer, images, targets)
        return n / (time.perf_counter() - start)

    rates = {"real": [], "memory": []}
    for _ in range(2):
        rates["real"].append(real())
        rates["memory"].append(memory())
    best_real, best_memory = max(rates["real"]), max(rates["memory"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.role} ({config.preset} preset), {n} images, batch {args.batch}, DataLoader workers {args.workers}")
    print(f"real epoch (decode + transforms + step): {' / '.join(f'{r:.1f}' for r in rates['real'])} img/s")
    print(f"tensors in memory (step only):           {' / '.join(f'{r:.1f}' for r in rates['memory'])} img/s")
    print(f"ratio real / in-memory (best of each):   {best_real / best_memory:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
