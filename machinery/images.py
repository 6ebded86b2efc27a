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


def open_image(source, name, max_pixels=MAX_PIXELS):
    """A PIL image from a path or a binary file, decoded whole and turned upright (a phone's EXIF note); UserError
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
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except Exception as error:  # PIL says an unreadable file in a dozen ways
        text = re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error))  # not the address of PIL's file object
        raise UserError(f"{name}: not an image PIL can read ({type(error).__name__}: {text})"[:300]) from None


def grey(image):
    """A float32 array in [0, 1] (0 black) of a PIL image; transparency is laid over white paper."""
    if image.mode in ("I", "I;16", "F"):  # no fixed white: scaled by the image's own range
        pixels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(pixels).all():
            raise UserError("the image has NaN or infinite pixels: save it as an 8-bit image")
        return ((pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-12)).astype(np.float32)
    if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float32) / 255


def to_mnist(image, name="the image"):
    """The 28x28 float tensor in [0, 1], light ink on black, that the model sees of a PIL image or a grey array;
    UserError if it is too small or blank."""
    pixels = image.astype(np.float32) if isinstance(image, np.ndarray) else grey(image)
    if min(pixels.shape) < 8:
        raise UserError(f"{name} is {pixels.shape[1]}x{pixels.shape[0]} pixels: too small to hold a digit")
    paper = float(np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])))
    if paper > 0.5:  # light paper: inverted, as MNIST's ink is light on black
        pixels, paper = 1 - pixels, 1 - paper
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
