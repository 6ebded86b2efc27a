"""How near each model's training step comes to this machine's limit, in one run: FLOPs per image (forward and
backward, counted by torch's FlopCounterMode), images per second of a whole training step (forward, loss,
backward, SGD), and their product as a share of the peak a large float32 matrix product reaches here.

    python3 -m benchmarks.speed [--models Net CompactNet FastNet] [--seconds 3]

Nothing else should run meanwhile: the numbers are only as steady as the machine.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from main_mnist import BLOCK, RECIPES
from model import MODELS
from utils import autocast, bfloat16_is_native, memory_format, pick_device


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, seconds, size=2048):
    """GFLOP/s of repeated size x size float32 matrix products: what this machine reaches at best."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        sync(device)
        count += 1
    return 2 * size ** 3 * count / (time.perf_counter() - start) / 1e9


def step_speed(model, batch_size, device, amp, seconds):
    """(FLOPs per image of a training step, images per second)."""
    images = torch.randn(batch_size, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            output = model(images)
        F.nll_loss(output.float(), labels).backward()
        optimizer.step()
    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(3):
        step()
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    sync(device)
    return counter.get_total_flops() / batch_size, count * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seconds", type=float, default=3.0, help="time each measure this long")
    args = parser.parse_args()
    device = pick_device()
    amp = bfloat16_is_native(device)
    peak = matmul_peak(device, args.seconds)
    print(f"Device: {device.type} ({torch.backends.cpu.get_cpu_capability() if device.type == 'cpu' else ''}, "
          f"{torch.get_num_threads()} threads), {'bfloat16' if amp else 'float32'}; a 2048x2048 float32 matrix "
          f"product reaches {peak:.0f} GFLOP/s\n")
    print("| model | batch | MFLOP per image (train step) | images/s | GFLOP/s | share of the matrix product's | "
          "contiguous, images/s | the layout's speed-up |\n|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        batch = {**BLOCK, **RECIPES.get(name, {})}["BATCH_SIZE"]
        model = MODELS[name]().to(device)  # contiguous, then in the layout main_mnist.py trains it in
        _, plain = step_speed(model, batch, device, amp, args.seconds)
        flops, speed = step_speed(model.to(memory_format=memory_format(model)), batch, device, amp, args.seconds)
        print(f"| {name} | {batch} | {flops / 1e6:.2f} | {speed:,.0f} | {flops * speed / 1e9:.1f} | "
              f"{100 * flops * speed / 1e9 / peak:.1f}% | {plain:,.0f} | {speed / plain:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
