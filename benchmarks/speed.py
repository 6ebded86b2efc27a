"""How fast each model trains here, in each precision the device runs natively, beside the original's path, in one run.

    python3 benchmarks/speed.py [--data-dir data] [--steps 12] [--models Net CompactNet] [--no-epoch] [--profile]

For each model (Net at the block's batch size, CompactNet at its recipe's) and each precision (float32, and
bfloat16 autocast where hardware.bfloat16_is_fast says the device runs it natively):
(a) the original's path: torchvision's PIL transforms per image in 2 DataLoader workers, float32, NCHW;
(b) this project's path, as main_mnist.py runs it: utils.get_trainloader + utils.train, in the layout
    hardware.choose_layout picks (timed here, not remembered);
(c) the compute floor of each layout: the same step on one batch already in memory, no input work at all;
then, unless --no-epoch, one whole epoch of (b), train and test, as main_mnist.py times it.
--profile adds a table of the operations (c) spends its time in, in the chosen layout.
Ratios are of numbers taken in this one run; compare them, not absolute figures from other runs.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machinery import hardware  # noqa: E402  (the repo root)
import main_mnist  # noqa: E402
import utils  # noqa: E402
from model import MODELS  # noqa: E402

WARMUP = 3  # the first steps pay for memory allocation and oneDNN's kernel selection


def recipe(model_name):
    """The settings main_mnist.py trains `model_name` with: the block, with the recipe --model applies over it."""
    return {**main_mnist.SETTINGS, **main_mnist.RECIPES[model_name], "MODEL": model_name}


def new_model_and_optimizer(hp, device, layout):
    torch.manual_seed(0)
    model = main_mnist.build_model(hp).to(device, memory_format=hardware.LAYOUTS[layout])
    return model, main_mnist.build_optimizer(model, hp)


def original_path(hp, device, steps):
    """img/s of the original's training loop: PIL transforms in 2 workers, float32, NCHW."""
    augmentation = transforms.Compose([
        transforms.RandomApply([transforms.CenterCrop(22)], p=0.1),
        transforms.Resize((28, 28)),
        transforms.RandomRotation((-15., 15.), fill=0),
        transforms.ToTensor(),
        transforms.Normalize((0.1307,), (0.3081,)),
    ])
    dataset = datasets.MNIST(hp["DATA_DIR"], train=True, download=True, transform=augmentation)
    loader = torch.utils.data.DataLoader(dataset, batch_size=hp["BATCH_SIZE"], shuffle=True, num_workers=2,
                                         pin_memory=device.type == "cuda")
    model, optimizer = new_model_and_optimizer(hp, device, "contiguous")
    model.train()
    batches = iter(loader)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            hardware.sync(device)
            start = time.perf_counter()
        data, target = next(batches)
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
    loss.item()
    hardware.sync(device)
    seconds = time.perf_counter() - start
    del batches  # stops the workers
    return steps * hp["BATCH_SIZE"] / seconds


def project_path(hp, train_loader, device, amp, layout, steps):
    """img/s of utils.train on utils.get_trainloader's batches, as main_mnist.py calls it."""
    model, optimizer = new_model_and_optimizer(hp, device, layout)
    train_loader.layout, train_loader.max_batches = layout, WARMUP
    utils.train(model, device, train_loader, optimizer, F.nll_loss, amp=amp)
    train_loader.max_batches = steps
    start = time.perf_counter()
    utils.train(model, device, train_loader, optimizer, F.nll_loss, amp=amp)  # ends reading the loss: synced
    return steps * hp["BATCH_SIZE"] / (time.perf_counter() - start)


def compute_floor(hp, device, amp, layout, steps, profile=False):
    """img/s of the same training step on one batch held in memory: the most any input path can give.
    With `profile`, also the table of where the timed steps spent their time."""
    model, optimizer = new_model_and_optimizer(hp, device, layout)
    data = torch.randn(hp["BATCH_SIZE"], 1, 28, 28, device=device).contiguous(
        memory_format=hardware.LAYOUTS[layout])
    target = torch.randint(0, 10, (hp["BATCH_SIZE"],), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with hardware.autocast(device, amp):
            output = model(data)
        loss = F.nll_loss(output.float(), target)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(WARMUP):
        step()
    hardware.sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    hardware.sync(device)
    speed = steps * hp["BATCH_SIZE"] / (time.perf_counter() - start)
    if not profile:
        return speed, None
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(min(steps, 5)):
            step()
        hardware.sync(device)
    return speed, profile_table(profiler)


def profile_table(profiler, rows=10):
    """The operations that took the largest share of the profiled steps' own time (self time, so nothing is
    counted twice), as a Markdown table."""
    events = [event for event in profiler.key_averages() if event.key.startswith("aten::")]
    total = sum(event.self_cpu_time_total for event in events) or 1
    lines = ["| op | calls | share of the step |", "|---|---|---|"]
    for event in sorted(events, key=lambda event: -event.self_cpu_time_total)[:rows]:
        lines.append(f"| `{event.key.removeprefix('aten::')}` | {event.count} | "
                     f"{100 * event.self_cpu_time_total / total:.0f}% |")
    return "\n".join(lines)


def whole_epoch(hp, train_loader, test_loader, device, amp, layout):
    """Seconds of one epoch as main_mnist.py runs it: training on all 60,000 images, then the test pass."""
    train_loader.layout, train_loader.max_batches, test_loader.layout = layout, None, layout
    model, optimizer = new_model_and_optimizer(hp, device, layout)
    scheduler = main_mnist.build_scheduler(optimizer, hp, len(train_loader))
    start = time.perf_counter()
    utils.train(model, device, train_loader, optimizer, F.nll_loss, scheduler, amp=amp)
    utils.test(model, device, test_loader, F.nll_loss, amp, verbose=False)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=main_mnist.DATA_DIR, help="folder holding MNIST/raw")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per path")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to time")
    parser.add_argument("--no-epoch", action="store_true", help="skip timing one whole epoch of (b)")
    parser.add_argument("--profile", action="store_true", help="print where the compute floor's step spends time")
    args = parser.parse_args()

    device = hardware.pick_device()
    precisions = [False] + ([True] if hardware.bfloat16_is_fast(device) else [])
    print(f"torch {torch.__version__}; device {hardware.device_name(device)}; precisions timed: "
          f"{', '.join(hardware.precision_name(amp) for amp in precisions)}; {args.steps} timed steps per path")
    for name in args.models:
        hp = {**recipe(name), "DATA_DIR": args.data_dir}
        train_loader = utils.get_trainloader(args.data_dir, hp["BATCH_SIZE"], device, augmentation=hp)
        test_loader = utils.get_testloader(args.data_dir, hp["TEST_BATCH_SIZE"], device)
        a = original_path(hp, device, args.steps)
        for amp in precisions:
            floors, tables = {}, {}
            for layout in hardware.LAYOUTS:
                floors[layout], tables[layout] = compute_floor(hp, device, amp, layout, args.steps, args.profile)
            layout = max(floors, key=floors.get)  # what LAYOUT = "auto" picks, timed the same way but longer
            b = project_path(hp, train_loader, device, amp, layout, args.steps)
            print(f"\n**{name}, batch {hp['BATCH_SIZE']}, {hardware.precision_name(amp)}, "
                  f"layout {layout} (the faster floor)**\n")
            rows = [("(a) the original's path: PIL transforms, 2 workers, float32, NCHW", f"{a:.0f} img/s"),
                    ("(b) this project's path (main_mnist.py)", f"{b:.0f} img/s"),
                    *[(f"(c) compute floor, {other}", f"{floors[other]:.0f} img/s") for other in floors],
                    ("**b / a**", f"**{b / a:.2f}×**"),
                    ("b / c (how close b is to its floor)", f"{b / floors[layout]:.2f}")]
            if not args.no_epoch:
                seconds = whole_epoch(hp, train_loader, test_loader, device, amp, layout)
                rows.append(("one epoch of (b): train 60,000 + test 10,000", f"{seconds:.1f} s"))
            print("| path | speed |\n|---|---|")
            print("\n".join(f"| {label} | {value} |" for label, value in rows))
            if args.profile:
                print(f"\nWhere (c)'s step spends its time, {layout}:\n\n{tables[layout]}")
    if device.type == "cuda":
        print(f"\npeak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
