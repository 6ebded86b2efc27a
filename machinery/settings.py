"""The command line of main_mnist.py, made from the settings in its block: a flag for each setting with its
comment as help, the models' recipes, the check of every value, the settings a run prints first, and those of a
resumed run.
"""
import argparse
import inspect
import os
import re
import shlex
import sys
import textwrap
import tokenize

from machinery.errors import OneLineParser, UserError, one_line
from machinery.hardware import LAYOUT_CHOICES
from machinery.non_digits import KINDS, kind_names
from model import MODELS
from utils import loss_name

# The valid choices of the settings that have a fixed list of them; --help shows them, check_settings enforces them.
CHOICES = {"MODEL": list(MODELS), "LAYOUT": LAYOUT_CHOICES}  # (SCHEDULE's: the branches of build_scheduler)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder above machinery/
TRAINING_IMAGES, TEST_IMAGES = 60_000, 10_000  # MNIST's: a batch larger than its set is a mistake
# The largest lr or weight decay: past it a step multiplies the weights by more than float32 holds (1e39 overflows
# with a traceback); anything near it diverges at once, which the run says in one line.
LARGEST_RATE = 1e4


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


def parse_args(argv, defaults, recipes, helps, builders=None):
    """The flags given (a setting's attribute exists only when its flag was given), checked with the settings they
    make (check_settings, then check_builds with `builders`, main_mnist.py's build_model, build_optimizer and
    build_scheduler): a bad value stops here, with one line and exit code 2, before any work."""
    recipe_lines = "\n".join(f"  {model}: " + (", ".join(f"{k}={v}" for k, v in recipe.items()) or "the settings as they are")
                             for model, recipe in recipes.items())
    parser = OneLineParser(description="Train a digit classifier on MNIST.", formatter_class=argparse.RawTextHelpFormatter,
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
            hp = resolve(args, defaults, recipes)
            check_settings(hp)
            if builders and args.compare is None:
                check_builds(hp, *builders)
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
    for note in setting_notes(hp, given, defaults, recipes, resumed):
        print(as_note(note))
    unused = {name: value for name, value in recipes.get(hp["MODEL"], {}).items() if hp[name] != value}
    if not resumed and "MODEL" not in given and unused:
        print(as_note(f"MODEL {hp['MODEL']} comes from the block, which is used as it is; --model {hp['MODEL']} "
                      f"would apply its recipe: " + ", ".join(f"{name}={value}" for name, value in unused.items())))


def as_note(text):
    """A note as a run prints it: "Note: " and the text, folded to the console's 118 columns."""
    return textwrap.fill("Note: " + text, width=118, subsequent_indent="  ", break_on_hyphens=False)


def setting_notes(hp, given, defaults, recipes, resumed):
    """What a learner's edit may have left unsaid: a model --model names that has no recipe, and a setting of the
    block that nothing reads (unread_settings)."""
    notes = []
    if not resumed and "MODEL" in given and given["MODEL"] not in recipes:
        notes.append(f"{given['MODEL']} has no recipe in RECIPES (main_mnist.py): it trains with the block's settings")
    unread = unread_settings(defaults, MODELS.get(hp["MODEL"]), project_sources())
    if unread:
        notes.append(f"nothing reads {', '.join(unread)}: no hp[\"NAME\"] in the code and no argument of "
                     f"{hp['MODEL']}'s constructor of that name, so {'it changes' if len(unread) == 1 else 'they change'}"
                     f" nothing")
    return notes


def project_files():
    """The project's .py files, relative to REPO: the learner's at the top and machinery/'s, sorted."""
    return sorted(name for folder in ("", "machinery") for name in
                  (os.path.join(folder, entry) for entry in os.listdir(os.path.join(REPO, folder)))
                  if name.endswith(".py"))


def project_sources():
    """{file: text} of project_files."""
    sources = {}
    for name in project_files():
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            sources[name] = f.read()
    return sources


def check_settings(hp):
    """Raises UserError for the first value that would make the run fail or train garbage. Every rule is here."""
    def whole(name, least):
        return isinstance(hp[name], int) and not isinstance(hp[name], bool) and hp[name] >= least

    def number(name, low, high):  # NaN fails every comparison, so it is never in range
        return isinstance(hp[name], (int, float)) and not isinstance(hp[name], bool) and low <= hp[name] <= high

    rules = [
        ("MODEL", hp["MODEL"] in CHOICES["MODEL"], f"must be one of {', '.join(CHOICES['MODEL'])}"),
        ("LAYOUT", hp["LAYOUT"] in CHOICES["LAYOUT"], f"must be one of {', '.join(CHOICES['LAYOUT'])}"),
        ("EPOCHS", whole("EPOCHS", 1), "must be a whole number, at least 1"),
        ("BATCH_SIZE", whole("BATCH_SIZE", 1) and hp["BATCH_SIZE"] <= TRAINING_IMAGES,
         f"must be a whole number from 1 to {TRAINING_IMAGES:,} (the training images)"),
        ("TEST_BATCH_SIZE", whole("TEST_BATCH_SIZE", 1) and hp["TEST_BATCH_SIZE"] <= TEST_IMAGES,
         f"must be a whole number from 1 to {TEST_IMAGES:,} (the test images)"),
        ("LR", number("LR", 0, LARGEST_RATE) and hp["LR"] > 0, f"must be a positive number, at most {LARGEST_RATE:g}"),
        ("MOMENTUM", number("MOMENTUM", 0, 1) and hp["MOMENTUM"] < 1, "must be in [0, 1)"),
        ("WEIGHT_DECAY", number("WEIGHT_DECAY", 0, LARGEST_RATE), f"must be a number from 0 to {LARGEST_RATE:g}"),
        ("STEP_SIZE", whole("STEP_SIZE", 1), "must be a whole number, at least 1"),
        ("GAMMA", number("GAMMA", 0, 1) and hp["GAMMA"] > 0, "must be in (0, 1]"),
        ("NESTEROV", not hp["NESTEROV"] or hp["MOMENTUM"] > 0, "needs a MOMENTUM above 0"),
        ("ROTATION", number("ROTATION", 0, 180), "must be a number of degrees from 0 to 180"),
        ("CROP_P", number("CROP_P", 0, 1), "must be a probability, from 0 to 1"),
        ("CROP_SIZE", whole("CROP_SIZE", 1) and hp["CROP_SIZE"] <= 28, "must be a whole number of pixels, 1 to 28"),
        ("SHIFT", whole("SHIFT", 0) and hp["SHIFT"] < 28, "must be a whole number of pixels, 0 to 27"),
        ("LABEL_SMOOTHING", number("LABEL_SMOOTHING", 0, 1) and hp["LABEL_SMOOTHING"] < 1, "must be in [0, 1)"),
        ("NON_DIGITS", isinstance(hp["NON_DIGITS"], str) and set(kind_names(hp["NON_DIGITS"])) <= set(KINDS),
         f"must name kinds from {', '.join(KINDS)}, comma-separated, or be empty (off)"),
        ("HELD_BACK", number("HELD_BACK", 0, 0.5), "must be a share of the training images, from 0 to 0.5"),
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


def check_builds(hp, build_model, build_optimizer, build_scheduler):
    """UserError, before any work, if the settings do not build a model, an optimizer and a schedule as
    main_mnist.py's build functions make them: what no rule here knows, such as a setting a learner added
    (DROPOUT = 1.5), or a SCHEDULE that build_scheduler has no branch for."""
    try:
        model = build_model(hp)
        build_scheduler(build_optimizer(model, hp), hp, 1)
    except Exception as error:  # whatever a learner's edit raises: said in one line, before any folder is made
        raise UserError(f"these settings do not build a model, an optimizer and a schedule: "
                        f"{one_line(error, with_type=True)}") from None


def report_training(optimizer, scheduler, criterion, outputs, hp):
    """Prints the loss, the optimizer and the schedule as built (describe_training), with a note where they differ
    from the settings; returns them for run.json."""
    built, lines = describe_training(optimizer, scheduler, hp)
    print(f"Loss: {loss_name(criterion)} (the model returns {outputs})")
    print("\n".join(lines))
    return {"loss": loss_name(criterion), **built}


def describe_training(optimizer, scheduler, hp):
    """({optimizer, schedule} for run.json, the lines to print): what was built, as the objects themselves say, and
    a note wherever that differs from the settings, which a learner's edit of build_optimizer can make happen
    (lr=0.001 typed in, Adam in place of SGD)."""
    built = {key: value for key, value in optimizer.defaults.items()
             if key in ("lr", "momentum", "betas", "nesterov", "weight_decay", "eps") and value is not None}
    built = {"class": type(optimizer).__name__, **{key: list(v) if isinstance(v, tuple) else v
                                                   for key, v in built.items()}}
    schedule = {"class": type(scheduler).__name__, "starting_lr": optimizer.param_groups[0]["lr"]}
    if "max_lr" in optimizer.param_groups[0]:  # OneCycleLR (or CyclicLR): its cycle replaces the optimizer's lr
        schedule["peak_lr"] = optimizer.param_groups[0]["max_lr"]
    lines = [f"Optimizer: {built['class']}(" + ", ".join(f"{k}={v}" for k, v in built.items() if k != "class")
             + f"); schedule: {schedule['class']}, starting at lr {schedule['starting_lr']:.3g}"
             + (f", peaking at {schedule['peak_lr']:.3g}" if "peak_lr" in schedule else "")]
    notes = []
    if built["class"] != "SGD":
        notes.append(f"the optimizer is {built['class']}, not SGD: MOMENTUM and NESTEROV describe SGD's, and "
                     f"are used only as far as build_optimizer passes them on")
    if "peak_lr" in schedule:
        if built["lr"] != schedule["peak_lr"]:
            notes.append(f"OneCycleLR sets the lr itself, peaking at {schedule['peak_lr']:g}: the lr "
                         f"{built['lr']:g} the optimizer was built with is not used")
    elif built["lr"] != hp["LR"]:
        notes.append(f"the optimizer's lr is {built['lr']:g}, not LR={hp['LR']:g} of the settings: build_optimizer "
                     f"does not pass hp[\"LR\"] on")
    if built.get("weight_decay", 0) != hp["WEIGHT_DECAY"]:
        notes.append(f"the optimizer's weight decay is {built.get('weight_decay', 0):g}, not "
                     f"WEIGHT_DECAY={hp['WEIGHT_DECAY']:g} of the settings")
    if built["class"] == "SGD" and "peak_lr" not in schedule and built["momentum"] != hp["MOMENTUM"]:
        notes.append(f"the optimizer's momentum is {built['momentum']:g}, not MOMENTUM={hp['MOMENTUM']:g} of the "
                     f"settings")
    lines += [as_note(note) for note in notes]
    return {"optimizer": built, "schedule": schedule}, lines


def unread_settings(defaults, model_class, sources):
    """The names of the block's settings that nothing reads: no hp["NAME"] (or 'NAME') in the project's source
    files `sources` ({path: text}), and no argument of model_class's constructor named so. Such a setting is in
    the block and run.json, and changes nothing."""
    arguments = {name.upper() for name in inspect.signature(model_class).parameters} if model_class else set()
    text = "\n".join(sources.values())
    return [name for name in defaults
            if name not in arguments and f'"{name}"' not in text and f"'{name}'" not in text]
