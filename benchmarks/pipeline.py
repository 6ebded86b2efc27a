"""Net's training steps in the original's pipeline against this repo's, timed in turns in one run:

    python3 -m benchmarks.pipeline [--data-dir data] [--batches 20] [--rounds 2]

The original: torchvision's MNIST with the assignment's transforms per image, a DataLoader of 512 shuffled images
with 2 workers, Net contiguous. This repo's: utils.get_trainloader (augmented a batch at a time on the device), Net
in utils.memory_format's layout. Each round times `batches` SGD steps of each, the loader's start included."""
import argparse
import time

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms as T

from main_mnist import BLOCK
from model import Net
from utils import MNIST_MEAN, MNIST_STD, get_trainloader, memory_format


def seconds_per_step(model, loader, batches):
    optimizer, start = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), time.perf_counter()
    for _, (images, labels) in zip(range(batches), loader):
        optimizer.zero_grad()
        F.nll_loss(model(images), labels).backward()
        optimizer.step()
    return (time.perf_counter() - start) / batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    original = torch.utils.data.DataLoader(datasets.MNIST(args.data_dir, transform=T.Compose([
        T.RandomApply([T.CenterCrop(22)], p=0.1), T.Resize((28, 28)), T.RandomRotation((-15.0, 15.0), fill=0),
        T.ToTensor(), T.Normalize((MNIST_MEAN,), (MNIST_STD,))])), batch_size=512, shuffle=True, num_workers=2)
    ours = get_trainloader(args.data_dir, 512, augmentation=BLOCK)
    print(f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, seconds a step of Net\n"
          f"| round | original's pipeline | this repo's | speed-up |\n|---|---|---|---|")
    for round in range(1, args.rounds + 1):
        before, model = seconds_per_step(Net(), original, args.batches), Net()
        after = seconds_per_step(model.to(memory_format=memory_format(model)), ours, args.batches)
        print(f"| {round} | {before:.3f} | {after:.3f} | {before / after:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
