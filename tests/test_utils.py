"""utils.py, augment.py and machinery/evaluation.py as a learner calls them: the original's functions, the data on
the device, the augmentation, and the calibration and robustness measures."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import main_mnist
import utils
from augment import random_augment, rotate, shift
from machinery import evaluation
from machinery.evaluation import FAMILIES, fit_temperature, not_sure_threshold, reliability
from model import MODELS
from utils import UserError

OFF = {**main_mnist.BLOCK, "ROTATION": 0, "CROP_P": 0, "SHIFT": 0}  # the block's settings, augmentation off


def tiny_loader(count=64, batch_size=16, **options):
    images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8)
    return utils.MnistBatches(images, torch.randint(0, 10, (count,)), batch_size, **options)


def test_get_correct_pred_count_counts_the_rows_whose_largest_score_is_the_label():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert int(utils.GetCorrectPredCount(scores, torch.tensor([1, 1, 1]))) == 2


def test_train_and_test_return_loss_and_accuracy_and_train_lowers_the_loss():
    torch.manual_seed(0)
    model, loader = MODELS["FastNet"](), tiny_loader(shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    before, _ = utils.test(model, torch.device("cpu"), loader, verbose=False)
    for _ in range(5):
        loss, accuracy = utils.train(model, torch.device("cpu"), loader, optimizer, F.nll_loss)
    after, test_accuracy = utils.test(model, torch.device("cpu"), loader, verbose=False)
    assert after < before and 0 <= accuracy <= 100 and 0 <= test_accuracy <= 100


def test_batches_are_normalized_as_the_original_and_cover_every_image_once():
    loader = tiny_loader(count=50, shuffle=True)
    labels = torch.cat([target for _, target in loader])
    assert len(loader) == 4 and sorted(labels.tolist()) == sorted(loader.labels.tolist())
    first = next(iter(utils.MnistBatches(loader.images, loader.labels, 50)))[0]
    assert torch.allclose(first, (loader.images.unsqueeze(1).float() / 255 - utils.MNIST_MEAN) / utils.MNIST_STD)


def test_model_summary_prints_torchsummary_s_table(capsys):
    utils.model_summary(MODELS["CompactNet"]())
    out = capsys.readouterr().out
    assert f"Total params: {sum(p.numel() for p in MODELS['CompactNet']().parameters()):,}" in out


def test_data_visualization_draws_and_leaves_the_random_state_as_it_was():
    loader = tiny_loader(shuffle=True, augmentation={**OFF, "ROTATION": 15})
    state = torch.get_rng_state()
    figure = utils.data_visualization(loader)
    assert len(figure.axes[0].texts) == min(32, loader.batch_size) and torch.equal(state, torch.get_rng_state())


def test_mnist_loads_as_uint8_tensors(data_dir):
    images, labels = utils.load_mnist(data_dir, train=False)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8 and set(labels.tolist()) == set(range(10))


def test_downloaded_files_are_unpacked_in_a_folder_of_their_own_and_moved_in_whole(data_dir, tmp_path):
    os.makedirs(tmp_path / "MNIST" / "raw")
    for name in os.listdir(os.path.join(data_dir, "MNIST", "raw")):
        if name.endswith(".gz"):  # what the download leaves, or a learner copies in to work offline
            shutil.copy(os.path.join(data_dir, "MNIST", "raw", name), tmp_path / "MNIST" / "raw" / name)
    images, _ = utils.load_mnist(str(tmp_path), train=False)
    assert len(images) == 10000 and os.listdir(tmp_path) == ["MNIST"]  # no folder of its own left behind
    assert len(os.listdir(tmp_path / "MNIST" / "raw")) == 8


def test_a_damaged_data_file_is_one_line_that_says_what_to_do(data_dir, tmp_path):
    shutil.copytree(os.path.join(data_dir, "MNIST"), tmp_path / "MNIST")
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot be read .* delete it and run again"):
        utils.load_mnist(str(tmp_path), train=False)


def test_rotate_by_a_right_angle_turns_the_pixels_and_shift_moves_them():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 3:10, 5:8] = 1
    assert torch.equal(rotate(image, torch.tensor([90.0])), torch.rot90(image, 1, dims=(2, 3)))
    assert torch.equal(shift(image, torch.tensor([[2, 1]])), torch.roll(image, (1, 2), dims=(2, 3)))


def test_the_augmentation_is_off_at_zero_and_the_same_for_the_same_seed():
    images = torch.rand(8, 1, 28, 28)
    assert torch.equal(random_augment(images, OFF), images)
    settings = {**OFF, "ROTATION": 15, "CROP_P": 0.5, "SHIFT": 2}
    torch.manual_seed(3)
    first = random_augment(images, settings)
    torch.manual_seed(3)
    assert torch.equal(first, random_augment(images, settings)) and not torch.equal(first, images)


def test_fit_temperature_finds_the_temperature_that_made_the_labels():
    torch.manual_seed(0)
    logits = 4 * torch.randn(20000, 10)
    labels = torch.distributions.Categorical(logits=logits / 2.0).sample()
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)


def test_reliability_and_the_not_sure_threshold_on_known_answers():
    probabilities = torch.tensor([[0.95, 0.05]] * 98 + [[0.55, 0.45]] * 2)
    labels = torch.tensor([0] * 98 + [1] * 2)  # the two least sure answers are the wrong ones
    rows, ece = reliability(probabilities, labels)
    assert sum(row[2] for row in rows if row) == 100 and ece == pytest.approx((98 * 0.05 + 2 * 0.55) / 100)
    assert 0.55 < not_sure_threshold(probabilities, labels) <= 0.95


def features_of_digits(n, width):
    """Unit-length features in ten clusters, as a layer's features of ten classes of digits lie."""
    centres = torch.randn(10, width, generator=torch.Generator().manual_seed(width))
    features = centres[torch.randint(10, (n,))] + 0.5 * torch.randn(n, width)
    return features / features.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("kept", [evaluation.KEPT, 0.5])  # at 0.5 the rough search cannot settle it: all is searched
def test_the_not_a_digit_limits_and_answers_are_those_of_the_whole_bank(kept, monkeypatch):
    monkeypatch.setattr(evaluation, "KEPT", kept)
    torch.manual_seed(0)
    bank, others = [features_of_digits(2000, 32), features_of_digits(2000, 8)], [features_of_digits(3000, 32),
                                                                                 features_of_digits(3000, 8)]
    whole = evaluation.distances(others, bank).double().quantile(kept, dim=0)
    assert torch.equal(evaluation.limits_of(others, bank), whole)
    new = [features_of_digits(3000, 32), torch.randn(3000, 8).div(8 ** 0.5)]  # the second layer's unlike any digit
    assert torch.equal(evaluation.distances(new, bank, above=whole) > whole, evaluation.distances(new, bank) > whole)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_shift_leaves_images_as_they_are_at_its_first_strength(family):
    transform, strengths = FAMILIES[family]
    images = torch.rand(8, 1, 28, 28)
    assert torch.allclose(transform(images, strengths[0]), images, atol=1e-3)
    assert not torch.allclose(transform(images, strengths[-1]), images, atol=1e-2)
