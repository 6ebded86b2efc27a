"""The training augmentation, done on the device a batch at a time: random_augment() draws each image's parameters
from the run's settings, then moves the images.

To add a kind: give it a setting in the block of main_mnist.py (0: off), a draw and a transform in random_augment(),
and, if it moves pixels, a matrix for affine(). docs/changing.md walks through SHIFT, added this way.
"""
import torch
import torch.nn.functional as F


def affine(images, matrix, offset=None, mode="bilinear"):
    """images [B, 1, H, W] resampled through per-image maps from output to input coordinates (both in [-1, 1] about
    the centre): matrix [B, 2, 2], offset [B, 2]. Zeros come in at the edges, as torchvision's transforms fill."""
    offset = matrix.new_zeros(len(matrix), 2) if offset is None else offset
    grid = F.affine_grid(torch.cat([matrix, offset.unsqueeze(2)], dim=2), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def scaling(images, span):
    """The matrices that stretch the middle `span` of each image (a share, or one per image) over all of it: a zoom
    by 1 / span about the centre."""
    span = torch.as_tensor(span, dtype=images.dtype, device=images.device).expand(len(images))
    return torch.diag_embed(span.unsqueeze(1).expand(-1, 2))


def rotate(images, degrees):
    """Each image turned counter-clockwise (as PIL turns) by its angle in `degrees` [B], nearest neighbour:
    torchvision's RandomRotation."""
    radians = torch.deg2rad(degrees.to(images.dtype))
    cos, sin = torch.cos(radians), torch.sin(radians)
    return affine(images, torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1), mode="nearest")


def shift(images, offsets):
    """Each image moved by whole pixels, offsets [B, 2] = (right, down): RandomAffine's translations."""
    return affine(images, scaling(images, 1), -2 * offsets.to(images.dtype) / images.shape[-1], mode="nearest")


def random_augment(images, settings):
    """The augmentation of a batch, images float [B, 1, 28, 28] in [0, 1]: a zoom of CROP_P of them by
    28 / CROP_SIZE (the original's CenterCrop and Resize), a turn within +-ROTATION degrees, a move of up to SHIFT
    pixels. Every draw comes before any transform, so that adding one leaves the others' draws as they were."""
    batch, device = len(images), images.device
    if settings["ROTATION"]:
        angles = torch.empty(batch, device=device).uniform_(-settings["ROTATION"], settings["ROTATION"])
    if settings["CROP_P"]:
        crop = torch.rand(batch, device=device) < settings["CROP_P"]
    if settings["SHIFT"]:
        offsets = torch.randint(-settings["SHIFT"], settings["SHIFT"] + 1, (batch, 2), device=device)

    if settings["CROP_P"] and crop.any():
        images = images.clone()
        zoomed = images[crop]
        images[crop] = affine(zoomed, scaling(zoomed, settings["CROP_SIZE"] / images.shape[-1]))
    if settings["ROTATION"]:
        images = rotate(images, angles)
    if settings["SHIFT"]:
        images = shift(images, offsets)
    return images
