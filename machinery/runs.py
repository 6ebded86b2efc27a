"""A folder per run and what it holds, each file written whole: run.json from start to end, metrics.csv and
checkpoint.pt after every epoch, model.pt at the end. And the one boundary where an error that the person running
a script can cause (a bad setting, a damaged file, a full disk, Ctrl-C) becomes one line and an exit status.
"""
import contextlib
import datetime
import hashlib
import io
import itertools
import json
import os
import platform
import random
import shlex
import stat
import subprocess
import sys

import torch

from machinery import UserError

RECORD, METRICS, CHECKPOINT, FINAL_MODEL = "run.json", "metrics.csv", "checkpoint.pt", "model.pt"
PLOT, SAMPLES = "accuracy_loss.png", "samples.png"
METRIC_NAMES = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LARGEST_RECORD = 10_000_000  # bytes: a run.json is a few KB, and a larger file is no record of ours


def printable(text):
    """`text` with control characters escaped, so that a file name never steers the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextlib.contextmanager
def errors_in_one_line():
    """Around a script's work: its errors that a person can fix, as one line on stderr and a non-zero exit."""
    try:
        yield
    except UserError as error:
        sys.exit(f"error: {printable(error)}")
    except KeyboardInterrupt:
        print("Stopped.", file=sys.stderr)
        sys.exit(130)
    except torch.OutOfMemoryError:
        sys.exit("error: out of memory: lower BATCH_SIZE (--batch-size) or TEST_BATCH_SIZE")
    except OSError as error:  # a full disk, a folder one may not write in, a reader gone away (| head)
        where = f"{error.filename}: " if error.filename else ""
        sys.exit(f"error: {printable(where)}{error.strerror or first_line(error)}")


# ---------------------------------------------------------------------------------------------------------------
# Folders and files

_identity = {}  # folder -> (device, inode) when the run took it: a folder deleted and made again is another one


def new_folder(parent, name):
    """A new folder parent/<date>_<time>_<name>, made by this process alone (mkdir fails if it exists): -2, -3,
    ... when runs start in the same second."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    os.makedirs(parent, exist_ok=True)
    for count in itertools.count(1):
        folder = os.path.join(parent, f"{stamp}_{name}" + (f"-{count}" if count > 1 else ""))
        try:
            os.mkdir(folder)
            return take_folder(folder)
        except FileExistsError:
            continue


def take_folder(folder):
    info = os.stat(folder)
    _identity[folder] = (info.st_dev, info.st_ino)
    return folder


def write_file(folder, name, write):
    """folder/name made by write(binary file) in memory, then written to a file of its own and renamed over the
    old one: readers, a crash and a full disk leave the old file or the whole new one, never a part. Only into
    the folder the run took: if it was deleted (and made again), the run stops rather than write into another."""
    content = io.BytesIO()
    write(content)
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        info = None
    if folder in _identity and (info is None or (info.st_dev, info.st_ino) != _identity[folder]):
        raise UserError(f"the run folder {folder} was deleted or replaced while the run wrote into it: stopped, "
                        f"so as to write over nothing else")
    path = os.path.join(folder, name)
    temporary = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(content.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(temporary)
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


def load(path, what="checkpoint", needs=()):
    """A checkpoint.pt or model.pt read back as a dict (tensors and plain values only: nothing in it runs), with
    the keys `needs` names."""
    try:
        saved = torch.load(io.BytesIO(read_bytes(path, 2 ** 31)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as error:  # torch says a damaged file in many ways
        raise UserError(f"{path} is damaged or no {what} ({first_line(error)[:200]})") from None
    if not isinstance(saved, dict) or not all(key in saved for key in needs):
        raise UserError(f"{path} is no {what} of this code (it holds {', '.join(map(str, saved))[:200]})")
    return saved


def save_torch(folder, name, data):
    write_file(folder, name, lambda f: torch.save(data, f))


# ---------------------------------------------------------------------------------------------------------------
# run.json and metrics.csv

def code_version():
    """The commit the code is at, and a hash of what differs from it (None where nothing does); {} outside git."""
    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=10)
            return done.stdout if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    diff = git("diff", "HEAD") or b""
    return {"commit": commit.decode().strip(), "changes": hashlib.sha256(diff).hexdigest()[:12] if diff else None}


def new_record(hp, model, device, amp, argv, mode="train"):
    return {"mode": mode, "status": "running", "model": hp["MODEL"],
            "parameters": sum(p.numel() for p in model.parameters()), "settings": hp,
            "command": shlex.join(["python3", "main_mnist.py", *argv]), "code": code_version(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device_name(device),
            "precision": "bfloat16 autocast" if amp else "float32",
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "epochs_done": 0, "final_test_acc": None, "best_test_acc": None, "best_epoch": None, "seconds": 0.0}


def device_name(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return device.type


def save_record(folder, record):
    write_file(folder, RECORD, lambda f: f.write(json.dumps(record, indent=1).encode()))


def save_epoch(folder, record, history, checkpoint):
    """What each epoch leaves: checkpoint.pt first (the truth a resumed run goes on from), then metrics.csv, the
    plot and run.json, which only report it."""
    from machinery.figures import plot_metrics
    save_torch(folder, CHECKPOINT, checkpoint)
    lines = [",".join(METRIC_NAMES)] + [",".join(str(row[key]) for key in METRIC_NAMES) for row in history]
    write_file(folder, METRICS, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    plot_metrics(history, folder, f"{record['model']}: {os.path.basename(folder)}")
    best = max(history, key=lambda row: row["test_acc"])
    record.update(epochs_done=len(history), final_test_acc=history[-1]["test_acc"], best_test_acc=best["test_acc"],
                  best_epoch=best["epoch"], seconds=sum(row["seconds"] for row in history))
    save_record(folder, record)


@contextlib.contextmanager
def recorded(folder, record):
    """Around a run's work: run.json says "finished" at the end, or "stopped" or "failed" with the error, and the
    console says how to go on from the last checkpoint."""
    try:
        yield
    except BaseException as error:
        record.update(status="stopped" if isinstance(error, KeyboardInterrupt) else "failed",
                      error=f"{type(error).__name__}: {first_line(error)}")
        with contextlib.suppress(Exception):  # the disk may be full: the error itself says so
            save_record(folder, record)
        if os.path.exists(os.path.join(folder, CHECKPOINT)):
            print(f"Go on from the last epoch saved: python3 main_mnist.py --resume "
                  f"{shlex.quote(os.path.join(folder, CHECKPOINT))}", file=sys.stderr)
        raise
    record["status"] = "finished"
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
