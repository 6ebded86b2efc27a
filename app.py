"""Draw a digit and let the model read it: python3 app.py [--model PATH] [--port N], then open the address shown.

A page served on this computer only (127.0.0.1) by Python's own http.server: a pad to draw on (or an image file to
send), the model's answer as predict.py gives it, its likeliest three digits, and the 28x28 image it received.
"""
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from machinery import runs
from machinery.evaluation import answer, read
from machinery.images import open_image, to_mnist
from machinery.settings import OneLineParser
from predict import load_reader
from utils import UserError, pick_device

LARGEST_REQUEST = 10_000_000  # bytes: a drawing is a few KB, a phone's photo a few MB; larger is refused unread
LARGEST_IMAGE = 16_000_000  # pixels, checked before decoding: a phone's 12-megapixel photo is read, 8000x8000 not

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Read a digit</title><style>
body { font-family: sans-serif; margin: 2em; } canvas { border: 1px solid #888; touch-action: none; }
#pad { cursor: crosshair; } #answer { font-size: 2em; margin: 0.3em 0; } #seen { image-rendering: pixelated; }
</style></head><body>
<h1>Draw a digit</h1><p>Draw one digit on the pad, large, then press Read; or send an image file.</p>
<canvas id="pad" width="280" height="280"></canvas> <canvas id="seen" width="28" height="28"
style="width:140px;height:140px"></canvas>
<p><button id="read">Read</button> <button id="clear">Clear</button> <input type="file" id="file" accept="image/*"></p>
<div id="answer">&nbsp;</div><div id="top"></div>
<script>
const pad = document.getElementById("pad"), pen = pad.getContext("2d");
function clear() { pen.fillStyle = "white"; pen.fillRect(0, 0, 280, 280); }
clear();
pen.lineWidth = 18; pen.lineCap = pen.lineJoin = "round"; pen.strokeStyle = "black";
let down = false;
pad.onpointerdown = e => { down = true; pen.beginPath(); pen.moveTo(e.offsetX, e.offsetY); };
pad.onpointermove = e => { if (down) { pen.lineTo(e.offsetX, e.offsetY); pen.stroke(); } };
pad.onpointerup = pad.onpointerleave = () => { down = false; };
async function send(body) {
  const reply = await (await fetch("/read", { method: "POST", body })).json();
  document.getElementById("answer").textContent = reply.error || reply.answer;
  document.getElementById("top").textContent = reply.top3 ? "likeliest: " +
    reply.top3.map(([d, p]) => d + " " + (100 * p).toFixed(1) + "%").join(", ") : "";
  const seen = document.getElementById("seen").getContext("2d"), image = seen.createImageData(28, 28);
  (reply.digit || []).flat().forEach((v, i) => { image.data.set([255 * v, 255 * v, 255 * v, 255], 4 * i); });
  seen.putImageData(image, 0, 0);
}
document.getElementById("read").onclick = () => pad.toBlob(send, "image/png");
document.getElementById("clear").onclick = () => { clear(); document.getElementById("answer").innerHTML = "&nbsp;"; };
document.getElementById("file").onchange = e => { if (e.target.files[0]) send(e.target.files[0]); };
</script></body></html>"""


def make_server(model, knows, device, port=7860):
    class Page(BaseHTTPRequestHandler):
        timeout = 5  # seconds a connection may send nothing before it is closed: idle ones hold no thread
        model_lock = threading.Lock()  # read() hooks the shared model per call: two requests at once mix features

        def reply(self, status, body, kind="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def foreign(self):  # True, answered 403, for another site's page or one that reached here by its own name
            host, port = self.headers.get("Host"), self.server.server_address[1]
            if host in ("127.0.0.1", "localhost", f"127.0.0.1:{port}", f"localhost:{port}") and \
                    self.headers.get("Origin") in (None, f"http://{host}"):
                return False  # (evil.example rebound to 127.0.0.1 sends Host and Origin evil.example: DNS rebinding)
            self.reply(403, b'{"error": "requests from other sites are refused"}')
            return True

        def do_GET(self):
            if not self.foreign():
                self.reply(*((200, PAGE.encode(), "text/html; charset=utf-8") if self.path == "/" else
                             (404, b'{"error": "no such page"}')))

        def do_POST(self):
            if self.foreign():
                return
            if self.path != "/read":
                return self.reply(404, b'{"error": "no such page"}')
            length = self.headers.get("Content-Length") or "0"
            size = int(length) if length.isdecimal() and len(length) < 20 else -1  # not "abc", "-5", nor 5,000 digits
            if not 0 < size <= LARGEST_REQUEST:
                self.close_connection = True  # the body is never read
                refusal = {"error": f"send an image of 1 to {LARGEST_REQUEST:,} bytes, its Content-Length a number"}
                return self.reply(413 if size > LARGEST_REQUEST else 400, json.dumps(refusal).encode())
            try:
                image = open_image(io.BytesIO(self.rfile.read(size)), "The image sent", LARGEST_IMAGE)
                digit = to_mnist(image, "The drawing")
            except UserError as error:
                return self.reply(200, json.dumps({"error": str(error)}).encode())
            with self.model_lock:
                probabilities, distance = read(model, device, digit[None], knows)
            top = probabilities[0].topk(3)
            verdict = answer(probabilities[0], distance[0] if distance is not None else None, knows)
            top3 = [[int(d), float(p)] for p, d in zip(top.values, top.indices)]
            self.reply(200, json.dumps({"answer": str(verdict), "digit": digit.tolist(), "top3": top3}).encode())

        def log_message(self, *args):  # one line per request on stderr would drown the console
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Page)
    server.socket.listen(64)  # http.server queues 5: a burst waiting on the model lock would be reset
    return server


def main(argv=None):
    parser = OneLineParser(description="Serve a page to draw a digit on and let the model read it.")
    parser.add_argument("--model", metavar="PATH", help="a model.pt (default: the newest finished run's)")
    parser.add_argument("--port", type=int, default=7860, metavar="N", help="the port to serve on (default: 7860)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 (any free one) to 65535, not {args.port}")
    with runs.errors_in_one_line():
        device = pick_device()
        model, knows = load_reader(args.model, device)
        server = make_server(model, knows, device, args.port)
        print(f"Open http://127.0.0.1:{server.server_address[1]}/ in a browser (Ctrl-C to stop)")
        try:
            server.serve_forever()
        finally:
            server.server_close()


if __name__ == "__main__":
    sys.exit(main())
