"""The original's functions (get_trainloader, get_testloader, GetCorrectPredCount, train, test, model_summary,
data_visualization) with the rest of data and training: MNIST as tensors on the device, their normalization, the
loss that fits a model's output, and the checks that stop a run whose numbers stop being finite. (The machinery
around them, which chooses the device and writes the run's files, is in machinery/.)
"""
import contextlib
import copy
import functools
import hashlib
import inspect
import io
import math
import os
import socket

import torch
import torch.nn.functional as F
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from torchsummary import summary
from torchvision import datasets
from tqdm import tqdm

from augment import random_augment
from machinery.errors import NonFiniteLoss, UserError, one_line
from machinery.files import save_figure
from machinery.hardware import LAYOUTS, autocast, random_state_kept
from machinery.receptive_field import receptive_field_table, receptive_fields


# ---------------------------------------------------------------------------------------------------------------
# Data: MNIST decoded once into uint8 tensors on the device, batched, augmented and normalized there.

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of MNIST's training pixels in [0, 1]; the original's Normalize


def normalize(images):
    """Images in [0, 1] (float, light digit on black) as the models take them: the original's
    Normalize((MNIST_MEAN,), (MNIST_STD,)), into a new tensor. Training, testing, the robustness measures and
    predict.py all go through this one function."""
    return (images - MNIST_MEAN) / MNIST_STD


DOWNLOAD_TIMEOUT_S = 15  # per connection: without one, a network that drops packets would hang the run for minutes


# torchvision checks the MD5 of the four .gz files when it downloads them, but once they are decompressed it reads
# the decompressed files without any check. These are the MD5s of those, so a damaged one is caught too.
DECOMPRESSED_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def mnist_raw_dir(data_dir):
    """The folder where torchvision's MNIST keeps (and looks for) the four original files."""
    return os.path.join(data_dir, "MNIST", "raw")


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_mnist_files(data_dir):
    """Raises UserError naming any MNIST file in the data folder whose checksum is wrong (damaged or truncated).

    Missing files are fine here: torchvision downloads them. A damaged one is never downloaded over silently."""
    raw_dir = mnist_raw_dir(data_dir)
    expected = dict(datasets.MNIST.resources)
    expected.update(DECOMPRESSED_MD5)
    for name, md5 in expected.items():
        path = os.path.join(raw_dir, name)
        if os.path.exists(path) and _md5(path) != md5:
            raise UserError(
                f"{path} is damaged (its MD5 is not {md5}). Delete it and run again to download it anew, "
                f"or replace it with a good copy."
            )


def _offline_message(raw_dir, reason):
    names = ", ".join(name for name, _ in datasets.MNIST.resources)
    return (
        f"MNIST is not in {raw_dir}/ and could not be downloaded ({reason}).\n"
        f"Put the four files {names} in {raw_dir}/ and run again.\n"
        f"They are at {datasets.MNIST.mirrors[0]} (torchvision's first mirror); no network is needed once they are there."
    )


class RawMNIST(datasets.MNIST):
    """torchvision's MNIST read from the four original files alone, whose checksums check_mnist_files knows. Its
    legacy MNIST/processed/{training,test}.pt, which torchvision would read first and without any check (a
    100-image test set, labels of 11), are passed over."""

    def _check_legacy_exist(self):
        return False

    @property
    def raw_folder(self):  # torchvision names the folder after the class: MNIST's own, not RawMNIST
        return mnist_raw_dir(self.root)


def load_mnist(data_dir, train):
    """(images, labels) of MNIST's training (60,000) or test (10,000) set: uint8 [N, 28, 28] and int64 [N].

    Uses torchvision's MNIST, which downloads the four files into data_dir/MNIST/raw once (about 11 MB) and
    touches no network when they are there. Damaged files stop it with UserError (check_mnist_files)."""
    raw_dir = mnist_raw_dir(data_dir)
    check_mnist_files(data_dir)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # torchvision prints each mirror it tries; our message below says what matters.
        with contextlib.redirect_stdout(io.StringIO()):
            dataset = RawMNIST(data_dir, train=train, download=True)
    except (RuntimeError, OSError) as error:
        lines = str(error).strip().splitlines()
        raise UserError(_offline_message(raw_dir, lines[-1] if lines else type(error).__name__)) from None
    finally:
        socket.setdefaulttimeout(old_timeout)
    return dataset.data, dataset.targets


def _pixel_stats(images):
    """(min, max, mean, std) of uint8 pixels, exact: from their 256-bin histogram, summed in float64.

    Counting in chunks keeps memory small; float32 sums over 47 million pixels would lose digits."""
    counts = sum(torch.bincount(chunk.flatten(), minlength=256) for chunk in images.split(4096)).cpu().double()
    values = torch.arange(256, dtype=torch.float64)
    present = counts.nonzero().flatten()
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    return int(present[0]), int(present[-1]), float(mean), float(std)


def describe_data(train_images, test_images, held_back=None):
    """A few printable lines on the training and test images (uint8 [N, 28, 28]), and the training images held
    back if any: their shapes, and the pixels' min, max, mean and (population) std, raw in 0-255 and scaled to
    [0, 1] as the loaders scale them."""
    lines = []
    sets = [("Training", train_images), ("Held-back training", held_back), ("Test", test_images)]
    for name, images in [(name, images) for name, images in sets if images is not None and len(images)]:
        low, high, mean, std = _pixel_stats(images)
        lines += [f"{name} set: {list(images.shape)} {str(images.dtype).replace('torch.', '')}, "
                  f"{images.numel():,} pixels",
                  f"  raw 0-255:  min {low}, max {high}, mean {mean:.4f}, std {std:.4f}",
                  f"  scaled 0-1: min {low / 255:.4f}, max {high / 255:.4f}, mean {mean / 255:.4f}, std {std / 255:.4f}"]
    lines.append(f"Normalize(({MNIST_MEAN},), ({MNIST_STD},)) is the scaled mean and std of MNIST's full training set.")
    return "\n".join(lines)


class MnistBatches:
    """Normalized (images, labels) batches made on the device from uint8 tensors that live there.

    It stands in for a DataLoader: len() is the number of batches, and each pass over it (an epoch) draws a new
    order and new augmentations. No worker processes and no host-to-device copies: MNIST is 55 MB as uint8."""

    def __init__(self, images, labels, batch_size, shuffle=False, augmentation=None, max_batches=None,
                 layout="contiguous", add_non_digits=None):
        self.images, self.labels = images, labels  # uint8 [N, 28, 28] and int64 [N], on the same device
        self.batch_size, self.shuffle, self.max_batches = batch_size, shuffle, max_batches
        self.augmentation = augmentation  # the settings random_augment() reads (ROTATION, ...), or None: none
        self.add_non_digits = add_non_digits  # (images, labels) -> the batch with non-digits added, or None: none
        self.layout = layout  # the memory layout of the batches (hardware.LAYOUTS), the model's

    def sample(self, count=8):
        """The first `count` images, normalized but neither shuffled nor augmented: a batch to check a model on,
        drawing no random numbers."""
        return self._normalize(self.images[:count].unsqueeze(1).float().div_(255))

    def _normalize(self, images):
        return normalize(images).contiguous(memory_format=LAYOUTS[self.layout])

    def __len__(self):
        batches = math.ceil(len(self.labels) / self.batch_size)
        return batches if self.max_batches is None else min(batches, self.max_batches)

    def __iter__(self):
        order = torch.randperm(len(self.labels), device=self.labels.device) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = slice(start, start + self.batch_size) if order is None else order[start:start + self.batch_size]
            images = self.images[index].unsqueeze(1).float().div_(255)
            labels = self.labels[index]
            if self.augmentation is not None:
                images = random_augment(images, self.augmentation)
            if self.add_non_digits is not None:  # after the augmentation: they are varied in their own ways
                images, labels = self.add_non_digits(images, labels)
            yield self._normalize(images), labels

    def hold_back(self, share, batch_size):
        """Sets this `share` of the images aside, never to be trained on, and returns them as batches of their own
        (in a fixed order, unaugmented): the digits on which a run chooses its "not sure" threshold. The same
        images for every seed (a generator of their own); none taken where `share` is 0."""
        count = round(share * len(self.labels))
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(0)).to(self.labels.device)
        held, kept = order[:count].sort().values, order[count:].sort().values
        held_back = MnistBatches(self.images[held], self.labels[held], batch_size, max_batches=self.max_batches,
                                 layout=self.layout)
        if count:
            self.images, self.labels = self.images[kept], self.labels[kept]
        return held_back


def get_trainloader(data_dir, batch_size, device="cpu", max_batches=None, augmentation=None, layout="contiguous",
                    add_non_digits=None):
    """The training set, shuffled anew each epoch, as batches on `device` in `layout`; augmented anew each epoch
    too where `augmentation` gives the settings of augment.random_augment (main_mnist.py passes its settings), and
    with non-digits added to each batch where `add_non_digits` makes them (machinery/non_digits.py)."""
    images, labels = load_mnist(data_dir, train=True)
    return MnistBatches(images.to(device), labels.to(device), batch_size, shuffle=True, augmentation=augmentation,
                        max_batches=max_batches, layout=layout, add_non_digits=add_non_digits)


def get_testloader(data_dir, batch_size, device="cpu", max_batches=None, layout="contiguous"):
    """The test set in its fixed order, normalized only, as batches on `device` in `layout`."""
    images, labels = load_mnist(data_dir, train=False)
    return MnistBatches(images.to(device), labels.to(device), batch_size, max_batches=max_batches, layout=layout)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation

CLASSES = 10  # the ten digits: a model's forward returns [batch, CLASSES]
NOT_A_DIGIT = -100  # the label of a non-digit in a training batch: the losses' ignore_index, so the digit loss skips it
NON_DIGIT_WEIGHT = 0.25  # the weight of the loss that pushes a non-digit's answer toward uniform (Hendrycks et al. used 0.5)


def check_output(model, images):
    """What `model` returns, checked once on a batch of `images` before training: "log-probabilities" (log_softmax,
    as Net and CompactNet and the original return) or "raw scores" (logits, as most tutorials write forward).
    UserError, one line, for an output of another shape, for probabilities (softmax), which no loss trains well,
    and for an output that changes from one call to the next in eval mode: something random left on at test time,
    such as F.dropout(x, 0.1) without training=self.training.

    The check runs in eval mode without gradients, and leaves the random state as it was: training is the same
    with it."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), random_state_kept(images.device):
            output, again = model(images), model(images)
    except RuntimeError as error:  # a layer that does not fit the input, typically
        raise UserError(f"the model's forward fails on a batch of shape {list(images.shape)}: "
                        f"{one_line(error)}") from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (len(images), CLASSES):
        got = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise UserError(f"the model's forward must return a tensor of shape [batch, {CLASSES}] (a score or "
                        f"log-probability per digit), not {got}, for a batch of shape {list(images.shape)}")
    if not torch.equal(output, again):
        raise UserError("the model's output in eval mode changes from one call to the next: something random stays "
                        "on at test time (F.dropout(x, p) needs training=self.training; nn.Dropout knows by itself)")
    output = output.float()
    if bool((output >= 0).all()) and torch.allclose(output.sum(dim=1), torch.ones(len(output)), atol=1e-3):
        raise UserError("the model's forward returns probabilities (softmax): return log-probabilities "
                        "(F.log_softmax) or raw scores instead, so that the loss can be computed stably")
    is_log_probabilities = bool((output <= 0).all()) and torch.allclose(
        output.logsumexp(dim=1), torch.zeros(len(output)), atol=1e-3)
    return "log-probabilities" if is_log_probabilities else "raw scores"


def loss_function(outputs, label_smoothing=0.0):
    """The loss for what a model returns (check_output's answer): F.nll_loss for log-probabilities, as the
    original, and F.cross_entropy for raw scores. With label smoothing, F.cross_entropy for both: on
    log-probabilities it is the same loss, since log_softmax leaves them as they are."""
    if label_smoothing:
        return functools.partial(F.cross_entropy, label_smoothing=label_smoothing)
    return F.nll_loss if outputs == "log-probabilities" else F.cross_entropy


def with_non_digits(digit_loss):
    """Outlier exposure's loss, for batches that hold non-digits (labelled NOT_A_DIGIT): `digit_loss` on the
    digits (it skips the NOT_A_DIGIT labels, its ignore_index), plus NON_DIGIT_WEIGHT times how far the non-digits' answers are from the uniform one: the mean over the ten
    classes of -log p, less log 10 (its least, where each gets 1/10), so 0 for a perfect "no digit" (this is
    KL(uniform || p)). A batch with no non-digit (the test set) adds 0."""
    def loss(output, target):
        non_digit = (target == NOT_A_DIGIT).unsqueeze(1)
        count = non_digit.sum()
        uniform = -(output.log_softmax(dim=1) * non_digit).sum() / (count * CLASSES).clamp(min=1)
        return digit_loss(output, target) + NON_DIGIT_WEIGHT * (uniform - math.log(CLASSES) * (count > 0))
    loss.__name__ = f"{loss_name(digit_loss)} + {NON_DIGIT_WEIGHT} x KL(uniform || p) on non-digits"
    return loss


def loss_name(criterion):
    """How run.json and the console name a loss: F.nll_loss, cross_entropy(label_smoothing=0.1),
    CrossEntropyLoss(label_smoothing=0.1), or any callable's own name."""
    if isinstance(criterion, functools.partial):
        arguments = [repr(a) for a in criterion.args] + [f"{k}={v!r}" for k, v in criterion.keywords.items()]
        return f"{loss_name(criterion.func)}({', '.join(arguments)})"
    if isinstance(criterion, torch.nn.Module):
        smoothing = getattr(criterion, "label_smoothing", 0.0)
        return f"{type(criterion).__name__}({f'label_smoothing={smoothing}' if smoothing else ''})"
    name = getattr(criterion, "__name__", type(criterion).__name__)
    return f"F.{name}" if getattr(criterion, "__module__", "") == "torch.nn.functional" else name


def step_on_metric(scheduler, test_loss):
    """Steps a schedule whose step() takes a metric (ReduceLROnPlateau) on the epoch's test loss; train() steps
    every other kind after each batch, and this leaves those alone."""
    if takes_metric(scheduler):
        scheduler.step(test_loss)


def takes_metric(scheduler):
    return scheduler is not None and "metrics" in inspect.signature(scheduler.step).parameters


def check_finite(what, value, model=None, where=""):
    """NonFiniteLoss if a weight of `model` or the number `value` (`what` names it) is NaN or infinite: from there
    on the run trains garbage, so it stops at once. `where` ends the message (" at batch 7")."""
    if model is not None and not all(torch.isfinite(p).all() for p in model.parameters()):
        raise NonFiniteLoss(f"the weights became infinite or NaN{where}")
    if not math.isfinite(value):
        raise NonFiniteLoss(f"{what} became {value}{where}")


def GetCorrectPredCount(pPrediction, pLabels):
    """How many predictions (rows of scores, argmax taken) match the labels, as a 0-dim tensor.

    A tensor rather than an int, so the training loop can add counts up on the device without waiting for it."""
    return pPrediction.argmax(dim=1).eq(pLabels).sum()


def train(model, device, train_loader, optimizer, criterion, scheduler=None, amp=False, sync_every=10):
    """One epoch of training; returns (mean loss, accuracy in %) over the epoch's samples.

    scheduler, if given, is stepped after every batch: the one place a run's learning-rate schedule moves.
    The loss and accuracy are read back from the device every `sync_every` batches only, for the progress bar
    and to stop at once (NonFiniteLoss) if the loss stops being finite."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen, digits = 0, torch.zeros((), dtype=torch.long, device=device)  # digits: the batches' non-digits left out
    step_each_batch = scheduler is not None and not takes_metric(scheduler)  # (step_on_metric steps the others)
    with tqdm(train_loader, desc="Train", dynamic_ncols=True) as pbar:
        for batch_idx, (data, target) in enumerate(pbar):
            data, target = data.to(device), target.to(device)  # no copy when the loader already lives on `device`
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp):
                output = model(data)
            loss = criterion(output.float(), target)
            loss.backward()
            optimizer.step()
            if step_each_batch:
                scheduler.step()
            loss_sum += loss.detach() * len(target)
            correct += GetCorrectPredCount(output.detach(), target)  # (a NOT_A_DIGIT label is never matched)
            seen += len(target)
            digits += (target != NOT_A_DIGIT).sum()
            if batch_idx % sync_every == sync_every - 1 or batch_idx == len(pbar) - 1:
                mean_loss = loss_sum.item() / seen
                check_finite("the training loss", mean_loss, where=f" at batch {batch_idx + 1}")
                pbar.set_postfix_str(f"loss={mean_loss:.4f} accuracy={100 * correct.item() / digits.item():.2f}%")
    return loss_sum.item() / seen, 100 * correct.item() / digits.item()


def test(model, device, test_loader, criterion, amp=False, verbose=True):
    """One pass over the test set; returns (mean loss, accuracy in %), and prints them on a line if `verbose` (as
    the original did; main_mnist.py's epoch line says them instead).

    The loss is the criterion's batch mean times the batch size, summed: right for F.nll_loss and
    nn.CrossEntropyLoss() alike, whatever their reduction argument would have been."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    with torch.inference_mode(), autocast(device, amp):
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data).float()
            loss_sum += criterion(output, target) * len(target)
            correct += GetCorrectPredCount(output, target)
            seen += len(target)
    test_loss, correct = loss_sum.item() / seen, correct.item()
    if verbose:
        print(f"Test set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{seen} ({100 * correct / seen:.2f}%)")
    return test_loss, 100 * correct / seen


def predict(model, device, loader, amp=False):
    """(log-probabilities, true labels) for every sample of `loader`, in its order, as CPU tensors: float32
    [N, 10], the log_softmax of the model's output (.exp() gives the probabilities; kept as logarithms, so that
    a temperature can be fitted to them without underflow), and int64 [N]."""
    model.eval()
    log_probabilities, labels = [], []
    with torch.inference_mode(), autocast(device, amp):
        for data, target in loader:
            log_probabilities.append(model(data.to(device)).float().log_softmax(dim=1).cpu())
            labels.append(target.cpu())
    return torch.cat(log_probabilities), torch.cat(labels)


def confusion_matrix(predictions, labels, classes=10):
    """counts[true, predicted] as a [classes, classes] int64 tensor."""
    return torch.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def per_class_accuracy(matrix):
    """Accuracy in % of each true class, from a confusion matrix."""
    return 100 * matrix.diag().double() / matrix.sum(dim=1).clamp(min=1).double()


def model_summary(model, input_size=(1, 28, 28)):
    """Prints torchsummary's table (layers, output shapes, parameter counts) for a model on any device, then the
    receptive field of each convolution and pooling; returns those (machinery/receptive_field.py) for run.json.

    torchsummary 1.5.1 builds its dummy input on CUDA or on the CPU only, and fails when the model sits elsewhere
    (its issues #14, #16, #179); a float32 copy on the CPU, with the CPU named, works wherever the model is."""
    copied = copy.deepcopy(model).float().cpu()
    summary(copied, input_size, device="cpu")
    layers = receptive_fields(copied, input_size)
    print(receptive_field_table(layers))
    return layers


def image_grid(images, columns, gap=12):
    """uint8 or float images [N, H, W] laid out `columns` to a row with `gap` pixels between them (and room above
    each for a title), as one float array, NaN in the gaps: drawn as a single picture, which is ten times faster
    than an axes per image. Returns (mosaic, [(x, y) of the top-centre of each image])."""
    count, height, width = images.shape
    rows = max(1, math.ceil(count / columns))
    mosaic = np.full((rows * (height + gap) + gap, columns * (width + gap) - gap), np.nan, dtype=np.float32)
    places = []
    for index, image in enumerate(images):
        top, left = gap + (index // columns) * (height + gap), (index % columns) * (width + gap)
        mosaic[top:top + height, left:left + width] = image.float().cpu().numpy()
        places.append((left + width / 2, top))
    return mosaic, places


def data_visualization(loader, path, count=32):
    """A grid of up to `count` images of the loader's first batch, as the model receives them (so augmented, for
    the training loader), un-normalized for display, each titled with its label, saved as a PNG at `path`.
    Drawn with a copy of the random state, so that a run trains the same with this picture or without it.
    Returns the Figure."""
    with random_state_kept(loader.labels.device):
        images, labels = next(iter(loader))
    non_digit = labels == NOT_A_DIGIT  # a batch with non-digits (NON_DIGITS) shows some of them in the last rows
    if non_digit.any():
        others = non_digit.nonzero()[:, 0]  # spread over them, so that each kind shows
        others = others[torch.linspace(0, len(others) - 1, min(count // 4, len(others))).round().long()]
        shown = torch.cat([(~non_digit).nonzero()[:count - count // 4, 0], others])
        images, labels = images[shown], labels[shown]
    images = images[:count, 0].float().cpu() * MNIST_STD + MNIST_MEAN  # back to [0, 1]
    columns = 8
    fig = Figure(figsize=(1.4 * columns, 1.6 * math.ceil(len(images) / columns) + 0.5))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    mosaic, places = image_grid(images, columns)
    ax.imshow(mosaic, cmap=colormaps["gray"].with_extremes(bad="white"), vmin=0, vmax=1)  # white on black, as the
    for (x, y), label in zip(places, labels.tolist()):                                     # network sees the digits
        ax.text(x, y - 1, "none" if label == NOT_A_DIGIT else str(label), ha="center", va="bottom", fontsize=12)
    fig.suptitle(f"{len(images)} augmented training images as the model receives them, with their labels"
                 + (" (none: a non-digit)" if non_digit.any() else ""), y=1.04)
    save_figure(fig, path)
    return fig
