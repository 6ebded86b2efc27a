"""What a model knows: robustness curves, calibration, and the confidence below which it says "not sure"."""
import math

import pytest
import torch

from machinery import records, robustness
import utils
from machinery.robustness import FAMILIES


@pytest.fixture(scope="module")
def test_digits(real_data_dir):
    """The first 300 real test digits (uint8 [300, 28, 28]) and their labels."""
    images, labels = utils.load_mnist(real_data_dir, train=False)
    return images[:300], labels[:300]


def synthetic_scores(count=40_000, seed=0):
    """Logits of 10 classes and labels drawn from their own softmax: a predictor calibrated by construction."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(count, 10, generator=generator)
    labels = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    return logits, labels


def test_each_family_at_its_first_strength_leaves_the_images_as_they_are(test_digits):
    images = test_digits[0][:16].unsqueeze(1).float() / 255
    for family, (transform, strengths) in FAMILIES.items():
        assert torch.equal(transform(images.clone(), strengths[0]), images), family


def test_at_strength_0_each_family_gives_exactly_the_clean_accuracy(trained_model, test_digits):
    _, model = records.load_model(trained_model, "cpu")
    images, labels = test_digits
    curves, count = robustness.robustness_curves(model, "cpu", images, labels)
    assert count == len(images)
    with torch.inference_mode():
        batch = utils.normalize(images.unsqueeze(1).float().div(255))
        clean = 100 * float(model(batch).argmax(dim=1).eq(labels).double().mean())
    for family, points in curves.items():
        assert dict(points)[FAMILIES[family][1][0]] == clean, family
    assert [strength for strength, _ in curves["rotation (degrees)"]] == sorted(FAMILIES["rotation (degrees)"][1])
    # A model that learned digits loses most of them upside down or inverted: the curves measure something.
    assert dict(curves["contrast (1 as is, -1 inverted)"])[-1.0] < clean - 30
    assert robustness.mean_accuracy(curves) < clean


def test_a_rotation_by_360_degrees_is_one_by_0_to_nearest_neighbour_error(test_digits):
    images = test_digits[0][:64].unsqueeze(1).float() / 255
    rotate = FAMILIES["rotation (degrees)"][0]
    differ = (rotate(images, 360.0) != rotate(images, 0.0)).double().mean()
    assert differ < 0.001  # of the pixels: at most a rounding at a pixel's edge


def test_strokes_thicken_and_thin_and_contrast_inverts():
    dot = torch.zeros(1, 1, 28, 28)
    dot[..., 10:18, 10:18] = 1
    stroke = FAMILIES["stroke width (- thinner, + thicker)"][0]
    assert stroke(dot, 1).sum() == 10 * 10 and stroke(dot, -1).sum() == 6 * 6
    assert torch.equal(FAMILIES["contrast (1 as is, -1 inverted)"][0](dot, -1.0), 1 - dot)
    assert FAMILIES["translation (pixels)"][0](dot, 3)[0, 0, 10:18, 13:21].sum() == 64  # the first moves right


def test_the_ece_of_a_predictor_calibrated_by_construction_is_near_0():
    logits, labels = synthetic_scores()
    assert robustness.expected_calibration_error(logits.softmax(dim=1), labels) < 0.01
    # ... and that of the same predictor made overconfident is not
    assert robustness.expected_calibration_error((2 * logits).softmax(dim=1), labels) > 0.05


def test_a_temperature_fitted_to_logits_made_overconfident_recovers_it():
    logits, labels = synthetic_scores()
    for temperature in (0.5, 2.5):
        assert robustness.fit_temperature(logits * temperature, labels) == pytest.approx(temperature, rel=0.05)
    # log-probabilities differ from the logits by a constant per image: the same fit
    fitted = robustness.fit_temperature((2.5 * logits).log_softmax(dim=1), labels)
    assert fitted == pytest.approx(robustness.fit_temperature(2.5 * logits, labels))


def test_the_threshold_is_the_lowest_confidence_that_keeps_the_answers_error_at_the_target():
    confidence = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.6, 0.5])
    correct = torch.tensor([True, True, True, True, False, True])
    assert robustness.not_sure_threshold(confidence, correct, answered_error=0.0) == pytest.approx(0.96)
    assert robustness.not_sure_threshold(confidence, correct, answered_error=0.2) == pytest.approx(0.5)  # 1 wrong in 6
    assert robustness.not_sure_threshold(confidence, ~correct, answered_error=0.0) == 1.0  # nothing can be answered


def test_calibrate_scores_each_half_with_the_other_halfs_fit():
    logits, labels = synthetic_scores(count=20_000)
    result = robustness.calibrate(2.0 * logits, labels)
    assert result["temperature"] == pytest.approx(2.0, rel=0.05)
    assert result["ece_after"] < 0.015 < result["ece_before"]
    assert 0 < result["answered"] < 1
    # This predictor errs often, so the error rule would decline most of it: the cap declines MOST_DECLINED,
    # chosen on one half, and held out on the other it declines about as much.
    assert 1 - result["answered"] == pytest.approx(robustness.MOST_DECLINED, abs=0.005)
    assert math.isclose(result["answered_error_target"], robustness.ANSWERED_ERROR)


def test_every_training_digit_is_solid_ink_enough_and_noise_is_not(real_data_dir):
    images, _ = utils.load_mnist(real_data_dir, train=True)
    shares = robustness.solid_ink_share(images.float() / 255)
    assert shares.min() >= robustness.LEAST_SOLID_INK  # no MNIST digit would be called "not sure" for its ink
    assert shares.min() < robustness.LEAST_SOLID_INK + 0.01  # and the bound is the data's, not a loose guess
    noise = torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.55
    assert (robustness.solid_ink_share(noise) < robustness.LEAST_SOLID_INK).all()
