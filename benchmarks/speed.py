"""How fast Net trains at batch 512 here: the original's input path against this project's, in one run.

    python3 benchmarks/speed.py [--data-dir data] [--steps 30] [--no-epoch]

(a) the original's path: torchvision's PIL transforms per image in 2 DataLoader workers, float32, NCHW;
(b) this project's path, exactly as main_mnist.py runs it: utils.get_trainloader + utils.train, with AMP as set there;
(c) the compute floor: the same model and precision on one batch already in memory, so no input work at all.
It also times the input pipeline of (b) alone (its share of b), the test pass, one whole epoch (train + test) of (b),
and reports the peak memory (RSS) of this process and of the workers of (a).
"""
import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_mnist  # noqa: E402  (the repo root, for the hyperparameters main uses)
import utils  # noqa: E402
from model import Net  # noqa: E402

BATCH = 512
WARMUP = 3  # the first steps pay for memory allocation and oneDNN's kernel selection


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def new_model_and_optimizer(device, channels_last):
    torch.manual_seed(0)
    model = Net().to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return model, torch.optim.SGD(model.parameters(), lr=main_mnist.LR, momentum=main_mnist.MOMENTUM)


def original_path(data_dir, device, steps):
    """img/s of the original's training loop: PIL transforms in 2 workers, float32, NCHW."""
    augmentation = transforms.Compose([
        transforms.RandomApply([transforms.CenterCrop(22)], p=0.1),
        transforms.Resize((28, 28)),
        transforms.RandomRotation((-15., 15.), fill=0),
        transforms.ToTensor(),
        transforms.Normalize((0.1307,), (0.3081,)),
    ])
    dataset = datasets.MNIST(data_dir, train=True, download=True, transform=augmentation)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=2,
                                         pin_memory=device.type == "cuda")
    model, optimizer = new_model_and_optimizer(device, channels_last=False)
    model.train()
    batches = iter(loader)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            sync(device)
            start = time.perf_counter()
        data, target = next(batches)
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
    loss.item()
    sync(device)
    seconds = time.perf_counter() - start
    del batches  # stops the workers
    return steps * BATCH / seconds


def project_path(train_loader, device, amp, steps):
    """img/s of utils.train on utils.get_trainloader's batches, as main_mnist.py calls it."""
    model, optimizer = new_model_and_optimizer(device, channels_last=True)
    train_loader.max_batches = WARMUP
    utils.train(model, device, train_loader, optimizer, F.nll_loss, amp=amp)
    train_loader.max_batches = steps
    start = time.perf_counter()
    utils.train(model, device, train_loader, optimizer, F.nll_loss, amp=amp)  # ends reading the loss: synced
    return steps * BATCH / (time.perf_counter() - start)


def pipeline_alone(train_loader, device, steps):
    """img/s of making the batches of (b) (shuffle, augment, normalize) with no training."""
    train_loader.max_batches = steps
    sync(device)
    start = time.perf_counter()
    for data, _ in train_loader:
        pass
    sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def compute_floor(device, amp, steps):
    """img/s of the same training step on one batch held in memory: the most any input path can give."""
    model, optimizer = new_model_and_optimizer(device, channels_last=True)
    data = torch.randn(BATCH, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (BATCH,), device=device)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            sync(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with utils.autocast(device, amp):
            output = model(data)
        loss = F.nll_loss(output.float(), target)
        loss.backward()
        optimizer.step()
    loss.item()
    sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def peak_rss_mib(who):
    kib = resource.getrusage(who).ru_maxrss  # KiB on Linux
    return kib / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", default=main_mnist.DATA_DIR, help="folder holding MNIST/raw")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps of batch 512 per path")
    parser.add_argument("--no-epoch", action="store_true", help="skip timing one whole epoch of (b)")
    args = parser.parse_args()

    device = utils.pick_device()
    amp = utils.use_bfloat16(device, main_mnist.AMP)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {device} ({name}); mixed precision of (b) and (c): "
          f"{'bfloat16' if amp else 'off'}; batch {BATCH}, {args.steps} timed steps per path")

    train_loader = utils.get_trainloader(args.data_dir, BATCH, device, augmentation=main_mnist.SETTINGS)
    test_loader = utils.get_testloader(args.data_dir, main_mnist.TEST_BATCH_SIZE, device)
    a = original_path(args.data_dir, device, args.steps)
    b = project_path(train_loader, device, amp, args.steps)
    pipeline = pipeline_alone(train_loader, device, args.steps)
    c = compute_floor(device, amp, args.steps)

    model, optimizer = new_model_and_optimizer(device, channels_last=True)
    utils.test(model, device, test_loader, F.nll_loss, amp)  # warm-up
    start = time.perf_counter()
    utils.test(model, device, test_loader, F.nll_loss, amp)
    evaluation = len(test_loader.labels) / (time.perf_counter() - start)

    rows = [
        ("(a) original path: PIL transforms, 2 workers, fp32, NCHW", f"{a:8.0f} img/s"),
        ("(b) this project's path (main_mnist.py)", f"{b:8.0f} img/s"),
        ("(c) compute floor: same step, batch already in memory", f"{c:8.0f} img/s"),
        ("b / a", f"{b / a:8.2f} x"),
        ("b / c (how close b is to the floor)", f"{b / c:8.2f}"),
        ("input pipeline of (b) alone", f"{pipeline:8.0f} img/s"),
        ("pipeline's share of (b)'s time", f"{100 * b / pipeline:8.1f} %"),
        (f"test pass (batch {main_mnist.TEST_BATCH_SIZE}, inference mode)", f"{evaluation:8.0f} img/s"),
    ]
    if not args.no_epoch:
        train_loader.max_batches = None
        model, optimizer = new_model_and_optimizer(device, channels_last=True)
        start = time.perf_counter()
        utils.train(model, device, train_loader, optimizer, F.nll_loss, amp=amp)
        utils.test(model, device, test_loader, F.nll_loss, amp)
        epoch = time.perf_counter() - start
        rows += [("one whole epoch of (b): train 60,000 + test 10,000", f"{epoch:8.1f} s"),
                 ("  as training throughput (60,000 / epoch time)", f"{60_000 / epoch:8.0f} img/s"),
                 ("  against the original's training-only throughput", f"{60_000 / epoch / a:8.2f} x")]
    rows += [("peak RSS of this process", f"{peak_rss_mib(resource.RUSAGE_SELF):8.0f} MiB"),
             ("peak RSS of the largest worker of (a)", f"{peak_rss_mib(resource.RUSAGE_CHILDREN):8.0f} MiB")]
    if device.type == "cuda":
        rows.append(("peak CUDA memory allocated", f"{torch.cuda.max_memory_allocated() / 2**20:8.0f} MiB"))
    width = max(len(label) for label, _ in rows)
    print()
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
