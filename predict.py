"""Read handwritten digits from image files: python3 predict.py IMAGE [IMAGE ...] [--checkpoint PATH] [--out PATH]

Any photo, scan or drawing works: each image is brought to MNIST's format first (images.to_mnist: grey, light ink
on black, cropped to the ink, fitted to 20x20 and centred by mass in 28x28). Prints the digit and the top-3
probabilities of each image, and draws predictions.png: each image as given, as the model saw it, and the ten
probabilities. By default the model is the one of the newest finished run in OUT_DIR (main_mnist.py).
"""
from machinery.errors import prepare_console

if __name__ == "__main__":  # before torch loads: Ctrl-C, closed or narrow consoles said in a word, not a traceback
    prepare_console()

import os
import sys
import warnings

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from machinery import records
from machinery.errors import OneLineParser, UserError, one_line
from machinery.files import FIGURE_FORMATS
from machinery.figures import SHOWN_SIZE, plot_predictions
from machinery.hardware import pick_device
from machinery.images import mnist_batch, to_mnist
from machinery.robustness import LEAST_SOLID_INK, solid_ink_share
from main_mnist import OUT_DIR

MAX_SHOWN = 20  # images drawn in predictions.png; a taller figure would be too long to read
# The most pixels an image may have, checked in the file's header before anything is decoded, by predict.py and
# by app.py's page. PIL's own guard stops only images over 179 megapixels, and a 13,300 x 13,300 PNG of 714 KB
# took 9 GB. Reading an image costs about 10 bytes a pixel at its peak (the decoded image, a copy as an array, its
# grey levels as float32): about 0.6 GB at this cap, on top of the 0.85 GB that predict.py takes with any image.
# A phone's photo is still read whole: 12 to 50 megapixels, and 64 on a few (9248x6936 is 64.1).
MAX_PIXELS = 65_000_000

# For a model without a calibration (a plain state_dict, or a run from before it): temperature 1, and "not sure"
# below this confidence. Not chosen on data; main_mnist.py chooses a run's own threshold on the test set.
UNCALIBRATED = {"temperature": 1.0, "threshold": 0.9}


def default_checkpoint(parent=OUT_DIR):
    """The model.pt of the newest finished run under `parent` (main_mnist.py's OUT_DIR); UserError saying how to
    train one if there is none."""
    folder = records.latest_finished_run(parent)
    if folder is None:
        raise UserError(f"no trained model in {parent}/: train one with `python3 main_mnist.py` "
                        f"(or name a model.pt with --checkpoint PATH)")
    return os.path.join(folder, records.FINAL_MODEL)


CHECKPOINT_HELP = f"a model.pt or checkpoint.pt (default: the model.pt of the newest finished run in {OUT_DIR}/)"


def load_reader(checkpoint, device):
    """(model name, model, its file, its calibration) from --checkpoint, or from the newest finished run; one line
    and exit if neither can be loaded. Says which model it is, and how sure it must be to answer."""
    try:
        path = checkpoint or default_checkpoint()
        name, model = records.load_model(path, device)
    except UserError as error:
        sys.exit(f"error: {error}")
    record = records.record_beside(path)  # read once, for the accuracy and the calibration
    if record is None:  # a file of its own, without its run's record
        accuracy = f"its accuracy unknown: no {records.RECORD} beside it"
    else:
        final = record["final_test_acc"]
        accuracy = "its accuracy not recorded" if final is None else f"{final:.2f}% on the test set"
    print(f"Model: {name} from {path} ({'' if checkpoint else 'the newest finished run, '}{accuracy})")
    calibration = records.calibration_of(record)
    if calibration:
        level = calibration.get("not_a_digit")
        print(f"Calibration of its run: temperature {calibration['temperature']:.2f}; \"not sure\" below "
              f"{100 * calibration['threshold']:.1f}% confidence"
              + (f", \"not a digit\" below {100 * level:.1f}%" if level is not None else ""))
    else:
        calibration = UNCALIBRATED
        print(f"Note: no calibration in a {records.RECORD} beside it: temperature 1, \"not sure\" below "
              f"{100 * calibration['threshold']:.0f}% confidence")
    return name, model, path, calibration


def too_large(name, width, height, size=None):
    """The one-line message for an image of more than MAX_PIXELS pixels; `size` says how large, if not its size."""
    size = size or f"{width}x{height} pixels ({width * height / 1e6:.1f} megapixels)"
    return (f"{name} is {size}, over the limit of {MAX_PIXELS / 1e6:g} megapixels: scale it down (the model reads "
            f"digits at 28x28)")


def open_image(source, name):
    """`source` (a path or a binary file) opened by PIL, which reads only its header: nothing is decoded yet.
    UserError naming it (`name`) if it is missing, not an image, or has more than MAX_PIXELS pixels."""
    try:
        with warnings.catch_warnings():  # PIL warns of images over 89 megapixels; the check below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except FileNotFoundError:
        raise UserError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{name}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image (or of a format PIL cannot read)") from None
    except Image.DecompressionBombError:  # PIL refuses to open one over twice its own limit, and says not its size
        over = f"more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
        raise UserError(too_large(name, None, None, size=over)) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{name}: cannot be read as an image ({error})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise UserError(too_large(name, width, height))
    return image


def read_image(path):
    """(the image, made small for predictions.png, and its 28x28 MNIST version); UserError naming the file if it
    cannot be read, is too large or is blank."""
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):  # never waited on, never read
        raise UserError(f"{path}: not a plain file (a pipe or a device): only image files are read")
    with open_image(path, path) as image:
        try:
            image.load()  # the whole file is decoded here, so a truncated one fails here
            image = ImageOps.exif_transpose(image)  # a phone's photo is stored sideways, with a note to turn it
        except (OSError, SyntaxError, ValueError) as error:
            raise UserError(f"{path}: cannot be read as an image ({error})") from None
    digit = to_mnist(image, name=path)
    shown = image.convert("RGBA")  # as plot_predictions draws it; a 12-megapixel photo is not kept whole
    shown.thumbnail(SHOWN_SIZE)
    return shown, digit


def check_out(path, images):
    """UserError unless `path` (--out) may be written: a new name or a plain file of one's own, not one of the
    `images` read, with an extension that names a format (files.FIGURE_FORMATS)."""
    if os.path.splitext(path)[1].lower() not in FIGURE_FORMATS:
        raise UserError(f"--out {path}: its extension names no format a figure is saved in; end it in "
                        f"{', '.join(FIGURE_FORMATS)}")
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
        raise UserError(f"--out {path}: not a plain file (a link, a device, a folder...), which is never replaced; "
                        f"name a new file")
    if os.path.exists(path) and any(os.path.exists(image) and os.path.samefile(path, image) for image in images):
        raise UserError(f"--out {path} is one of the images read: name another file, so that it is not replaced")


def image_paths(names):
    """(the files `names` gives, how many folders held none): a file as it is, a folder as the image files directly
    in it (by the extensions PIL reads), sorted. A folder with none is said on stderr."""
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    paths, empty = [], 0
    for name in names:
        if not os.path.isdir(name):
            paths.append(name)
            continue
        found = sorted(os.path.join(name, entry) for entry in os.listdir(name)
                       if os.path.splitext(entry)[1].lower() in extensions and os.path.isfile(os.path.join(name, entry)))
        if not found:
            print(f"error: {name}: a folder with no image files in it", file=sys.stderr)
            empty += 1
        paths += found
    return paths, empty


def classify(model, device, digits, calibration):
    """Probabilities [N, 10] of the 28x28 images `digits` [N, 28, 28], at the calibration's temperature."""
    with torch.inference_mode():
        scores = model(mnist_batch(digits).to(device)).float().cpu()  # log-probabilities or raw scores
    return (scores.log_softmax(dim=1) / calibration["temperature"]).softmax(dim=1)


NOT_SURE, NOT_A_DIGIT = "not sure", "not a digit"  # what answer() says where it reads no digit


def answer(probs, digit, calibration):
    """The digit read from one image's probabilities; or NOT_SURE below the calibration's confidence threshold;
    or NOT_A_DIGIT below its "not a digit" level (a confidence that only 0.5% of digits fall under; a run from
    before it has none), or where the image's ink (the 28x28 `digit`) is not strokes as MNIST's are
    (robustness.LEAST_SOLID_INK), such as noise, which a model may still read at 100%."""
    confidence, best = probs.max(dim=0)
    if float(solid_ink_share(digit)) < LEAST_SOLID_INK or float(confidence) < calibration.get("not_a_digit", 0):
        return NOT_A_DIGIT
    return int(best) if float(confidence) >= calibration["threshold"] else NOT_SURE


def top3_line(path, probs, digit, calibration):
    top = probs.topk(3)
    answers = "  ".join(f"{int(d)} {100 * float(p):.1f}%" for p, d in zip(top.values, top.indices))
    return f"{path}: {answer(probs, digit, calibration)}   top 3: {answers}"


def main(argv=None):
    parser = OneLineParser(description="Read handwritten digits from image files with a trained model.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...), or folders of them")
    parser.add_argument("--checkpoint", metavar="PATH", help=CHECKPOINT_HELP)
    parser.add_argument("--out", metavar="PATH", default="predictions.png",
                        help=f"where to draw the images and their probabilities: a new file or one of yours, "
                             f"ending in {', '.join(FIGURE_FORMATS)} (default: predictions.png)")
    args = parser.parse_args(argv)

    paths, failed = image_paths(args.images)
    try:
        check_out(args.out, paths)  # before anything is loaded: nothing of the user's is ever written over
    except UserError as error:
        sys.exit(f"error: {error}")
    device = pick_device()
    _, model, _, calibration = load_reader(args.checkpoint, device)

    # Each image on its own: one that cannot be read is named on stderr, and the others are still read.
    read = []
    for path in paths:
        try:
            read.append((path, *read_image(path)))
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
        except Exception as error:  # a damaged file can fail deep in PIL or numpy: its own line, named by its type
            print(f"error: {path}: cannot be read ({one_line(error, with_type=True)})", file=sys.stderr)
            failed += 1
    if read:
        paths, images, digits = zip(*read)
        probabilities = classify(model, device, torch.stack(digits), calibration)
        for path, probs, digit in zip(paths, probabilities, digits):
            print(top3_line(path, probs, digit, calibration))
        shown = min(len(paths), MAX_SHOWN)
        try:
            plot_predictions(paths[:shown], images[:shown], digits[:shown], probabilities[:shown], args.out,
                             [answer(p, d, calibration) for p, d in zip(probabilities[:shown], digits[:shown])],
                             calibration["threshold"])
        except OSError as error:
            print(f"error: cannot write {args.out}: {error.strerror}", file=sys.stderr)
            return 1
        print(f"Saved: {args.out}" + (f" (the first {shown} of {len(paths)} images)" if shown < len(paths) else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
