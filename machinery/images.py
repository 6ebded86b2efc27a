"""Any image as an MNIST digit, the way MNIST's own were made (LeCun et al.): grey, light ink on black, cropped to
the ink, fitted to a 20x20 box and centred by its mass in 28x28. What predict.py and app.py read images through.
"""
import re
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from utils import UserError

MAX_PIXELS = 65_000_000  # a phone's 64-megapixel photo is read whole; a small file can claim far more (a 714 KB
                         # PNG of 13,300 x 13,300 took 9 GB), so the header is checked before anything is decoded
DIGIT_BOX, MASS_CENTRE = 20, 14.0  # MNIST's digits fit 20x20, their centre of mass near (14, 14) (measured)
INK_LEVEL = 0.25  # of the ink's range above the paper: fainter pixels are paper, shadow or noise
MIN_CONTRAST = 0.1  # the darkest ink stands at least this far (0-1) from the paper, or the image is blank
NOISE = 0.015  # a photo's sensor noise is averaged down to about this (0-1) before the ink is told from the paper
PAPER = 0.05  # paper lies within this of the light fitted to it (the grain averaged), a digit's blurred edge beyond


def open_image(source, name, max_pixels=MAX_PIXELS):
    """A PIL image from a binary file, decoded whole and turned upright (a phone's EXIF note); UserError
    naming it (`name`) if it is not an image, is damaged or has more than `max_pixels` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
            if image.width * image.height > max_pixels:
                raise UserError(f"{name} is {image.width}x{image.height} pixels, over {max_pixels / 1e6:g} megapixels: "
                                f"scale it down (the model reads 28x28)")
            image.load()
            return ImageOps.exif_transpose(image)
    except UserError:
        raise
    except Exception as error:  # PIL says an unreadable file in a dozen ways
        text = re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error))  # not the address of PIL's file object
        raise UserError(f"{name}: not an image PIL can read ({type(error).__name__}: {text})"[:300]) from None


def grey(image):
    """A float32 array in [0, 1] (0 black) of a PIL image. What is clear is laid on paper: where all that is opaque
    is of one shade, it is the ink, and the paper the other (white ink, as a canvas exports MNIST's, on black); where
    it is a page and its ink (a clear margin, rounded corners), the paper is the page's shade."""
    if image.mode in ("I", "I;16", "F"):  # no fixed white: scaled by the image's own range
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise UserError("the image has NaN or infinite pixels: save it as an 8-bit image")
        return ((pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-12)).astype(np.float32)
    if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
        image = image.convert("RGBA")
        opaque = np.asarray(image.convert("L"))[np.asarray(image.getchannel("A")) > 127]
        lit = float((opaque > 127).mean()) if opaque.size else 0.0
        paper = "black" if lit > 0.99 or 0.01 <= lit < 0.5 else "white"
        image = Image.alpha_composite(Image.new("RGBA", image.size, paper), image)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255


def levelled(pixels, paper, span):
    """The pixels with the light that falls unevenly on the paper (from one side, darker at the corners) taken away,
    the paper at its level: a quadratic surface, fitted to the pixels near the paper's level, then again to those
    near the last fit until it settles, so that the ink is left out (light of 160 grey levels across a page, burnt
    out to white at one side, within ten fits). The pixels themselves where the surface stays within span / 8 of
    the paper: a clean image is read as it is."""
    height, width = pixels.shape
    y, x = (np.linspace(-0.5, 0.5, n, dtype=np.float32) for n in (height, width))
    y, x = y[:, None], x[None]
    terms = lambda y, x: [np.ones((1, 1), np.float32), x, x * x, y, y * y, x * y]  # of a column y and a row x,
    # summed row and column first: a 12-megapixel surface in 97 ms, not 180-220
    step = max(1, round((height * width / 10_000) ** 0.5))  # fitted on every step-th pixel: a smooth surface
    sampled = np.stack([t.ravel() for t in np.broadcast_arrays(*terms(y[::step], x[:, ::step]))], axis=1)
    values, fitted = pixels[::step, ::step].ravel(), paper
    for _ in range(10):  # until the fit moves by under 0.005, about a grey level
        near = np.abs(values - fitted) <= min(span / 4, PAPER)
        if near.sum() < sampled.shape[1]:
            return pixels
        coefficients = np.linalg.lstsq(sampled[near], values[near], rcond=None)[0]
        last, fitted = fitted, sampled @ coefficients
        if np.abs(fitted - last).max() < 0.005:
            break
    if np.abs(fitted - paper).max() <= span / 8:
        return pixels
    return pixels - (sum(c * t for c, t in zip(coefficients, terms(y, x))) - paper).astype(np.float32)


def to_mnist(image, name="the image"):
    """The 28x28 float tensor in [0, 1], light ink on black, that the model sees of a PIL image or a grey array in
    [0, 1]; UserError if it is too small or blank. A photo's grain is averaged out and light that falls unevenly
    levelled first, where they would reach the ink's level; a clean image is read as it is."""
    pixels = image.astype(np.float32) if isinstance(image, np.ndarray) else grey(image)
    if min(pixels.shape) < 8:
        raise UserError(f"{name} is {pixels.shape[1]}x{pixels.shape[0]} pixels: too small to hold a digit")
    edges = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    paper = float(np.median(edges))
    box = min(2 * round(1.4826 * np.median(np.abs(edges - paper)) / NOISE / 2) + 1, 9,  # the edges' spread
              min(pixels.shape) // 16 | 1)  # a small photo's strokes are a few pixels wide, its edges lit unevenly
    if box > 1:  # the mean of box x box pixels: noise shrinks box-fold, and strokes wider than that stay
        pixels = F.avg_pool2d(torch.from_numpy(pixels)[None, None], box, 1, box // 2, count_include_pad=False)
        pixels = pixels[0, 0].numpy()
    pixels = levelled(pixels, paper, max(float(pixels.max()) - paper, paper - float(pixels.min())))
    if paper > 0.5 or paper - pixels.min() > pixels.max() - paper:  # light paper (a glare on it is no ink), or ink
        pixels, paper = 1 - pixels, 1 - paper  # darker than the paper of a dim photo: inverted, as MNIST's is light
    ink = float(pixels.max())
    if ink - paper < MIN_CONTRAST:
        raise UserError(f"{name} is blank: nothing in it stands out from its background")
    low = paper + INK_LEVEL * (ink - paper)  # a faint pencil is stretched to full ink, as MNIST's strongest is 1
    pixels = np.clip((pixels - low) / (ink - low), 0, 1)
    rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    pixels = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    scale = DIGIT_BOX / max(pixels.shape)
    size = (max(1, round(pixels.shape[0] * scale)), max(1, round(pixels.shape[1] * scale)))
    digit = F.interpolate(torch.from_numpy(np.ascontiguousarray(pixels))[None, None], size=size, mode="bilinear",
                          antialias=True, align_corners=False)[0, 0].clamp(0, 1)
    mass = digit.sum()  # whole-pixel shift to the centre of mass, kept inside the frame
    top = min(max(round(MASS_CENTRE - float((digit.sum(1) * torch.arange(size[0])).sum() / mass)), 0), 28 - size[0])
    left = min(max(round(MASS_CENTRE - float((digit.sum(0) * torch.arange(size[1])).sum() / mass)), 0), 28 - size[1])
    canvas = torch.zeros(28, 28)
    canvas[top:top + size[0], left:left + size[1]] = digit
    return canvas
