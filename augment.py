"""The training augmentation: each kind a small function of a batch on the device, and random_augment(), which
draws every image's parameters from the settings in main_mnist.py's block and applies them in order.

To add one: write a function of the batch below, add its setting to the block of main_mnist.py (it gets a flag,
a line in run.json and a column in --compare by itself), and give it two lines in random_augment(): one that
draws its parameters, one that applies them. docs/changing.md walks through SHIFT, added this way.
"""
import torch
import torch.nn.functional as F


def resample(images, theta, mode):
    """images [B, 1, H, W] sampled through the affine maps theta [B, 2, 3] (output to input coordinates, both in
    [-1, 1], about the centre), with zeros outside, as torchvision's affine transforms fill."""
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def zoom(images, crop, crop_size):
    """CenterCrop(crop_size) then Resize back (bilinear) on the images whose `crop` [B] is set: a zoom by
    size / crop_size about the centre. The others pass unchanged, and are not resampled at all: with CROP_P 0.1,
    nine images in ten."""
    zoomed = images[crop]
    if len(zoomed) == 0:  # (affine_grid refuses an empty batch)
        return images
    theta = zoomed.new_zeros(zoomed.shape[0], 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = crop_size / images.shape[-1]
    images = images.clone()
    images[crop] = resample(zoomed, theta, "bilinear")
    return images


def rotate(images, angles):
    """Each image rotated about its centre by its angle in `angles` [B] (degrees, counter-clockwise as PIL's),
    nearest neighbour, the corners filled with 0: torchvision's RandomRotation."""
    radians = torch.deg2rad(angles.to(images.dtype))
    cos, sin = torch.cos(radians), torch.sin(radians)
    theta = images.new_zeros(images.shape[0], 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return resample(images, theta, "nearest")


def shift(images, offsets):
    """Each image moved by whole pixels, offsets [B, 2] = (right, down), zeros coming in at the edges:
    torchvision's affine(translate=...) with whole-pixel translations, as RandomAffine draws them."""
    height, width = images.shape[-2:]
    theta = images.new_zeros(images.shape[0], 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * offsets[:, 0].to(images.dtype) / width  # a pixel is 2/width of the [-1, 1] span
    theta[:, 1, 2] = -2 * offsets[:, 1].to(images.dtype) / height
    return resample(images, theta, "nearest")


def random_augment(images, settings):
    """The training augmentation of a batch, images float [B, 1, H, W] in [0, 1], each image with parameters of
    its own. settings: the run's settings (main_mnist.py's block): ROTATION, CROP_P, CROP_SIZE and SHIFT; a 0
    turns that augmentation off.

    The draws come first, in a fixed order (the original's angles, then its crops), then the transforms, in
    torchvision's order: the same seed gives the same batches as before SHIFT was added."""
    batch, device = images.shape[0], images.device
    if settings["ROTATION"]:
        angles = torch.empty(batch, device=device).uniform_(-settings["ROTATION"], settings["ROTATION"])
    if settings["CROP_P"]:
        crop = torch.rand(batch, device=device) < settings["CROP_P"]
    if settings["SHIFT"]:
        offsets = torch.randint(-settings["SHIFT"], settings["SHIFT"] + 1, (batch, 2), device=device)

    if settings["CROP_P"]:
        images = zoom(images, crop, settings["CROP_SIZE"])
    if settings["ROTATION"]:
        images = rotate(images, angles)
    if settings["SHIFT"]:
        images = shift(images, offsets)
    return images
