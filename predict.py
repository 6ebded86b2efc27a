"""Read handwritten digits from image files: python3 predict.py IMAGE_OR_FOLDER [...] [--model PATH] [--out PATH]

Any photo, scan or drawing works: each image is brought to MNIST's format first (machinery/images.py). Prints, per
image, the digit read, or "not sure", or "not a digit", with the likeliest three digits; draws the first images
with what the model saw and its probabilities into predictions.png. The model is by default the model.pt of the
newest finished run in OUT_DIR.
"""
import contextlib
import glob
import io
import os
import sys

from PIL import Image

from machinery import runs
from machinery.evaluation import answer, read
from machinery.figures import plot_predictions
from machinery.images import open_image, to_mnist
from machinery.settings import OneLineParser, read_block
from machinery.tools import built_as, load_model
from utils import UserError, pick_device

MAX_SHOWN = 20  # images drawn in predictions.png; only theirs are kept as small copies
LARGEST_FILE = 200_000_000  # bytes of an image file; a phone's photo is a few MB
UNCALIBRATED = {"temperature": 1.0, "threshold": 0.9}  # for a model.pt that no run of main_mnist.py finished


def newest_model(parent=None):
    """The model.pt of the newest finished training run under `parent` (main_mnist.py's OUT_DIR), not a dry run:
    an --eval-only folder holds a copy of what it scored, which may be a dry run's or a stopped run's."""
    parent, found = parent or read_block()["OUT_DIR"], []
    for path in glob.glob(os.path.join(glob.escape(parent), "*", runs.FINAL_MODEL)):
        with contextlib.suppress(UserError, OSError, KeyError, TypeError):  # a record of older code, or damaged
            record = runs.read_json(os.path.join(os.path.dirname(path), runs.RECORD))
            if record["status"] == "finished" and record["mode"] == "train" and not record["settings"]["DRY_RUN"]:
                found.append((os.path.getmtime(path), path))
    if not found:
        raise UserError(f"no finished run in {parent}/ (dry runs aside): train one with `python3 main_mnist.py`, or "
                        f"name a model.pt with --model PATH")
    return max(found)[1]


def load_reader(path, device):
    """(model, what it knows to answer with) of `path`, or of the newest run; says which model and how it answers."""
    path = path or newest_model()
    name, model, knows = load_model(path, device)
    print(f"Model: {name} from {runs.printable(path)}")
    if built_as(runs.file_in(path, runs.FINAL_MODEL))[2].get("DRY_RUN"):
        print("Note: a dry run's model (one batch an epoch): it reads digits little better than by chance")
    if not knows:  # of a finished run's checkpoint.pt, the model.pt beside it answers with the run's calibration
        final, calibration = (os.path.join(os.path.dirname(path), f) for f in (runs.FINAL_MODEL, runs.CALIBRATION))
        other = os.path.isfile(path) and path != final and os.path.isfile(final) and os.path.isfile(calibration)
        print(f"Note: {runs.printable(path)} has no calibration of a finished run" + (
              f" (--model {runs.printable(final)} answers with it)" if other else "") + ": \"not sure\" below "
              f"{100 * UNCALIBRATED['threshold']:.0f}% confidence, and no \"not a digit\"")
    return model, {**UNCALIBRATED, **knows}


def image_paths(names):
    """(the files `names` gives: a file as it is, a folder as the image files directly in it, sorted; how many
    folders held none)."""
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    paths, empty = [], 0
    for name in names:
        if os.path.isdir(name):
            found = sorted(os.path.join(name, entry) for entry in os.listdir(name)
                           if os.path.splitext(entry)[1].lower() in extensions)
            paths += [path for path in found if os.path.isfile(path)]
            if not found:
                print(f"error: {runs.printable(name)}: a folder with no image files in it", file=sys.stderr)
                empty += 1
        else:
            paths.append(name)
    return paths, empty


def check_out(path, images):
    """--out may be a new file or a plain one of one's own, but never one of the images, nor a link or a device."""
    if os.path.splitext(path)[1].lower() not in runs.FORMATS:
        raise UserError(f"--out {path}: end it in one of {', '.join(runs.FORMATS)}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"--out {path}: there is no folder {os.path.dirname(os.path.abspath(path))}")
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
        raise UserError(f"--out {path} is not a plain file: name a new one")
    if os.path.exists(path) and any(os.path.exists(i) and os.path.samefile(path, i) for i in images):
        raise UserError(f"--out {path} is one of the images read: name another file")


def main(argv=None):
    parser = OneLineParser(description="Read handwritten digits from image files with a trained model.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...), or folders of them")
    parser.add_argument("--model", metavar="PATH", help="a model.pt (default: the newest finished run's)")
    parser.add_argument("--out", metavar="PATH", default="predictions.png", help="where to draw the first images")
    args = parser.parse_args(argv)
    with runs.errors_in_one_line():
        paths, failed = image_paths(args.images)
        check_out(args.out, paths)
        device = pick_device()
        model, knows = load_reader(args.model, device)
        shown, answered = [], 0
        for path in paths:  # each image alone: one that cannot be read is said, and the others still read
            try:
                image = open_image(io.BytesIO(runs.read_bytes(path, LARGEST_FILE)), path)
                digit = to_mnist(image, path)
            except (UserError, OSError) as error:
                message = f"{path}: {error.strerror}" if isinstance(error, OSError) else error
                print(f"error: {runs.printable(message)}", file=sys.stderr)
                failed += 1
                continue
            probabilities, distance = read(model, device, digit[None], knows)
            verdict = answer(probabilities[0], distance[0] if distance is not None else None, knows)
            top = probabilities[0].topk(3)
            answered += 1
            print(f"{runs.printable(path)}: {verdict}   top 3: " + "  ".join(
                f"{int(d)} {100 * float(p):.1f}%" for p, d in zip(top.values, top.indices)))
            if len(shown) < MAX_SHOWN:
                image.thumbnail((256, 256))
                shown.append((path, image.convert("RGBA"), digit, probabilities[0], verdict))
        if shown:
            runs.save_figure(plot_predictions(*zip(*shown)), args.out)
            print(f"Saved: {runs.printable(args.out)}" + (f" (the first {len(shown)} images read)"
                                                          if len(shown) < answered else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
