"""app.py as a person uses it: the page in headless Chromium, a digit drawn with the mouse, the model's answer read
from the page.

Needs the demo's extras: gradio and playwright (pip install -r requirements-demo.txt) and Debian's chromium
(apt-get install -y chromium; Playwright's own browser download is never used). Without them these tests skip,
except under CI (CI=true, as .ci/run sets it), where a missing install step must fail rather than pass unnoticed.
"""
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

import predict
from test_predict import huge_png

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT_S = 90  # the page starts in about 3 s on an idle machine; a busy CI machine may be much slower
ANSWER_TIMEOUT_MS = 30_000


def require(ok, reason):
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must install the demo's extras)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def demo_extras():
    """Checked before anything is trained or started, so that a machine without them skips at once."""
    require(importlib.util.find_spec("gradio"), "gradio is not installed: pip install -r requirements-demo.txt")
    require(importlib.util.find_spec("playwright"), "playwright is not installed: pip install -r requirements-demo.txt")
    require(os.access(CHROMIUM, os.X_OK), f"no {CHROMIUM}: apt-get install -y chromium")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_server(demo_extras, trained_model, tmp_path_factory):
    """app.py serving the trained model on a free local port, as its own process, for this module's tests:
    its url, its process id, and gradio's temp folder, where the files sent to the page go."""
    port = free_port()
    folder = tmp_path_factory.mktemp("app")
    log_path, temp_dir = folder / "app.log", folder / "gradio"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, os.path.join(REPO, "app.py"), "--checkpoint", trained_model,
                                    "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "GRADIO_TEMP_DIR": str(temp_dir)})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with code {process.returncode}:\n{log_path.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app.py did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()}")
                time.sleep(0.5)
        yield types.SimpleNamespace(url=url, pid=process.pid, temp_dir=temp_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def app_url(app_server):
    return app_server.url


@pytest.fixture(scope="module")
def browser(demo_extras):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url):
    """A fresh page of the app: nothing drawn, no answer."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(app_url)
    page.wait_for_selector("#read")
    yield page
    page.close()


def draw(page, strokes):
    """Draws with the mouse on the pad: each stroke a list of (x, y) points, in pixels from the pad's centre (the
    drawing area is the 280x280 canvas shown about that size, centred in the pad's canvas element)."""
    if page.get_by_text("select the draw tool to start").is_visible():  # the pad draws once its brush is picked
        page.get_by_role("button", name="Brush").click()
    box = page.locator("#pad canvas").first.bounding_box()
    centre_x, centre_y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    for stroke in strokes:
        page.mouse.move(centre_x + stroke[0][0], centre_y + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(centre_x + x, centre_y + y, steps=20)
        page.mouse.up()


# The answer has come when the message has changed and no output shows gradio's "processing" overlay any more.
ANSWERED = """previous => document.querySelector('#message [data-testid=markdown]').innerText.trim() !== previous
    && [...document.querySelectorAll('#message [data-testid=status-tracker], #answer [data-testid=status-tracker]')]
       .every(tracker => tracker.classList.contains('hide'))"""


def read_answer(page):
    """Presses the button and waits for the answer: (message, [(digit, probability)] of the top 3 as shown)."""
    previous = page.inner_text("#message [data-testid=markdown]").strip()
    page.click("#read")
    page.wait_for_function(ANSWERED, arg=previous, timeout=ANSWER_TIMEOUT_MS)
    meters = page.locator("#answer meter")
    top3 = [(meters.nth(i).get_attribute("aria-label"), float(meters.nth(i).get_attribute("value")))
            for i in range(meters.count())]
    return page.inner_text("#message [data-testid=markdown]").strip(), top3


ONE = [[(0, -95), (0, 95)]]  # a vertical stroke
SEVEN = [[(-70, -90), (70, -90), (-15, 95)]]  # a bar across the top, then the diagonal down to the left


@pytest.mark.parametrize("digit, strokes", [("1", ONE), ("7", SEVEN)])
def test_a_drawn_digit_is_read(page, digit, strokes, tmp_path):
    draw(page, strokes)
    message, top3 = read_answer(page)
    assert message.startswith(f"Read as {digit} (")
    assert page.inner_text("#answer [data-testid=label-output-value]") == digit
    assert len(top3) == 3 and top3[0][0] == digit and top3[0][1] > 0.5
    assert [p for _, p in top3] == sorted((p for _, p in top3), reverse=True)
    assert page.locator("#received img").count() == 1  # the 28x28 image the model received
    if digit == "7":  # a picture of the page to look at: /tmp/app.png locally, the test's folder under CI
        screenshot = tmp_path / "app.png" if os.environ.get("CI") else "/tmp/app.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert os.path.getsize(screenshot) > 10_000


W = [[(-90, -90), (-45, 90), (0, -20), (45, 90), (90, -90)]]  # a capital W in one stroke: no digit


def test_a_drawn_letter_is_no_digit_and_a_digit_after_it_is_read(page, tmp_path):
    draw(page, W)
    message, top3 = read_answer(page)
    assert message.startswith(("Not a digit", "Not sure")), message  # the model declines, however it words it
    likeliest = message.split("The likeliest: ")[1]
    assert [digit for digit, _ in top3] == re.findall(r"(\d) \d+%", likeliest)  # the same three, in order
    screenshot = tmp_path / "app_w.png" if os.environ.get("CI") else "/tmp/app_w.png"  # as the 7's, above
    page.screenshot(path=str(screenshot), full_page=True)
    page.get_by_role("button", name="Clear canvas").click()
    draw(page, ONE)
    assert read_answer(page)[0].startswith("Read as 1 (")


def test_nothing_drawn_says_so(page):
    message, top3 = read_answer(page)
    assert message == "Nothing drawn yet: draw a digit on the pad first."
    assert top3 == []
    # Once a digit has been read, clearing the pad and pressing again clears the answer too
    draw(page, ONE)
    assert read_answer(page)[0].startswith("Read as 1")
    page.get_by_role("button", name="Clear canvas").click()
    message, top3 = read_answer(page)
    assert message.startswith("Nothing drawn yet") and top3 == []


def test_no_trained_model_is_a_one_line_error(demo_extras, tmp_path, monkeypatch, capsys):
    import app
    from main_mnist import OUT_DIR
    monkeypatch.chdir(tmp_path)  # no OUT_DIR here
    with pytest.raises(SystemExit) as stop:
        app.main([])
    assert str(stop.value.code).startswith(f"error: no trained model in {OUT_DIR}/")
    assert "python3 main_mnist.py" in str(stop.value.code) and "\n" not in str(stop.value.code)


def upload(url, name, data):
    """POSTs a file to the page's upload route, as the page does with a drawing: (HTTP status, the answer)."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def files_in(folder):
    return sorted(os.path.join(parent, name) for parent, _, names in os.walk(folder) for name in names)


def test_an_upload_over_the_size_limit_is_refused_and_nothing_of_it_is_kept(app_server, tmp_path):
    import app
    Image.new("L", (28, 28)).save(tmp_path / "small.png")
    status, paths = upload(app_server.url, "small.png", (tmp_path / "small.png").read_bytes())
    assert status == 200 and len(paths) == 1 and os.path.isfile(paths[0])  # the route takes files as the page sends
    before = files_in(app_server.temp_dir)
    status, answer = upload(app_server.url, "big.png", b"\0" * (app.MAX_UPLOAD_BYTES + 1_000_000))
    assert status == 413 and f"maximum allowed size of {app.MAX_UPLOAD_BYTES} bytes" in answer
    assert files_in(app_server.temp_dir) == before


def peak_memory_mb(pid):
    """The most memory (resident) the process has held since it started, in MB: VmHWM in Linux's /proc."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def read_digit(url, drawing):
    """The page's answer to `drawing` sent to its read_digit route, as a script can: (top 3, image, message)."""
    request = urllib.request.Request(url + "gradio_api/call/read_digit", data=json.dumps({"data": [drawing]}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        event = json.loads(answer.read())["event_id"]
    with urllib.request.urlopen(url + f"gradio_api/call/read_digit/{event}", timeout=120) as answer:
        lines = answer.read().decode().splitlines()
    assert lines[0] == "event: complete", lines
    return json.loads(lines[1].removeprefix("data: "))


def test_an_image_of_too_many_pixels_sent_to_the_page_is_refused_before_it_is_decoded(app_server, tmp_path):
    import predict
    huge_png(tmp_path / "huge.png", 13_300, 13_300)  # 177 megapixels in 38 KB: decoded, it took the server to 5 GB
    status, paths = upload(app_server.url, "huge.png", (tmp_path / "huge.png").read_bytes())
    assert status == 200
    file = {"path": paths[0], "meta": {"_type": "gradio.FileData"}}
    peak = peak_memory_mb(app_server.pid)
    top3, received, message = read_digit(app_server.url, {"background": file, "layers": [], "composite": file})
    assert message == (f"The image sent is 13300x13300 pixels (176.9 megapixels), over the limit of "
                       f"{predict.MAX_PIXELS / 1e6:g} megapixels: scale it down (the model reads digits at 28x28)")
    assert not top3 and received is None
    assert peak_memory_mb(app_server.pid) < peak + 100


def test_a_drawing_of_too_many_pixels_is_refused_before_it_is_read(demo_extras):
    import app
    side = int(app.MAX_PIXELS ** 0.5) + 1
    white = np.broadcast_to(np.uint8(255), (side, side, 4))  # a huge drawing, in no memory at all
    assert app.read_drawing(None, "cpu", predict.UNCALIBRATED, {"background": None, "layers": [], "composite": white}) == (
        None, None, f"The drawing is {side}x{side} pixels ({side * side / 1e6:.1f} megapixels), over the limit of "
                    f"{app.MAX_PIXELS / 1e6:g} megapixels: scale it down (the model reads digits at 28x28)")


def test_an_image_the_pad_keeps_in_memory_is_measured_too(demo_extras, tmp_path):
    """The page can send its images as blobs that the pad keeps in memory, rather than as uploaded files."""
    import app
    from gradio.components.image_editor import EditorData, EditorDataBlobs
    huge_png(tmp_path / "huge.png", 13_300, 13_300)
    pad = app.drawing_pad(type="numpy", image_mode="RGBA", layers=False, render=False)
    pad.blob_storage["sent"] = EditorDataBlobs(background=None, layers=[],
                                               composite=(tmp_path / "huge.png").read_bytes())
    drawing = pad.preprocess(EditorData(id="sent"))
    assert drawing["refused"].startswith("The image sent is 13300x13300 pixels (176.9 megapixels), over the limit")
    assert not pad.blob_storage  # not kept either
    assert app.read_drawing(None, "cpu", predict.UNCALIBRATED, drawing) == (None, None, drawing["refused"])
    assert not os.path.exists(os.path.join(REPO, "app.pyi"))  # which gradio writes for a subclass of its components


def test_a_request_of_any_kind_over_the_limit_is_refused_before_it_is_read(app_server):
    import app
    drawing = {"composite": {"url": "data:image/png;base64," + "A" * (4 * app.MAX_REQUEST_BYTES)}}
    request = urllib.request.Request(app_server.url + "gradio_api/call/read_digit",
                                     data=json.dumps({"data": [drawing]}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    before = peak_memory_mb(app_server.pid)
    with pytest.raises(urllib.error.URLError) as refused:  # 413, or the connection closed while it still sent
        urllib.request.urlopen(request, timeout=60)
    assert getattr(refused.value, "code", 413) == 413
    assert peak_memory_mb(app_server.pid) - before < 2 * app.MAX_REQUEST_BYTES / 1e6  # never held whole
    with urllib.request.urlopen(app_server.url, timeout=30) as page:  # and the page still serves
        assert page.status == 200


@pytest.mark.parametrize("port", ["0", "70000", "-5", "http"])
def test_a_port_no_page_can_be_served_on_is_one_line(demo_extras, port, capsys):
    import app
    with pytest.raises(SystemExit) as stop:
        app.main(["--port", port])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--port" in err and len(err.strip().splitlines()) == 1


def test_a_pad_covered_in_ink_says_so_rather_than_nothing_drawn(demo_extras):
    import app
    covered = np.zeros((280, 280, 4), dtype=np.uint8)
    covered[..., 3] = 255  # opaque black all over
    answer, image, message = app.read_drawing(None, "cpu", None, {"composite": covered})
    assert (answer, image, message) == (None, None, app.ALL_INK)
