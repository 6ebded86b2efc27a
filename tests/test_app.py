"""The drawing page (app.py): what it answers, what it refuses, and a person drawing on it in Chromium."""
import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image, ImageDraw

import app
from machinery import runs
from predict import load_reader


@pytest.fixture(scope="module")
def page(trained):
    model, knows = load_reader(os.path.join(trained, runs.FINAL_MODEL), torch.device("cpu"))
    server = app.make_server(model, knows, torch.device("cpu"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def post(port, body, headers=None, method="POST"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(method, "/read" if method == "POST" else "/", body=body, headers=headers or {})
    response = connection.getresponse()
    reply = response.read()
    return response.status, json.loads(reply) if method == "POST" else reply


def png(draw, image=None):
    image = image or Image.new("L", (280, 280), 255)
    draw(ImageDraw.Draw(image))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def grid(d):
    for at in (50, 140, 230):
        d.line([(30, at), (250, at)], fill=0, width=18)
        d.line([(at, 30), (at, 250)], fill=0, width=18)


DRAWINGS = [png(lambda d: d.line([(140, 40), (140, 240)], fill=0, width=18)),  # a 1
            png(lambda d: d.ellipse([(70, 40), (210, 240)], outline=0, width=18)),  # a 0
            png(lambda d: d.line([(60, 50), (220, 50), (110, 240)], fill=0, width=18)),  # a 7
            png(grid)]  # no digit


def test_the_page_reads_a_drawing_and_says_what_the_model_saw(page):
    status, reply = post(page, png(lambda d: d.line([(140, 40), (140, 240)], fill=0, width=18)))
    verdict = reply["answer"].split(" (")[0]  # "not a digit (its ink is thicker ...)" says why
    assert status == 200 and verdict in ("1", "not sure", "not a digit") and len(reply["top3"]) == 3
    assert torch.tensor(reply["digit"]).shape == (28, 28)


@pytest.mark.parametrize("body, headers, status, words", [
    (png(lambda d: None), {}, 200, "is blank"),
    (b"not an image", {}, 200, "not an image PIL can read"),
    (b"x", {"Origin": "http://elsewhere.example"}, 403, "other sites"),
    (None, {"Content-Length": str(app.LARGEST_REQUEST + 1)}, 413, "send an image of 1 to"),
    (png(lambda d: None, Image.new("1", (8000, 8000))), {}, 200, "over 16 megapixels")])  # 8 KB, unread: 200
def test_the_page_refuses_what_it_cannot_read_in_one_line(page, body, headers, status, words):
    got, reply = post(page, body, headers)
    assert got == status and words in reply["error"]


def test_a_phone_photo_of_12_megapixels_is_read(page):
    status, reply = post(page, png(lambda d: None, Image.new("1", (4000, 3000))))  # black: read, and found blank
    assert status == 200 and reply["error"] == "The drawing is blank: nothing in it stands out from its background"


@pytest.mark.parametrize("length", ["abc", "-5", "9" * 5000, "0"])
def test_a_bad_content_length_is_answered_400_and_the_page_goes_on(page, capfd, length):
    status, reply = post(page, None, {"Content-Length": length})
    assert status == 400 and "Content-Length" in reply["error"]
    assert post(page, DRAWINGS[0])[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_requests_at_once_get_the_answers_they_get_alone(page):
    def answer(drawing):
        reply = post(page, drawing)[1]
        return reply["answer"], reply["top3"]
    alone = {drawing: answer(drawing) for drawing in DRAWINGS}
    sent = [DRAWINGS[i % len(DRAWINGS)] for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        assert list(pool.map(answer, sent)) == [alone[drawing] for drawing in sent]


def test_a_connection_that_sends_nothing_is_closed_within_seconds(page):
    with socket.create_connection(("127.0.0.1", page), timeout=10) as idle:
        start = time.monotonic()
        assert idle.recv(1) == b"" and time.monotonic() - start < 10  # a timeout here raises instead


@pytest.mark.parametrize("host, served", [
    ("127.0.0.1", True), ("127.0.0.1:{port}", True), ("localhost", True), ("localhost:{port}", True),
    ("evil.example", False), ("evil.example:{port}", False), ("127.0.0.2:{port}", False)])
def test_only_this_computers_own_names_are_served(page, host, served):
    host = host.format(port=page)  # a DNS-rebinding page sends its own name, and an Origin that matches it
    for method, body in ("GET", None), ("POST", DRAWINGS[0]):
        status, _ = post(page, body, {"Host": host, "Origin": f"http://{host}"}, method)
        assert status == (200 if served else 403)


def test_a_person_draws_a_non_digit_and_then_a_digit_in_chromium(page):
    chromium = shutil.which("chromium")
    if chromium is None or not pytest.importorskip("playwright"):
        if os.environ.get("CI"):
            pytest.fail("CI installs Debian's chromium and playwright (requirements-demo.txt)")
        pytest.skip("needs Debian's chromium and playwright")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        tab = browser.new_page()
        tab.goto(f"http://127.0.0.1:{page}/")
        box = tab.locator("#pad").bounding_box()

        def stroke(*points):
            tab.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
            tab.mouse.down()
            for x, y in points[1:]:
                tab.mouse.move(box["x"] + x, box["y"] + y, steps=8)
            tab.mouse.up()
        for row in (50, 140, 230):  # a grid of lines: no digit
            stroke((30, row), (250, row))
            stroke((row, 30), (row, 250))
        tab.click("#read")
        tab.wait_for_function("document.getElementById('top').textContent.length > 0")
        assert tab.inner_text("#answer") in ("not a digit", "not sure")
        tab.click("#clear")
        stroke((140, 40), (140, 240))  # a 1
        tab.click("#read")
        tab.wait_for_function("!['not a digit', 'not sure', ''].includes("
                              "document.getElementById('answer').textContent.trim())")
        assert tab.inner_text("#answer") == "1"
        browser.close()
