"""augment.py, the training augmentation: each kind against torchvision's own transform, and the random draws."""
import inspect
import re

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import augment
import main_mnist
from test_utils import smooth_digits

# The settings random_augment reads, as augment.py names them: a kind a learner adds is among them by itself.
KINDS = sorted(set(re.findall(r'settings\["(\w+)"\]', inspect.getsource(augment))))
# The block's settings with every kind of the original on, explicitly: whatever the block says of them.
EVERY_KIND_ON = {**main_mnist.SETTINGS, "ROTATION": 15.0, "CROP_P": 0.1, "CROP_SIZE": 22, "SHIFT": 2}


def torchvision_transforms(image, angle, crop, offset=(0, 0)):
    """The original's transforms (and a shift) with fixed parameters, on one uint8 [1, 28, 28] image, in the order
    a Compose of them applies: CenterCrop(22) if crop, Resize(28), the rotation, then the shift."""
    pil = Image.fromarray(image[0].numpy())
    if crop:
        pil = TF.center_crop(pil, 22)
    pil = TF.resize(pil, [28, 28])
    pil = TF.rotate(pil, angle, fill=0)
    pil = TF.affine(pil, angle=0, translate=list(offset), scale=1, shear=[0.0], fill=0)
    return TF.to_tensor(pil)


@pytest.mark.parametrize("angle", [-15.0, -7.5, 0.0, 4.0, 15.0])
@pytest.mark.parametrize("crop", [False, True])
def test_zoom_and_rotation_match_torchvisions_transforms(angle, crop):
    images = smooth_digits()
    expected = torch.stack([torchvision_transforms(image, angle, crop) for image in images])
    batch = len(images)
    ours = augment.rotate(augment.zoom(images.float() / 255, torch.full((batch,), crop), 22), torch.full((batch,), angle))
    difference = (ours - expected).abs()
    if crop:  # torchvision resizes in 8-bit fixed point and rounds to uint8 before rotating
        assert difference.mean() < 0.003 and torch.quantile(difference.flatten(), 0.99) < 0.03
    else:  # both are nearest-neighbour rotations about the centre: the same pixels, but for rare exact ties
        assert (difference > 1e-4).float().mean() < 0.002


@pytest.mark.parametrize("offset", [(0, 0), (2, 0), (0, -2), (-1, 2), (2, 2), (-2, -1)])
def test_shift_matches_torchvisions_affine_translation(offset):
    # docs/changing.md's worked example of adding an augmentation: a random shift of up to 2 pixels each way.
    images = smooth_digits()
    expected = torch.stack([torchvision_transforms(image, 0.0, False, offset) for image in images])
    ours = augment.shift(images.float() / 255, torch.tensor([offset] * len(images)))
    assert torch.equal(ours, expected)  # whole pixels: no interpolation at all, so exactly the same
    if offset == (2, 0):  # moved right: the two left columns come in empty
        assert ours[..., :2].max() == 0 and torch.equal(ours[..., 2:], images[..., :-2].float() / 255)


def test_random_augment_draws_each_images_parameters_from_the_settings(monkeypatch):
    drawn = {}
    monkeypatch.setattr(augment, "zoom", lambda images, crop, size: drawn.update(crop=crop, size=size) or images)
    monkeypatch.setattr(augment, "rotate", lambda images, angles: drawn.update(angles=angles) or images)
    monkeypatch.setattr(augment, "shift", lambda images, offsets: drawn.update(offsets=offsets) or images)
    torch.manual_seed(0)
    augment.random_augment(torch.zeros(20_000, 1, 28, 28), EVERY_KIND_ON)
    degrees = EVERY_KIND_ON["ROTATION"]
    assert -degrees <= drawn["angles"].min() < -0.99 * degrees and 0.99 * degrees < drawn["angles"].max() <= degrees
    assert abs(drawn["angles"].mean()) < 0.02 * degrees  # uniform, centred on 0
    assert abs(drawn["crop"].float().mean() - EVERY_KIND_ON["CROP_P"]) < 0.01 and drawn["size"] == 22
    assert drawn["offsets"].unique().tolist() == list(range(-EVERY_KIND_ON["SHIFT"], EVERY_KIND_ON["SHIFT"] + 1))


def test_a_zero_turns_an_augmentation_off_and_all_zeros_draw_nothing():
    images = smooth_digits().float() / 255
    off = {**EVERY_KIND_ON, **{name: 0 for name in KINDS if name != "CROP_SIZE"}}  # each kind's 0 turns it off
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert torch.equal(augment.random_augment(images, off), images)
    assert torch.equal(torch.get_rng_state(), before)
    only_shift = augment.random_augment(images, {**off, "SHIFT": 2})
    assert not torch.equal(only_shift, images)
    assert torch.equal(only_shift.sum(dim=(1, 2, 3)) > 0, images.sum(dim=(1, 2, 3)) > 0)


def test_the_blocks_augmentation_settings_are_the_ones_random_augment_reads():
    names = set(KINDS)
    assert {"ROTATION", "CROP_P", "CROP_SIZE", "SHIFT"} <= names <= set(main_mnist.SETTINGS)
    augment.random_augment(torch.zeros(4, 1, 28, 28), {name: main_mnist.SETTINGS[name] for name in names})
