"""Training images/s of each role and preset on this machine (tensors already in memory).

    python bench/train_step.py [--presets cpu paper] [--batch 16] [--steps 10] [--threads N]

One SGD step = FCOS forward with targets + backward + optimizer step. Random images with 1 to 6
random boxes each, at the preset's image size. The first two steps are warm-up, not timed.
"""
import argparse
import platform
import time

import torch

from diredi_sim.models import ROLES, build_detector, count_parameters, get_spec


def make_batch(batch_size: int, size: int, generator: torch.Generator):
    images, targets = [], []
    for _ in range(batch_size):
        images.append(torch.rand(3, size, size, generator=generator))
        n = int(torch.randint(1, 7, (1,), generator=generator))
        xy = torch.rand(n, 2, generator=generator) * size * 0.6
        wh = (torch.rand(n, 2, generator=generator) * 0.35 + 0.08) * size
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 20, (n,), generator=generator)})
    return images, targets


def measure_train_rate(role: str, preset: str, batch_size: int, steps: int, device: str = "cpu") -> float:
    detector = build_detector(role, preset).to(device).train()
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.001, momentum=0.9)
    images, targets = make_batch(batch_size, get_spec(role, preset).image_size, torch.Generator().manual_seed(0))
    images = [i.to(device) for i in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    for step in range(steps + 2):
        if step == 2:
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = sum(detector(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--roles", nargs="+", default=list(ROLES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--paper-steps", type=int, default=2, help="steps for the paper preset (slow on a CPU)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}")
    print(f"{'preset':6} {'role':8} {'backbone':13} {'px':>4} {'params':>8} {'img/s':>8}")
    for preset in args.presets:
        for role in args.roles:
            spec = get_spec(role, preset)
            steps = args.paper_steps if preset == "paper" and args.device == "cpu" else args.steps
            batch = min(args.batch, 4) if preset == "paper" and args.device == "cpu" else args.batch
            rate = measure_train_rate(role, preset, batch, steps, args.device)
            params = sum(count_parameters(build_detector(role, preset)).values())
            name = spec.backbone + (f"x{spec.width_mult}" if spec.width_mult != 1.0 else "")
            print(f"{preset:6} {role:8} {name:13} {spec.image_size:4d} {params / 1e6:7.2f}M {rate:8.1f}", flush=True)


if __name__ == "__main__":
    main()
