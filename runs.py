"""Run bookkeeping for main_mnist.py, so that the training script can tell the training story.

Here: the command line built from the script's settings, a folder per run with its lock and its record (run.json),
checkpoints and exact resume, Ctrl-C and SIGTERM, what a failed run leaves and says, and `--compare`.
"""
import argparse
import csv
import datetime
import hashlib
import io
import json
import os
import platform
import random
import re
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import tokenize
from contextlib import contextmanager

try:  # the folder lock: POSIX's flock where there is one (Linux, macOS), else Windows' byte-range locks
    import fcntl
except ImportError:
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

import torch
import torchvision

from model import MODELS
from utils import (UserError, NonFiniteLoss, METRICS_HEADER, atomic_write, write_metrics, plot_metrics,
                   plot_comparison)

# The files of a run folder. Any of RUN_FILES in a folder means a run wrote there, and no other run may.
RECORD, CHECKPOINT, METRICS, PLOT, FINAL_MODEL = "run.json", "checkpoint.pt", "metrics.csv", "accuracy_loss.png", "model.pt"
SAMPLES, MISCLASSIFIED, CONFUSION, LR_PLOT = "samples.png", "misclassified.png", "confusion_matrix.png", "lr_finder.png"
RUN_FILES = (RECORD, SAMPLES, CHECKPOINT, METRICS, PLOT, FINAL_MODEL, MISCLASSIFIED, CONFUSION, LR_PLOT)
LOCK = ".lock"
COMPARISON_PNG, COMPARISON_CSV = "comparison.png", "comparison.csv"

# The valid choices of the settings that have a fixed list of them; --help shows them, check_settings enforces them.
CHOICES = {"MODEL": list(MODELS), "SCHEDULE": ["step", "onecycle"]}
# What may change when a run resumes: the optimizer and the schedule come back from the checkpoint as they were.
RESUMABLE = ["EPOCHS", "DATA_DIR"]
# Settings that say where things are rather than how the model trains; --compare does not list them.
PLACES = ["DATA_DIR", "OUT_DIR"]


# ---------------------------------------------------------------------------------------------------------------
# The command line: one flag per setting, its help taken from the comment beside the setting.

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
        kwargs = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {"type": type(default)}
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
            check_settings(settings(args, defaults, recipes))
        except UserError as error:
            parser.error(str(error))
    return args


def flags_given(args, defaults):
    return {name: getattr(args, name) for name in defaults if hasattr(args, name)}


def settings(args, defaults, recipes):
    """The run's settings: the block (defaults) as it is, then the recipe of the model that --model names, then the
    other flags. A model chosen in the block gets no recipe: what the block says is what runs."""
    given = flags_given(args, defaults)
    return {**defaults, **recipes.get(given.get("MODEL"), {}), **given}


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


# ---------------------------------------------------------------------------------------------------------------
# Run folders and their lock: one writer per folder, and nothing a run wrote is ever overwritten by another.

_held_locks = []  # open lock files: the OS releases their locks when the process ends, however it ends
# Windows locks byte ranges, and a locked range cannot be read by others: the lock is taken on a byte far past the
# process id that the file holds, so that a second process can still read who holds it.
_LOCKED_BYTE = 1 << 20
_PID_LINE = re.compile(rb"\d{1,20}\n?")  # what a lock file of ours holds: the process id of its last holder


def _try_lock(fd, shared=False):
    """Takes the OS's lock on the open file `fd` without waiting; False if another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        elif msvcrt is not None:
            os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:  # BlockingIOError (flock), PermissionError (Windows): held by another process
        return False


def _open_lock_file(folder, flags):
    """The open lock file of `folder`, never through a link; UserError if it is anything but a file of ours."""
    path = os.path.join(folder, LOCK)
    if os.path.islink(path):  # O_NOFOLLOW refuses a link too, where the OS has it; this says why
        raise UserError(f"{path} is a link: a run's lock is never written through one; remove it and run again")
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0), 0o644)
    content = os.read(fd, 64) if stat.S_ISREG(os.fstat(fd).st_mode) else b"not a plain file"
    if content and not _PID_LINE.fullmatch(content):
        os.close(fd)
        raise UserError(f"{path} is not a run's lock file (it holds something else): move it out of the folder "
                        f"and run again")
    return fd, content.decode().strip()


def lock_folder(folder):
    """Holds an exclusive lock on `folder` for the rest of this process's life; UserError if another process has it.

    The lock is the OS's (flock, or Windows' locking), so it ends with the process, a killed one too. Its file
    .lock holds the holder's process id, for the message a second process gets; it is written only into a plain
    file that is empty or holds such an id, never through a link."""
    try:
        fd, holder = _open_lock_file(folder, os.O_RDWR | os.O_CREAT)
    except OSError as error:
        raise UserError(f"cannot write to the output folder {folder}: {error.strerror}") from None
    if not _try_lock(fd):
        os.close(fd)
        raise UserError(f"{folder} is in use by another run (process {holder or 'unknown'}): wait for it to end, "
                        f"or choose another --out-dir") from None
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.ftruncate(fd, len(f"{os.getpid()}\n"))  # a file of ours (checked above): the last holder's id goes
    except OSError as error:
        os.close(fd)
        raise UserError(f"cannot write to the output folder {folder}: {error.strerror}") from None
    _remove_orphans(folder)
    if fcntl is None and msvcrt is None:
        print(f"warning: this system has no file lock that Python can use; nothing stops a second run from "
              f"writing into {folder}", file=sys.stderr)
    _held_locks.append(fd)


def _remove_orphans(folder):
    """Removes the temporary files that atomic_write() leaves when its process is killed mid-write: whoever holds
    the folder's lock is its only writer, so any such file is an orphan."""
    orphan = re.compile(r"\.(" + "|".join(map(re.escape, RUN_FILES)) + r")\.\d+-[0-9a-f]{8}\.tmp")
    for name in os.listdir(folder):
        if orphan.fullmatch(name):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass  # kept: it harms nothing but space


def release_locks():
    """Ends this process's hold on its run folders (the end of the process does the same)."""
    while _held_locks:
        os.close(_held_locks.pop())


def is_locked(folder):
    """Whether a live process holds `folder`'s lock (a run whose record says 'running' but is not locked was killed)."""
    try:
        fd, _ = _open_lock_file(folder, os.O_RDONLY)
    except (OSError, UserError):
        return False
    try:
        if _try_lock(fd, shared=True):
            if msvcrt is not None and fcntl is None:
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            return False
        return True
    finally:
        os.close(fd)


def new_run_folder(parent, name):
    """A new folder parent/<date>_<time>_<name>, locked; `ls` sorts such folders by start. Never an existing one."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        os.makedirs(parent, exist_ok=True)
        for attempt in range(1, 100):
            folder = os.path.join(parent, f"{stamp}_{name}" + (f"-{attempt}" if attempt > 1 else ""))
            try:
                os.mkdir(folder)  # fails if it exists, even if another process made it a moment ago
                break
            except FileExistsError:
                continue
    except OSError as error:
        raise UserError(f"cannot write to the output folder {parent}: {error.strerror}") from None
    lock_folder(folder)
    return folder


def claim_folder(folder):
    """The folder --out-dir names, locked, once it is known to hold no run's files."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write to the output folder {folder}: {error.strerror}") from None
    lock_folder(folder)
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]
    if not present:
        return folder
    checkpoint_path = os.path.join(folder, CHECKPOINT)
    if os.path.exists(os.path.join(folder, FINAL_MODEL)):
        raise UserError(f"{folder} already holds a run's files ({', '.join(present)}): choose another --out-dir, "
                        f"or leave it out for a new folder of its own")
    if not os.path.exists(checkpoint_path):
        raise UserError(f"{folder} holds a run that ended in its first epoch ({', '.join(present)}), with no "
                        f"checkpoint, so nothing to resume: delete the folder to use it again, or choose another "
                        f"--out-dir")
    checkpoint = load_checkpoint(checkpoint_path)
    raise UserError(f"{folder} holds an unfinished run (epoch {checkpoint['epoch']} of "
                    f"{checkpoint['hyperparameters']['EPOCHS']}): resume it with "
                    f"{resume_command(checkpoint_path, checkpoint.get('dry_run', False))}, or choose another --out-dir")


def open_run_folder(args, hp, kind=""):
    """Where this run writes: --out-dir exactly if given, else a new folder under OUT_DIR named for its start and
    model (and `kind`, for what is not a training run). Locked either way."""
    if hasattr(args, "OUT_DIR"):
        return claim_folder(hp["OUT_DIR"])
    return new_run_folder(hp["OUT_DIR"], hp["MODEL"] + (f"_{kind}" if kind else ""))


def resume_command(checkpoint_path, dry_run=False):
    return f"python3 main_mnist.py --resume {shlex.quote(checkpoint_path)}" + (" --dry-run" if dry_run else "")


# ---------------------------------------------------------------------------------------------------------------
# run.json: what a person reads to know what a run was and how it went. Rewritten whole at every change.

def device_name(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({_processor()}, {torch.get_num_threads()} threads)"


def _processor():
    """The CPU's model name where Linux tells it (platform.processor() is often empty there)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0]
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


REPO = os.path.dirname(os.path.abspath(__file__))


def _git(*args):
    """The output of a git command in the repo, or None where git is missing, fails or takes too long."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version():
    """Which code a run ran: {"commit", "uncommitted_changes", "changes_hash"} in a git checkout (the hash covers
    the diff against the commit and any new .py file not yet added), else {"source_hash"} of the top-level .py
    files. The hashes are short (12 hex digits): enough to tell two versions apart in --compare."""
    commit = _git("rev-parse", "HEAD")
    if commit is not None:
        diff = _git("diff", "HEAD", "--binary") or b""
        new_files = (_git("ls-files", "--others", "--exclude-standard", "-z", "--", "*.py") or b"").split(b"\0")
        changes = hashlib.sha256(diff)
        for name in sorted(filter(None, new_files)):
            changes.update(name + b"\0" + _read_bytes(os.path.join(REPO, os.fsdecode(name))))
        dirty = bool(diff) or any(new_files)
        return {"commit": commit.decode().strip(), "uncommitted_changes": dirty,
                "changes_hash": changes.hexdigest()[:12] if dirty else None}
    sources = hashlib.sha256()
    for name in sorted(os.listdir(REPO)):  # the project's modules all stand at the top: no package folder
        if name.endswith(".py"):
            sources.update(name.encode() + b"\0" + _read_bytes(os.path.join(REPO, name)))
    return {"source_hash": sources.hexdigest()[:12]}


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def code_label(code):
    """A short name of a run's code for --compare: the commit's first 7 digits, + the changes' hash if any."""
    if not code:
        return "?"
    if "source_hash" in code:
        return f"files:{code['source_hash'][:7]}"
    return code["commit"][:7] + (f"+{code['changes_hash'][:7]}" if code["uncommitted_changes"] else "")


def new_record(folder, hp, model, device, amp, argv, mode="train"):
    return {
        "folder": folder, "mode": mode, "status": "running",
        "model": hp["MODEL"], "parameters": sum(p.numel() for p in model.parameters()),
        "hyperparameters": hp, "dry_run": False,
        "command": shlex.join(["python3", "main_mnist.py", *argv]), "code": code_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "device": device_name(device), "precision": "bfloat16 autocast" if amp else "float32",
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "epochs_done": 0, "epochs_planned": hp["EPOCHS"],
        "final_test_acc": None, "best_test_acc": None, "best_epoch": None, "seconds": 0.0,
    }


def open_record(folder, checkpoint, hp, model, device, amp, args):
    """The run.json of a run starting now: a new one, or for a resumed run the one it had, brought up to its
    checkpoint (the truth, should run.json lag behind it: a killed run's does). A resumed run whose run.json is
    missing or damaged gets a new one, and says so."""
    record = None
    if checkpoint is not None:
        try:
            record = read_record(folder)
        except UserError as error:
            print(f"Note: {error}; a new {RECORD} is started")
    record = record or new_record(folder, hp, model, device, amp, args.argv)
    record.update(status="running", error=None, epochs_planned=hp["EPOCHS"], dry_run=args.dry_run,
                  hyperparameters=hp)
    if checkpoint is not None:
        record_epochs(record, checkpoint["history"])
        print(f"Resuming {hp['MODEL']} from {args.resume} after epoch {checkpoint['epoch']}")
    return record


def save_record(folder, record):
    atomic_write(os.path.join(folder, RECORD), lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))


def read_record(folder):
    """The run.json of `folder`, checked against RECORD_FIELDS; UserError naming the file and its first problem
    if it is missing, not JSON, or not such a record (edited by hand, or written by another program)."""
    path = os.path.join(folder, RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read as JSON ({getattr(error, 'strerror', None) or error})") from None
    check_fields(record, RECORD_FIELDS, path)
    return record


# ---------------------------------------------------------------------------------------------------------------
# Records as they are read back, from this version, an older one or a hand's edit: one check per kind of file.

NUMBER, WHOLE, TEXT, MAPPING, ROWS = "a number", "a whole number", "a text", "a mapping", "a list"
RECORD_FIELDS = {"mode": TEXT, "status": TEXT, "model": TEXT, "hyperparameters": MAPPING, "epochs_done": WHOLE,
                 "epochs_planned": WHOLE, "final_test_acc": (NUMBER, None), "best_test_acc": (NUMBER, None),
                 "best_epoch": (WHOLE, None), "seconds": NUMBER}
CHECKPOINT_FIELDS = {"hyperparameters": MAPPING, "epoch": WHOLE, "model": MAPPING, "optimizer": MAPPING,
                     "scheduler": MAPPING, "history": ROWS}
LARGEST = float(torch.finfo(torch.float32).max)  # no metric of a float32 training is larger; a figure can draw it


def _is(value, kind):
    if kind is None:
        return value is None
    if kind in (NUMBER, WHOLE):
        whole = isinstance(value, int) and not isinstance(value, bool)
        return whole or (kind == NUMBER and isinstance(value, float) and abs(value) <= LARGEST)
    return isinstance(value, {TEXT: str, MAPPING: dict, ROWS: list}[kind])


def check_fields(data, fields, what):
    """UserError naming `what` and the first of `fields` ({key: kind or (kinds...)}) that `data` lacks or holds
    a value of another kind for (a NaN or an infinite value is no number here)."""
    if not isinstance(data, dict):
        raise UserError(f"{what} does not hold a record (a mapping of names to values)")
    for key, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if key not in data:
            raise UserError(f"{what} lacks {key!r}: it was not written by this version of main_mnist.py")
        if not any(_is(data[key], kind) for kind in kinds):
            wanted = " or ".join("null" if kind is None else kind for kind in kinds)
            raise UserError(f"{what} has {key} = {data[key]!r}, where {wanted} belongs")


def check_history(rows, what):
    """UserError naming `what` and the first epoch's row that is not one of metrics.csv's: its columns, epochs
    numbered from 1, finite numbers, accuracies in [0, 100], losses, lr and seconds not negative."""
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or set(row) != set(METRICS_HEADER.split(",")):
            raise UserError(f"{what}: the row of epoch {number} does not have the columns {METRICS_HEADER}")
        bad = [key for key, value in row.items() if not _is(value, NUMBER) or value < 0
               or (key.endswith("acc") and value > 100)]
        if row["epoch"] != number or bad:
            name = "epoch" if row["epoch"] != number else bad[0]
            raise UserError(f"{what}: epoch {number} has {name} = {row[name]!r}, which no run writes")


def record_epochs(record, history):
    """The record's summary of the epochs so far."""
    best = max(history, key=lambda row: row["test_acc"])
    record.update(epochs_done=history[-1]["epoch"], final_test_acc=round(history[-1]["test_acc"], 4),
                  best_test_acc=round(best["test_acc"], 4), best_epoch=best["epoch"],
                  seconds=round(sum(row["seconds"] for row in history), 1))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: everything an exact resume needs, read back with weights_only=True (no code runs from the file).

def rng_states():
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        states["mps"] = torch.mps.get_rng_state()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"])


def read_saved(path, what):
    """torch.load of a file the user named; weights_only=True runs no code from the file."""
    if not os.path.isfile(path):
        raise UserError(f"no {what} at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: not a zip, truncated, foreign pickle ...
        raise UserError(f"{path} is not a {what} this script can read ({type(error).__name__})") from None


def load_checkpoint(path):
    """The dict save_epoch() writes after each epoch, checked against CHECKPOINT_FIELDS and its own history (and
    its model's name against model.py) before anything is built from it."""
    return check_checkpoint(read_saved(path, "checkpoint"), path)


def check_checkpoint(checkpoint, path):
    """`checkpoint`, read from `path`, if it is one that save_epoch() writes; else UserError saying what it lacks."""
    if isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UserError(f"{path} is not a training checkpoint. It holds only model weights (a model.pt?): resume "
                        f"from checkpoint.pt.")
    check_fields(checkpoint, CHECKPOINT_FIELDS, path)
    check_fields(checkpoint["hyperparameters"], {"MODEL": TEXT, "EPOCHS": WHOLE}, f"{path} (its hyperparameters)")
    check_history(checkpoint["history"], f"{path} (its history)")
    if checkpoint["epoch"] != len(checkpoint["history"]) or checkpoint["epoch"] < 1:
        raise UserError(f"{path} says epoch {checkpoint['epoch']} but holds {len(checkpoint['history'])} epochs' "
                        f"metrics")
    if checkpoint["hyperparameters"]["MODEL"] not in MODELS:
        raise UserError(f"{path} is a run of {checkpoint['hyperparameters']['MODEL']}, which model.py does not "
                        f"define (it has {', '.join(MODELS)})")
    return checkpoint


def resumed_settings(args, defaults, checkpoint):
    """The settings of the run --resume continues: the checkpoint's, with only RESUMABLE ones changed by flags."""
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
    started_dry = checkpoint.get("dry_run", args.dry_run)  # (older versions did not save it)
    if started_dry != args.dry_run:
        raise UserError(f"this run was started {'with' if started_dry else 'without'} --dry-run, and goes on so: "
                        f"{resume_command(args.resume, started_dry)}")
    predates = [name for name in defaults if name not in saved]  # added to the block after the run began
    if predates:
        print(f"Note: {args.resume} predates the settings {', '.join(predates)}: the block's values are used")
    hp = {**defaults, **saved, **given}
    check_settings(hp)
    if hp["EPOCHS"] <= checkpoint["epoch"]:
        raise UserError(f"{args.resume} ends at epoch {checkpoint['epoch']}, so there is nothing left to train: "
                        f"add --epochs N with N above {checkpoint['epoch']} to train further")
    if hp["SCHEDULE"] == "onecycle" and hp["EPOCHS"] != saved["EPOCHS"]:
        raise UserError("a onecycle run's length is fixed when it starts: resume it without --epochs")
    return hp


def restore(checkpoint, model, optimizer, scheduler):
    """Puts a resumed run back where its checkpoint left it; returns the history of its epochs so far. UserError,
    before anything is written, if the checkpoint does not fit: a model whose layers changed since the run began."""
    name = checkpoint["hyperparameters"]["MODEL"]
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"the checkpoint's weights do not fit {name} as model.py defines it now (changed since the "
                        f"run began?): {first}") from None
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if "rng" in checkpoint:
            set_rng_states(checkpoint["rng"])
        else:
            print("Note: the checkpoint holds no random state (an older version's): the run goes on, not exactly "
                  "as an uninterrupted one would")
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"the checkpoint's optimizer, schedule or random state cannot be restored "
                        f"({type(error).__name__}: {str(error).strip()[:200]})") from None
    return checkpoint["history"]


def load_weights(path):
    """(model name or None, state_dict) from a model.pt or a checkpoint.pt. The name comes from the checkpoint, or
    from the run.json beside a model.pt; None if neither says."""
    saved = read_saved(path, "model file")
    if isinstance(saved, dict) and "hyperparameters" in saved:
        checkpoint = check_checkpoint(saved, path)
        return checkpoint["hyperparameters"]["MODEL"], checkpoint["model"]
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise UserError(f"{path} does not hold a model's state_dict")
    try:
        return read_record(os.path.dirname(path) or ".")["model"], saved
    except UserError:  # no run.json beside it (a file of its own), or one this script cannot read
        return None, saved


def load_model(path, device, model_name=None):
    """(model name, model in eval mode on `device`) from a model.pt or checkpoint.pt.

    The model's class is the one the file (or its run.json) names, else `model_name`, else whichever fits."""
    saved_name, state_dict = load_weights(path)
    if saved_name and model_name and saved_name != model_name:
        raise UserError(f"{path} holds a {saved_name}, not a {model_name}")
    name = saved_name or model_name
    candidates = [name] if name else list(MODELS)
    for candidate in candidates:
        model = MODELS[candidate]()
        if _fits(model, state_dict):
            return candidate, model.to(device, memory_format=torch.channels_last).eval()
    fits = [other for other in MODELS if other not in candidates and _fits(MODELS[other](), state_dict)]
    hint = f"; it fits --model {fits[0]}" if fits else ""
    raise UserError(f"{path} does not hold weights of {' or '.join(candidates)}{hint}")


def _fits(model, state_dict):
    """Loads state_dict into model if its names and shapes match; says whether they did."""
    try:
        model.load_state_dict(state_dict)
        return True
    except RuntimeError:
        return False


def latest_finished_run(parent):
    """The newest folder under `parent` whose run finished training and left its model.pt; None if there is none."""
    try:
        names = sorted(os.listdir(parent), reverse=True)  # run folders sort by their start
    except OSError:
        return None
    for name in names:
        folder = os.path.join(parent, name)
        try:
            record = read_record(folder)
        except UserError:  # not a run's folder, or a record this script cannot read: not a candidate
            continue
        if (record["mode"] == "train" and record["status"] == "finished"
                and os.path.isfile(os.path.join(folder, FINAL_MODEL))):
            return folder
    return None


# ---------------------------------------------------------------------------------------------------------------
# Saving an epoch, and what a run that stops early leaves and says.

_signals = {"deferring": False, "received": None}


def _on_stop_signal(signum, frame):
    if _signals["deferring"]:
        _signals["received"] = signum
    else:
        raise KeyboardInterrupt


@contextmanager
def stop_signals_handled():
    """Ctrl-C (SIGINT) and `kill` (SIGTERM) both stop the script as KeyboardInterrupt: one mechanism for both.

    While uninterrupted() writes files, a signal waits until the files are whole."""
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def uninterrupted():
    _signals["deferring"] = True
    try:
        yield
    finally:
        _signals["deferring"] = False
        if _signals["received"] is not None:
            _signals["received"] = None
            raise KeyboardInterrupt


def save_epoch(folder, record, model, optimizer, scheduler, history, title):
    """After an epoch: the checkpoint, metrics.csv, the plot and run.json, each whole or not at all."""
    checkpoint = dict(hyperparameters=record["hyperparameters"], epoch=history[-1]["epoch"], model=model.state_dict(),
                      optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), history=history,
                      rng=rng_states(), dry_run=record["dry_run"])
    with uninterrupted():
        atomic_write(os.path.join(folder, CHECKPOINT), lambda f: torch.save(checkpoint, f))
        record_epochs(record, history)  # only now: epochs_done is what the checkpoint on disk holds
        write_metrics(history, os.path.join(folder, METRICS))
        plot_metrics(history, os.path.join(folder, PLOT), title, record["hyperparameters"]["SCHEDULE"])
        save_record(folder, record)


def save_model(folder, record, model):
    with uninterrupted():
        atomic_write(os.path.join(folder, FINAL_MODEL), lambda f: torch.save(model.state_dict(), f))
        record.update(status="finished", finished=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
        save_record(folder, record)


@contextmanager
def run_ends_cleanly(folder, record, dry_run):
    """Whatever stops a training run early, its record says so and one message says what is kept and how to go on.

    Ctrl-C / SIGTERM: exit code 130. A write that fails (full disk, folder removed) or a loss that turns NaN: a
    UserError, so the script prints one line and exits non-zero. The last whole checkpoint is never touched."""
    try:
        yield
    except KeyboardInterrupt:
        _mark(folder, record, "stopped", "stopped by Ctrl-C or SIGTERM")
        print(f"\nStopped {_when(record)}. {_kept(folder, record, dry_run)}", file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss as error:
        _mark(folder, record, "failed", _one_line(error))
        raise UserError(f"{error} {_when(record)}: the learning rate ({record['hyperparameters']['LR']}) is "
                        f"probably too high; try a lower --lr. {_kept(folder, record, dry_run, resume=False)}") from None
    except OSError as error:
        _mark(folder, record, "failed", _one_line(error))
        name = error.filename or f"in {folder}"
        raise UserError(f"could not write {name} {_when(record)}: {error.strerror or error}. "
                        f"{_kept(folder, record, dry_run)}") from None
    except Exception as error:  # a bug, in code a learner changed say: its traceback follows, then what is kept
        _mark(folder, record, "failed", _one_line(error))
        print(f"\nFailed {_when(record)} ({type(error).__name__}). {_kept(folder, record, dry_run)}", file=sys.stderr)
        raise


def _when(record):
    return "after the last epoch" if record["status"] == "finished" else f"in epoch {record['epochs_done'] + 1}"


def _one_line(error):
    """An exception as run.json's "error" gives it: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _mark(folder, record, status, error):
    """Records how the run ended early (status, and `error`: what stopped it, one line) in its run.json."""
    if record["status"] == "finished":
        return  # the model is saved: what failed after it (a figure) does not unfinish the run
    record.update(status=status, error=error)
    try:
        with uninterrupted():
            save_record(folder, record)
    except OSError:
        pass  # the folder itself may be what failed; the message says what is kept


def _kept(folder, record, dry_run, resume=True):
    checkpoint_path = os.path.join(folder, CHECKPOINT)
    if record["status"] == "finished":
        return f"The run is finished: its model is in {os.path.join(folder, FINAL_MODEL)}."
    if record["epochs_done"] == 0 or not os.path.isfile(checkpoint_path):
        return "No epoch's checkpoint is kept, so there is nothing to resume."
    kept = f"The checkpoint of epoch {record['epochs_done']} is kept in {checkpoint_path}."
    return kept + (f" Resume with: {resume_command(checkpoint_path, dry_run)}" if resume else "")


# ---------------------------------------------------------------------------------------------------------------
# --compare: runs side by side.

def run_folders(parent):
    """The folders directly under `parent` that hold a run's record, oldest first."""
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        raise UserError(f"no runs to compare: cannot read {parent}") from None
    return [os.path.join(parent, name) for name in names if os.path.exists(os.path.join(parent, name, RECORD))]


def read_history(folder):
    """The rows of a run's metrics.csv, checked by check_history; [] if the run has none yet (in its first epoch,
    or killed there). UserError naming the file and its first problem if it is not a metrics.csv."""
    path = os.path.join(folder, METRICS)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read ({getattr(error, 'strerror', None) or error})") from None
    if not lines or ",".join(lines[0]) != METRICS_HEADER:
        raise UserError(f"{path} does not start with the header {METRICS_HEADER}")
    rows = []
    for values in lines[1:]:
        try:
            numbers = [float(value) for value in values]
        except ValueError:
            numbers = []
        row = dict(zip(lines[0], numbers)) if len(numbers) == len(lines[0]) else {}
        if "epoch" in row and row["epoch"].is_integer():
            row["epoch"] = int(row["epoch"])
        rows.append(row)
    check_history(rows, path)
    return rows


def run_status(folder, record):
    """The record's status, except that a 'running' run whose lock nobody holds was killed."""
    if record["status"] == "running" and not is_locked(folder):
        return "killed"
    return record["status"]


def compare(folders, out_dir):
    """Prints a table of the runs in `folders` (default: every run in out_dir) and writes comparison.png and
    comparison.csv into out_dir. A folder whose files cannot be read is skipped with a line that says why; the
    others are still compared. Returns the rows of the table."""
    folders = folders or run_folders(out_dir)
    runs = []
    for folder in folders:
        try:
            record = read_record(folder)
            if record["mode"] != "train":
                print(f"skipped {folder}: {record['mode']}, not a training run")
                continue
            check_fields(record["hyperparameters"], {"MODEL": TEXT}, os.path.join(folder, RECORD))
            runs.append((folder, record, read_history(folder)))
        except UserError as error:
            print(f"skipped {folder}: {error}")
    if not runs:
        raise UserError(f"no runs to compare in {', '.join(folders) if folders else out_dir}")
    all_settings = [record["hyperparameters"] for _, record, _ in runs]
    # Settings that differ get a column each; EPOCHS has one anyway ("epochs": done/planned).
    differ = [name for name in all_settings[0] if name not in PLACES and name != "EPOCHS"
              and len({json.dumps(hp.get(name)) for hp in all_settings}) > 1]
    codes = [code_label(record.get("code")) for _, record, _ in runs]
    rows = []
    for (folder, record, history), code in zip(runs, codes):
        status = run_status(folder, record)
        rows.append({
            "run": os.path.basename(os.path.normpath(folder)), "model": record["model"],
            **{name.lower(): record["hyperparameters"].get(name) for name in differ},
            **({"code": code} if len(set(codes)) > 1 else {}),
            "epochs": f"{record['epochs_done']}/{record['epochs_planned']}",
            "status": status + ("" if status == "finished" else " *"),
            "final_acc": _percent(record["final_test_acc"]), "best_acc": _percent(record["best_test_acc"]),
            "best_epoch": record["best_epoch"] or "", "seconds": round(record["seconds"]),
        })
    try:
        _print_table(rows)
        if any(row["status"].endswith("*") for row in rows):
            print("* unfinished: still running, stopped, failed or killed")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped reading (`| head`): the files are still written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    csv_path, png_path = os.path.join(out_dir, COMPARISON_CSV), os.path.join(out_dir, COMPARISON_PNG)
    shown = [name.lower() for name in differ] + (["code"] if len(set(codes)) > 1 else [])
    curves = [{"label": row["run"] + "".join(f", {name}={row[name]}" for name in shown), "history": history,
               "finished": record["status"] == "finished"} for row, (_, record, history) in zip(rows, runs)]
    try:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(csv_path, lambda f: f.write(_csv_text(rows).encode()))
        if any(curve["history"] for curve in curves):
            plot_comparison(curves, png_path)
        else:
            png_path = None
            print("No run has a finished epoch yet: no curves to draw.")
    except OSError as error:
        raise UserError(f"could not write {error.filename or out_dir}: {error.strerror or error}. The table above "
                        f"is complete; to save it, choose a folder you can write with --out-dir DIR") from None
    print(f"Saved: {png_path + ', ' if png_path else ''}{csv_path}")
    return rows


def _percent(value):
    return "" if value is None else f"{value:.2f}"


def _print_table(rows):
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))


def _csv_text(rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()
