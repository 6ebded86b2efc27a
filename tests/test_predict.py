"""predict.py as a user runs it on their own images: photos of digits, folders, things that are no digit, and files
that are no image at all; and images.to_mnist, which brings each to MNIST's format."""
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import model as model_py
import predict
from benchmarks.not_a_digit import photo_of  # the benchmark's photographed digits, read here too
from conftest import run_main
from machinery import runs
from machinery.evaluation import ink_depth
from machinery.images import levelled, to_mnist
from machinery.tools import load_model
from utils import UserError, load_mnist, normalize


def run_predict(capsys, *args):
    return run_main(capsys, *args, main=predict.main)


def test_mnist_digits_come_back_as_they_were(data_dir):
    images, _ = load_mnist(data_dir, train=False)
    converted = torch.stack([to_mnist(image.numpy().astype(np.float32) / 255) for image in images[:200]])
    assert (converted - images[:200].float() / 255).abs().mean() < 0.05


def test_photos_of_digits_read_as_the_model_reads_the_originals(data_dir, trained, tmp_path, capsys):
    images, _ = load_mnist(data_dir, train=False)
    rng = np.random.default_rng(0)
    for i, image in enumerate(images[:100]):
        photo_of(image, rng).convert("RGB").save(tmp_path / f"digit{i:03d}.png")  # as a phone saves it
    _, model, _ = load_model(os.path.join(trained, runs.FINAL_MODEL), torch.device("cpu"))
    with torch.inference_mode():
        own = model(normalize(images[:100].float().unsqueeze(1) / 255)).argmax(1).tolist()
    code, out, err = run_predict(capsys, tmp_path, "--model", os.path.join(trained, runs.FINAL_MODEL),
                                 "--out", tmp_path / "p.png")
    read = re.findall(r"digit(\d+)\.png: (\d|not sure|not a digit)[^\n]*   top 3: (\d) ", out)
    assert code == 0 and err == "" and len(read) == 100
    assert sum(int(top) == own[int(i)] for i, _, top in read) >= 95  # the likeliest digit
    assert sum(answer in ("not sure", "not a digit") for _, answer, _ in read) <= 5
    assert os.path.isfile(tmp_path / "p.png") and "(the first 20 images read)" in out


def test_a_photo_on_unevenly_lit_grainy_paper_comes_to_the_digit_a_clean_one_does(data_dir):
    images, _ = load_mnist(data_dir, train=False)
    differences = [float((to_mnist(photo_of(image, np.random.default_rng(i), grain=12, slope=50))  # the benchmark's
                          - to_mnist(photo_of(image, np.random.default_rng(i), grain=0))).abs().mean())
                   for i, image in enumerate(images[:20])]
    assert np.mean(differences) < 0.05  # 0.029 here; 0.083 when the grain's brightest speck set the ink and the crop


@pytest.mark.parametrize("lighting", ["from one side", "darker at the corners"])
def test_a_photo_of_a_blank_page_in_uneven_light_is_blank_and_of_a_digit_on_it_the_digit(data_dir, lighting):
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(-0.5, 0.5, 200), np.linspace(-0.5, 0.5, 160))  # photo_of's page
    shade = 60 * x if lighting == "from one side" else -60 * (x ** 2 + y ** 2) * 2  # 60 grey levels edge to edge
    page = (200 + shade + rng.normal(0, 5, x.shape)).clip(0, 255)
    with pytest.raises(UserError, match="is blank"):  # a bright band of paper was read as an 8 at 100%
        to_mnist(Image.fromarray(np.uint8(page)))
    images, _ = load_mnist(data_dir, train=False)
    photo = np.asarray(photo_of(images[0], rng, grain=0), dtype=np.float64)  # a clean photo of it, then the light
    lit = to_mnist(Image.fromarray(np.uint8((photo + shade + rng.normal(0, 5, x.shape)).clip(0, 255))))
    assert float((lit - to_mnist(Image.fromarray(np.uint8(photo)))).abs().mean()) < 0.05


@pytest.mark.parametrize("paper, size", [(110, 84), (220, 16)])  # in dim light; small, its edges lit unevenly
def test_a_digit_photographed_dimly_or_small_in_light_from_one_side_comes_to_the_clean_one(data_dir, paper, size):
    images, _ = load_mnist(data_dir, train=False)
    digit = np.asarray(Image.fromarray(images[0].numpy()).resize((size, size), Image.BICUBIC), dtype=np.float64)
    clean = np.full((size + 4, size + 4), float(paper))
    clean[2:-2, 2:-2] -= 100 * digit / 255  # dark ink, 100 grey levels below the paper
    shade = np.linspace(-30, 30, size + 4)[None] + np.random.default_rng(0).normal(0, 2, clean.shape)
    photo = to_mnist(Image.fromarray(np.uint8((clean + shade).clip(0, 255))))  # was blank, in both
    assert float((photo - to_mnist(Image.fromarray(np.uint8(clean)))).abs().mean()) < 0.05


def test_a_clean_blurred_digit_is_read_as_it_is(data_dir):
    images, _ = load_mnist(data_dir, train=False)  # as UCI's 8x8 digits are drawn at 64x64: a wide blurred edge
    blurred = Image.fromarray(images[0].numpy()).resize((8, 8), Image.BILINEAR).resize((64, 64), Image.BILINEAR)
    pixels = np.asarray(blurred, dtype=np.float32) / 255
    assert levelled(pixels, 0.0, float(pixels.max())) is pixels  # no light to take away


@pytest.mark.parametrize("ink", ["black", "white", "a page"])  # white: as a canvas exports MNIST's own shades
def test_a_seven_drawn_on_a_clear_page_comes_to_the_one_drawn_on_paper(ink):
    seven = [(20, 20), (80, 20), (40, 90)]
    clear, paper = Image.new("RGBA", (100, 100), (0, 0, 0, 0)), Image.new("L", (100, 100), 255)
    ImageDraw.Draw(paper).line(seven, fill=0, width=8)
    if ink == "a page":  # the page itself on a clear margin, as a screenshot's shadow or a cut-out
        clear = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
        clear.paste(paper.convert("RGBA"), (30, 30))
    else:
        ImageDraw.Draw(clear).line(seven, fill=ink, width=8)
    assert float((to_mnist(clear) - to_mnist(paper)).abs().max()) < 0.01


def test_the_newest_finished_run_is_the_default_model(trained, tmp_path, capsys, monkeypatch):
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    monkeypatch.setattr(predict.newest_model, "__defaults__", (os.path.dirname(trained),))
    code, out, err = run_predict(capsys, tmp_path / "blank.png", "--out", tmp_path / "p.png")
    assert f"from {os.path.join(trained, runs.FINAL_MODEL)}" in out and "is blank" in err and code == 1


def test_a_drawing_of_no_digit_is_declined(trained, tmp_path, capsys):
    image = Image.new("L", (200, 200), 255)
    draw = ImageDraw.Draw(image)
    draw.rectangle([30, 30, 170, 170], outline=0, width=12)  # a square
    draw.line([(30, 30), (170, 170)], fill=0, width=12)
    draw.line([(30, 170), (170, 30)], fill=0, width=12)
    image.save(tmp_path / "box.png")
    code, out, err = run_predict(capsys, tmp_path / "box.png", "--model", trained,  # the run folder: its model.pt
                                 "--out", tmp_path / "p.png")
    assert code == 0 and re.search(r"box.png: not a digit   top 3: \d", out)
    code, out, err = run_predict(capsys, tmp_path / "box.png", "--model", os.path.join(trained, runs.CHECKPOINT),
                                 "--out", tmp_path / "p.png")
    assert code == 0 and f"--model {os.path.join(trained, runs.FINAL_MODEL)} answers with it" in out  # the calibration


def test_a_filled_oval_is_declined_as_thicker_than_any_training_digit(data_dir, trained, tmp_path, capsys):
    image = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(image).ellipse([50, 20, 150, 180], fill=0)  # at the features, a 0
    image.save(tmp_path / "oval.png")
    code, out, err = run_predict(capsys, tmp_path / "oval.png", "--model", trained, "--out", tmp_path / "p.png")
    assert code == 0 and re.search(r"oval.png: not a digit \(its ink is thicker than any digit's.*\)   top 3: \d", out)
    thickest = load_model(trained, torch.device("cpu"))[2]["thickest"]
    digits = load_mnist(data_dir, train=False)[0]
    assert ink_depth(to_mnist(Image.open(tmp_path / "oval.png"))[None]) > thickest
    assert float((ink_depth(digits) > thickest).double().mean()) < 0.001  # test digits that thick: none of 10,000 here


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b"not an image"), "not an image PIL can read"),
    (lambda p: p.write_bytes(open(os.devnull, "rb").read()), "not an image PIL can read"),
    (lambda p: os.mkfifo(p), "not a file of ours"),
    (lambda p: Image.new("1", (9000, 9000)).save(p), "over 65 megapixels"),
    (lambda p: Image.new("L", (5, 5)).save(p), "too small to hold a digit")])
def test_a_file_that_is_no_readable_image_is_one_line_and_the_others_are_still_read(trained, tmp_path, capsys, make,
                                                                                      words):
    bad = tmp_path / "bad\x1b[31m.png"  # a terminal escape in its name is shown, never sent to the terminal
    make(bad)
    Image.new("L", (60, 60), 255).save(tmp_path / "blank.png")
    code, out, err = run_predict(capsys, bad, "--model", os.path.join(trained, runs.FINAL_MODEL), "--out",
                                 tmp_path / "p.png")
    assert code == 1 and words in err and "\x1b" not in err and "bad\\x1b[31m.png" in err and " at 0x" not in err
    assert "blank.png" not in out and len(err.strip().splitlines()) == 1


def test_out_never_replaces_an_image_read_nor_a_folder(trained, tmp_path, capsys):
    Image.new("L", (60, 60), 255).save(tmp_path / "seven.png")
    for out, words in [(tmp_path / "seven.png", "is one of the images read"), (tmp_path, "end it in one of"),
                       (tmp_path / "p.txt", "end it in one of"), (tmp_path / "no" / "p.png", "there is no folder")]:
        code, _, err = run_predict(capsys, tmp_path / "seven.png", "--out", out)
        assert code == 1 and words in err


def test_a_model_with_weights_that_are_not_numbers_is_one_line(trained, tmp_path, capsys):
    weights = torch.load(os.path.join(trained, runs.FINAL_MODEL), weights_only=True)
    weights["fc2.bias"][0] = float("nan")
    torch.save(weights, tmp_path / "model.pt")
    Image.new("L", (60, 60), 255).save(tmp_path / "x.png")
    code, out, err = run_predict(capsys, tmp_path / "x.png", "--model", tmp_path / "model.pt")
    assert code == 1 and "fc2.bias is not all numbers" in err


def test_a_run_whose_model_changed_in_model_py_since_is_named_so(trained, tmp_path, monkeypatch):
    for name in (runs.FINAL_MODEL, runs.RECORD):
        shutil.copy(os.path.join(trained, name), tmp_path)
    monkeypatch.setitem(model_py.MODELS, "FastNet", model_py.CompactNet)  # as if a learner rewrote FastNet's layers
    with pytest.raises(UserError, match=r"holds a FastNet that model.py's FastNet no longer takes \(Missing key"):
        load_model(str(tmp_path), torch.device("cpu"))


def test_a_folder_without_images_says_so(tmp_path, trained, capsys):
    os.mkdir(tmp_path / "empty")
    code, out, err = run_predict(capsys, tmp_path / "empty", "--model", os.path.join(trained, runs.FINAL_MODEL))
    assert code == 1 and "a folder with no image files in it" in err


def test_only_the_images_drawn_are_kept_in_memory(trained, tmp_path, capsys, monkeypatch):
    one = Image.new("L", (60, 60), 0)
    ImageDraw.Draw(one).line([(30, 10), (30, 50)], fill=255, width=6)
    for i in range(5):
        one.save(tmp_path / f"{i}.png")
    drawn = []
    monkeypatch.setattr(predict, "MAX_SHOWN", 2)
    monkeypatch.setattr(predict, "plot_predictions", lambda *args: drawn.append(args))
    monkeypatch.setattr(runs, "save_figure", lambda figure, path: None)
    code, out, err = run_predict(capsys, tmp_path, "--model", os.path.join(trained, runs.FINAL_MODEL))
    assert code == 0 and len(out.strip().splitlines()) == 1 + 5 + 1 and len(drawn[0][0]) == 2


def test_to_mnist_refuses_a_blank_image_and_inverts_light_paper():
    with pytest.raises(UserError, match="is blank"):
        to_mnist(Image.new("L", (40, 40), 200))
    ink = Image.new("L", (40, 40), 255)
    ImageDraw.Draw(ink).line([(20, 5), (20, 35)], fill=0, width=4)
    digit = to_mnist(ink)
    assert digit.shape == (28, 28) and float(digit.max()) == 1.0 and float(digit[0].max()) == 0.0
