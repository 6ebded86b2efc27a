"""to_mnist, which brings any image to MNIST's format, and predict.py, which reads digits from image files."""
import json
import os
import re
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import main_mnist
import predict
from machinery import records, runs
from conftest import assert_png
from machinery.images import mnist_batch, to_mnist
from main_mnist import OUT_DIR
from model import CompactNet
from machinery.errors import UserError
from utils import load_mnist


def mass_centre(digit):
    rows, cols = torch.arange(28.0), torch.arange(28.0)
    mass = digit.sum()
    return float((digit.sum(1) * rows).sum() / mass), float((digit.sum(0) * cols).sum() / mass)


def ink_box(digit):
    """(height, width) of the rows and columns that hold any ink."""
    return int((digit > 0).any(1).sum()), int((digit > 0).any(0).sum())


def seven_on_paper(size=(400, 300), paper=230, ink=20):
    """A large 7, dark on light paper, far off the image's centre (top right), as a photo of one might be."""
    image = Image.new("L", size, paper)
    ImageDraw.Draw(image).line([(250, 20), (380, 20), (300, 280)], fill=ink, width=16)
    return image


def run_predict(capsys, *argv):
    """predict.main in this process: (exit code, or the message sys.exit was given; stdout; stderr)."""
    try:
        code = predict.main([str(arg) for arg in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def test_dark_digit_on_light_paper_comes_out_as_mnist_draws_it():
    digit = to_mnist(seven_on_paper())
    assert digit.shape == (28, 28) and digit.dtype == torch.float32
    # Light ink on black, its brightest pixel white, as MNIST's digits are
    assert digit[0].max() == digit[-1].max() == digit[:, 0].max() == digit[:, -1].max() == 0
    assert digit.max() > 0.9
    # Scaled to fit the 20x20 box, keeping its aspect ratio: the 7 is taller than wide, so 20 rows high
    height, width = ink_box(digit)
    assert height == 20 and 10 <= width < 20
    # Centred by mass where MNIST's digits have theirs, to the half pixel a whole-pixel shift allows
    row, col = mass_centre(digit)
    assert abs(row - 14) <= 0.5 and abs(col - 14) <= 0.5


def test_transparent_background_counts_as_light_paper():
    # A drawing exported with a transparent background: its invisible pixels are black (0, 0, 0, 0)
    rgba = Image.new("RGBA", (200, 160), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).line([(100, 10), (100, 150)], fill=(0, 0, 0, 255), width=10)
    grey = Image.new("L", (200, 160), 255)
    ImageDraw.Draw(grey).line([(100, 10), (100, 150)], fill=0, width=10)
    expected = to_mnist(grey)
    assert torch.allclose(to_mnist(rgba), expected)
    assert torch.allclose(to_mnist(np.asarray(rgba)), expected)  # the array the drawing pad sends
    assert ink_box(expected)[0] == 20


@pytest.mark.parametrize("pixels", [
    np.full((40, 50), 255, np.uint8),  # white paper
    np.full((40, 50, 3), 0.5, np.float32),  # grey
    np.zeros((40, 50, 4), np.uint8),  # fully transparent
    (250 - 8 * np.random.default_rng(0).random((40, 50))).astype(np.uint8),  # paper with faint grain
], ids=["white", "grey", "transparent", "faint-noise"])
def test_an_image_without_ink_is_blank(pixels):
    with pytest.raises(UserError, match=r"^empty\.png is blank"):
        to_mnist(pixels, name="empty.png")


def test_mnist_digits_come_back_as_they_were(real_data_dir):
    """MNIST's own digits are already in MNIST's format: the conversion changes them only by resampling."""
    images, _ = load_mnist(real_data_dir, train=False)
    originals = images[:200].float() / 255
    converted = torch.stack([to_mnist(image.numpy()) for image in images[:200]])
    assert (converted - originals).abs().mean() < 0.05


def photo_of(digit, rng):
    """A MNIST digit as a user's photo of it: dark ink on light paper, 3x larger, off-centre in a bigger image,
    with some sensor noise."""
    ink = digit.numpy() / 255
    enlarged = Image.fromarray(np.uint8(225 - 185 * ink)).resize((84, 84), Image.BICUBIC)
    canvas = Image.new("L", (200, 160), 225)
    canvas.paste(enlarged, (int(rng.integers(0, 116)), int(rng.integers(0, 76))))
    noisy = np.asarray(canvas) + rng.normal(0, 3, (160, 200))
    return Image.fromarray(np.uint8(noisy.clip(0, 255))).convert("RGB")


def test_predict_reads_photos_of_digits_as_the_model_reads_the_originals(real_data_dir, trained_model, tmp_path,
                                                                           capsys):
    images, _ = load_mnist(real_data_dir, train=False)
    images = images[:200]
    rng = np.random.default_rng(0)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"digit{i:03d}.png"))
        photo_of(image, rng).save(paths[-1])
    _, model = records.load_model(trained_model, "cpu")
    with torch.inference_mode():
        own_answers = model(mnist_batch(images.float() / 255)).argmax(1).tolist()

    code, out, err = run_predict(capsys, *paths, "--checkpoint", trained_model, "--out", tmp_path / "p.png")
    assert code == 0 and err == ""
    answers = dict(re.findall(r"^(\S+): (?:\d|not sure|not a digit)   top 3: (\d) ", out,  # the likeliest
                              re.MULTILINE))
    assert len(answers) == 200
    agree = sum(int(answers[path]) == own for path, own in zip(paths, own_answers))
    assert agree >= 190, f"only {agree} of 200 photos read as their originals"
    assert os.path.isfile(tmp_path / "p.png") and "the first 20 of 200 images" in out


def test_each_bad_image_is_named_on_one_line_and_the_others_still_read(trained_model, tmp_path, capsys):
    seven_on_paper().save(tmp_path / "seven.png")
    (tmp_path / "notes.png").write_text("not an image at all")
    Image.new("L", (60, 60), 255).save(tmp_path / "white.png")
    names = ["missing.png", "notes.png", "seven.png", "white.png"]
    code, out, err = run_predict(capsys, *[tmp_path / name for name in names], "--checkpoint", trained_model,
                                 "--out", tmp_path / "p.png")
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "missing.png: no such file" in lines[0]
    assert "notes.png: not an image" in lines[1]
    assert "white.png is blank" in lines[2]
    assert re.search(r"seven\.png: 7   top 3: 7 \d+\.\d%  \d \d+\.\d%  \d \d+\.\d%\n", out)
    assert os.path.isfile(tmp_path / "p.png")


def float_tiff(path, bad_value):
    """The 7 on paper as a 32-bit float TIFF (PIL's mode 'F', as scientific cameras and image tools save), with one
    pixel NaN or infinite."""
    pixels = np.asarray(seven_on_paper(), np.float32) / 255
    pixels[5, 5] = bad_value
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == "F"


def test_a_float_tiff_with_nan_or_infinite_pixels_is_named_and_the_others_still_read(trained_model, tmp_path,
                                                                                      capsys):
    seven_on_paper().save(tmp_path / "good.png")
    float_tiff(tmp_path / "nan.tif", np.nan)
    float_tiff(tmp_path / "inf.tif", np.inf)
    seven_on_paper().convert("CMYK").save(tmp_path / "cmyk.jpg")
    names = ["good.png", "nan.tif", "inf.tif", "cmyk.jpg"]
    code, out, err = run_predict(capsys, *[tmp_path / name for name in names], "--checkpoint", trained_model,
                                 "--out", tmp_path / "p.png")
    assert code == 1
    assert err.splitlines() == [
        f"error: {tmp_path / name} has NaN or infinite pixel values: only finite ones can be read as shades of grey "
        f"(save it as an 8-bit image)" for name in ("nan.tif", "inf.tif")]
    assert re.search(r"good\.png: 7   top 3: ", out) and re.search(r"cmyk\.jpg: 7   top 3: ", out)
    assert os.path.isfile(tmp_path / "p.png")


def huge_png(path, width, height):
    """A white 1-bit PNG of width x height pixels, written row by row: a few KB on disk however large, as a
    hostile or careless file can be (PIL would decode 13,300 x 13,300 of them into 9 GB)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    row = b"\0" + b"\xff" * ((width + 7) // 8)  # filter type 0, then 8 pixels a byte
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))


OVER_THE_LIMIT = (f"over the limit of {predict.MAX_PIXELS / 1e6:g} megapixels: scale it down (the model reads digits "
                  f"at 28x28)")


@pytest.mark.filterwarnings("error")  # PIL's own warning of a large image would be a second line: none must come
def test_an_image_of_too_many_pixels_is_refused_from_its_header_and_the_others_still_read(trained_model, tmp_path,
                                                                                          capsys):
    seven_on_paper().save(tmp_path / "seven.png")
    huge_png(tmp_path / "huge.png", 13_300, 13_300)  # 177 megapixels: PIL warns, and would decode it
    huge_png(tmp_path / "huger.png", 20_000, 20_000)  # 400 megapixels: PIL refuses it, without saying its size
    assert os.path.getsize(tmp_path / "huge.png") < 100_000
    start = time.monotonic()
    with pytest.raises(UserError):
        predict.read_image(str(tmp_path / "huge.png"))
    assert time.monotonic() - start < 0.5  # its header only: decoding it took 47 s
    code, out, err = run_predict(capsys, tmp_path / "huge.png", tmp_path / "seven.png", tmp_path / "huger.png",
                                 "--checkpoint", trained_model, "--out", tmp_path / "p.png")
    assert code == 1
    assert err.splitlines() == [
        f"error: {tmp_path / 'huge.png'} is 13300x13300 pixels (176.9 megapixels), {OVER_THE_LIMIT}",
        f"error: {tmp_path / 'huger.png'} is more than 179 megapixels, {OVER_THE_LIMIT}"]
    assert re.search(r"seven\.png: 7   top 3: ", out) and os.path.isfile(tmp_path / "p.png")


def test_the_pixel_limit_is_on_width_times_height_and_leaves_room_for_a_phone_s_photo(tmp_path):
    assert 9248 * 6936 <= predict.MAX_PIXELS  # a 64-megapixel phone's photo is read whole
    width = 10_000
    height = predict.MAX_PIXELS // width
    huge_png(tmp_path / "under.png", width, height)
    huge_png(tmp_path / "over.png", width, height + 1)
    predict.open_image(str(tmp_path / "under.png"), "under.png").close()  # its header only, here
    with pytest.raises(UserError, match=rf"^over\.png is {width}x{height + 1} pixels \(.*\), over the limit of "):
        predict.open_image(str(tmp_path / "over.png"), "over.png")


def test_an_unforeseen_failure_in_one_image_is_its_one_line_naming_the_error(trained_model, tmp_path, capsys,
                                                                             monkeypatch):
    seven_on_paper().save(tmp_path / "seven.png")
    seven_on_paper().save(tmp_path / "odd.png")
    convert = predict.to_mnist

    def failing_on_odd(image, name):  # a failure nobody foresaw, deep in the conversion of one image
        if name.endswith("odd.png"):
            raise RuntimeError("no conversion\nfor this mode")
        return convert(image, name=name)

    monkeypatch.setattr(predict, "to_mnist", failing_on_odd)
    code, out, err = run_predict(capsys, tmp_path / "odd.png", tmp_path / "seven.png", "--checkpoint", trained_model,
                                 "--out", tmp_path / "p.png")
    assert code == 1
    assert err == f"error: {tmp_path / 'odd.png'}: cannot be read (RuntimeError: no conversion)\n"
    assert re.search(r"seven\.png: 7   top 3: ", out)


def finished_run(parent, name, model_file, status="finished"):
    """A run folder as main_mnist.py leaves it, reduced to what predict.py reads: run.json and model.pt."""
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(open(model_file, "rb").read())
    record = runs.new_record({**main_mnist.SETTINGS, "MODEL": "CompactNet"}, CompactNet(),
                             torch.device("cpu"), False, [])
    (folder / "run.json").write_text(json.dumps({**record, "status": status}))
    return folder


def test_the_default_model_is_the_newest_finished_run(trained_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    finished_run(tmp_path / OUT_DIR, "2025-01-01_09-00-00_CompactNet", trained_model)
    finished_run(tmp_path / OUT_DIR, "2025-01-02_09-00-00_CompactNet", trained_model)
    finished_run(tmp_path / OUT_DIR, "2025-01-03_09-00-00_CompactNet", trained_model, status="stopped")
    seven_on_paper().save("seven.png")
    code, out, err = run_predict(capsys, "seven.png")
    assert code == 0 and err == ""
    newest = os.path.join(OUT_DIR, "2025-01-02_09-00-00_CompactNet", "model.pt")
    assert f"Model: CompactNet from {newest} (the newest finished run, its accuracy not recorded)" in out
    assert "seven.png: 7 " in out and "Saved: predictions.png" in out and os.path.isfile("predictions.png")


def test_no_finished_run_says_how_to_train_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seven_on_paper().save("seven.png")
    code, out, err = run_predict(capsys, "seven.png")
    assert isinstance(code, str) and "\n" not in code
    assert code.startswith(f"error: no trained model in {OUT_DIR}/") and "python3 main_mnist.py" in code
    assert not os.path.exists("predictions.png")


@pytest.mark.parametrize("mode, suffix", [("P", "png"), ("1", "png"), ("CMYK", "jpg"), ("I;16", "png"), ("LA", "png")],
                         ids=["palette", "1-bit", "CMYK", "16-bit", "grey+alpha"])
def test_images_of_every_pixel_format_are_read_as_their_greyscale_twin(mode, suffix, trained_model, tmp_path, capsys):
    grey = seven_on_paper(paper=255, ink=0)
    if mode == "I;16":  # 16-bit grey, as scanners save it: 0-65535
        image = Image.fromarray((np.asarray(grey).astype(np.uint16) * 257))
    else:
        image = grey.convert(mode)
    path = tmp_path / f"seven.{suffix}"
    image.save(path)
    with Image.open(path) as saved:  # a 16-bit grey PNG opens as I;16 in Pillow 12, as I (32-bit) in Pillow 10.1
        assert saved.mode == mode or (mode == "I;16" and saved.mode == "I")
    grey.save(tmp_path / "grey.png")
    code, out, err = run_predict(capsys, path, tmp_path / "grey.png", "--checkpoint", trained_model,
                                 "--out", tmp_path / "p.png")
    assert code == 0 and err == ""
    answers = re.findall(r"^\S+: (\d)   top 3: (\d) (\d+\.\d)%", out, re.MULTILINE)
    assert len(answers) == 2 and answers[0][0] == answers[1][0] == "7"
    if mode != "CMYK":  # JPEG's compression changes a few grey levels; the others are exactly the same pixels
        assert answers[0] == answers[1]


# ---- Calibration and "not sure" ----

def test_a_trained_run_keeps_its_calibration_and_predict_uses_it(trained_model, tmp_path, capsys):
    calibration = records.calibration_of(records.record_beside(trained_model))
    assert calibration is not None and 0 < calibration["temperature"] and 0 < calibration["threshold"] < 1
    seven_on_paper().save(tmp_path / "seven.png")
    code, out, err = run_predict(capsys, tmp_path / "seven.png", "--checkpoint", trained_model, "--out",
                                 tmp_path / "p.png")
    assert code == 0 and f"temperature {calibration['temperature']:.2f}" in out
    assert f"\"not sure\" below {100 * calibration['threshold']:.1f}% confidence" in out


def test_predict_says_not_a_digit_on_an_image_of_noise_and_shows_the_top_3(trained_model, tmp_path, capsys):
    noise = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    code, out, err = run_predict(capsys, tmp_path / "noise.png", "--checkpoint", trained_model, "--out",
                                 tmp_path / "p.png")
    assert code == 0
    assert re.search(r"noise\.png: not a digit   top 3: \d \d+\.\d%  \d \d+\.\d%  \d \d+\.\d%\n", out)
    assert_png(tmp_path / "p.png")


def test_a_plain_state_dict_still_loads_uncalibrated_and_says_so(trained_model, tmp_path, capsys):
    plain = tmp_path / "weights.pt"  # no run.json beside it
    torch.save(torch.load(trained_model, weights_only=True), plain)
    seven_on_paper().save(tmp_path / "seven.png")
    code, out, err = run_predict(capsys, tmp_path / "seven.png", "--checkpoint", plain, "--out", tmp_path / "p.png")
    assert code == 0 and "Note: no calibration" in out
    assert f"\"not sure\" below {100 * predict.UNCALIBRATED['threshold']:.0f}% confidence" in out
    assert re.search(r"seven\.png: (\d|not sure)   top 3: ", out)


@pytest.mark.parametrize("calibration", [None, "hot", {"temperature": -1, "threshold": 0.5},
                                         {"temperature": 1.5, "threshold": 2}])
def test_a_damaged_calibration_is_no_calibration(tmp_path, calibration, trained_model):
    folder = tmp_path / "run"
    folder.mkdir()
    record = records.read_record(os.path.dirname(trained_model))
    (folder / records.RECORD).write_text(json.dumps({**record, "calibration": calibration}))
    assert records.calibration_of(records.record_beside(str(folder / records.FINAL_MODEL))) is None
