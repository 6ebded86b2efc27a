"""The command line of main_mnist.py, made from the settings in its block: a flag for each setting with its
comment as help, the models' recipes, the check of every value, the settings a run prints first, and those of a
resumed run.
"""
import argparse
import inspect
import re
import shlex
import sys
import textwrap
import tokenize

from machinery.errors import UserError
from machinery.hardware import LAYOUT_CHOICES
from model import MODELS

# The valid choices of the settings that have a fixed list of them; --help shows them, check_settings enforces them.
CHOICES = {"MODEL": list(MODELS), "SCHEDULE": ["step", "onecycle"], "LAYOUT": LAYOUT_CHOICES}

# What may change when a run resumes: the optimizer and the schedule come back from the checkpoint as they were.
RESUMABLE = ["EPOCHS", "DATA_DIR"]


def model_arguments(model_class, hp):
    """{argument: value} for each argument of model_class's constructor named like a setting (dropout: DROPOUT):
    how a setting added to the block reaches the model, wherever one is built."""
    return {name: hp[name.upper()] for name in inspect.signature(model_class).parameters if name.upper() in hp}


def flag_name(name):
    """The command-line flag of a setting: BATCH_SIZE -> --batch-size."""
    return "--" + name.lower().replace("_", "-")


def setting_comments(path):
    """{NAME: comment} for each line `NAME = value  # comment` of a Python file: a setting's meaning, written once."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(iter(lines).__next__) if token.type == tokenize.COMMENT}
    names = {number: match.group(1) for number, line in enumerate(lines, 1)
             if (match := re.match(r"([A-Z][A-Z0-9_]*)\s*=", line))}
    return {name: comments[number] for number, name in names.items() if number in comments}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line that names the problem, rather than the whole usage text
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv, defaults, recipes, helps):
    """The flags given (a setting's attribute exists only when its flag was given), checked with the settings they
    make: a bad value stops here, with one line and exit code 2, before any work."""
    recipe_lines = "\n".join(f"  {model}: " + (", ".join(f"{k}={v}" for k, v in recipe.items()) or "the settings as they are")
                             for model, recipe in recipes.items())
    parser = _Parser(description="Train a digit classifier on MNIST.", formatter_class=argparse.RawTextHelpFormatter,
                     allow_abbrev=False,  # --epoch is a typo, not --epochs
                     epilog=f"recipes applied by --model (flags given still win):\n{recipe_lines}")
    for name, default in defaults.items():
        kwargs = ({"action": argparse.BooleanOptionalAction} if isinstance(default, bool)
                  else {"type": parse_number} if isinstance(default, (int, float)) else {"type": str})
        if name in CHOICES:
            kwargs["metavar"] = "{" + ",".join(CHOICES[name]) + "}"
        in_recipes = "".join(f"; {model}: {recipe[name]}" for model, recipe in recipes.items() if name in recipe)
        parser.add_argument(flag_name(name), dest=name, default=argparse.SUPPRESS,
                            help=f"{helps.get(name, name)} (default: {default}{in_recipes})", **kwargs)
    parser.add_argument("--dry-run", action="store_true", help="one batch of training and one of test per epoch")
    modes = parser.add_mutually_exclusive_group()  # one mode at a time: a second stops here, in one line
    modes.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in this checkpoint.pt, "
                                                              "in its own folder")
    modes.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint on the test set")
    parser.add_argument("--checkpoint", metavar="PATH", help="with --eval-only: a model.pt or checkpoint.pt")
    modes.add_argument("--find-lr", action="store_true", help="an LR range test of the model and recipe; "
                                                              "prints a suggested --lr, trains nothing for keeps")
    modes.add_argument("--compare", nargs="*", metavar="RUN_DIR",
                       help="train nothing: put these runs (default: every run in OUT_DIR) side by side")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # for the run's record
    if args.eval_only and not args.checkpoint:
        parser.error("--eval-only needs --checkpoint PATH (a model.pt or checkpoint.pt)")
    if args.checkpoint and not args.eval_only:
        parser.error("--checkpoint goes with --eval-only; to continue training, use --resume PATH")
    if args.resume is None:
        try:
            check_settings(resolve(args, defaults, recipes))
        except UserError as error:
            parser.error(str(error))
    return args


def parse_number(text):
    """A number flag's value: a whole number where the text is one, else a float, whatever type the block's value
    has (CROP_P = 0 in the block still takes --crop-p 0.3); check_settings says where a whole number is needed."""
    text = text.strip()
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)


def flags_given(args, defaults):
    return {name: getattr(args, name) for name in defaults if hasattr(args, name)}


def resolve(args, defaults, recipes):
    """The run's settings: the block (defaults) as it is, then the recipe of the model that --model names, then the
    other flags. A model chosen in the block gets no recipe: what the block says is what runs."""
    given = flags_given(args, defaults)
    return {**defaults, **recipes.get(given.get("MODEL"), {}), **given}


def start(args, defaults, recipes):
    """The settings of a run that starts now (resolve), printed (print_settings)."""
    hp = resolve(args, defaults, recipes)
    print_settings(hp, args, defaults, recipes)
    return hp


def print_settings(hp, args, defaults, recipes, resumed=False):
    """Prints the settings a run uses, a few to a line, marking those that did not come from the block: [flag]
    (the command line), [recipe] (the recipe of --model) or, for a resumed run, [checkpoint]."""
    given = flags_given(args, defaults)
    recipe = {} if resumed else recipes.get(given.get("MODEL"), {})
    marked = []
    for name, value in hp.items():
        mark = ("flag" if name in given else "recipe" if name in recipe
                else "checkpoint" if resumed and value != defaults.get(name) else None)
        marked.append(f"{name}={value}" + (f" [{mark}]" if mark else ""))
    where = "the block of main_mnist.py"
    if recipe:
        where += f", {given['MODEL']}'s recipe [recipe] (RECIPES in main_mnist.py)"
    if resumed:
        where = "the checkpoint's [checkpoint] where they differ from the block"
    print(f"Settings ({where}; [flag]: from the command line):")
    line = " "
    for item in marked:
        if len(line) + 2 + len(item) > 116:
            print(line)
            line = " "
        line += " " + item
    print(line)
    unused = {name: value for name, value in recipes.get(hp["MODEL"], {}).items() if hp[name] != value}
    if not resumed and "MODEL" not in given and unused:
        print(textwrap.fill(f"Note: MODEL {hp['MODEL']} comes from the block, which is used as it is; --model "
                            f"{hp['MODEL']} would apply its recipe: "
                            + ", ".join(f"{name}={value}" for name, value in unused.items()),
                            width=118, subsequent_indent="  ", break_on_hyphens=False))


def check_settings(hp):
    """Raises UserError for the first value that would make the run fail or train garbage. Every rule is here."""
    def whole(name, least):
        return isinstance(hp[name], int) and not isinstance(hp[name], bool) and hp[name] >= least

    def number(name, low, high):  # NaN fails every comparison, so it is never in range
        return isinstance(hp[name], (int, float)) and not isinstance(hp[name], bool) and low <= hp[name] <= high

    rules = [
        ("MODEL", hp["MODEL"] in CHOICES["MODEL"], f"must be one of {', '.join(CHOICES['MODEL'])}"),
        ("SCHEDULE", hp["SCHEDULE"] in CHOICES["SCHEDULE"], f"must be one of {', '.join(CHOICES['SCHEDULE'])}"),
        ("LAYOUT", hp["LAYOUT"] in CHOICES["LAYOUT"], f"must be one of {', '.join(CHOICES['LAYOUT'])}"),
        ("EPOCHS", whole("EPOCHS", 1), "must be a whole number, at least 1"),
        ("BATCH_SIZE", whole("BATCH_SIZE", 1), "must be a whole number, at least 1"),
        ("TEST_BATCH_SIZE", whole("TEST_BATCH_SIZE", 1), "must be a whole number, at least 1"),
        ("LR", number("LR", 0, float("inf")) and 0 < hp["LR"] < float("inf"), "must be a positive number"),
        ("MOMENTUM", number("MOMENTUM", 0, 1) and hp["MOMENTUM"] < 1, "must be in [0, 1)"),
        ("WEIGHT_DECAY", number("WEIGHT_DECAY", 0, float("inf")) and hp["WEIGHT_DECAY"] < float("inf"),
         "must be 0 or more"),
        ("STEP_SIZE", whole("STEP_SIZE", 1), "must be a whole number, at least 1"),
        ("GAMMA", number("GAMMA", 0, 1) and hp["GAMMA"] > 0, "must be in (0, 1]"),
        ("NESTEROV", not hp["NESTEROV"] or hp["MOMENTUM"] > 0, "needs a MOMENTUM above 0"),
        ("ROTATION", number("ROTATION", 0, 180), "must be a number of degrees from 0 to 180"),
        ("CROP_P", number("CROP_P", 0, 1), "must be a probability, from 0 to 1"),
        ("CROP_SIZE", whole("CROP_SIZE", 1) and hp["CROP_SIZE"] <= 28, "must be a whole number of pixels, 1 to 28"),
        ("SHIFT", whole("SHIFT", 0) and hp["SHIFT"] < 28, "must be a whole number of pixels, 0 to 27"),
        ("SEED", whole("SEED", 0) and hp["SEED"] < 2 ** 63, "must be a whole number from 0 to 2**63 - 1"),
    ]
    for name, ok, requirement in rules:
        if not ok:
            raise UserError(f"{name} ({flag_name(name)}) {requirement}, not {hp[name]!r}")


def resumed_settings(args, defaults, recipes, checkpoint):
    """The settings of the run --resume continues, printed: the checkpoint's, with only RESUMABLE ones changed by
    flags."""
    saved = checkpoint["hyperparameters"]
    given = flags_given(args, defaults)
    if "MODEL" in given and given["MODEL"] != saved["MODEL"]:
        raise UserError(f"{args.resume} belongs to a {saved['MODEL']} run, not to --model {given['MODEL']}")
    if "OUT_DIR" in given:
        raise UserError("--resume continues in the checkpoint's own folder: leave out --out-dir")
    fixed = [name for name, value in given.items() if name not in RESUMABLE and value != saved.get(name)]
    if fixed:
        raise UserError(f"a resumed run keeps its hyperparameters; only {', '.join(map(flag_name, RESUMABLE))} "
                        f"may change, not {', '.join(fixed)}")
    started_dry = checkpoint["dry_run"]
    if started_dry != args.dry_run:
        raise UserError(f"this run was started {'with' if started_dry else 'without'} --dry-run, and goes on so: "
                        f"{resume_command(args.resume, started_dry)}")
    predates = [name for name in defaults if name not in saved]
    if predates:  # added to the block after the run began
        print(f"Note: {args.resume} predates the settings {', '.join(predates)}: the block's values are used")
    hp = {**defaults, **saved, **given}
    check_settings(hp)
    if hp["EPOCHS"] <= checkpoint["epoch"]:
        raise UserError(f"{args.resume} ends at epoch {checkpoint['epoch']}, so there is nothing left to train: "
                        f"add --epochs N with N above {checkpoint['epoch']} to train further")
    if hp["SCHEDULE"] == "onecycle" and hp["EPOCHS"] != saved["EPOCHS"]:
        raise UserError("a onecycle run's length is fixed when it starts: resume it without --epochs")
    print_settings(hp, args, defaults, recipes, resumed=True)
    return hp


def resume_command(checkpoint_path, dry_run=False):
    return f"python3 main_mnist.py --resume {shlex.quote(checkpoint_path)}" + (" --dry-run" if dry_run else "")
