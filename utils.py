"""Everything main_mnist.py calls (data, training and test passes, the model summary, figures and files), and
the conversion of any image to an MNIST digit that predict.py and app.py share."""
import contextlib
import copy
import hashlib
import io
import math
import os
import secrets
import socket

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator
from PIL import Image
from torchsummary import summary
from torchvision import datasets
from tqdm import tqdm

from augment import random_augment


class UserError(Exception):
    """A problem the person running the script can fix (a damaged data file, a bad checkpoint, ...).

    main_mnist.py prints its message alone, without a traceback, and exits with a non-zero code."""


# ---------------------------------------------------------------------------------------------------------------
# Data: MNIST decoded once into uint8 tensors on the device, batched, augmented and normalized there.

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of MNIST's training pixels in [0, 1]; the original's Normalize
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
            dataset = datasets.MNIST(data_dir, train=train, download=True)
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


def describe_data(train_images, test_images):
    """A few printable lines on the training and test images (uint8 [N, 28, 28]): their shapes, and the pixels'
    min, max, mean and (population) std, raw in 0-255 and scaled to [0, 1] as the loaders scale them."""
    lines = []
    for name, images in (("Training", train_images), ("Test", test_images)):
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

    def __init__(self, images, labels, batch_size, shuffle=False, augmentation=None, max_batches=None):
        self.images, self.labels = images, labels  # uint8 [N, 28, 28] and int64 [N], on the same device
        self.batch_size, self.shuffle, self.max_batches = batch_size, shuffle, max_batches
        self.augmentation = augmentation  # the settings random_augment() reads (ROTATION, ...), or None: none

    def sample(self, count=8):
        """The first `count` images, normalized but neither shuffled nor augmented: a batch to check a model on,
        drawing no random numbers."""
        return self._normalize(self.images[:count].unsqueeze(1).float().div_(255))

    def _normalize(self, images):
        return images.sub_(MNIST_MEAN).div_(MNIST_STD).contiguous(memory_format=torch.channels_last)

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
            yield self._normalize(images), self.labels[index]


def get_trainloader(data_dir, batch_size, device="cpu", max_batches=None, augmentation=None):
    """The training set, shuffled anew each epoch, as batches on `device`; augmented anew each epoch too where
    `augmentation` gives the settings of augment.random_augment (main_mnist.py passes its settings)."""
    images, labels = load_mnist(data_dir, train=True)
    return MnistBatches(images.to(device), labels.to(device), batch_size, shuffle=True, augmentation=augmentation,
                        max_batches=max_batches)


def get_testloader(data_dir, batch_size, device="cpu", max_batches=None):
    """The test set in its fixed order, normalized only, as batches on `device`."""
    images, labels = load_mnist(data_dir, train=False)
    return MnistBatches(images.to(device), labels.to(device), batch_size, max_batches=max_batches)


# ---------------------------------------------------------------------------------------------------------------
# Any image as an MNIST digit, the way MNIST's were made (LeCun et al.): the digit scaled to fit a 20x20 box,
# keeping its aspect ratio (antialiased, hence grey edges), then placed in 28x28 by its centre of mass.
# predict.py and app.py both read images through to_mnist(), so a photo and a drawing get the same treatment.

DIGIT_BOX = 20  # MNIST's digits fit a 20x20 box: every one of the 60,000 training digits does
MASS_CENTRE = 14.0  # where MNIST's centre of mass sits (row and column), measured on the training set; not 13.5
INK_LEVEL = 0.25  # of the ink's range above the background: fainter pixels are paper, shadow or noise
MIN_CONTRAST = 0.1  # the darkest ink must stand this far (0-1 scale) from the background, or the image is blank
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's convert("L")
PIXELS_AT_ONCE = 1_000_000  # converted to float a few rows at a time: a 50-megapixel photo is 600 MB as float32 RGB


def grey_pixels(image, name="the image"):
    """A new float32 [H, W] numpy array in [0, 1] (0 black) from a PIL image or an array: H x W or H x W x 1-4
    channels, uint8 (uint16) or float in [0, 1]. Transparency is composited over white, so that a transparent
    background counts as light, as paper does. UserError naming the image (`name`) if it has NaN or infinite pixels,
    which have no shade of grey."""
    if isinstance(image, Image.Image):
        if image.mode in ("I", "F"):  # 32-bit pixels have no fixed white: scale by the image's own range
            pixels = np.asarray(image, dtype=np.float32)
            if image.mode == "F":
                _check_finite(pixels, name)
            low, high = float(pixels.min()), float(pixels.max())
            # Halved first, exactly, so that a range as wide as float32's own (-3e38 to 3e38) cannot overflow
            return (pixels / 2 - low / 2) / max((high - low) / 2, 1e-12)
        if image.mode not in ("L", "LA", "RGB", "RGBA", "I;16"):  # palette, 1-bit, CMYK, ...: as RGB(A)
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 2 and not (pixels.ndim == 3 and pixels.shape[2] in (2, 3, 4)):
        raise ValueError(f"an image must be H x W or H x W x 1-4 channels, not of shape {pixels.shape}")
    integer = np.issubdtype(pixels.dtype, np.integer)
    white = (65535 if pixels.dtype == np.uint16 else 255) if integer else 1
    if not integer:
        _check_finite(pixels, name)
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4) and (pixels[..., -1] == white).all():
        pixels = pixels[..., :-1]  # opaque: composited over white, every pixel would stay as it is
    grey = np.empty(pixels.shape[:2], np.float32)
    rows = max(1, PIXELS_AT_ONCE // max(1, pixels.shape[1]))
    for top in range(0, len(pixels), rows):
        grey[top:top + rows] = _grey_rows(pixels[top:top + rows], integer, white)
    return grey


def _grey_rows(pixels, integer, white):
    """grey_pixels of a few rows, H x W or H x W x 2-4 channels."""
    pixels = pixels.astype(np.float32)  # a new array, so divided in place
    if integer:
        pixels /= white
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):  # the last channel is alpha
        alpha = pixels[..., -1:]
        pixels = pixels[..., :-1] * alpha + (1 - alpha)
    if pixels.ndim == 3 and pixels.shape[2] == 1:  # grey and alpha
        return pixels[..., 0]
    return pixels @ LUMA if pixels.ndim == 3 else pixels


def _check_finite(pixels, name):
    if not np.isfinite(pixels).all():
        raise UserError(f"{name} has NaN or infinite pixel values: only finite ones can be read as shades of grey "
                        f"(save it as an 8-bit image)")


def to_mnist(image, name="the image"):
    """The 28x28 float tensor in [0, 1] (light ink on black) that the model sees, before normalization, of a
    PIL image or array (see grey_pixels). UserError "<name> is blank" if no ink stands out from the background."""
    pixels = grey_pixels(image, name)
    if pixels.size == 0:
        raise UserError(f"{name} is blank: it has no pixels")
    # The background is what most of the outer frame shows; MNIST's is black, so light paper gets inverted.
    frame = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = float(np.median(frame))
    if background > 0.5:
        pixels, background = np.subtract(1, pixels, out=pixels), 1 - background  # in place: the array is ours
    ink = float(pixels.max())
    if ink - background < MIN_CONTRAST:
        raise UserError(f"{name} is blank: nothing in it stands out from its background")
    # Relative to the ink's range, so a faint pencil reads as well as a marker: what is fainter than INK_LEVEL
    # becomes black (paper grain, noise), and the ink is stretched so that its strongest pixel is 1, as in MNIST.
    low = background + INK_LEVEL * (ink - background)
    pixels -= low
    pixels /= ink - low
    np.clip(pixels, 0, 1, out=pixels)
    rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))  # not np.nonzero: 16 bytes a pixel
    pixels = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]

    height, width = pixels.shape
    scale = DIGIT_BOX / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    digit = F.interpolate(torch.from_numpy(np.ascontiguousarray(pixels))[None, None], size=size, mode="bilinear",
                          antialias=True, align_corners=False)[0, 0].clamp(0, 1)

    # Shifted by whole pixels, as MNIST's were (their centres of mass spread +-0.5 px around 14); kept whole
    # where a lopsided digit would otherwise be pushed over the edge.
    mass = digit.sum()
    centre_row = (digit.sum(1) * torch.arange(size[0])).sum() / mass
    centre_col = (digit.sum(0) * torch.arange(size[1])).sum() / mass
    top = min(max(round(MASS_CENTRE - float(centre_row)), 0), 28 - size[0])
    left = min(max(round(MASS_CENTRE - float(centre_col)), 0), 28 - size[1])
    canvas = torch.zeros(28, 28)
    canvas[top:top + size[0], left:left + size[1]] = digit
    return canvas


def mnist_batch(digits):
    """The model's input from to_mnist's 28x28 images ([28, 28] or [N, 28, 28]): [N, 1, 28, 28], normalized as
    in training."""
    return ((digits - MNIST_MEAN) / MNIST_STD).reshape(-1, 1, 28, 28)


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation


def pick_device():
    """CUDA if there is a GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bfloat16_is_fast(device):
    """Whether bfloat16 autocast speeds this device up: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX.

    Elsewhere (older CPUs, MPS) bf16 would be emulated or untested, so training stays in float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, name, lambda: False)()
                   for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def autocast(device, amp):
    """Mixed precision for the forward pass: bfloat16 autocast when `amp` is on and the device runs it fast.

    bfloat16 has float32's range, so no loss scaling is needed."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and bfloat16_is_fast(device))


class NonFiniteLoss(ArithmeticError):
    """The training loss became NaN or infinite: the weights are garbage from here on."""


CLASSES = 10  # the ten digits: a model's forward returns [batch, CLASSES]


def loss_function(model, images):
    """The loss that fits what `model` returns, checked once on a batch of `images` before training: F.nll_loss
    for log-probabilities (log_softmax, as Net and CompactNet return, and the original), F.cross_entropy for raw
    scores (logits, as most tutorials write forward). UserError, one line, for an output of another shape or for
    probabilities (softmax), which neither loss trains well.

    The check runs in eval mode without gradients, and draws no random numbers: training is the same with it."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model(images)
    except RuntimeError as error:  # a layer that does not fit the input, typically
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"the model's forward fails on a batch of shape {list(images.shape)}: {message}") from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (len(images), CLASSES):
        got = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise UserError(f"the model's forward must return a tensor of shape [batch, {CLASSES}] (a score or "
                        f"log-probability per digit), not {got}, for a batch of shape {list(images.shape)}")
    output = output.float()
    if bool((output >= 0).all()) and torch.allclose(output.sum(dim=1), torch.ones(len(output)), atol=1e-3):
        raise UserError("the model's forward returns probabilities (softmax): return log-probabilities "
                        "(F.log_softmax) or raw scores instead, so that the loss can be computed stably")
    is_log_probabilities = bool((output <= 0).all()) and torch.allclose(
        output.logsumexp(dim=1), torch.zeros(len(output)), atol=1e-3)
    return F.nll_loss if is_log_probabilities else F.cross_entropy


def GetCorrectPredCount(pPrediction, pLabels):
    """How many predictions (rows of scores, argmax taken) match the labels, as a 0-dim tensor.

    A tensor rather than an int, so the training loop can add counts up on the device without waiting for it."""
    return pPrediction.argmax(dim=1).eq(pLabels).sum()


def train(model, device, train_loader, optimizer, criterion, scheduler=None, amp=False, sync_every=10):
    """One epoch of training; returns (mean loss, accuracy in %) over the epoch's samples.

    scheduler, if given, is stepped after every batch (OneCycleLR); one stepped per epoch is the caller's.
    The loss and accuracy are read back from the device every `sync_every` batches only, for the progress bar
    and to stop at once (NonFiniteLoss) if the loss stops being finite."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    with tqdm(train_loader, desc="Train", dynamic_ncols=True) as pbar:
        for batch_idx, (data, target) in enumerate(pbar):
            data, target = data.to(device), target.to(device)  # no copy when the loader already lives on `device`
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp):
                output = model(data)
            loss = criterion(output.float(), target)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach() * len(target)
            correct += GetCorrectPredCount(output.detach(), target)
            seen += len(target)
            if batch_idx % sync_every == sync_every - 1 or batch_idx == len(pbar) - 1:
                mean_loss = loss_sum.item() / seen
                if not math.isfinite(mean_loss):
                    raise NonFiniteLoss(f"the training loss became {mean_loss} at batch {batch_idx + 1}")
                pbar.set_postfix_str(f"loss={mean_loss:.4f} accuracy={100 * correct.item() / seen:.2f}%")
    return loss_sum.item() / seen, 100 * correct.item() / seen


def test(model, device, test_loader, criterion, amp=False):
    """One pass over the test set; prints a one-line summary and returns (mean loss, accuracy in %).

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
    print(f"Test set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{seen} ({100 * correct / seen:.2f}%)")
    return test_loss, 100 * correct / seen


def predict(model, device, loader, amp=False):
    """(probabilities, true labels) for every sample of `loader`, in its order, as CPU tensors:
    float32 [N, 10], the softmax of the model's output, and int64 [N]."""
    model.eval()
    probabilities, labels = [], []
    with torch.inference_mode(), autocast(device, amp):
        for data, target in loader:
            probabilities.append(model(data.to(device)).float().softmax(dim=1).cpu())
            labels.append(target.cpu())
    return torch.cat(probabilities), torch.cat(labels)


def model_summary(model, input_size=(1, 28, 28)):
    """Prints torchsummary's table (layers, output shapes, parameter counts) for a model on any device.

    torchsummary 1.5.1 builds its dummy input on CUDA or on the CPU only, and fails when the model sits elsewhere
    (its issues #14, #16, #179); a float32 copy on the CPU, with the CPU named, works wherever the model is."""
    summary(copy.deepcopy(model).float().cpu(), input_size, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate range test (Leslie Smith, "Cyclical Learning Rates for Training Neural Networks", 2017), run by
# torch-lr-finder: the lr grows exponentially from far too small to far too large, one batch per step, while the
# smoothed training loss is recorded; the test stops early once that loss exceeds 5 times its best (divergence).

LR_RULE = "a tenth of the lr where the smoothed loss is lowest (fastai's 'minimum' rule)"


def find_lr(model, optimizer, loader, criterion, device, amp, start_lr=1e-7, end_lr=10, num_iter=100):
    """Runs the range test from start_lr to end_lr over num_iter batches of `loader` (restarted if it is shorter),
    training `model` with `optimizer` (SGD with its momentum, say) under the same mixed precision as train().

    The model's weights and buffers and the optimizer's state are restored afterwards, and the random number
    generators too, so a run trains the same with or without a range test first. Call it before a scheduler is
    attached to the optimizer (torch-lr-finder refuses one that has). Returns a dict: lrs and losses (the smoothed
    loss after each step, up to divergence), suggested_lr and rule (how it was chosen), min_loss_lr (the lr of the
    lowest smoothed loss) and steepest_lr (where the smoothed loss falls fastest)."""
    # Imported here: torch-lr-finder imports pyplot and tqdm.autonotebook, which training does not need.
    from torch_lr_finder import LRFinder, TrainDataLoaderIter

    device = torch.device(device)
    amp_config = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": amp and bfloat16_is_fast(device)}
    # The loss in float32 from bfloat16 outputs, as train() computes it.
    finder = LRFinder(model, optimizer, lambda output, target: criterion(output.float(), target), device,
                      amp_backend="torch", amp_config=amp_config,
                      grad_scaler=torch.amp.GradScaler(device.type, enabled=False))  # bfloat16 needs no scaling
    was_training = model.training
    on_cpu = device.type == "cpu"  # the CPU's generator is always forked; an accelerator's only if named
    rng = torch.random.fork_rng(devices=[] if on_cpu else [device], device_type=device.type)
    try:
        with rng, contextlib.redirect_stdout(io.StringIO()):
            # (stdout hidden: the library prints a fixed sentence at the end; its progress bar is on stderr)
            # TrainDataLoaderIter takes any iterable of (inputs, labels), such as MnistBatches, and restarts it
            # when it runs out; range_test accepts a DataLoader or one of these only.
            finder.range_test(TrainDataLoaderIter(loader), start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
                              step_mode="exp", smooth_f=0.05, diverge_th=5)
    finally:
        finder.reset()
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return _suggest_lr(finder.history["lr"], finder.history["loss"], num_iter)


def _suggest_lr(lrs, losses, num_iter):
    """The result dict of find_lr from the test's lrs and smoothed losses.

    The suggestion is a tenth of the lr at the lowest loss (LR_RULE). torch-lr-finder's own suggestion, the lr
    where the loss falls fastest, is returned too (steepest_lr) but not used: the smoothed loss lags the raw one
    by about 20 steps (smooth_f 0.05), so the curve falls fastest late, or even while it recovers from a spike:
    on MNIST it pointed at lrs where Net's loss blows up. README ("A learning rate") gives what each rule said
    for each model over 3 seeds, beside the lrs known to train them well."""
    finite = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
    lrs, losses = lrs[:finite], losses[:finite]  # a NaN loss never counts as diverged there: drop it and after
    # Both libraries leave out the first tenth of the steps (noise around the initial loss) and the last 5 of 100
    # (the blow-up) when they suggest an lr; the same fractions of shorter tests.
    start, end = num_iter // 10, len(losses) - num_iter // 20
    if end - start < 2:
        raise ValueError(f"the range test diverged after {len(losses)} of {num_iter} steps, too few to suggest an "
                         f"lr: lower end_lr or raise num_iter")
    window = torch.tensor(losses[start:end], dtype=torch.float64)
    lowest = start + int(window.argmin())
    steepest = start + int(torch.gradient(window)[0].argmin())  # as torch-lr-finder's plot() computes it
    return {"lrs": lrs, "losses": losses, "suggested_lr": lrs[lowest] / 10, "rule": LR_RULE,
            "min_loss_lr": lrs[lowest], "steepest_lr": lrs[steepest]}


# ---------------------------------------------------------------------------------------------------------------
# Files and figures. Every file is written whole or not at all, so a kill at any moment leaves the last good one.


def atomic_write(path, write):
    """Writes `path` through write(binary_file), whole or not at all.

    The content is made in memory first, then written to a temporary file of this writer's own (a unique name in
    the same folder), fsynced and renamed over `path`: readers, a crash and a second process see the old file or
    the whole new one, never a part. Made in memory, a full disk shows as the OSError it is (ENOSPC); torch.save
    writing straight to a full disk fails with an unrelated RuntimeError."""
    content = io.BytesIO()
    write(content)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(content.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError):
            error.filename, error.filename2 = str(path), None  # the file the caller asked for, not our temporary one
        raise


METRICS_HEADER = "epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds"


def write_metrics(history, path):
    """metrics.csv: one row per epoch (a dict with METRICS_HEADER's keys), accuracies in percent."""
    keys = METRICS_HEADER.split(",")
    lines = [METRICS_HEADER] + [",".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k]) for k in keys)
                                for row in history]
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))


# Curves. Accuracies are drawn as error rates (100 - accuracy) on an inverted log axis labelled in accuracy: going
# from 99.0% to 99.5% halves the errors, and gets as much room as going from 80% to 90%, so the late epochs' tenths
# of a percent stay apart. Losses go on a log axis for the same reason.

# An accuracy of 100% is drawn at this error rate (%), as log(0) cannot be, and labelled 100: half of one test
# image in 10,000, so it stays apart from 99.99%.
ERROR_FLOOR = 0.005
LOSS_FLOOR = 1e-6  # a loss of 0 (a dry run can score one) is drawn there
ERROR_RANGE = 2.5  # the accuracy axis reaches down to at least this many times the best error rate
TICK_MANTISSAS = ((1,), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9))  # log-axis ticks, coarse to fine
METRICS_PANELS = [("train_loss", "Training Loss"), ("test_loss", "Test Loss"),
                  ("train_acc", "Training Accuracy"), ("test_acc", "Test Accuracy")]


def _error(accuracy):
    return max(100 - accuracy, ERROR_FLOOR)


def _nice(value, up):
    """The nearest value of the form m x 10^k (m in 1..9) above (up) or below `value`: log axes end on a tick."""
    k = math.floor(math.log10(value))
    candidates = [float(f"{m}e{e}") for e in (k, k + 1) for m in range(1, 10)]  # via text: 0.7, not 0.7000000001
    if up:
        return min(c for c in candidates if c >= value * (1 - 1e-9))
    return max(c for c in candidates if c <= value * (1 + 1e-9))


def _log_ticks(low, high):
    """Tick values from low to high: the coarsest of TICK_MANTISSAS giving 5 or more, thinned to about 10."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in TICK_MANTISSAS:
        values = (float(f"{m}e{e}") for e in decades for m in mantissas)
        ticks = [v for v in values if low * (1 - 1e-9) <= v <= high * (1 + 1e-9)]
        if len(ticks) >= 5:
            break
    return ticks[::max(1, math.ceil(len(ticks) / 10))]


def _log_axis(ax, bottom, top, label, least=0.0):
    """A log y axis from bottom to top (top < bottom inverts it), ticked at _log_ticks from `least` up, each tick
    labelled label(value)."""
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ticks = _log_ticks(min(bottom, top), max(bottom, top))
    ax.yaxis.set_major_locator(FixedLocator([tick for tick in ticks if tick >= least * (1 - 1e-9)]))
    ax.yaxis.set_minor_locator(NullLocator())  # matplotlib's minor labels would mix 2x10^-2 with our 0.02
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: label(value)))


def _loss_panel(ax, curves):
    """Draws curves, [(epochs, losses, plot style)], on a log axis."""
    values = [max(v, LOSS_FLOOR) for _, losses, _ in curves for v in losses]
    low = _nice(min(values) / 1.15, up=False)
    high = max(_nice(max(values) * 1.15, up=True), _nice(3 * low, up=True))  # a flat curve still gets a few ticks
    _log_axis(ax, low, high, lambda loss: f"{loss:g}")
    for epochs, losses, style in curves:
        ax.plot(epochs, [max(v, LOSS_FLOOR) for v in losses], **style)
    ax.set_ylabel("loss (log scale)")


def _accuracy_panel(ax, curves):
    """Draws curves, [(epochs, accuracies in %, plot style)], on the accuracy axis (see above); returns the lines.

    The axis spans the best error rate and ERROR_RANGE times it, or more if a curve's later epochs (the later half
    of the longest curve's) need it; earlier points below its bottom are drawn on the bottom edge as a ▼, and the
    y label says from where. So neither a first epoch at 50% nor a short run hides the spread at the top."""
    errors = [[_error(a) for a in accuracies] for _, accuracies, _ in curves]
    best = min(min(e) for e in errors)
    last_epoch = max(max(epochs) for epochs, _, _ in curves)
    worst_late = max(error for (epochs, _, _), curve_errors in zip(curves, errors)
                     for epoch, error in zip(epochs, curve_errors) if epoch > last_epoch / 2)
    bottom = min(_nice(max(ERROR_RANGE * best, 1.1 * worst_late), up=True), 100)
    _log_axis(ax, bottom, _nice(best / 1.15, up=False), least=ERROR_FLOOR,
              label=lambda error: "100" if error <= ERROR_FLOOR * (1 + 1e-9) else f"{100 - error:.6g}")
    lines = []
    for (epochs, _, style), curve_errors in zip(curves, errors):
        line, = ax.plot(epochs, curve_errors, **style)
        below = [epoch for epoch, error in zip(epochs, curve_errors) if error > bottom]
        if below:
            ax.plot(below, [bottom] * len(below), "v", color=line.get_color(), clip_on=False, gid="below")
        lines.append(line)
    clipped = any(error > bottom for curve_errors in errors for error in curve_errors)
    ax.set_ylabel("accuracy (%), log scale of errors" + (f"\n▼ below {100 - bottom:.6g}%" if clipped else ""))
    return lines


def _epoch_axis(ax, epochs):
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # else a 1-epoch axis gets 0.9, 1.1
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _best(history):
    """The row with the best test accuracy; the earliest of equals."""
    return max(history, key=lambda row: row["test_acc"])


def _mark_best(ax, history, color):
    row = _best(history)
    ax.plot(row["epoch"], _error(row["test_acc"]), "*", color=color, markersize=15, markeredgecolor="black",
            gid="best", label=f"best {row['test_acc']:.2f}% (epoch {row['epoch']})")


def lr_events(history, schedule=None):
    """[(x, text)]: where the learning rate schedule turns, to draw a vertical line at x and say text.

    A step schedule gets each change, drawn on the boundary before the epoch that first trains with the new lr.
    A one-cycle schedule gets its peak, at the epoch with the highest lr, once the lr has come down from it.
    schedule: "step", "onecycle", or None to tell them apart from the lrs (one-cycle changes it at most epochs)."""
    lrs = [row["lr"] for row in history]
    changes = [i for i in range(1, len(lrs)) if not math.isclose(lrs[i], lrs[i - 1], rel_tol=1e-6)]
    if schedule is None:
        schedule = "onecycle" if len(lrs) >= 3 and len(changes) > (len(lrs) - 1) / 2 else "step"
    if schedule == "onecycle":
        peak = max(history, key=lambda row: row["lr"])
        past = peak is not history[-1]
        return [(peak["epoch"], f"lr peak {peak['lr']:.3g} at epoch {peak['epoch']}")] if past else []
    return [(history[i]["epoch"] - 0.5, f"lr {lrs[i - 1]:.3g} → {lrs[i]:.3g} from epoch {history[i]['epoch']}")
            for i in changes]


def data_visualization(loader, path, count=32):
    """A grid of up to `count` images of the loader's first batch, as the model receives them (so augmented, for
    the training loader), un-normalized for display, each titled with its label. Returns the Figure."""
    device = loader.labels.device
    # Drawn with a copy of the random state, so that a run trains the same with this picture or without it.
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        images, labels = next(iter(loader))
    images = (images[:count, 0].float().cpu() * MNIST_STD + MNIST_MEAN).numpy()  # back to [0, 1]
    columns = 8
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(1.4 * columns, 1.6 * rows + 0.5))
    axs = fig.subplots(rows, columns, squeeze=False)
    for ax in axs.flat:
        ax.axis("off")
    for ax, image, label in zip(axs.flat, images, labels.tolist()):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)  # white on black, as the network sees the digits
        ax.set_title(str(label))
    fig.suptitle(f"{len(images)} augmented training images as the model receives them, with their labels")
    save_figure(fig, path)
    return fig


def plot_metrics(history, path, title="", schedule=None):
    """The original's 2x2 figure (training loss, test loss, training accuracy, test accuracy per epoch), with
    log loss and accuracy axes, the final and best test accuracy written above, the best epoch starred and the
    learning rate's changes drawn as dotted lines. history: metrics.csv's rows as dicts, at least one.
    Saves it to `path` and returns the Figure."""
    epochs = [row["epoch"] for row in history]
    events = lr_events(history, schedule)
    fig = Figure(figsize=(15, 10))
    axs = fig.subplots(2, 2, gridspec_kw=dict(top=0.88, hspace=0.3, wspace=0.22))
    for ax, (key, name) in zip(axs.flat, METRICS_PANELS):
        curve = [(epochs, [row[key] for row in history], dict(marker="o", markersize=3))]
        (_accuracy_panel if key.endswith("acc") else _loss_panel)(ax, curve)
        ax.set_title(name)
        _epoch_axis(ax, epochs)
        for x, _ in events:
            ax.axvline(x, color="gray", linestyle=":", linewidth=1.5, gid="lr-change")
    test_ax = axs[1, 1]
    _mark_best(test_ax, history, "gold")
    test_ax.legend(loc="best")
    best = _best(history)
    summary = [f"test accuracy: final {history[-1]['test_acc']:.2f}%",
               f"best {best['test_acc']:.2f}% (epoch {best['epoch']})"]
    summary += [text + " (dotted line)" for _, text in events]
    fig.suptitle(title, y=0.975, fontsize=15)
    fig.text(0.5, 0.93, " | ".join(summary), ha="center", fontsize=12)
    save_figure(fig, path)
    return fig


def _run_label(run):
    history = run["history"]
    best = _best(history)
    return (f"{run['label']}{'' if run['finished'] else ' (unfinished)'}: final {history[-1]['test_acc']:.2f}%, "
            f"best {best['test_acc']:.2f}% (epoch {best['epoch']})")


def plot_comparison(runs, path, title="Run comparison"):
    """Test accuracy and test loss per epoch of several runs, one line each, on the same axes as plot_metrics.

    runs: [{"label": what sets the run apart, "history": metrics.csv's rows, "finished": bool}]; unfinished runs
    are dashed and say so in the legend, which also gives each run's final and best test accuracy. Runs without
    a row are left out. Saves the figure to `path` and returns it."""
    runs = [run for run in runs if run["history"]]
    if not runs:
        raise ValueError("none of the runs has an epoch to plot")
    columns = 1 if len(runs) <= 3 else 2
    legend_rows = math.ceil(len(runs) / columns)
    # The legend goes below the panels, and the figure grows with it, so that 50 runs still leave the curves clear.
    fig = Figure(figsize=(15, 6 + 0.25 * max(0, legend_rows - 4)), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    # Matplotlib's 10 colours for up to 10 runs; beyond, as many as there are runs, spread along one colour map.
    colours = ([f"C{i}" for i in range(len(runs))] if len(runs) <= 10
               else [colormaps["turbo"](i / (len(runs) - 1)) for i in range(len(runs))])
    accuracy_curves, loss_curves = [], []
    for run, colour in zip(runs, colours):
        epochs = [row["epoch"] for row in run["history"]]
        style = dict(color=colour, marker="o", markersize=3, linestyle="-" if run["finished"] else "--",
                     label=_run_label(run))  # colours by hand, so a run has the same one in both panels
        accuracy_curves.append((epochs, [row["test_acc"] for row in run["history"]], style))
        loss_curves.append((epochs, [row["test_loss"] for row in run["history"]], style))
    lines = _accuracy_panel(acc_ax, accuracy_curves)
    _loss_panel(loss_ax, loss_curves)
    for run, colour in zip(runs, colours):
        _mark_best(acc_ax, run["history"], colour)
    epochs = [row["epoch"] for run in runs for row in run["history"]]
    for ax, name in ((acc_ax, "Test Accuracy"), (loss_ax, "Test Loss")):
        ax.set_title(name)
        _epoch_axis(ax, epochs)
    fig.legend(handles=lines, loc="outside lower center", ncol=columns, title="★ best epoch of each run")
    fig.suptitle(title, fontsize=15)
    save_figure(fig, path)
    return fig


def plot_lr_finder(result, path, title=""):
    """find_lr's smoothed loss against the lr (log scale), the suggested lr marked. Returns the Figure."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    ax.plot(result["lrs"], result["losses"], label="training loss, smoothed")
    at_lowest = result["lrs"].index(result["min_loss_lr"])
    ax.scatter([result["min_loss_lr"]], [result["losses"][at_lowest]], color="black", zorder=3,
               label=f"lowest loss, at lr {result['min_loss_lr']:.3g}")
    ax.axvline(result["suggested_lr"], color="red", label=f"suggested lr {result['suggested_lr']:.3g}")
    ax.set_xscale("log")
    # The blow-up at the end dwarfs the dip that matters: show from the lowest loss to as far above the initial one.
    initial, lowest = result["losses"][0], min(result["losses"])
    margin = max(initial - lowest, 1e-3 * initial)
    ax.set_ylim(lowest - 0.1 * margin, initial + margin)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title or "Learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.text(0.5, -0.02, f"Suggested lr: {result['rule']}.", ha="center", va="top", fontsize=9)
    save_figure(fig, path)
    return fig

def confusion_matrix(predictions, labels, classes=10):
    """counts[true, predicted] as a [classes, classes] int64 tensor."""
    return torch.bincount(labels * classes + predictions, minlength=classes * classes).reshape(classes, classes)


def per_class_accuracy(matrix):
    """Accuracy in % of each true class, from a confusion matrix."""
    return 100 * matrix.diag().double() / matrix.sum(dim=1).clamp(min=1).double()


def plot_confusion_matrix(matrix, path):
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    shown = ax.imshow(matrix.double().log1p().numpy(), cmap="Blues")  # log scale: errors are tiny beside the diagonal
    classes = matrix.shape[0]
    for true in range(classes):
        for predicted in range(classes):
            count = int(matrix[true, predicted])
            if count:
                ax.text(predicted, true, count, ha="center", va="center", fontsize=8,
                        color="white" if true == predicted else "black")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({int(matrix.trace())}/{int(matrix.sum())} right)")
    fig.colorbar(shown, ax=ax, label="log(1 + count)")
    save_figure(fig, path)


def plot_misclassified(images, probabilities, labels, path, count=25):
    """A grid of the `count` misclassified images (uint8 [N, 28, 28]) the model was surest of, surest first, each
    with its true label, the prediction and the probability given to it. probabilities: float [N, 10].
    Saves the figure to `path` and returns it."""
    confidence, predictions = probabilities.max(dim=1)
    wrong = (predictions != labels).nonzero().flatten()
    shown = wrong[confidence[wrong].argsort(descending=True, stable=True)][:count].tolist()
    columns = 5
    rows = max(1, math.ceil(len(shown) / columns))
    fig = Figure(figsize=(2 * columns, 2.3 * rows), layout="constrained")
    axs = fig.subplots(rows, columns, squeeze=False)
    for ax in axs.flat:
        ax.axis("off")
    for ax, i in zip(axs.flat, shown):
        ax.imshow(images[i].cpu().numpy(), cmap="gray_r")
        # Rounded down, so a 99.7% sure mistake does not read as a certain one.
        percent = math.floor(100 * float(confidence[i]))
        ax.set_title(f"true {int(labels[i])}, said {int(predictions[i])} ({percent}%)\n#{i}", fontsize=9)
    fig.suptitle(f"{len(wrong)} of {len(labels)} test images misclassified; "
                 f"the {len(shown)} most confident mistakes, most confident first")
    save_figure(fig, path)
    return fig
