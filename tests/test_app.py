"""app.py as a person uses it: the page in headless Chromium, a digit drawn with the mouse, the model's answer read
from the page.

Needs the demo's extras: gradio and playwright (pip install -r requirements-demo.txt) and Debian's chromium
(apt-get install -y chromium; Playwright's own browser download is never used). Without them these tests skip,
except under CI (CI=true, as .ci/run sets it), where a missing install step must fail rather than pass unnoticed.
"""
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

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
def app_url(demo_extras, trained_model, tmp_path_factory):
    """app.py serving the trained model on a free local port, as its own process, for this module's tests."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, os.path.join(REPO, "app.py"), "--checkpoint", trained_model,
                                    "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
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
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
