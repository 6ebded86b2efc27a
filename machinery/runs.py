"""A folder per run, each file written whole: run.json, metrics.csv, the plot and checkpoint.pt after every epoch,
calibration.pt and model.pt at the end. A run has an id (in run.json and every checkpoint) and one writer (its pid in
run.json). And the one boundary where an error a person can cause (a bad setting, a damaged file, a full disk, a
learner's edit that fails, Ctrl-C) becomes one line."""
import contextlib
import csv
import datetime
import hashlib
import inspect
import io
import itertools
import json
import os
import platform
import random
import shlex
import signal
import stat
import sys
import textwrap
import traceback
import uuid

import torch

from machinery.figures import plot_metrics
from utils import UserError

RECORD, METRICS, CHECKPOINT, FINAL_MODEL, CALIBRATION = "run.json", "metrics.csv", "checkpoint.pt", "model.pt", \
    "calibration.pt"
PLOT, SAMPLES = "accuracy_loss.png", "samples.png"
CHECKPOINT_KEYS = ("id", "settings", "history", "lr_curve", "model", "optimizer", "scheduler", "random_state")
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}  # figures' file types
MACHINERY = os.path.dirname(os.path.abspath(__file__))  # an error names the learner's file before these
REPO = os.path.dirname(MACHINERY)
LARGEST_RECORD = 10_000_000  # bytes: a run.json is a few KB, and a larger file is no record of ours


def printable(text):
    """`text` with control characters escaped, so that a file name never steers the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def in_project(path):
    """Whether a file is the project's own (a learner's model.py, not torch's files in .venv)."""
    relative = os.path.relpath(os.path.abspath(path), REPO)
    return not relative.startswith(("..", ".venv")) and "site-packages" not in relative


STOPPED = []  # the signal that asked this process to stop


def stop(signum, frame):  # Ctrl-C, SIGTERM and SIGHUP end a run alike, the exit status saying which
    STOPPED.append(signum)  # raised where Python happens to be: in a weakref's callback it is only printed, and
    raise KeyboardInterrupt(signum)  # the run goes on; save_epoch raises it again


def one_line(error):
    """An error raised in the project's code as one line naming the deepest of its files and the line there (a
    SyntaxError: the line it is on); where that is in machinery/, the learner's line that led there first."""
    frames = [(f.filename, f.lineno, f" in {f.name}") for f in traceback.extract_tb(error.__traceback__)]
    if isinstance(error, SyntaxError) and error.filename:
        frames.append((error.filename, error.lineno, ""))
        error = type(error)(error.msg)  # its text without the file and line, said once already
    frames = [f"{os.path.relpath(name, REPO)}:{line}{function}" for name, line, function in frames if in_project(name)]
    own = [frame for frame in frames if not frame.startswith(os.path.basename(MACHINERY) + os.sep)]
    where = ((f"{own[-1]} (raised in {frames[-1]})" if own and own[-1] != frames[-1] else frames[-1]) + ": "
             if frames else "")
    return (f"error: {printable(where)}{type(error).__name__}: {printable(first_line(error))[:500]} "
            f"(--traceback shows the whole trace)")


def excepthook(kind, error, trace):  # an error before a script's errors_in_one_line: model.py's SyntaxError on import
    if "--traceback" in sys.argv or not isinstance(error, Exception):
        return sys.__excepthook__(kind, error, trace)
    print(one_line(error), file=sys.stderr)


sys.excepthook = excepthook


@contextlib.contextmanager
def errors_in_one_line(show_traceback=False):
    """Around a script's work: an error a person can fix is one line on stderr and a non-zero exit. An error
    raised in the project's code (a layer that does not fit, a learner's typo) names the file and line it came
    from, deepest first; `show_traceback` (--traceback) lets it through whole. SIGTERM and SIGHUP stop as Ctrl-C."""
    STOPPED.clear()
    handlers = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM,
                                                                   getattr(signal, "SIGHUP", None)) if number}
    try:
        yield
    except UserError as error:
        sys.exit(f"error: {printable(error)}")
    except KeyboardInterrupt as error:
        print("Stopped.", file=sys.stderr)
        sys.exit(128 + (error.args[0] if error.args else signal.SIGINT))
    except torch.OutOfMemoryError:
        sys.exit("error: out of memory: lower BATCH_SIZE (--batch-size) or TEST_BATCH_SIZE")
    except BrokenPipeError:  # the reader went away (| head): it wants no more, not even an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (FileExistsError, NotADirectoryError) as error:  # a folder asked for where a file is (--out-dir FILE)
        path = str(error.filename)
        while path and not os.path.lexists(path):  # the file may be a folder above the one asked for
            path = os.path.dirname(path)
        sys.exit(f"error: {printable(path or error.filename)} is a file, where a folder is needed")
    except OSError as error:  # a full disk, a folder one may not write in
        where = f"{error.filename}: " if error.filename else ""
        sys.exit(f"error: {printable(where)}{error.strerror or first_line(error)}")
    except Exception as error:
        if show_traceback:
            raise
        sys.exit(one_line(error))
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


# ---------------------------------------------------------------------------------------------------------------
# Folders and files

def new_folder(parent, name):
    """A new folder parent/<date>_<time>_<name>, made by this process alone (mkdir fails if it exists)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    os.makedirs(parent, exist_ok=True)
    for count in itertools.count(1):
        folder = os.path.join(parent, f"{stamp}_{name}" + (f"-{count}" if count > 1 else ""))
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder)
            return folder


def write_file(folder, name, write):
    """folder/name made by write(binary file) in memory, then written to a file of its own and renamed over the
    old one: readers, a crash and a full disk leave the old file or the whole new one, never a part; a stop while
    writing leaves no temporary file."""
    content = io.BytesIO()
    write(content)
    path = os.path.join(folder, name)
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(content.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if isinstance(error, OSError):
            error.filename = path
        raise


def read_bytes(path, limit=LARGEST_RECORD):
    """The bytes of a plain file of at most `limit` bytes; a pipe or a device is refused unread, never waited on."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise UserError(f"{path} is not a file of ours (a pipe, a device or over {limit:,} bytes)")
        return f.read()


def read_json(path):
    """A run.json as a dict; UserError if it is missing or damaged."""
    try:
        record = json.loads(read_bytes(path))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (ValueError, RecursionError) as error:  # not JSON, too deep, a number of 5,000 digits or more
        raise UserError(f"{path} is damaged ({first_line(error)[:200]})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is damaged (not a record)")
    return record


def file_in(path, name):
    """`path`, or the file `name` in it where it is a folder: a run folder given for its checkpoint or its model."""
    return os.path.join(path, name) if os.path.isdir(path) else path


def load(path, what="checkpoint", needs=()):
    """A .pt file read back (tensors and plain values only: nothing in it runs), with the keys `needs` names."""
    try:
        saved = torch.load(io.BytesIO(read_bytes(path, 2 ** 31)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        stopped = os.path.join(os.path.dirname(path), CHECKPOINT)
        raise UserError(f"{path}: no such file" + (f"; its run has not finished: --resume {stopped}, or name it"
                                                   if os.path.isfile(stopped) else "")) from None
    except Exception as error:  # torch says a damaged file in many ways, and a file of no tensors in a paragraph
        reason = ("it holds more than tensors and numbers, or torch did not write it" if "Weights only" in str(error)
                  else first_line(error)[:200])
        raise UserError(f"{path} is damaged or no {what} ({reason})") from None
    missing = [key for key in needs if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise UserError(f"{path} is no {what} of this code (it lacks {', '.join(missing)})")
    return saved


def no_longer_fits(path, name, error):
    """The UserError for weights in `path` that model.py's `name` no longer takes: torch's first mismatch (its lines
    are a title, then one a key) and how many more."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    reason = (lines[1:] or lines)[0].strip()[:250] + (f"...; {len(lines) - 2} more" if len(lines) > 2 else "")
    return UserError(f"{path} holds a {name} that model.py's {name} no longer takes ({reason})")


def load_weights(model, state, path):
    """model.load_state_dict(state), or UserError: the model in model.py changed since `path` was saved."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise no_longer_fits(path, type(getattr(model, "_orig_mod", model)).__name__, error) from None


def save_torch(folder, name, data):
    write_file(folder, name, lambda f: torch.save(data, f))


def save_figure(fig, path):
    folder, name = os.path.split(os.path.abspath(path))
    kind = FORMATS.get(os.path.splitext(name)[1].lower(), "png")
    tight = None if fig.get_layout_engine() else "tight"  # a constrained layout fits already; "tight" draws it twice
    write_file(folder, name, lambda f: fig.savefig(f, format=kind, dpi=100, bbox_inches=tight))


def row_text(row):
    """An epoch's row for the console, every key it holds: losses to 4 decimals, accuracies in %, others to 3 digits."""
    return " | ".join(f"{k} {v:.4f}" if k.endswith("loss") else f"{k} {v:.2f}%" if k.endswith("acc") else
                      f"{k} {v:.3g}" for k, v in row.items() if k != "epoch")


def csv_text(rows):
    """Rows (dicts) as CSV, a column for every key any row has, in the order they first appear."""
    text = io.StringIO()
    writer = csv.DictWriter(text, list(dict.fromkeys(key for row in rows for key in row)), lineterminator="\n")
    writer.writeheader()  # a value with a comma in it ("stroke width (- thinner, + thicker)") is quoted
    writer.writerows(rows)
    return text.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# run.json: what the run built, and how it went

def code_version():
    """A hash of the project's code as it ran: its .py files as they are, so that two edited copies differ."""
    digest = hashlib.sha256()
    for folder in (REPO, os.path.join(REPO, "machinery")):
        for name in sorted(name for name in os.listdir(folder) if name.endswith(".py")):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return {"files": digest.hexdigest()[:12]}


def structure(model, arguments):
    """The model as built: its layers, the arguments it was given, its parameters, and a short fingerprint of them."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model's own
    layers = [f"{name}: {module}" for name, module in model.named_modules() if not list(module.children())]
    shapes = [f"{name} {list(p.shape)}" for name, p in model.state_dict().items()]
    fingerprint = hashlib.sha256("\n".join(layers + shapes).encode()).hexdigest()[:10]
    return {"class": type(model).__name__, "arguments": arguments, "layers": layers,
            "parameters": sum(p.numel() for p in model.parameters()), "fingerprint": fingerprint}


def source_of(function):
    """The code of a function the run built and used (the loss), as it ran; a library's by its name."""
    try:
        if not in_project(inspect.getsourcefile(function)):
            raise TypeError
        return textwrap.dedent(inspect.getsource(function)).strip()
    except (TypeError, OSError):
        return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', function)}"


def new_record(hp, model, device, amp, argv, mode="train", **built):
    return {"id": uuid.uuid4().hex[:12], "mode": mode, "status": "running", "pid": os.getpid(), "model": hp["MODEL"],
            "structure": structure(model, built.pop("arguments", {})), "settings": hp, **built,
            "command": shlex.join(["python3", "main_mnist.py", *argv]), "code": code_version(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device_name(device),
            "precision": "bfloat16 autocast" if amp else "float32", "compiled": hasattr(model, "_orig_mod"),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), **summary([], [])}


def summary(history, lr_curve):
    """What run.json says of the epochs done: their rows, the lr curve, the final and best test accuracy."""
    best = max(history, key=lambda row: row["test_acc"], default={})
    return {"history": history, "lr_curve": lr_curve, "epochs_done": len(history), "final_test_acc":
            history[-1]["test_acc"] if history else None, "best_test_acc": best.get("test_acc"),
            "best_epoch": best.get("epoch"), "seconds": sum(row["seconds"] for row in history)}


def device_name(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return device.type


def save_record(folder, record):
    write_file(folder, RECORD, lambda f: f.write(json.dumps(record, indent=1).encode()))


def alive(pid):
    """Whether a process of this number runs (ours to signal or another user's); on Windows, where os.kill(pid, 0)
    would end it, no process is taken as running."""
    if os.name == "nt":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, TypeError, OverflowError):  # PermissionError: another user's; TypeError: no number
        return isinstance(pid, int)
    return True


def resume_folder(path, checkpoint, hp):
    """The folder a resumed run goes on in: its checkpoint's, if its run.json is the same run's and unfinished, else
    None (a new folder). UserError while another process writes that run, or if a finished run has nothing to do."""
    folder, done = os.path.dirname(os.path.abspath(path)), len(checkpoint["history"])
    finished = f"{path}: its run is finished ({done} of {done} epochs); "
    onecycle = "a one-cycle run's length is set when it starts: "
    if hp["SCHEDULE"] == "onecycle" and hp["EPOCHS"] != checkpoint["settings"].get("EPOCHS"):
        raise UserError(finished + onecycle + "start a new run to train longer" if done >= checkpoint["settings"][
            "EPOCHS"] else onecycle + "resume it without --epochs, or start anew")
    try:
        record = read_json(os.path.join(folder, RECORD))
    except UserError:
        record = {}
    if record.get("id") != checkpoint["id"]:
        print(f"Note: {printable(folder)} holds no record of this checkpoint's run: it goes on in a new folder")
        return None
    if record.get("status") == "running" and record.get("pid") != os.getpid() and alive(record.get("pid")):
        raise UserError(f"{folder} is being written by process {record['pid']}: wait for it to end, or stop it "
                        f"(Ctrl-C, kill {record['pid']}) and resume then")
    if record.get("code") != code_version():
        print("Note: the project's .py files changed since this run last started (a layer? the loss?): it goes on "
              "with them as they are now")
    if record.get("status") != "finished":
        for name in os.listdir(folder):  # what a killed writer (kill -9, power off) left half-written
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
        return folder
    if done >= hp["EPOCHS"]:
        raise UserError(finished + (onecycle + "start a new run to train longer" if hp["SCHEDULE"] == "onecycle"
                                    else f"--epochs N, N over {done}, trains it further in a new folder"))
    print(f"Note: the run of {printable(path)} is finished: its {hp['EPOCHS'] - done} more epochs go into a new folder")
    return None


def save_epoch(folder, record, checkpoint):
    """Each epoch's files: checkpoint.pt first (what --resume goes on from), then what reports it."""
    if STOPPED:  # a stop that Python swallowed (see stop) ends the run here, at the latest
        raise KeyboardInterrupt(STOPPED[0])
    save_torch(folder, CHECKPOINT, checkpoint)
    history = checkpoint["history"]
    write_file(folder, METRICS, lambda f: f.write(csv_text(history).encode()))
    save_figure(plot_metrics(history, checkpoint["lr_curve"], f"{record['model']}: {os.path.basename(folder)}"),
                os.path.join(folder, PLOT))
    record.update(summary(history, checkpoint["lr_curve"]))
    save_record(folder, record)


@contextlib.contextmanager
def recorded(folder, record):
    """Around a run's work: run.json "finished" once all is written, else "stopped" or "failed", and how to go on."""
    try:
        yield
    except BaseException as error:
        stopped = isinstance(error, KeyboardInterrupt)  # by stop(), with its signal
        record.update(status="stopped" if stopped else "failed", error=f"{type(error).__name__}: {first_line(error)}"
                      if not (stopped and error.args) else f"stopped by {signal.Signals(error.args[0]).name}")
        with contextlib.suppress(Exception):  # the disk may be full, the folder gone: the error itself says so
            save_record(folder, record)
        if os.path.exists(os.path.join(folder, CHECKPOINT)):
            print(f"Go on from the last epoch saved: python3 main_mnist.py --resume "
                  f"{shlex.quote(printable(os.path.join(folder, CHECKPOINT)))}", file=sys.stderr)
        elif isinstance(error, KeyboardInterrupt) and record.get("mode") == "train":
            print("No epoch had ended, so there is nothing to resume: run the command again", file=sys.stderr)
        raise
    record.update(status="finished", error=None)
    save_record(folder, record)


# ---------------------------------------------------------------------------------------------------------------
# Random state, for an exact resume

def random_state():
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
