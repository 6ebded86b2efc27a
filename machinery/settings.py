"""The settings of a run, made in one place from main_mnist.py's block, the recipe of its model, the flags and (for
a resumed run) the checkpoint: a flag for every setting with its help from the comment beside it, one check of
every value wherever it comes from, and where each value came from."""
import argparse
import ast
import difflib
import inspect
import math
import os
import re
import textwrap

from machinery.runs import CHECKPOINT, file_in, printable
from model import MODELS
from utils import UserError

CHOICES = {"MODEL": MODELS, "DATASET": ("MNIST", "FashionMNIST", "KMNIST"),
           "DEVICE": ("auto", "cpu", "cuda", "mps")}
RESUMABLE = ("EPOCHS", "DATA_DIR", "DEVICE")  # what a resumed run may change: it goes on as it began
BOUNDS = {  # name: (lowest, highest) of a number; NaN is never within them
    "EPOCHS": (1, 10_000), "BATCH_SIZE": (1, 60_000), "TEST_BATCH_SIZE": (1, 10_000), "LR": (1e-12, 10),
    "MOMENTUM": (0, 0.999), "WEIGHT_DECAY": (0, 10), "STEP_SIZE": (1, 10_000), "GAMMA": (1e-12, 1),
    "ROTATION": (0, 180), "CROP_P": (0, 1), "CROP_SIZE": (1, 28), "SHIFT": (0, 27), "LABEL_SMOOTHING": (0, 0.999),
    "SEED": (0, 2 ** 63 - 1),
}
WHOLE = ("EPOCHS", "BATCH_SIZE", "TEST_BATCH_SIZE", "STEP_SIZE", "CROP_SIZE", "SHIFT", "SEED")  # counts, never 2.5
MAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main_mnist.py")


class Settings(dict):
    """A run's settings: a dict that remembers the names read from it, so that a setting nothing read is said."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def __getitem__(self, name):
        if name not in self:  # hp["l1"] for L1: the name it likely meant
            close = difflib.get_close_matches(str(name).upper(), self, n=1, cutoff=0.7)
            raise KeyError(f"{name!r} is no setting" + (f": {close[0]}?" if close else " of the block"))
        self.read.add(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        return self[name] if name in self else default


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose error is one line naming the problem (exit 2), not the usage text and then it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setting_help(source):
    """{NAME: its comment} from the `NAME = value  # comment` lines of main_mnist.py's text."""
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-Z][A-Z0-9_]*) = .*?#\s*(.+)$", source, re.MULTILINE)}


def read_block(path=MAIN):
    """The plain values of main_mnist.py's block, read from its text: for the scripts that do not import it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    return {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) for target in node.targets if isinstance(target, ast.Name)}


def flag(name):
    return "--" + name.lower().replace("_", "-")


def parse_args(argv, block, recipes):
    """The command line of main_mnist.py: a flag per setting of the block, with the comment beside it, and the modes."""
    with open(MAIN, encoding="utf-8") as f:
        helps = setting_help(f.read())
    parser = OneLineParser(description="Train a digit classifier on MNIST. Each flag overrides a setting of "
                                       "main_mnist.py's block, or of the recipe of the model trained.")
    for name, value in block.items():
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(value, bool) else dict(
            type=float if isinstance(value, (int, float)) else str, metavar=name)
        in_recipes = "".join(f"; {model}: {recipe[name]}" for model, recipe in recipes.items() if name in recipe)
        parser.add_argument(flag(name), dest=name, default=argparse.SUPPRESS,
                            help=f"{helps.get(name, '')}" + (f"; one of {', '.join(CHOICES[name])}" if name in CHOICES
                                                             else "") + f" (default: {value}{in_recipes})", **kind)
    parser.add_argument("--traceback", action="store_true", help="an error's whole traceback, not its one line")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--resume", metavar="CHECKPOINT", help="go on with a stopped run from its checkpoint.pt")
    modes.add_argument("--eval-only", metavar="MODEL_PT", help="score a saved model.pt on the test set, robustness "
                                                                "included, into a folder of its own")
    modes.add_argument("--find-lr", action="store_true", help="an LR range test of the model and recipe")
    modes.add_argument("--compare", nargs="*", metavar="RUN_DIR", help="train nothing: these runs side by side "
                                                                       "(default: every run in OUT_DIR)")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.resume = args.resume and file_in(args.resume, CHECKPOINT)
    args.given = {name: getattr(args, name) for name in block if hasattr(args, name)}
    if args.eval_only and "MODEL" in args.given:
        parser.error("--eval-only reads the model from MODEL_PT (its run.json, or its weights); leave out --model")
    return args


def merge(block, recipes, given, checkpoint=None, where="the checkpoint"):
    """(settings, the source of each, notes) of a run: the block, the recipe of its MODEL over it, then the flags;
    for a resumed run, the settings saved in its checkpoint over the block and recipe, and only RESUMABLE ones
    changed by flags. Each value checked; a value the recipe overrides, or one edited in or added to the block or
    recipe since the checkpoint, is said."""
    for model, recipe in recipes.items():
        unknown = sorted(set(recipe) - set(block))
        if unknown:
            close = difflib.get_close_matches(unknown[0], block, n=1, cutoff=0.7)
            raise UserError(f"RECIPES[{model!r}] in main_mnist.py sets {unknown[0]}, which the block above it does not "
                            f"have" + (f": {close[0]}?" if close else ": add it there first"))
    saved = dict(checkpoint["settings"]) if checkpoint else {}
    model = (saved or given).get("MODEL", block["MODEL"])
    recipe = recipes.get(model, {})
    hp, sources = {}, {}
    for source, values in (("block", block), ("recipe", recipe), ("checkpoint", saved), ("flag", given)):
        hp.update(values)
        sources.update(dict.fromkeys(values, source))
    overridden = [f"{name}={block[name]!r}" for name in recipe if recipe[name] != block[name] and name not in given]
    notes = [f"{model}'s recipe overrides the block's {', '.join(overridden)}: edit RECIPES[{model!r}] in "
             f"main_mnist.py to change them"] if overridden and not saved else []
    if saved:
        fixed = [flag(name) for name, value in given.items() if name not in RESUMABLE and value != saved.get(name)]
        if fixed:
            raise UserError(f"a resumed run goes on with its own settings; only {', '.join(map(flag, RESUMABLE))} may "
                            f"change, not {', '.join(fixed)}")
        now, was = {**block, **recipe}, checkpoint.get("sources") or {}
        edited = [name for name in now if was.get(name) in ("block", "recipe") and saved[name] != now[name]
                  and name not in given]
        if edited:
            notes.append(f"edited since {where}: {', '.join(f'{n}={now[n]!r}' for n in edited)}; the run goes on "
                         f"with its own {', '.join(f'{n}={saved[n]!r}' for n in edited)}")
        new = [f"{name}={hp[name]!r}" for name in now if name not in saved and name not in given]
        if new:
            notes.append(f"new since {where}: {', '.join(new)}; the run goes on with {'them' if new[1:] else 'it'}, "
                         f"though its first {len(checkpoint['history'])} epochs had none")
    check(block, block, dict.fromkeys(block, "block"), model, where)  # what a recipe overrides too
    notes += [f"{name}={hp[name]!r} ({place(name, sources[name], model, where)}) is a string: a number is written "
              f"without quotes" for name in hp if sources[name] in ("block", "recipe") and reads_as_number(hp[name])]
    hp = Settings(check(hp, block, sources, model, where))
    hp.read.update(checkpoint.get("read", ()) if checkpoint else ())  # what the epochs before a resume read
    return hp, sources, notes


def place(name, source, model, checkpoint):
    """Where a setting's value was written: its flag, its line in main_mnist.py (the block's, or its model's recipe's),
    or the checkpoint resumed."""
    if source in ("flag", "checkpoint"):
        return flag(name) if source == "flag" else checkpoint
    with open(MAIN, encoding="utf-8") as f:
        pattern = rf"^{name} = " if source == "block" else rf"^\s*[\"']{re.escape(model)}[\"']: dict\("
        line = next((i for i, text in enumerate(f, 1) if re.match(pattern, text)), None)
    where = f"main_mnist.py:{line}" if line else "main_mnist.py"
    return where if source == "block" else f"RECIPES[{model!r}] at {where}"


def check(hp, block, sources, model, checkpoint):
    """The settings with each value checked (`checked`); UserError naming the first that is not and where it was
    written (`sources`: name -> block, recipe, checkpoint or flag)."""
    result = {}
    for name, value in hp.items():
        try:
            result[name] = checked(name, value, block.get(name, value))
        except ValueError as error:
            raise UserError(f"{name} ({place(name, sources[name], model, checkpoint)}) {error}") from None
    return result


def checked(name, value, reference):
    """The value, or ValueError saying what it must be: a number where BOUNDS has the name or the block has a number
    (whole where WHOLE has the name; a whole value stays whole where the block's is), else of the block's kind;
    within BOUNDS and CHOICES."""
    number = name in BOUNDS or type(reference) in (int, float)
    if not isinstance(value, (int, float, str)):  # a bool is an int
        raise ValueError(f"must be a number, a string, True or False, not {value!r} (an upper-case name above BLOCK "
                         f"is a setting: a constant that is no setting goes below it)")
    if value in ("True", "False"):  # NESTEROV = "False" would be true: a string that is not empty
        raise ValueError(f"is the string {value!r}: write {value} without quotes")
    if (type(value) in (int, float)) != number or not number and type(value) is not type(reference):
        kind = "a number" if number else f"{type(reference).__name__} as in the block ({reference!r})"
        raise ValueError(f"must be {kind}, not {value!r}")
    if number and math.isfinite(value) and value == int(value) and (name in WHOLE or type(reference) is int):
        value = int(value)
    elif name in WHOLE:
        raise ValueError(f"must be a whole number, not {value!r}")
    low, high = BOUNDS.get(name, (-math.inf, math.inf))
    if number and not low <= value <= high:
        raise ValueError(f"must be from {low:g} to {high:g}, not {value!r}")
    if name in CHOICES and value not in CHOICES[name]:
        raise ValueError(f"must be one of {', '.join(CHOICES[name])}, not {value!r}")
    return value


def reads_as_number(value):
    try:
        return isinstance(value, str) and math.isfinite(float(value))
    except ValueError:
        return False


def model_arguments(model_class, hp):
    """The settings whose names are arguments of the model's constructor, by those names: DROPOUT -> dropout."""
    names = inspect.signature(model_class).parameters
    return {name: hp[name.upper()] for name in names if name.upper() in hp}


def print_settings(hp, sources, notes):
    """The settings a run uses, a few to a line, each marked with where it came from unless the block."""
    items = [printable(f"{name}={value}") + (f" [{sources[name]}]" if sources[name] != "block" else "")
             for name, value in hp.items()]
    marks = {"flag": "the command line", "recipe": f"{hp['MODEL']}'s recipe", "checkpoint": "the checkpoint resumed"}
    print("Settings (" + "".join(f"[{mark}]: from {text}; " for mark, text in marks.items() if mark in sources.values())
          + "the others: the block of main_mnist.py):")
    line = " "
    for item in items:  # a line as full as it goes, never splitting a value from its mark
        if len(line) + len(item) >= 118:
            print(line)
            line = " "
        line += " " + item
    print(line)
    for note in notes:
        print(textwrap.fill(printable(f"Note: {note}"), width=118, subsequent_indent="  ", break_on_hyphens=False))
