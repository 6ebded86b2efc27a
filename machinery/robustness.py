"""What a trained model knows off MNIST's test set: its accuracy under families of shifts (rotation, translation,
scale, stroke width, noise, blur, contrast), how well its confidence matches its accuracy (expected calibration
error, temperature scaling), and the confidence below which it should answer "not sure".

Every shift is a function of a batch on the device, in the style of augment.py: images float [B, 1, 28, 28] in
[0, 1], white digit on black, before normalization.
"""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from augment import resample, rotate, shift
from machinery.hardware import autocast
from utils import normalize

ROBUSTNESS_IMAGES = 2000  # test images each curve point is measured on: its standard error is under 1 point of accuracy
ECE_BINS = 15             # confidence bins of the expected calibration error, as Guo et al. (2017)
LEAST_TO_CALIBRATE = 2    # test images a calibration needs: it fits on one half and scores on the other
ANSWERED_ERROR = 0.002    # the "not sure" threshold is the lowest confidence at which answers given err at most this often
MOST_DECLINED = 0.01      # ... but never so high that it declines more of the digits it is chosen on than this share
UNSURE_DIGITS = 0.005     # below the "not a digit" level: this share of digits; an answer there says "not a digit"
# MNIST's digits are strokes of solid ink with soft edges: of the pixels a digit inks (above 0.1), at least this
# share is solid (above 0.5) in every one of the 60,000 training digits (the least: 0.3947; tests check it). An
# image below it (noise, a faint smudge) is no digit the model has seen, however sure the model is of it.
LEAST_SOLID_INK = 0.39


def translate(images, pixels):
    """Each image moved by `pixels` whole pixels: right, down, left, up in turn along the batch."""
    directions = torch.tensor([[1, 0], [0, 1], [-1, 0], [0, -1]], device=images.device)
    return shift(images, directions[torch.arange(len(images), device=images.device) % 4] * pixels)


def scale(images, factor):
    """Each image zoomed by `factor` about its centre (bilinear; 0.5: half the size, 1.5: cropped at the edges)."""
    if factor == 1:  # exactly as it is (bilinear sampling at the pixels' centres would round by ~1e-6)
        return images
    theta = images.new_zeros(len(images), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factor
    return resample(images, theta, "bilinear")


def stroke(images, steps):
    """Strokes made thicker (steps > 0) or thinner (steps < 0) by that many 3x3 dilations or erosions."""
    for _ in range(abs(steps)):
        sign = 1 if steps > 0 else -1  # an erosion is a dilation of the negative image
        images = sign * F.max_pool2d(sign * images, 3, stride=1, padding=1)
    return images


def noise(images, std):
    """Gaussian noise of standard deviation `std` (in units of the white level) added, clipped to [0, 1]. The same
    noise for the same batch each time: it is drawn from a generator of its own."""
    generator = torch.Generator(device=images.device).manual_seed(0)
    return (images + std * torch.randn(images.shape, generator=generator, device=images.device)).clamp_(0, 1)


def blur(images, sigma):
    """A Gaussian blur of standard deviation `sigma` pixels."""
    if sigma == 0:
        return images
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0)), kernel.view(1, 1, 1, -1))  # zeros beyond the edge,
    return F.conv2d(F.pad(images, (0, 0, radius, radius)), kernel.view(1, 1, -1, 1))  # as MNIST's black border


def contrast(images, level):
    """The contrast scaled by `level` about mid-grey: 1 leaves the image, 0 makes it flat grey, -1 inverts it."""
    return images * level + (1 - level) * 0.5


# Each family: its function and the strengths measured, the first leaving the images as they are.
FAMILIES = {
    "rotation (degrees)": (lambda images, angle: rotate(images, images.new_full((len(images),), angle)),
                           [0, 15, 30, 45, 60, 75, 90]),
    "translation (pixels)": (translate, [0, 1, 2, 3, 4, 6, 8]),
    "scale (factor)": (scale, [1.0, 0.5, 0.625, 0.75, 0.875, 1.125, 1.25, 1.375, 1.5]),
    "stroke width (- thinner, + thicker)": (stroke, [0, -2, -1, 1, 2, 3]),
    "Gaussian noise (std)": (noise, [0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]),
    "blur (sigma in pixels)": (blur, [0, 0.5, 1.0, 1.5, 2.0, 3.0]),
    "contrast (1 as is, -1 inverted)": (contrast, [1.0, 0.75, 0.5, 0.25, 0.0, -0.5, -1.0]),
}


def robustness_curves(model, device, images, labels, amp=False, count=ROBUSTNESS_IMAGES, batch_size=500):
    """({family: [(strength, accuracy in %), ...]}, the number of images measured): the accuracy of `model` on the
    first `count` of `images` (uint8 [N, 28, 28]) under each family of FAMILIES at each of its strengths, the
    strengths in increasing order."""
    images, labels = images[:count].to(device), labels[:count].cpu()  # moved once, shifted anew for each strength
    model.eval()
    curves = {}
    progress = tqdm(total=sum(len(strengths) for _, strengths in FAMILIES.values()), desc="Robustness",
                    dynamic_ncols=True)
    for family, (transform, strengths) in FAMILIES.items():
        points = []
        progress.set_postfix_str(family)
        for strength in strengths:
            correct = 0
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].unsqueeze(1).float().div_(255)
                batch = normalize(transform(batch, strength))
                with torch.inference_mode(), autocast(device, amp):
                    predicted = model(batch).argmax(dim=1)
                correct += int((predicted.cpu() == labels[start:start + batch_size]).sum())
            points.append((strength, 100 * correct / len(images)))
            progress.update()
        curves[family] = sorted(points)
    progress.close()
    return curves, len(images)


def standard_error(accuracy, count):
    """The standard error of an accuracy (in %) measured on `count` images: binomial."""
    p = accuracy / 100
    return 100 * math.sqrt(max(p * (1 - p), 1 / count) / count)


def mean_accuracy(curves):
    """The summary of the curves: the mean over the families of each family's mean accuracy on its shifted
    points (the unchanged one left out), so that every family weighs the same."""
    means = []
    for family, points in curves.items():
        clean = FAMILIES[family][1][0]
        shifted = [accuracy for strength, accuracy in points if strength != clean]
        means.append(sum(shifted) / len(shifted))
    return sum(means) / len(means)


def solid_ink_share(digits):
    """Per 28x28 image of `digits` ([N, 28, 28] or [28, 28], light on black in [0, 1]): the share of its inked
    pixels (above 0.1) that are solid (above 0.5). 0 for an image with no ink."""
    digits = digits.reshape(-1, 28 * 28)
    inked = (digits > 0.1).sum(dim=1)
    return (digits > 0.5).sum(dim=1) / inked.clamp(min=1)


# ---- Calibration ----

def reliability(probabilities, labels, bins=ECE_BINS):
    """Per equal-width bin of confidence (the top probability): (mean confidence, accuracy, count), for a
    reliability diagram and the ECE; None where the bin is empty."""
    confidence, correct = _confidence_and_correct(probabilities, labels)
    confidence, correct = confidence.double(), correct.double()
    which = (confidence * bins).long().clamp_(max=bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        rows.append((float(confidence[members].mean()), float(correct[members].mean()), count) if count else None)
    return rows


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """ECE: over the bins of reliability(), the gap between each bin's accuracy and its mean confidence, weighted
    by the share of samples in it. 0 for a perfectly calibrated model."""
    rows = [row for row in reliability(probabilities, labels, bins) if row is not None]
    return sum(count * abs(accuracy - confidence) for confidence, accuracy, count in rows) / len(labels)


def fit_temperature(scores, labels):
    """The temperature T that minimises the negative log-likelihood of softmax(scores / T): a golden-section
    search over log T in [1/20, 20] (the likelihood has one minimum there). `scores`: logits or log-probabilities
    (the same softmax either way)."""
    scores = scores.double()

    def nll(log_t):
        return float(F.cross_entropy(scores / math.exp(log_t), labels))
    low, high = math.log(1 / 20), math.log(20)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


def not_sure_threshold(confidence, correct, answered_error=ANSWERED_ERROR):
    """The lowest confidence threshold at which the answers at or above it are wrong at most `answered_error` of
    the time; 1.0 if there is none (the model would answer nothing)."""
    order = confidence.argsort(descending=True)
    errors = (~correct[order]).double().cumsum(0)
    answered = torch.arange(1, len(order) + 1, dtype=torch.double)
    good = (errors / answered <= answered_error).nonzero()
    return float(confidence[order][good[-1, 0]]) if len(good) else 1.0


def calibrate(scores, labels, held_scores=None, held_labels=None):
    """The calibration of a model from its scores on the test set (logits or log-probabilities, [N, 10]) and the
    labels, and on digits held back from training where given (HELD_BACK in main_mnist.py's block).

    With held-back digits, the temperature, the "not sure" threshold and the "not a digit" level are chosen on
    them, and scored on the test set, which chooses nothing. Without, on halves of the test set: each fitted on one
    half and scored on the other, then the halves swap, so no image scores the fit it took part in; the saved ones
    are then fitted on all of it.

    Returns a dict: temperature, threshold, not_a_digit, chosen_on, ece_before, ece_after, and on the test images
    scored: answered (the share the model answers, not "not sure") and answered_error (the error among those)."""
    scores, labels = scores.float().cpu(), labels.cpu()
    if held_scores is not None:
        fits = [(held_scores.float().cpu(), held_labels.cpu(), scores, labels)]
        chosen_on = f"{len(held_labels):,} training digits held back"
    else:
        halves = torch.arange(len(labels)) % 2 == 0
        fits = [(scores[fit], labels[fit], scores[~fit], labels[~fit]) for fit in (halves, ~halves)]
        chosen_on = "halves of the test set, each scored with the other's fit"
    fitted = [_fit(fit_scores, fit_labels) for fit_scores, fit_labels, _, _ in fits]
    before, after, answered, wrong, scored = [], [], 0, 0, 0
    for (t, threshold, _), (_, _, test_scores, test_labels) in zip(fitted, fits):
        held_out = (test_scores / t).softmax(dim=1)
        before.append(expected_calibration_error(test_scores.softmax(dim=1), test_labels))
        after.append(expected_calibration_error(held_out, test_labels))
        confidence, correct = _confidence_and_correct(held_out, test_labels)
        answer = confidence >= threshold
        answered += int(answer.sum())
        wrong += int((~correct[answer]).sum())
        scored += len(test_labels)
    # the saved fit: the held-back digits' one, above; without them, one on the whole test set
    temperature, threshold, not_a_digit = fitted[0] if held_scores is not None else _fit(scores, labels)
    return {"temperature": temperature, "threshold": threshold, "not_a_digit": not_a_digit, "chosen_on": chosen_on,
            "ece_before": sum(before) / len(fits), "ece_after": sum(after) / len(fits), "answered": answered / scored,
            "answered_error": wrong / max(answered, 1), "answered_error_target": ANSWERED_ERROR}


def _fit(scores, labels):
    """(temperature, "not sure" threshold, "not a digit" level) fitted on these digits' scores: the threshold
    is ANSWERED_ERROR's, capped at the confidence that keeps all but MOST_DECLINED of them; the level, the one
    that keeps all but UNSURE_DIGITS (an image less sure than almost any digit: "not a digit", not "not sure")."""
    t = fit_temperature(scores, labels)
    confidence, correct = _confidence_and_correct((scores / t).softmax(dim=1), labels)
    threshold = min(not_sure_threshold(confidence, correct), digits_quantile(confidence, MOST_DECLINED))
    return t, threshold, min(threshold, digits_quantile(confidence, UNSURE_DIGITS))


def digits_quantile(confidence, share):
    """The confidence that all but `share` of these digits reach."""
    return float(confidence.double().quantile(share))


def _confidence_and_correct(probabilities, labels):
    confidence, predicted = probabilities.max(dim=1)
    return confidence, predicted.eq(labels)
