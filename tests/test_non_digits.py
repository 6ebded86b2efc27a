"""Non-digits in training (NON_DIGITS), the digits held back for the threshold (HELD_BACK), and "not a digit"."""
import importlib.util
import math
import random

import pytest
import torch
import torch.nn as nn

import main_mnist
import predict
import utils
from conftest import REPO
from machinery import non_digits, records, robustness
from machinery.images import to_mnist

spec = importlib.util.spec_from_file_location("non_digit_kinds", f"{REPO}/benchmarks/non_digit_kinds.py")
held_out_kinds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(held_out_kinds)


def digit_batch(count=64, seed=0):
    """Blobs standing in for a batch of digits: float [count, 1, 28, 28] in [0, 1], and labels 0-9."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, 28, 28)
    images[:, :, 8:20, 10:18] = torch.rand(count, 1, 12, 8, generator=generator)
    return images, torch.arange(count) % 10


# ---- What training adds to a batch ----

@pytest.mark.parametrize("kind", non_digits.KINDS)
def test_each_kind_makes_inked_28x28_images_in_0_1(kind):
    images, labels = digit_batch()
    made = non_digits.MAKERS[kind](images, labels, 12)
    assert made.shape == (12, 1, 28, 28)
    assert made.min() >= 0 and made.max() <= 1
    assert (made.flatten(1).amax(dim=1) > 0.5).all()  # every one has ink


def test_a_batch_gets_its_share_of_non_digits_at_its_end_split_among_the_kinds(monkeypatch):
    images, labels = digit_batch(128)
    torch.manual_seed(0)
    mixed, mixed_labels = non_digits.batch_adder("letters,strokes")(images, labels)
    added = round(non_digits.SHARE * 128)
    assert len(mixed) == 128 + added
    unchanged = (mixed[:128] == images).flatten(1).all(dim=1).double().mean()
    assert 0.1 < unchanged < 0.4  # a quarter as they were; others thicker or softer (vary_pen), or dimmer
    assert torch.equal(mixed_labels[:128], labels) and (mixed_labels[128:] == utils.NOT_A_DIGIT).all()
    asked = []
    monkeypatch.setitem(non_digits.MAKERS, "letters", lambda i, l, n: asked.append(("letters", n)) or i[:n])
    monkeypatch.setitem(non_digits.MAKERS, "strokes", lambda i, l, n: asked.append(("strokes", n)) or i[:n])
    non_digits.add_non_digits(images, labels, ("letters", "strokes"))
    assert asked == [("letters", added // 2), ("strokes", added - added // 2)]
    made = non_digits.add_non_digits(images, labels, ("letters", "strokes"))[0]
    as_made = torch.cat([images[:added // 2], images[:added - added // 2]]).flatten(1)  # the stand-ins above
    dimmed = made[128:].flatten(1).sum(dim=1) / as_made.sum(dim=1)
    assert torch.allclose(made[128:].flatten(1), as_made * dimmed[:, None])  # the pen varied for the digits only,
    assert dimmed.min() >= 0.8 - 1e-6 and dimmed.max() <= 1 + 1e-6  # but the brightness for both


def test_letters_and_shapes_are_turned_as_the_digits_are_with_no_new_shades():
    # Nearest neighbour, as augment.rotate turns the digits: a bilinear turn would give the non-digits a softer
    # edge than any training digit has, and the model would learn that softness, not the shape, means "none".
    drawings = non_digits._bank("shapes", torch.device("cpu"))[:50].unsqueeze(1).float() / 255
    torch.manual_seed(0)
    turned = non_digits.vary(drawings)
    assert set(turned.unique().tolist()) <= set(drawings.unique().tolist()) | {0.0}


def test_no_kind_gives_away_a_non_digit_by_its_brightest_pixel():
    images, labels = digit_batch()
    images = images / images.amax(dim=(2, 3), keepdim=True)  # as MNIST's digits: the brightest pixel 1
    torch.manual_seed(0)
    for kind in non_digits.KINDS:
        made = non_digits.MAKERS[kind](images, labels, 64)
        assert torch.allclose(made.amax(dim=(2, 3)), torch.ones(64, 1)), kind


def test_no_kinds_named_adds_nothing_and_the_same_seed_adds_the_same():
    assert non_digits.batch_adder("") is None and non_digits.batch_adder(" , ") is None
    images, labels = digit_batch()
    torch.manual_seed(3)
    first = non_digits.add_non_digits(images, labels, non_digits.KINDS)[0]
    torch.manual_seed(3)
    assert torch.equal(first, non_digits.add_non_digits(images, labels, non_digits.KINDS)[0])


def test_the_training_letters_leave_out_what_passes_for_a_digit():
    for letter in "OoQDIilJjTSsZzBbGgq":
        assert letter not in non_digits.LETTERS
    assert len(non_digits.letter_drawings()) == len(non_digits.LETTERS) * len(non_digits.FONTS)


def test_the_kinds_reported_on_are_made_by_other_code_and_fonts():
    source = open(f"{REPO}/benchmarks/non_digit_kinds.py").read()
    assert "machinery.non_digits" not in source and "machinery import non_digits" not in source
    assert not any(font in source for font in non_digits.FONTS)
    rng = random.Random(0)
    for kind, make in held_out_kinds.KINDS.items():
        assert to_mnist(make(rng)).max() > 0.9, kind  # each reads as an image with ink, through predict.py's path


def test_the_pen_varies_for_the_digits_a_third_thicker_a_sixth_softer():
    images = torch.zeros(3000, 1, 28, 28)
    images[:, :, 10:18, 13:15] = 1.0  # a bar 2 px wide
    torch.manual_seed(0)
    varied = non_digits.vary_pen(images)
    ink = (varied > 0.05).flatten(1).sum(dim=1)
    thicker = ((varied > 0.99).flatten(1).sum(dim=1) > 16).double().mean()
    softer = ((ink > 16) & ((varied > 0.99).flatten(1).sum(dim=1) < 16)).double().mean()
    assert abs(thicker - 1 / 3) < 0.04 and abs(softer - 1 / 6) < 0.04
    assert varied.amax(dim=(1, 2, 3)).min() == pytest.approx(1.0)  # the brightest pixel still white


# ---- The loss ----

def test_the_loss_adds_nothing_for_a_uniform_answer_and_more_the_surer_the_answer():
    loss = utils.with_non_digits(utils.loss_function("raw scores"))
    scores = torch.tensor([[5.0] + [0.0] * 9, [0.0] * 10, [0.0] * 10])
    digits_only = torch.tensor([0, 1, 2])
    assert torch.isclose(loss(scores, digits_only), nn.functional.cross_entropy(scores, digits_only))  # the test set
    with_uniform = torch.tensor([0, utils.NOT_A_DIGIT, utils.NOT_A_DIGIT])
    assert torch.isclose(loss(scores, with_uniform), nn.functional.cross_entropy(scores[:1], digits_only[:1]))
    sure = torch.tensor([0, 0, utils.NOT_A_DIGIT])
    scores[2, 3] = 6.0  # a non-digit read as a 3
    distance = -scores[2].log_softmax(dim=0).mean() - math.log(10)  # KL(uniform || p), above 0
    assert distance > 1 and torch.isclose(
        loss(scores, sure), nn.functional.cross_entropy(scores[:2], sure[:2]) + utils.NON_DIGIT_WEIGHT * distance)
    assert "KL(uniform || p) on non-digits" in utils.loss_name(loss)


def test_the_loss_pushes_a_non_digits_answer_toward_uniform():
    scores = torch.tensor([[4.0, 1.0, 0.0, 0, 0, 0, 0, 0, 0, 0]], requires_grad=True)
    utils.with_non_digits(utils.loss_function("raw scores"))(scores, torch.tensor([utils.NOT_A_DIGIT])).backward()
    assert scores.grad[0, 0] > 0 and scores.grad[0, 2] < 0  # a step lowers the top score and raises the least


def test_train_counts_accuracy_on_the_digits_only():
    class Oracle(nn.Module):  # reads the label that the loader hid in the first pixel
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return nn.functional.one_hot(x[:, 0, 0, 0].round().long().clamp(0, 9), 10).float() * 20 + self.w

    images, labels = torch.zeros(40, 28, 28, dtype=torch.uint8), torch.arange(40) % 10
    loader = utils.MnistBatches(images, labels, 8, add_non_digits=lambda i, l: non_digits.add_non_digits(
        i, l, ("strokes",)))
    model = Oracle()

    class Hidden:  # the labels in the first pixel of each digit
        def __len__(self):
            return len(loader)

        def __iter__(self):
            for batch, target in loader:
                batch = batch.clone()
                batch[:, 0, 0, 0] = target.clamp(min=0).float()
                yield batch, target
    _, accuracy = utils.train(model, "cpu", Hidden(), torch.optim.SGD(model.parameters(), lr=0), utils.with_non_digits(
        utils.loss_function("raw scores")))
    assert accuracy == 100.0  # the non-digits, never "right", are not counted among the digits


# ---- The digits held back, and the threshold chosen on them ----

def test_the_held_back_digits_are_the_same_for_every_seed_and_never_trained_on():
    images = torch.arange(1000, dtype=torch.int64).view(-1, 1, 1).expand(-1, 28, 28).to(torch.uint8)
    labels = torch.arange(1000)
    held = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        loader = utils.MnistBatches(images, labels, 50, shuffle=True)
        held.append(loader.hold_back(0.1, 50).labels)
        assert len(loader.labels) == 900 and not set(held[-1].tolist()) & set(loader.labels.tolist())
    assert torch.equal(held[0], held[1])
    loader = utils.MnistBatches(images, labels, 50)
    assert len(loader.hold_back(0.0, 50).labels) == 0 and torch.equal(loader.labels, labels)  # 0: as before


def test_with_held_back_digits_the_threshold_is_theirs_and_the_test_set_only_scores_it():
    generator = torch.Generator().manual_seed(0)
    held = 4 * torch.randn(5000, 10, generator=generator)
    held_labels = torch.multinomial(held.softmax(dim=1), 1, generator=generator).squeeze(1)
    test = 6 * torch.randn(2000, 10, generator=generator)  # differently sure: a fit on it would differ
    test_labels = test.argmax(dim=1)
    calibration = robustness.calibrate(test, test_labels, held, held_labels)
    temperature = robustness.fit_temperature(held, held_labels)
    confidence, predicted = (held / temperature).softmax(dim=1).max(dim=1)
    assert calibration["temperature"] == temperature
    assert calibration["threshold"] == min(robustness.not_sure_threshold(confidence, predicted.eq(held_labels)),
                                           float(confidence.double().quantile(robustness.MOST_DECLINED)))
    assert float((confidence < calibration["threshold"]).double().mean()) <= robustness.MOST_DECLINED  # capped
    assert calibration["not_a_digit"] == pytest.approx(float(confidence.double().quantile(robustness.UNSURE_DIGITS)))
    assert "5,000 training digits held back" in calibration["chosen_on"]
    assert calibration["answered"] == pytest.approx(
        float(((test / temperature).softmax(dim=1).max(dim=1).values >= calibration["threshold"]).double().mean()))


# ---- The settings ----

@pytest.mark.parametrize("flags, message", [
    (["--non-digits", "letters,faces"], "NON_DIGITS (--non-digits) must name kinds from " + ", ".join(non_digits.KINDS)),
    (["--held-back", "0.9"], "HELD_BACK (--held-back) must be a share of the training images, from 0 to 0.5"),
])
def test_a_bad_non_digit_setting_is_one_line_at_the_start(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main_mnist.main(["--model", "CompactNet", *flags])
    assert stopped.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_faithful_default_trains_on_digits_only_and_compactnets_recipe_on_non_digits_too():
    assert main_mnist.SETTINGS["NON_DIGITS"] == "" and main_mnist.SETTINGS["HELD_BACK"] == 0
    recipe = main_mnist.RECIPES["CompactNet"]
    assert set(non_digits.kind_names(recipe["NON_DIGITS"])) <= set(non_digits.KINDS) and recipe["HELD_BACK"] > 0
    assert non_digits.batch_adder(recipe["NON_DIGITS"]) is not None


# ---- What predict.py and the page say ----

def test_answer_says_a_digit_not_sure_or_not_a_digit_by_the_calibrations_levels():
    calibration = {"temperature": 1.0, "threshold": 0.9, "not_a_digit": 0.5}
    digit = torch.zeros(28, 28)
    digit[6:22, 12:16] = 1.0  # solid ink
    probs = torch.full((10,), 0.02)
    for top, said in ((0.95, 7), (0.7, predict.NOT_SURE), (0.3, predict.NOT_A_DIGIT)):
        probs[7] = top
        assert predict.answer(probs, digit, calibration) == said
    del calibration["not_a_digit"]  # a run from before it: "not sure" only
    assert predict.answer(probs, digit, calibration) == predict.NOT_SURE
    assert predict.answer(probs, torch.rand(28, 28) * 0.45, calibration) == predict.NOT_A_DIGIT  # faint noise


def test_the_trained_model_declines_non_digits_it_never_saw_far_more_than_digits(trained_model, real_data_dir):
    # One epoch of CompactNet's recipe (the session's model): printed letters in other fonts, doodles and the rest,
    # made by code training never uses, are declined far more often than real test digits are.
    _, model, _, calibration = predict.load_reader(trained_model, torch.device("cpu"))
    assert "held back" in records.record_beside(trained_model)["calibration"]["chosen_on"]
    rng = random.Random(1)
    made = torch.stack([to_mnist(make(rng)) for make in held_out_kinds.KINDS.values() for _ in range(20)])
    test_images = utils.load_mnist(real_data_dir, train=False)[0][:500].float() / 255
    shares = []
    for images in (made, test_images):
        probabilities = predict.classify(model, torch.device("cpu"), images, calibration)
        shares.append(sum(isinstance(predict.answer(p, d, calibration), str) for p, d in zip(probabilities, images))
                      / len(images))
    assert shares[0] > 0.3 and shares[0] > 5 * shares[1]  # (the recipe's 15 epochs: docs/model-knows.md)
