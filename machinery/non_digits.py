"""Images that are no digit at all, made on the fly for training (NON_DIGITS in main_mnist.py's block).

A classifier trained on digits alone has no "none of these" to give: it reads a letter or a doodle as some digit,
often at 100%. Outlier exposure (Hendrycks, Mazeika & Dietterich, 2019) mixes non-digits into every batch and
trains the model to answer them with no digit in particular, the uniform answer over the ten; its top probability
on a non-digit then falls far below its top probability on a digit, and "not sure" separates the two.

Four kinds, each a function of the batch it joins (images float [B, 1, 28, 28] in [0, 1], light on black):
  letters  Latin letters printed in the DejaVu fonts that matplotlib ships (no download), each image turned,
           scaled and thickened anew
  shapes   polygons, stars, arrows and crosses, outlined or filled, turned and scaled anew
  strokes  three random curved strokes
  pieces   pieces of the batch's own digits: two different digits laid over each other, or one cut in four
           and put together wrongly
What passes for a digit is left out, since training a digit-like shape toward "none" would teach the model to doubt
real digits: the letters O o Q D (a 0), I i l J j T (a 1 or a 7), S s (a 5), Z z (a 2), B (an 8), b G (a 6), g q
(a 9); no ring and no lone bar among the shapes; never a single stroke.

The kinds reported on in docs/model-knows.md are made by other code (benchmarks/non_digit_kinds.py), with other
fonts and other drawing, which training never sees.
"""
import math
import os
import random

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from augment import resample, shift
from machinery.images import to_mnist
from machinery.robustness import blur
from utils import NOT_A_DIGIT

KINDS = ("letters", "shapes", "strokes", "pieces")
SHARE = 0.25  # non-digits added to each batch, as a share of its digits (32 to CompactNet's 128)
LETTERS = "ACEFHKMNPRUVWXYacdefhkmnprtuvwxy"  # A-Z and a-z without the digit-like ones named above
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf")
BANK_SHAPES = 400  # shapes drawn once per run, then turned and scaled anew each time one is used
CANVAS = 160  # pixels a side that letters and shapes are drawn at, before to_mnist brings them to 28x28


def kind_names(text):
    """The names in NON_DIGITS' text: "letters, shapes" -> ["letters", "shapes"]; "" -> [] (off).
    (settings.check_settings checks that each is one of KINDS.)"""
    return [name.strip() for name in text.split(",") if name.strip()]


def batch_adder(text):
    """For the loader (utils.MnistBatches): a function (images, labels) -> the batch with non-digits of the kinds
    `text` names added at its end, labelled NOT_A_DIGIT; None where `text` names none."""
    kinds = tuple(kind for kind in KINDS if kind in kind_names(text))
    if not kinds:
        return None
    return lambda images, labels: add_non_digits(images, labels, kinds)


def add_non_digits(images, labels, kinds, share=SHARE):
    """The batch with round(share * its size) non-digits (at least one) added at its end, split evenly among
    `kinds`, labelled NOT_A_DIGIT. Random numbers come from torch's generator on the batch's device, as the
    augmentation's do: the same seed makes the same batches."""
    count = max(1, round(share * len(labels)))
    sizes = [count // len(kinds) + (i < count % len(kinds)) for i in range(len(kinds))]
    made = [MAKERS[kind](images, labels, size) for kind, size in zip(kinds, sizes) if size]
    return (vary_brightness(torch.cat([vary_pen(images), *made])),
            torch.cat([labels, labels.new_full((count,), NOT_A_DIGIT)]))


def vary_brightness(images):
    """Half of the images, digits and non-digits alike, with their ink dimmed to 80-100%. Every MNIST digit's
    brightest pixel is exactly 1; without this, a model learns that an image whose brightest pixel is less (a
    turned letter's, resampled) is no digit, and then declines photos of real digits, which to_mnist's resizing
    leaves at 0.85-1."""
    dim = torch.empty(len(images), 1, 1, 1, device=images.device).uniform_(0.8, 1.0)
    return images * torch.where(torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5, dim, 1.0)


def vary_pen(digits):
    """A third of the digits drawn with a thicker pen (a 3x3 dilation) and a sixth with a soft one (blurred, sigma
    1 px, the brightest pixel brought back to 1). Without it, the model learns that a thick or soft stroke means
    "no digit" (some letters are bold, MNIST's digits seldom are) and declines real digits written or scanned so:
    63% of the UCI set's, against 20% before non-digits were trained on (docs/model-knows.md). Varied for the
    non-digits too, it cost them: a thin doodle then passed for a digit more often."""
    pick = torch.rand(len(digits), device=digits.device)
    thicker, softer = pick < 1 / 3, (pick >= 1 / 3) & (pick < 1 / 2)
    digits = digits.clone()
    digits[thicker] = F.max_pool2d(digits[thicker], 3, stride=1, padding=1)
    soft = blur(digits[softer], 1.0)
    digits[softer] = soft / soft.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return digits


# ---- letters and shapes: drawn once with PIL, then each use turned, scaled and thickened on the device ----

_banks = {}  # (kind, device) -> uint8 [N, 28, 28], made the first time a run asks


def _bank(kind, device):
    if (kind, device) not in _banks:
        drawings = letter_drawings() if kind == "letters" else shape_drawings()
        _banks[kind, device] = torch.stack([to_mnist(d) for d in drawings]).mul(255).round().to(torch.uint8).to(device)
    return _banks[kind, device]


def letter_drawings():
    """Every letter of LETTERS in every font of FONTS, black on white."""
    import matplotlib  # only for where its fonts are
    drawings = []
    for name in FONTS:
        font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), CANVAS // 2)
        for letter in LETTERS:
            image = Image.new("L", (CANVAS, CANVAS), 255)
            ImageDraw.Draw(image).text((CANVAS / 2, CANVAS / 2), letter, fill=0, font=font, anchor="mm")
            drawings.append(image)
    return drawings


def shape_drawings(count=BANK_SHAPES, seed=0):
    """`count` shapes, black on white: regular polygons of 3 to 6 sides, stars, arrows, plus and times signs,
    half-moons; outlined with a pen 6-18 px wide, or filled. The same every run (their own seeded generator)."""
    rng = random.Random(seed)
    drawings = []
    for _ in range(count):
        image = Image.new("L", (CANVAS, CANVAS), 255)
        draw = ImageDraw.Draw(image)
        c, r, width = CANVAS / 2, rng.uniform(45, 70), rng.randint(6, 18)
        turn = rng.uniform(0, 2 * math.pi)
        kind = rng.choice(["polygon", "star", "arrow", "plus", "times", "half-moon"])
        filled = rng.random() < 0.3 and kind in ("polygon", "star", "half-moon")
        if kind in ("polygon", "star"):
            sides = rng.randint(3, 6) if kind == "polygon" else rng.randint(5, 7)
            corners = sides if kind == "polygon" else 2 * sides
            reach = [1 if kind == "polygon" or k % 2 == 0 else 0.45 for k in range(corners)]  # a star's dips
            points = [(c + r * reach[k] * math.cos(turn + 2 * math.pi * k / corners),
                       c + r * reach[k] * math.sin(turn + 2 * math.pi * k / corners)) for k in range(corners)]
            draw.polygon(points, fill=0 if filled else None, outline=0, width=width)
        elif kind == "arrow":
            tip, tail = (c + r, c), (c - r, c)
            draw.line([tail, tip], fill=0, width=width)
            draw.line([(c + r * 0.4, c - r * 0.5), tip, (c + r * 0.4, c + r * 0.5)], fill=0, width=width, joint="curve")
        elif kind in ("plus", "times"):
            a = r if kind == "plus" else r * 0.7
            if kind == "plus":
                draw.line([(c - a, c), (c + a, c)], fill=0, width=width)
                draw.line([(c, c - a), (c, c + a)], fill=0, width=width)
            else:
                draw.line([(c - a, c - a), (c + a, c + a)], fill=0, width=width)
                draw.line([(c - a, c + a), (c + a, c - a)], fill=0, width=width)
        else:  # half a disc, or its outline: not a ring
            box = [c - r, c - r, c + r, c + r]
            start = rng.uniform(0, 360)
            if filled:
                draw.chord(box, start, start + 180, fill=0)
            else:
                draw.chord(box, start, start + 180, outline=0, width=width)
        drawings.append(image)
    return drawings


def _from_bank(kind):
    def make(images, labels, count):
        bank = _bank(kind, images.device)
        chosen = bank[torch.randint(len(bank), (count,), device=images.device)].unsqueeze(1).float().div_(255)
        varied = vary(chosen)  # brought back to a brightest pixel of 1, as every digit's, once resampled
        return varied / varied.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return make


def vary(drawings, largest_turn=30.0):
    """Each drawing turned by up to +-largest_turn degrees, scaled by 0.75-1.1 and moved by up to 2 px; nearest
    neighbour, as augment.rotate turns the digits, so that a soft, resampled edge tells no non-digit."""
    count, device = len(drawings), drawings.device
    angle = torch.deg2rad(torch.empty(count, device=device).uniform_(-largest_turn, largest_turn))
    size = torch.empty(count, device=device).uniform_(0.75, 1.1)
    moved = torch.empty(count, 2, device=device).uniform_(-2 / 14, 2 / 14)
    theta = drawings.new_zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) / size, -torch.sin(angle) / size
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) / size, torch.cos(angle) / size
    theta[:, :, 2] = moved
    return resample(drawings, theta, "nearest")


# ---- strokes and pieces of digits: made on the device, anew for every batch ----

def strokes(images, labels, count, samples=24):
    """Three quadratic Bezier curves, their ends and bends anywhere in the central 20x20 box, drawn with a pen
    1.8-4 px wide (with one or two, a curve too often makes a 1, a 2, a 7 or a 9): the distance of each pixel to
    the nearest of `samples` points along each curve."""
    device = images.device
    ends = torch.rand(count, 3, 3, 2, device=device) * 20 + 4  # [image, curve, start/bend/end, (x, y)] in px
    t = torch.linspace(0, 1, samples, device=device).view(1, 1, -1, 1)
    points = ((1 - t) ** 2 * ends[:, :, :1] + 2 * (1 - t) * t * ends[:, :, 1:2] + t ** 2 * ends[:, :, 2:])
    grid = torch.stack(torch.meshgrid(torch.arange(28.0, device=device), torch.arange(28.0, device=device),
                                      indexing="xy"), dim=-1).view(1, -1, 2) + 0.5
    distance = torch.cdist(grid.expand(count, -1, -1), points.reshape(count, -1, 2)).amin(dim=2)
    half_width = torch.empty(count, 1, device=device).uniform_(0.9, 2.0)
    return (half_width + 0.5 - distance).clamp_(0, 1).view(count, 1, 28, 28)


def pieces(images, labels, count):
    """Half of them: two of the batch's digits with different labels laid over each other, the second moved by
    5-8 px (less, and the larger one hides the other). The rest: one digit cut in four and put together wrongly,
    its top and bottom halves swapped, or its left and right, or both (within the 20x20 box that MNIST's digits
    fit, so the ink keeps its distance from the edge). Both keep MNIST's own strokes."""
    device = images.device
    overlays = count // 2
    picked = torch.randint(len(labels), (count,), device=device)
    partner = (picked + torch.randint(1, max(2, len(labels)), (count,), device=device)) % len(labels)
    partner = torch.where(labels[picked] == labels[partner], (partner + 1) % len(labels), partner)  # rarely the same
    offsets = torch.randint(5, 9, (count, 2), device=device) * (torch.randint(0, 2, (count, 2), device=device) * 2 - 1)
    laid = torch.maximum(images[picked[:overlays]], shift(images[partner[:overlays]], offsets[:overlays]))
    cut = images[picked[overlays:]].clone()
    box = cut[:, :, 4:24, 4:24]
    across = torch.rand(len(cut), device=device) < 2 / 3
    down = ~across | (torch.rand(len(cut), device=device) < 0.5)  # at least one of the two swaps
    box = torch.where(across.view(-1, 1, 1, 1), box.roll(10, dims=3), box)
    cut[:, :, 4:24, 4:24] = torch.where(down.view(-1, 1, 1, 1), box.roll(10, dims=2), box)
    return torch.cat([laid, cut])


MAKERS = {"letters": _from_bank("letters"), "shapes": _from_bank("shapes"), "strokes": strokes, "pieces": pieces}
