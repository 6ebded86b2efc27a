"""The command line made from main_mnist.py's block: a flag for every setting, its help from the comment that
explains it there, and one check of every value, wherever it comes from (the block, a flag, a checkpoint)."""
import argparse
import math
import re
import sys
import textwrap

from machinery import UserError
from model import MODELS

DATASETS = ("MNIST", "FashionMNIST", "KMNIST")  # torchvision's sets of 28x28 grey images in ten classes
RESUMABLE = ("EPOCHS", "DATA_DIR")  # what a resumed run may change: it goes on as it began, but may go further
BOUNDS = {  # name: (lowest, highest) of a number; NaN is never within them
    "EPOCHS": (1, 10_000), "BATCH_SIZE": (1, 60_000), "TEST_BATCH_SIZE": (1, 10_000), "LR": (1e-12, 10),
    "MOMENTUM": (0, 0.999), "WEIGHT_DECAY": (0, 10), "STEP_SIZE": (1, 10_000), "GAMMA": (1e-12, 1),
    "ROTATION": (0, 180), "CROP_P": (0, 1), "CROP_SIZE": (1, 28), "SHIFT": (0, 27), "LABEL_SMOOTHING": (0, 0.999),
    "SEED": (0, 2 ** 63 - 1),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose error is one line naming the problem (exit 2), not the usage text and then it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setting_help(source):
    """{NAME: its comment} from main_mnist.py's text: `NAME = value  # comment` and `#   NAME   comment` lines."""
    pattern = r"^([A-Z][A-Z0-9_]*) = .*?#\s*(.+)$|^#\s+([A-Z][A-Z0-9_]*)\s{2,}(.+)$"
    return {m[1] or m[3]: (m[2] or m[4]).strip() for m in re.finditer(pattern, source, re.MULTILINE)}


def defaults(block, recipes):
    """Every setting with its value in the block or in Net's recipe, which give each setting's type."""
    return {**block, **recipes["Net"]}


def flag(name):
    return "--" + name.lower().replace("_", "-")


def number(text):
    """A number flag's value: whole where the text is one, else a float (--crop-p 0 and --crop-p 0.3 both work)."""
    return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else float(text)


def parse_args(argv, block, recipes, source):
    """The command line of main_mnist.py: a flag per setting of the block and the recipes, and the modes."""
    helps = setting_help(source)
    parser = OneLineParser(description="Train a digit classifier on MNIST. Each flag overrides a setting of "
                                       "main_mnist.py's block, or of the recipe of the model trained.")
    for name, value in defaults(block, recipes).items():
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(value, bool) else dict(
            type=number if isinstance(value, (int, float)) else str, metavar=name)
        parser.add_argument(flag(name), dest=name, default=argparse.SUPPRESS,
                            help=f"{helps.get(name, '')} (default: {value})", **kind)
    parser.add_argument("--dry-run", action="store_true", help="one batch of training and one of test an epoch")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--resume", metavar="CHECKPOINT", help="go on with a stopped run from its checkpoint.pt")
    modes.add_argument("--eval-only", metavar="MODEL_PT", help="score a saved model.pt on the test set, robustness "
                                                                "included, into a folder of its own")
    modes.add_argument("--find-lr", action="store_true", help="an LR range test of the model and recipe")
    modes.add_argument("--compare", nargs="*", metavar="RUN_DIR", help="train nothing: these runs side by side "
                                                                       "(default: every run in OUT_DIR)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.given = {name: getattr(args, name) for name in defaults(block, recipes) if hasattr(args, name)}
    return args


def resolve(args, block, recipes):
    """The settings of a new run: the block, then the recipe of its MODEL over Net's (which gives what a recipe
    leaves out, and all of a model that has none), then the flags; each value checked."""
    model = args.given.get("MODEL", block["MODEL"])
    hp = {**block, **recipes["Net"], **recipes.get(model, {}), **args.given}
    check(hp, defaults(block, recipes), "")
    return hp


def check(hp, reference, where):
    """UserError for the first setting of another type than its value in `reference` has (a float takes a whole
    number too), or out of its bounds. `where` names the settings' source in the message."""
    for name, value in hp.items():
        expected = type(reference.get(name, value))
        if not (type(value) is expected or expected is float and type(value) is int):
            raise UserError(f"{name}{where} must be {expected.__name__}, like {reference[name]!r}, not {value!r}")
        low, high = BOUNDS.get(name, (-math.inf, math.inf))
        if isinstance(value, (int, float)) and not low <= value <= high:
            raise UserError(f"{name} ({flag(name)}){where} must be from {low:g} to {high:g}, not {value!r}")
    for name, choices in (("MODEL", MODELS), ("DATASET", DATASETS)):
        if hp.get(name) not in choices:
            raise UserError(f"{name}{where} must be one of {', '.join(choices)}, not {hp.get(name)!r}")


def resumed(args, checkpoint, block, recipes):
    """The settings of the run a checkpoint was saved by, with only the RESUMABLE ones changed by flags."""
    if not isinstance(checkpoint["settings"], dict):
        raise UserError(f"{args.resume} is damaged: its settings are no mapping")
    model = checkpoint["settings"].get("MODEL")
    hp = {**block, **recipes["Net"], **recipes.get(model, {}), **checkpoint["settings"], **args.given}
    fixed = [flag(name) for name, value in args.given.items()
             if name not in RESUMABLE and value != checkpoint["settings"].get(name)]
    if fixed:
        raise UserError(f"a resumed run goes on with its own settings; only {', '.join(map(flag, RESUMABLE))} may "
                        f"change, not {', '.join(fixed)}")
    check(hp, defaults(block, recipes), f" in {args.resume}")
    if hp["SCHEDULE"] == "onecycle" and hp["EPOCHS"] != checkpoint["settings"]["EPOCHS"]:
        raise UserError("a one-cycle run's length is set when it starts: resume it without --epochs")
    return hp


def print_settings(hp, given, recipes, resumed_from=None):
    """The settings a run uses, a few to a line, [flag] marking those from the command line."""
    source = (f"those of {resumed_from}" if resumed_from else "the block of main_mnist.py and "
              + (f"{hp['MODEL']}'s recipe" if hp["MODEL"] in recipes else f"Net's recipe ({hp['MODEL']} has none)"))
    items = [f"{name}={value}" + (" [flag]" if name in given else "") for name, value in hp.items()]
    print(f"Settings ({source}; [flag]: from the command line):")
    print(textwrap.fill(" ".join(items), width=118, initial_indent="  ", subsequent_indent="  ",
                        break_on_hyphens=False, break_long_words=False))
