import math
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import datasets
from torch.utils.data import DataLoader, TensorDataset

import main_mnist
import utils
from machinery import figures, files, hardware, lr_finder
from machinery.errors import NonFiniteLoss, UserError
from conftest import assert_png
from model import Net
from utils import (GetCorrectPredCount, MnistBatches, get_testloader, get_trainloader,
                   load_mnist, model_summary)

AUGMENTED = {**main_mnist.SETTINGS, "ROTATION": 15.0, "CROP_P": 0.5, "CROP_SIZE": 22, "SHIFT": 2}  # every kind on


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
    get_testloader(tiny_mnist, batch_size=16)  # extracts the .gz files, so both kinds of file exist
    path = os.path.join(tiny_mnist, "MNIST", "raw", name)
    with open(path, "rb") as f:
        truncated = f.read()[:-100]
    with open(path, "wb") as f:
        f.write(truncated)
    with pytest.raises(UserError, match="damaged") as error:
        get_trainloader(tiny_mnist, batch_size=16)
    assert path in str(error.value) and "Delete it" in str(error.value)
    with open(path, "rb") as f:
        assert f.read() == truncated


def smooth_digits(count=16):
    """Smooth strokes inside the 20x20 centre, as MNIST's digits are: a fair test of the interpolation."""
    generator = torch.Generator().manual_seed(1)
    strokes = (torch.rand(count, 1, 20, 20, generator=generator) > 0.85).float()
    strokes = F.conv2d(strokes, torch.ones(1, 1, 3, 3) / 3, padding=1).clamp(0, 1)
    return (F.pad(strokes, (4, 4, 4, 4)) * 255).round().to(torch.uint8)


def test_batches_are_channels_last_and_augmented_only_for_training():
    images = smooth_digits(8)[:, 0]
    labels = torch.arange(8)
    plain = next(iter(MnistBatches(images, labels, batch_size=8)))[0]
    augmented = next(iter(MnistBatches(images, labels, batch_size=8, augmentation=AUGMENTED)))[0]
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


class ScoresNet(Net):
    """Net as most tutorials write forward: raw scores (logits) out, for cross_entropy."""

    def forward(self, x):
        return super().forward(x) + 3.0  # scores: any shift of log-probabilities gives the same softmax


class Returns(nn.Module):
    """A 'model' whose forward returns what it is given to return, for a batch of any size."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(len(x))


def test_the_loss_fits_what_forward_returns():
    images = torch.randn(8, 1, 28, 28)
    assert utils.check_output(Net(), images) == "log-probabilities"  # log_softmax out, as the original
    assert utils.loss_function("log-probabilities") is F.nll_loss
    assert utils.check_output(ScoresNet(), images) == "raw scores"
    assert utils.check_output(Returns(lambda n: torch.zeros(n, 10)), images) == "raw scores"
    assert utils.loss_function("raw scores") is F.cross_entropy


@pytest.mark.parametrize("outputs", ["log-probabilities", "raw scores"])
def test_label_smoothing_is_the_same_loss_on_scores_and_on_their_log_probabilities(outputs):
    scores, targets = torch.randn(16, 10), torch.arange(16) % 10
    criterion = utils.loss_function(outputs, label_smoothing=0.1)
    given = scores.log_softmax(dim=1) if outputs == "log-probabilities" else scores
    expected = nn.CrossEntropyLoss(label_smoothing=0.1)(scores, targets)
    assert torch.allclose(criterion(given, targets), expected)
    assert utils.loss_name(criterion) == "F.cross_entropy(label_smoothing=0.1)"
    assert utils.loss_name(nn.CrossEntropyLoss(label_smoothing=0.1)) == "CrossEntropyLoss(label_smoothing=0.1)"


def test_an_output_that_changes_from_call_to_call_in_eval_mode_is_one_line():
    class DropoutLeftOn(nn.Module):  # F.dropout's training argument is True unless it is given
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return F.log_softmax(self.fc(F.dropout(x.flatten(1), 0.1)), dim=1)
    model, images = DropoutLeftOn(), torch.randn(8, 1, 28, 28)
    rng = torch.get_rng_state()
    with pytest.raises(UserError, match="changes from one call to the next") as error:
        utils.check_output(model, images)
    assert "\n" not in str(error.value) and torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("make, expected", [
    (lambda n: torch.zeros(n, 5), "must return a tensor of shape [batch, 10]"),
    (lambda n: torch.zeros(n, 10, 1), "not [8, 10, 1]"),
    (lambda n: (torch.zeros(n, 10), None), "not tuple"),
    (lambda n: torch.full((n, 10), 0.1), "returns probabilities (softmax)"),
])
def test_a_forward_that_returns_something_else_gets_one_line(make, expected):
    with pytest.raises(UserError) as error:
        utils.check_output(Returns(make), torch.zeros(8, 1, 28, 28))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_forward_that_fails_on_the_input_gets_one_line():
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 10))  # a layer sized for another input
    with pytest.raises(UserError, match=r"forward fails on a batch of shape \[8, 1, 28, 28\]: mat1 and mat2") as error:
        utils.check_output(model, torch.zeros(8, 1, 28, 28))
    assert "\n" not in str(error.value)


def test_checking_the_output_leaves_training_as_it_was():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    model(torch.zeros(2, 1, 28, 28))  # materialize the lazy layer
    model.train()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    images = torch.randn(8, 1, 28, 28)
    rng = torch.get_rng_state()
    utils.check_output(model, images)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())  # BN stats too


def test_training_on_raw_scores_with_cross_entropy_lowers_the_loss():
    torch.manual_seed(0)
    model = ScoresNet()
    loader = separable_loader()
    criterion = utils.loss_function(utils.check_output(model, next(iter(loader))[0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = [utils.train(model, "cpu", loader, optimizer, criterion)[0] for _ in range(5)]
    assert losses[-1] < losses[0] / 2 and min(losses) > 0  # cross entropy is never negative


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

    amp = hardware.use_bfloat16("cpu", True)
    result = lr_finder.find_lr(model, optimizer, loader, F.nll_loss, "cpu", amp, start_lr=1e-5, end_lr=1, num_iter=20)
    lrs = torch.tensor(result["lrs"], dtype=torch.float64)
    assert lrs[0] == pytest.approx(1e-5) and len(lrs) <= 20
    assert torch.allclose(lrs[1:] / lrs[:-1], torch.tensor(10 ** (5 / 19), dtype=torch.float64))  # x 10^5 in 19 steps
    assert len(result["losses"]) == len(lrs)
    assert abs(result["losses"][0] - math.log(10)) < 0.5  # the smoothed loss starts at chance: ln 10 for 10 classes
    assert 0 < result["suggested_lr"] < 1 and result["suggested_lr"] == pytest.approx(result["min_loss_lr"] / 10)
    assert "lowest" in result["rule"]

    assert all(torch.equal(value, weights[name]) for name, value in model.state_dict().items())
    assert optimizer.param_groups[0]["lr"] == 0.01 and not optimizer.state  # no momentum left behind
    assert "initial_lr" not in optimizer.param_groups[0]  # a scheduler can still be attached
    assert all(p.grad is None for p in model.parameters()) and not model.training
    assert torch.equal(torch.get_rng_state(), rng)

    fig = figures.plot_lr_finder(result, tmp_path / "lr.png", title="tiny net")
    assert_png(tmp_path / "lr.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == "tiny net"
    assert any(f"suggested lr {result['suggested_lr']:.3g}" in text.get_text() for text in ax.get_legend().texts)
    assert result["rule"] in fig.texts[0].get_text()


def test_lr_suggestion_is_a_tenth_of_the_lowest_loss_and_ignores_what_follows_a_nan():
    lrs = [10 ** (i / 10 - 5) for i in range(40)]
    losses = [2.0 - 0.03 * i if i < 25 else 1.25 + 0.2 * (i - 25) for i in range(40)]  # lowest at i = 25
    losses[30:] = [float("nan")] * 10
    result = lr_finder._suggest_lr(lrs, losses, num_iter=40)
    assert result["min_loss_lr"] == lrs[25] and result["suggested_lr"] == pytest.approx(lrs[25] / 10)
    assert result["lrs"] == lrs[:30] and result["losses"] == losses[:30]
    with pytest.raises(ValueError, match="diverged after 5 of 100 steps"):
        lr_finder._suggest_lr(lrs[:5], losses[:5], num_iter=100)


def test_predict_returns_the_log_probabilities_and_the_labels():
    inputs = torch.zeros(10, 1, 28, 28)
    inputs[:, 0, 0, 0] = torch.arange(10).float()
    answers = torch.tensor([3, 1, 2, 3, 4, 5, 6, 7, 8, 0])
    loader = DataLoader(TensorDataset(inputs, torch.arange(10)), batch_size=4)
    log_probabilities, labels = utils.predict(FixedAnswers(answers), "cpu", loader)
    probabilities = log_probabilities.exp()
    assert probabilities.shape == (10, 10) and probabilities.dtype == torch.float32
    assert probabilities.device.type == "cpu"
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(10))
    assert probabilities.argmax(dim=1).tolist() == answers.tolist() and labels.tolist() == list(range(10))


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
        files.atomic_write(path, fails_halfway)
    assert path.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["model.pt"]
