"""The original's functions, get_trainloader, get_testloader, GetCorrectPredCount, train, test, model_summary and
data_visualization, with what a learner follows through an epoch: MNIST as tensors on the device, batched,
augmented and normalized there, and the device and precision it runs in.
"""
import copy
import math
import os
import shutil
import struct
import tempfile

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR, ReduceLROnPlateau
from torchsummary import summary
from tqdm import tqdm

from augment import random_augment

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of MNIST's training pixels in [0, 1]: the original's Normalize


class UserError(Exception):
    """A problem the person running a script can fix (a bad setting, a damaged file, no network): said in one line,
    `error: ...`, with exit status 1."""


def normalize(images):
    """Images in [0, 1] (light digit on black) as the models take them; training, tests and predict.py share it."""
    return (images - MNIST_MEAN) / MNIST_STD


# ---------------------------------------------------------------------------------------------------------------
# Data: decoded once into uint8 tensors on the device, then batched, augmented and normalized there.

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path):
    """The uint8 array an unpacked MNIST file holds: a big-endian header (0, 0, 8 for uint8, the count of sizes, the
    sizes), then the values; ValueError if the file is not whole."""
    with open(path, "rb") as f:
        data = f.read()
    header = 4 + 4 * data[3] if len(data) > 3 and data[:3] == b"\0\0\x08" else 0
    sizes = struct.unpack(f">{data[3]}I", data[4:header]) if 4 < header <= len(data) else ()
    if not sizes or len(data) != header + math.prod(sizes):
        raise ValueError(f"{path} is not a whole MNIST file")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * len(sizes)).view(sizes)


def load_mnist(data_dir, train, dataset="MNIST"):
    """(images uint8 [N, 28, 28], labels int64 [N]) of torchvision's `dataset` (MNIST, FashionMNIST, KMNIST), read
    from data_dir/<dataset>/raw and checked: the count of images and labels, labels 0-9. Missing files are
    downloaded into a folder of this process's own and moved in whole, so that two runs starting at once never read
    a half-written file; a .gz already there that is not the original (its MD5) is named as damaged."""
    raw = os.path.join(data_dir, dataset, "raw")
    if not all(os.path.isfile(os.path.join(raw, name)) for name in FILES):
        from torchvision import datasets  # only to download: reading the files needs none of it (2 s of import)
        from torchvision.datasets.utils import check_md5
        kind = getattr(datasets, dataset)
        os.makedirs(raw, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=data_dir) as own:
            os.makedirs(os.path.join(own, dataset, "raw"))
            for name, md5 in kind.resources:  # the .gz files already there are unpacked, not downloaded again
                if os.path.isfile(os.path.join(raw, name)):
                    if not check_md5(os.path.join(raw, name), md5):
                        raise UserError(f"{os.path.join(raw, name)} is damaged (not the original file: its MD5 "
                                        f"differs): delete it and run again to fetch it anew")
                    shutil.copy(os.path.join(raw, name), os.path.join(own, dataset, "raw", name))
            try:
                kind(own, train=train, download=True)
            except (OSError, RuntimeError) as error:
                files = ", ".join(name for name, _ in kind.resources)
                raise UserError(f"{dataset} is not in {raw}/ and could not be downloaded "
                                f"({str(error).strip().splitlines()[-1]}): put {files} there and run again") from None
            for name in FILES + tuple(name for name, _ in kind.resources):  # the .gz kept: the tests read them too
                if not os.path.exists(os.path.join(raw, name)):
                    os.replace(os.path.join(own, dataset, "raw", name), os.path.join(raw, name))
    try:
        images, labels = (read_idx(os.path.join(raw, name)) for name in FILES[0 if train else 2:][:2])
    except ValueError as error:
        raise UserError(f"the {dataset} files in {raw}/ cannot be read ({error}): one is damaged; delete it and run "
                        f"again to fetch it anew") from None
    labels = labels.long()
    if len(images) != (60_000 if train else 10_000) or len(labels) != len(images) or not 0 <= labels.min() <= \
            labels.max() <= 9:
        raise UserError(f"the {'training' if train else 'test'} files of {dataset} in {raw}/ are damaged: "
                        f"{len(images):,} images, {len(labels):,} labels from {int(labels.min())} to "
                        f"{int(labels.max())}; delete them and run again to fetch them anew")
    return images, labels


class MnistBatches:
    """Normalized (images, labels) batches made on the device from uint8 tensors that live there: a DataLoader
    without workers or copies (MNIST is 55 MB). Each pass draws a new order (if shuffled) and new augmentations."""

    def __init__(self, images, labels, batch_size, shuffle=False, augmentation=None, max_batches=None):
        self.images, self.labels = images, labels  # uint8 [N, 28, 28] and int64 [N], on one device
        self.batch_size, self.shuffle, self.max_batches = batch_size, shuffle, max_batches
        self.augmentation = augmentation  # the settings random_augment() reads, or None

    def __len__(self):
        batches = math.ceil(len(self.labels) / self.batch_size)
        return batches if self.max_batches is None else min(batches, self.max_batches)

    def __iter__(self):
        order = torch.randperm(len(self.labels), device=self.labels.device) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = slice(start, start + self.batch_size) if order is None else order[start:start + self.batch_size]
            images = self.images[index].unsqueeze(1).float().div_(255)
            if self.augmentation is not None:
                images = random_augment(images, self.augmentation)
            yield normalize(images), self.labels[index]


def get_trainloader(data_dir, batch_size, device="cpu", max_batches=None, augmentation=None, dataset="MNIST"):
    """The training set as batches on `device`, shuffled and (with `augmentation`, the run's settings) augmented
    anew each epoch."""
    images, labels = load_mnist(data_dir, True, dataset)
    return MnistBatches(images.to(device), labels.to(device), batch_size, True, augmentation, max_batches)


def get_testloader(data_dir, batch_size, device="cpu", max_batches=None, dataset="MNIST"):
    """The test set in its fixed order as batches on `device`, normalized only."""
    images, labels = load_mnist(data_dir, False, dataset)
    return MnistBatches(images.to(device), labels.to(device), batch_size, max_batches=max_batches)


def describe_data(train_images, test_images):
    """A line on the data: counts, shape, type, and the training pixels' mean and std in [0, 1], which
    Normalize((MNIST_MEAN,), (MNIST_STD,)) takes to 0 and 1."""
    counts = torch.bincount(train_images.flatten(), minlength=256).double().cpu()  # exact, and no float copy
    levels = torch.arange(256, dtype=torch.float64) / 255
    mean = float((counts * levels).sum() / counts.sum())
    std = float(((counts * (levels - mean) ** 2).sum() / counts.sum()).sqrt())
    return (f"Data: {len(train_images):,} training and {len(test_images):,} test images of "
            f"{'x'.join(map(str, train_images.shape[1:]))} {str(train_images.dtype)[6:]} on {train_images.device}; "
            f"training pixels in [0, 1]: mean {mean:.4f}, std {std:.4f} "
            f"(normalized with {MNIST_MEAN}, {MNIST_STD})")


# ---------------------------------------------------------------------------------------------------------------
# Device and precision

def pick_device(name="auto"):
    """The device DEVICE names; "auto": CUDA if there is a GPU, else Apple's MPS, else the CPU."""
    here = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(device for device, there in here.items() if there) if name == "auto" else name
    if not here.get(name):
        raise UserError(f"DEVICE {name}: there is no such device on this machine (try cpu, or auto for the best)")
    return torch.device(name)


def bfloat16_is_native(device):
    """Whether the device computes in bfloat16 natively: a CUDA GPU from Ampere on (compute capability 8), a CPU
    with AVX512-BF16 or AMX. Elsewhere (a T4, a plain CPU) it is emulated, slower than float32, so a run keeps
    float32; torch.cuda.is_bf16_supported() says True for emulation too."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def memory_format(model):
    """channels_last for a model with wide convolutions (32 channels or more), contiguous for thin ones: a training
    step of Net ran 1.2-1.3x faster in it on 2 AVX2 cores, FastNet's 1.3x, CompactNet's (18 channels at most) 8-25%
    slower."""
    wide = any(isinstance(m, torch.nn.Conv2d) and m.out_channels >= 32 for m in model.modules())
    return torch.channels_last if wide else torch.contiguous_format


def autocast(device, amp):
    """bfloat16 autocast if `amp`, else float32 as it is. bfloat16 has float32's range: no loss scaling needed."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


# ---------------------------------------------------------------------------------------------------------------
# Training and testing

def GetCorrectPredCount(pPrediction, pLabels):
    """How many rows of scores have their largest where the label is, as a 0-dim tensor (added up on the device,
    so that the loop does not wait for each batch)."""
    return pPrediction.argmax(dim=1).eq(pLabels).sum()


def steps_every_batch(scheduler):
    """One-cycle schedules move the lr every batch; every other kind (StepLR, CosineAnnealingLR(T_max=EPOCHS),
    ReduceLROnPlateau) counts epochs, as their documentation does, and main_mnist.py steps it once an epoch."""
    return isinstance(scheduler, (OneCycleLR, CyclicLR))


def step_epoch_schedule(scheduler, test_loss):
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.step(test_loss)
    elif scheduler is not None and not steps_every_batch(scheduler):
        scheduler.step()


def train(model, device, train_loader, optimizer, criterion, scheduler=None, amp=False, sync_every=20):
    """One epoch of training; returns (mean loss, accuracy in %). A one-cycle `scheduler` steps after each batch.
    The loss is read back every `sync_every` batches only: for the progress bar, and to stop a run whose loss is
    no longer a number."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    with tqdm(train_loader, desc="Train", dynamic_ncols=True, leave=False) as bar:
        for batch_idx, (data, target) in enumerate(bar):
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp):
                output = model(data)
            loss = criterion(output.float(), target)
            loss.backward()
            optimizer.step()
            if steps_every_batch(scheduler):
                scheduler.step()
            loss_sum += loss.detach() * len(target)
            correct += GetCorrectPredCount(output.detach(), target)
            seen += len(target)
            if batch_idx % sync_every == sync_every - 1 or batch_idx == len(bar) - 1:
                mean_loss = loss_sum.item() / seen
                if not math.isfinite(mean_loss):
                    raise UserError(f"the training loss became {mean_loss} at batch {batch_idx + 1}: the lr is too "
                                    f"high for this model (try a tenth of it, or --find-lr)")
                bar.set_postfix_str(f"loss={mean_loss:.4f} accuracy={100 * correct.item() / seen:.2f}%")
    return loss_sum.item() / seen, 100 * correct.item() / seen


def test(model, device, test_loader, criterion=F.nll_loss, amp=False, verbose=True):
    """One pass over the test set; returns (mean loss, accuracy in %), printed as the original did if `verbose`.
    The loss is the batch mean times the batch size, summed: right for F.nll_loss and nn.CrossEntropyLoss alike."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    with torch.inference_mode(), autocast(device, amp):
        for data, target in test_loader:
            output = model(data.to(device)).float()
            loss_sum += float(criterion(output, target.to(device))) * len(target)
            correct += int(GetCorrectPredCount(output, target.to(device)))
            seen += len(target)
    if verbose:
        print(f"Test set: Average loss: {loss_sum / seen:.4f}, "
              f"Accuracy: {correct}/{seen} ({100 * correct / seen:.2f}%)")
    return loss_sum / seen, 100 * correct / seen


def model_summary(model, input_size=(1, 28, 28)):
    """torchsummary's table of the model's layers, output shapes and parameters. torchsummary builds its input on
    CUDA or the CPU only, so it gets a float32 copy on the CPU, wherever the model lives."""
    summary(copy.deepcopy(model).float().cpu(), input_size, device="cpu")


def data_visualization(loader, count=32):
    """A figure of the first `count` images of a batch, as the model receives them (augmented, for training), with
    their labels. Drawn with the random state kept, so that a run trains the same with it or without."""
    with torch.random.fork_rng(devices=[loader.labels.device] if loader.labels.device.type == "cuda" else []):
        images, labels = next(iter(loader))
    images = images[:count, 0].float().cpu() * MNIST_STD + MNIST_MEAN
    return image_grid(images, [str(label) for label in labels[:count].tolist()],
                      f"{len(images)} training images as the model receives them, with their labels")


def image_grid(images, titles, title, columns=8, gap=12):
    """A figure of images [N, H, W] in [0, 1], light on black, `columns` to a row under their titles, drawn as one
    picture (an axes per image is ten times slower)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # imported here: the page and predict.py start without it
    images = images.float().cpu().numpy()
    count, height, width = images.shape
    rows = max(1, math.ceil(count / columns))
    mosaic = np.full((rows * (height + gap) + gap, columns * (width + gap) - gap), np.nan, dtype=np.float32)
    fig = Figure(figsize=(1.4 * columns, 1.6 * rows + 0.5))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for index, (image, text) in enumerate(zip(images, titles)):
        top, left = gap + (index // columns) * (height + gap), (index % columns) * (width + gap)
        mosaic[top:top + height, left:left + width] = image
        ax.text(left + width / 2, top - 1, text, ha="center", va="bottom", fontsize=10)
    ax.imshow(mosaic, cmap=colormaps["gray"].with_extremes(bad="white"), vmin=0, vmax=1)
    fig.suptitle(title, y=1.04)
    return fig
