import gzip
import math
import os
import time

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision import datasets
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import utils
from model import Net
from utils import (GetCorrectPredCount, MnistBatches, UserError, NonFiniteLoss, augment, get_testloader,
                   get_trainloader, load_mnist, model_summary)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- Data ----

def test_loaders_read_idx_files_through_torchvisions_mnist(tiny_mnist):
    train_loader = get_trainloader(tiny_mnist, batch_size=16)
    test_loader = get_testloader(tiny_mnist, batch_size=10)
    assert len(train_loader) == 4 and len(test_loader) == 4  # 64 / 16, and 32 / 10 with a last batch of 2
    images, labels = next(iter(test_loader))
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.float32
    assert labels.tolist() == list(range(10))  # the test set keeps its order
    # Normalized as the original: black pixels become -mean/std, white ones (1 - mean)/std.
    assert images.unique().tolist() == pytest.approx([-0.1307 / 0.3081, (1 - 0.1307) / 0.3081])
    assert sum(len(labels) for _, labels in test_loader) == 32


def test_the_training_loader_shuffles_every_sample_once_per_epoch(tiny_mnist):
    loader = get_trainloader(tiny_mnist, batch_size=16)
    epochs = [torch.cat([labels for _, labels in loader]) for _ in range(2)]
    for labels in epochs:
        assert sorted(labels.tolist()) == sorted((torch.arange(64) % 10).tolist())
    assert not torch.equal(epochs[0], epochs[1])


def test_max_batches_limits_an_epoch(tiny_mnist):
    loader = get_trainloader(tiny_mnist, batch_size=16, max_batches=1)
    assert len(loader) == 1 and len(list(loader)) == 1


def test_missing_data_without_network_stops_at_once_with_what_to_do(tmp_path, no_network):
    mirror = datasets.MNIST.mirrors[0]  # a closed local port here
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        load_mnist(str(tmp_path), train=True)
    assert time.monotonic() - started < 10
    message = str(error.value)
    raw_dir = os.path.join(str(tmp_path), "MNIST", "raw")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz", raw_dir, mirror):
        assert name in message
    assert len(message.splitlines()) <= 4


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte"])
def test_a_damaged_data_file_is_named_and_never_downloaded_over(tiny_mnist, name):
    get_testloader(tiny_mnist)  # extracts the .gz files, so both kinds of file exist
    path = os.path.join(tiny_mnist, "MNIST", "raw", name)
    with open(path, "rb") as f:
        truncated = f.read()[:-100]
    with open(path, "wb") as f:
        f.write(truncated)
    with pytest.raises(UserError, match="damaged") as error:
        get_trainloader(tiny_mnist)
    assert path in str(error.value) and "Delete it" in str(error.value)
    with open(path, "rb") as f:
        assert f.read() == truncated


def smooth_digits(count=16):
    """Smooth strokes inside the 20x20 centre, as MNIST's digits are: a fair test of the interpolation."""
    generator = torch.Generator().manual_seed(1)
    strokes = (torch.rand(count, 1, 20, 20, generator=generator) > 0.85).float()
    strokes = F.conv2d(strokes, torch.ones(1, 1, 3, 3) / 3, padding=1).clamp(0, 1)
    return (F.pad(strokes, (4, 4, 4, 4)) * 255).round().to(torch.uint8)


def torchvision_augment(image, angle, crop):
    """The original's transforms with fixed parameters, on one uint8 [1, 28, 28] image."""
    pil = Image.fromarray(image[0].numpy())
    if crop:
        pil = TF.center_crop(pil, 22)
    pil = TF.resize(pil, [28, 28])
    pil = TF.rotate(pil, angle, fill=0)
    return TF.to_tensor(pil)


@pytest.mark.parametrize("angle", [-15.0, -7.5, 0.0, 4.0, 15.0])
@pytest.mark.parametrize("crop", [False, True])
def test_batched_augmentation_matches_torchvisions_transforms(angle, crop):
    images = smooth_digits()
    expected = torch.stack([torchvision_augment(image, angle, crop) for image in images])
    batch = len(images)
    ours = augment(images.float() / 255, torch.full((batch,), angle), torch.full((batch,), crop))
    difference = (ours - expected).abs()
    if crop:  # torchvision resizes in 8-bit fixed point and rounds to uint8 before rotating
        assert difference.mean() < 0.003 and torch.quantile(difference.flatten(), 0.99) < 0.03
    else:  # both are nearest-neighbour rotations about the centre: the same pixels, but for rare exact ties
        assert (difference > 1e-4).float().mean() < 0.002


def test_random_augmentation_draws_the_originals_parameters(monkeypatch):
    drawn = {}
    monkeypatch.setattr(utils, "augment", lambda images, angles, crop: drawn.update(angles=angles, crop=crop))
    torch.manual_seed(0)
    utils.random_augment(torch.zeros(20_000, 1, 28, 28))
    angles, crop = drawn["angles"], drawn["crop"]
    assert -15 <= angles.min() < -14.9 and 14.9 < angles.max() <= 15  # uniform over +-15 degrees
    assert abs(angles.mean()) < 0.2
    assert 0.09 < crop.float().mean() < 0.11  # the centre crop with p = 0.1


def test_batches_are_channels_last_and_augmented_only_for_training():
    images = smooth_digits(8)[:, 0]
    labels = torch.arange(8)
    plain = next(iter(MnistBatches(images, labels, batch_size=8)))[0]
    augmented = next(iter(MnistBatches(images, labels, batch_size=8, augment=True)))[0]
    assert plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(plain, (images.unsqueeze(1).float() / 255 - 0.1307) / 0.3081)
    assert not torch.allclose(plain, augmented)


def test_describe_data_gives_shapes_and_exact_pixel_statistics():
    train = torch.tensor([[[0, 255], [255, 0]], [[0, 255], [255, 0]]], dtype=torch.uint8)  # half 0, half 255
    test = torch.full((3, 2, 2), 51, dtype=torch.uint8)
    lines = utils.describe_data(train, test).splitlines()
    assert lines[0] == "Training set: [2, 2, 2] uint8, 8 pixels"
    assert lines[1] == "  raw 0-255:  min 0, max 255, mean 127.5000, std 127.5000"
    assert lines[2] == "  scaled 0-1: min 0.0000, max 1.0000, mean 0.5000, std 0.5000"
    assert lines[3] == "Test set: [3, 2, 2] uint8, 12 pixels"
    assert lines[4] == "  raw 0-255:  min 51, max 51, mean 51.0000, std 0.0000"
    assert lines[5] == "  scaled 0-1: min 0.2000, max 0.2000, mean 0.2000, std 0.0000"
    assert "Normalize((0.1307,), (0.3081,))" in lines[6]


def test_describe_data_matches_float64_statistics_over_many_chunks():
    images = smooth_digits(10_000)[:, 0]  # more images than one chunk of the histogram
    pixels = images.double()
    text = utils.describe_data(images, images[:10])
    assert f"mean {pixels.mean():.4f}, std {pixels.std(unbiased=False):.4f}" in text
    assert f"mean {pixels.mean() / 255:.4f}, std {pixels.std(unbiased=False) / 255:.4f}" in text


# ---- Training and evaluation ----

def test_get_correct_pred_count_counts_argmax_matches():
    predictions = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert int(GetCorrectPredCount(predictions, torch.tensor([1, 0, 0]))) == 2


def separable_loader(count=256, batch_size=32):
    """Digits that differ in their left and right halves: class 0 is bright on the left, class 1 on the right."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.arange(count) % 2
    images = torch.rand(count, 1, 28, 28, generator=generator) * 0.3
    images[labels == 0, :, :, :14] += 0.7
    images[labels == 1, :, :, 14:] += 0.7
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def test_training_on_a_tiny_task_lowers_the_loss():
    torch.manual_seed(0)
    model = Net()
    loader = separable_loader()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = [utils.train(model, "cpu", loader, optimizer, F.nll_loss)[0] for _ in range(5)]
    assert losses[-1] < losses[0] / 2
    _, accuracy = utils.test(model, "cpu", loader, F.nll_loss)
    assert accuracy > 95


class FixedAnswers(nn.Module):
    """A 'model' that answers class `answers[i]` for an input whose first pixel is i, with certainty."""

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def forward(self, x):
        return F.one_hot(self.answers[x[:, 0, 0, 0].long()], 10).float().mul(50).log_softmax(dim=1)


@pytest.mark.parametrize("criterion", [F.nll_loss, nn.CrossEntropyLoss()])
def test_test_reports_accuracy_and_mean_loss_with_either_criterion(criterion, capsys):
    inputs = torch.zeros(10, 1, 28, 28)
    inputs[:, 0, 0, 0] = torch.arange(10).float()
    labels = torch.arange(10)
    answers = labels.clone()
    answers[:3] = (answers[:3] + 1) % 10  # three wrong answers
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=4)  # batches of 4, 4, 2
    loss, accuracy = utils.test(FixedAnswers(answers), "cpu", loader, criterion)
    assert accuracy == pytest.approx(70.0)
    assert loss == pytest.approx(3 * 50 / 10, rel=1e-4)  # each wrong answer costs 50 nats, right ones ~0
    assert "Accuracy: 7/10 (70.00%)" in capsys.readouterr().out


def test_train_stops_at_once_when_the_loss_is_not_finite():
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(NonFiniteLoss, match="nan"):
        utils.train(model, "cpu", separable_loader(), optimizer, lambda output, target: F.nll_loss(output, target) * torch.nan)


def test_model_summary_prints_torchsummarys_table_for_a_cpu_model(capsys):
    model_summary(Net())
    out = capsys.readouterr().out
    assert "Total params: 593,200" in out and "Conv2d-1" in out and "[-1, 10]" in out


# ---- Learning-rate range test ----

def tiny_net():
    """A convolution, batch norm (whose running statistics a range test changes) and a linear classifier."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(64, 10), nn.LogSoftmax(dim=1))


def test_find_lr_sweeps_exponentially_and_leaves_the_model_and_optimizer_as_they_were(tiny_mnist, tmp_path):
    torch.manual_seed(0)
    model = tiny_net().to(memory_format=torch.channels_last)
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = get_trainloader(tiny_mnist, batch_size=16)  # 4 batches: the test restarts it
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    rng = torch.get_rng_state()

    result = utils.find_lr(model, optimizer, loader, F.nll_loss, "cpu", amp=True, start_lr=1e-5, end_lr=1,
                           num_iter=20)
    lrs = torch.tensor(result["lrs"], dtype=torch.float64)
    assert lrs[0] == pytest.approx(1e-5) and len(lrs) <= 20
    assert torch.allclose(lrs[1:] / lrs[:-1], torch.tensor(10 ** (5 / 19), dtype=torch.float64))  # x 10^5 in 19 steps
    assert len(result["losses"]) == len(lrs) and all(math.isfinite(loss) for loss in result["losses"])
    assert 0 < result["suggested_lr"] < 1 and result["suggested_lr"] == pytest.approx(result["min_loss_lr"] / 10)
    assert "lowest" in result["rule"]

    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    assert optimizer.param_groups[0]["lr"] == 0.01 and not optimizer.state  # no momentum left behind
    assert "initial_lr" not in optimizer.param_groups[0]  # a scheduler can still be attached
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert torch.equal(torch.get_rng_state(), rng)

    fig = utils.plot_lr_finder(result, tmp_path / "lr.png", title="tiny net")
    assert_png(tmp_path / "lr.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == "tiny net"
    assert any(f"suggested lr {result['suggested_lr']:.3g}" in text.get_text() for text in ax.get_legend().texts)
    assert result["rule"] in fig.texts[0].get_text()


def test_lr_suggestion_is_a_tenth_of_the_lowest_loss_and_ignores_what_follows_a_nan():
    lrs = [10 ** (i / 10 - 5) for i in range(40)]
    losses = [2.0 - 0.03 * i if i < 25 else 1.25 + 0.2 * (i - 25) for i in range(40)]  # lowest at i = 25
    losses[30:] = [float("nan")] * 10
    result = utils._suggest_lr(lrs, losses, num_iter=40)
    assert result["min_loss_lr"] == lrs[25] and result["suggested_lr"] == pytest.approx(lrs[25] / 10)
    assert result["lrs"] == lrs[:30] and result["losses"] == losses[:30]
    with pytest.raises(ValueError, match="diverged after 5 of 100 steps"):
        utils._suggest_lr(lrs[:5], losses[:5], num_iter=100)


# ---- Files and figures ----

def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def history(epochs=3):
    return [dict(epoch=e, train_loss=1 / e, train_acc=90 + e, test_loss=0.5 / e, test_acc=95 + e, lr=0.01, seconds=1.5)
            for e in range(1, epochs + 1)]


def test_metrics_csv_has_the_documented_header_and_a_row_per_epoch(tmp_path):
    path = tmp_path / "metrics.csv"
    utils.write_metrics(history(), path)
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds"
    assert lines[1] == "1,1,91,0.5,96,0.01,1.5" and len(lines) == 4


def test_figures_are_valid_pngs(tmp_path):
    utils.plot_metrics(history(), tmp_path / "curves.png")
    predictions = torch.tensor([0, 1, 2, 3, 3, 5])
    labels = torch.tensor([0, 1, 2, 2, 4, 5])
    matrix = utils.confusion_matrix(predictions, labels)
    utils.plot_confusion_matrix(matrix, tmp_path / "confusion.png")
    utils.plot_misclassified(smooth_digits(6)[:, 0], predictions, labels, tmp_path / "wrong.png")
    for name in ("curves.png", "confusion.png", "wrong.png"):
        assert_png(tmp_path / name)


def test_data_visualization_shows_a_batch_as_the_model_gets_it_unnormalized_and_labelled(tmp_path):
    images, labels = smooth_digits(12)[:, 0], torch.arange(12) % 10
    fig = utils.data_visualization(MnistBatches(images, labels, batch_size=12), tmp_path / "plain.png", count=10)
    assert_png(tmp_path / "plain.png")
    shown = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in shown] == [str(label) for label in labels[:10].tolist()]
    for ax, image in zip(shown, images):
        assert np.allclose(ax.images[0].get_array(), image.numpy() / 255, atol=1e-6)  # normalization undone

    loader = MnistBatches(images, labels, batch_size=12, shuffle=True, augment=True)
    fig = utils.data_visualization(loader, tmp_path / "augmented.png")
    assert_png(tmp_path / "augmented.png")
    pixels = np.stack([ax.images[0].get_array() for ax in fig.axes if ax.images])
    assert len(pixels) == 12 and -1e-6 < pixels.min() and pixels.max() < 1 + 1e-6
    assert "augmented training images" in fig._suptitle.get_text()


def test_confusion_matrix_and_per_class_accuracy():
    matrix = utils.confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), classes=3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert utils.per_class_accuracy(matrix).tolist() == [100.0, 100.0, 50.0]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"good")

    def fails_halfway(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        utils.atomic_write(path, fails_halfway)
    assert path.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["model.pt"]
