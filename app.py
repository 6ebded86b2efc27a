"""Draw a digit and let the model read it: python3 app.py [--checkpoint PATH] [--port N], then open the address shown.

A page on this computer only (127.0.0.1): a drawing pad, the model's top 3 answers, and the 28x28 image the model
received, made from the drawing by images.to_mnist as predict.py makes it from a file. Needs gradio
(pip install -r requirements-demo.txt); the training scripts do not.
"""
from machinery.errors import prepare_console

if __name__ == "__main__":  # before gradio and torch load: Ctrl-C, closed or narrow consoles said in a word
    prepare_console()

import io  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

# Before gradio is imported: no usage statistics sent, and no reaching for the Hugging Face Hub. The page works
# with no network at all.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["HF_HUB_OFFLINE"] = "1"

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from gradio.components.image_editor import EditorDataBlobs  # noqa: E402
from gradio.data_classes import FileData  # noqa: E402
from machinery.figures import likeliest  # noqa: E402
from predict import (CHECKPOINT_HELP, MAX_PIXELS, NOT_A_DIGIT, NOT_SURE, answer, classify, load_reader,  # noqa: E402
                     open_image, too_large)
from machinery.errors import OneLineParser, UserError  # noqa: E402
from machinery.hardware import pick_device  # noqa: E402
from machinery.images import grey_pixels, to_mnist  # noqa: E402

NOTHING_DRAWN = "Nothing drawn yet: draw a digit on the pad first."
ALL_INK = "The pad is all ink, so nothing on it stands out: clear it and draw one digit."
SHOWN_SCALE = 10  # the 28x28 image is shown 280x280, each pixel a sharp square rather than a browser-blurred one
# The largest file the page accepts, of any upload to it. The pad sends its drawing as PNGs of a few KB (280x280
# RGBA is 314 KB even uncompressed); without a limit gradio took 300 MB and kept it in its temp folder. Larger
# files are refused (HTTP 413) while they arrive, and nothing of them is kept. The pixels of an image are capped
# apart, by predict.MAX_PIXELS, since a small PNG can hold a huge image.
MAX_UPLOAD_BYTES = 10_000_000
# The largest request of any kind, JSON included (a drawing can be sent as base64 in the JSON of the read_digit
# route, which max_file_size does not cover: a 600 MB one took the server to 3.3 GB). Room for an upload of
# MAX_UPLOAD_BYTES and its multipart wrapping, so that gradio's own, clearer refusal answers those.
MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + 2_000_000
CACHE_S = 3600  # the drawings the page was sent are deleted from gradio's temp folder after an hour


def port_number(text):
    """--port's value: a TCP port a page can be served on, 1 to 65535 (argparse says so in one line otherwise)."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


def drawing_pad(**options):
    """gr.Sketchpad(**options) that refuses an image of more than predict.MAX_PIXELS pixels, measured in its file's
    header, before gradio decodes it whole (a 714 KB PNG of 13,300 x 13,300 pixels took the server to 5 GB), and
    that decodes only the composite, which is all that read_drawing reads. The page draws only 280x280, but
    anything can be sent to its address. read_drawing gives the one-line message.

    Its preprocess method is replaced on this pad alone: gradio writes a .pyi file beside the module of any
    subclass of its components, here app.pyi."""
    pad = gr.Sketchpad(**options)
    pad.preprocess = types.MethodType(_measured_preprocess, pad)  # bound, so that a copy of the pad binds its own
    return pad


def _measured_preprocess(pad, payload):
    # The images come as files uploaded to the page, or as blobs the pad keeps in memory under the payload's id
    images = pad.blob_storage.get(payload.id) if payload is not None and payload.id is not None else payload
    for image in [images.background, *images.layers, images.composite] if images is not None else []:
        if image is None:
            continue
        try:
            open_image(image.path if isinstance(image, FileData) else io.BytesIO(image), "The image sent").close()
        except UserError as error:  # too large, or not an image at all
            pad.blob_storage.pop(payload.id, None)
            return {"background": None, "layers": [], "composite": None, "refused": str(error)}
    if payload is not None and payload.id in pad.blob_storage:
        pad.blob_storage[payload.id] = EditorDataBlobs(background=None, layers=[], composite=images.composite)
    elif payload is not None:
        payload = payload.model_copy(update={"background": None, "layers": []})
    return type(pad).preprocess(pad, payload)


def read_drawing(model, device, calibration, drawing):
    """(the top answers for gr.Label, the 28x28 image the model received, a one-line message) for the pad's value.

    The pad sends {"background", "layers", "composite"}; composite is the drawing as an RGBA array (black ink on
    opaque white), or None while nothing is drawn: before the brush is picked, before a stroke, after a clear.
    drawing_pad decodes only the composite, and sends {"refused": message} for an image it would not decode."""
    if drawing and drawing.get("refused"):
        return None, None, drawing["refused"]
    composite = drawing.get("composite") if drawing else None
    if composite is None:
        return None, None, NOTHING_DRAWN
    height, width = np.shape(composite)[:2]
    if height * width > MAX_PIXELS:
        return None, None, too_large("The drawing", width, height)
    try:
        digit = to_mnist(composite, name="the drawing")
    except UserError:  # a pad with no ink on it, or covered in it: nothing stands out
        covered = float(grey_pixels(composite).mean()) < 0.5  # mostly dark, where the pad is white
        return None, None, ALL_INK if covered else NOTHING_DRAWN
    probs = classify(model, device, digit.unsqueeze(0), calibration)[0]
    best = answer(probs, digit, calibration)
    shown = np.kron((digit.numpy() * 255).round().astype(np.uint8), np.ones((SHOWN_SCALE, SHOWN_SCALE), np.uint8))
    if best == NOT_A_DIGIT:
        message = f"**Not a digit**, it seems: less sure than of almost any digit. The likeliest: {likeliest(probs)}."
    elif best == NOT_SURE:
        message = f"**Not sure** which digit this is. The likeliest: {likeliest(probs)}."
    else:
        message = f"Read as **{best}** ({100 * float(probs[best]):.1f}% sure)."
    return {str(d): float(p) for d, p in enumerate(probs)}, shown, message


def build_page(model, device, model_name, checkpoint, calibration):
    with gr.Blocks(title="MNIST digit reader", delete_cache=(CACHE_S, CACHE_S)) as page:
        run_file = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(checkpoint))),
                                os.path.basename(checkpoint))  # the run's folder names the model; its path is long
        gr.Markdown("# MNIST digit reader\n"
                    f"Draw one digit (0-9), large, and press *Read the digit*: {model_name} (`{run_file}`) reads it "
                    f"as an MNIST digit.")
        with gr.Row():
            with gr.Column():
                pad = drawing_pad(label="Your digit", type="numpy", image_mode="RGBA", canvas_size=(280, 280),
                                  brush=gr.Brush(default_size=12, colors=["#000000"], color_mode="fixed"),
                                  layers=False, elem_id="pad")
                button = gr.Button("Read the digit", variant="primary", elem_id="read")
            with gr.Column():
                message = gr.Markdown(elem_id="message")
                answer = gr.Label(num_top_classes=3, label="Top 3", elem_id="answer")
                received = gr.Image(label="What the model received (28x28, shown enlarged)", type="numpy",
                                    interactive=False, height=320, format="png", elem_id="received")
        button.click(lambda drawing: read_drawing(model, device, calibration, drawing), inputs=pad,
                     outputs=[answer, received, message], api_name="read_digit")
    return page


def main(argv=None):
    parser = OneLineParser(description="A page to draw a digit on and see what the model reads.")
    parser.add_argument("--checkpoint", metavar="PATH", help=CHECKPOINT_HELP)
    parser.add_argument("--port", type=port_number, default=7860, help="the local port of the page, 1 to 65535 "
                                                                      "(default: 7860)")
    args = parser.parse_args(argv)

    device = pick_device()
    model_name, model, checkpoint, calibration = load_reader(args.checkpoint, device)
    page = build_page(model, device, model_name, checkpoint, calibration)
    try:
        page.launch(server_name="127.0.0.1", server_port=args.port, show_error=True, max_file_size=MAX_UPLOAD_BYTES,
                    app_kwargs={"max_body_size": MAX_REQUEST_BYTES})
    except OSError:  # gradio's way of saying that the port is taken
        sys.exit(f"error: cannot serve the page on 127.0.0.1:{args.port}: the port is in use "
                 f"(choose another with --port N)")


if __name__ == "__main__":
    main()
