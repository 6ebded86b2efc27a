"""Any image as an MNIST digit (to_mnist), the way MNIST's own digits were made: what predict.py and app.py read
photos, scans and drawings through.

The digit is scaled to fit a 20x20 box, keeping its aspect ratio (antialiased, hence grey edges), then placed in
28x28 by its centre of mass (LeCun et al.). A photo and a drawing get the same treatment.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from machinery.errors import UserError
from utils import normalize

DIGIT_BOX = 20  # MNIST's digits fit a 20x20 box: every one of the 60,000 training digits does


MASS_CENTRE = 14.0  # where MNIST's centre of mass sits (row and column), measured on the training set; not 13.5


INK_LEVEL = 0.25  # of the ink's range above the background: fainter pixels are paper, shadow or noise


SMALLEST_SIDE = 8  # fewer pixels than this across or down can hold no digit: a 2x1 image is refused, not read as one


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
    if min(pixels.shape) < SMALLEST_SIDE:
        raise UserError(f"{name} is {pixels.shape[1]}x{pixels.shape[0]} pixels: too small to hold a digit (at least "
                        f"{SMALLEST_SIDE} pixels a side)")
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
    return normalize(digits).reshape(-1, 1, 28, 28)
