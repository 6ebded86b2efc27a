"""A folder per run: its lock, its record (run.json) from start to end, what each epoch saves, and what a stopped
or failed run leaves and says. (--compare, which reads the folders, is compare.py.)
"""
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import stat
import subprocess
import sys
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

from machinery.errors import NonFiniteLoss, UserError, one_line
from machinery.figures import plot_metrics
from machinery.files import atomic_write
from machinery.hardware import device_name, precision_name
from machinery.records import (CHECKPOINT, FINAL_MODEL, METRICS, PLOT, RECORD, RUN_FILES, best_epoch, load_checkpoint,
                                read_record, rng_states, write_metrics)
from machinery.settings import REPO, project_files, resume_command, resumed_settings, start as start_settings

LOCK = ".lock"


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


def unwritable(folder, error):
    """The UserError of an output folder that cannot be made or written (the OSError `error` says why)."""
    return UserError(f"cannot write to the output folder {folder}: {error.strerror or error}")


def lock_folder(folder):
    """Holds an exclusive lock on `folder` for the rest of this process's life; UserError if another process has it.

    The lock is the OS's (flock, or Windows' locking), so it ends with the process, a killed one too. Its file
    .lock holds the holder's process id, for the message a second process gets; it is written only into a plain
    file that is empty or holds such an id, never through a link."""
    try:
        fd, holder = _open_lock_file(folder, os.O_RDWR | os.O_CREAT)
    except OSError as error:
        raise unwritable(folder, error) from None
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
        raise unwritable(folder, error) from None
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
        raise unwritable(parent, error) from None
    lock_folder(folder)
    return folder


def claim_folder(folder):
    """The folder --out-dir names, locked, once it is known to hold no run's files."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise unwritable(folder, error) from None
    lock_folder(folder)
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(folder, name))]
    if not present:
        return folder
    checkpoint_path = os.path.join(folder, CHECKPOINT)
    try:
        mode = read_record(folder)["mode"]
    except UserError:
        mode = "train"
    if mode != "train":  # an evaluation or an LR range test: finished work of its own, never to be deleted
        raise UserError(f"{folder} holds the files of --{mode} ({', '.join(present)}): choose another --out-dir, "
                        f"or leave it out for a new folder of its own")
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


def start(args, defaults, recipes):
    """(settings, folder, checkpoint or None) of a training run: its settings printed, then its folder, locked
    and printed: a new one (or --out-dir's), or for --resume the checkpoint's own."""
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        hp = resumed_settings(args, defaults, recipes, checkpoint)
        folder = os.path.dirname(os.path.abspath(args.resume))
        lock_folder(folder)
        check_own_folder(args.resume, folder, checkpoint)
    else:
        checkpoint, hp = None, start_settings(args, defaults, recipes)
        folder = open_run_folder(args, hp)
    print(f"Run folder: {folder}")
    return hp, folder, checkpoint


def check_own_folder(path, folder, checkpoint):
    """UserError unless the checkpoint at `path` is the one its folder's run wrote: a resumed run writes its files
    beside its checkpoint, so a checkpoint copied into another run's folder (or under another name) would write
    over that run."""
    if os.path.basename(path) != CHECKPOINT:
        raise UserError(f"{path} is not where a run keeps its checkpoint ({CHECKPOINT} in the run's own folder): a "
                        f"run resumed from it would write over the files beside it. Resume from the {CHECKPOINT} "
                        f"of the run's own folder")
    try:
        record = read_record(folder)
    except UserError:  # no run.json, or a damaged one: the checkpoint is the truth (open_record starts a new one)
        return
    started = checkpoint.get("started", record.get("started"))  # (a checkpoint of the version before it says not)
    if record.get("started") != started or record["model"] != checkpoint["hyperparameters"]["MODEL"]:
        raise UserError(f"{folder} holds another run ({record['model']}, started {record.get('started', '?')}) "
                        f"than the one {path} is from: a resumed run would write over it. Resume a run from the "
                        f"{CHECKPOINT} in its own folder, or start a new one")


def open_run_folder(args, hp, kind=""):
    """Where this run writes: --out-dir exactly if given, else a new folder under OUT_DIR named for its start and
    model (and `kind`, for what is not a training run). Locked either way."""
    if hasattr(args, "OUT_DIR"):
        return claim_folder(hp["OUT_DIR"])
    return new_run_folder(hp["OUT_DIR"], hp["MODEL"] + (f"_{kind}" if kind else ""))


# ---------------------------------------------------------------------------------------------------------------
# run.json: what a person reads to know what a run was and how it went. Rewritten whole at every change.

def _git(*args):
    """The output of a git command in the repo, or None where git is missing, fails or takes too long."""
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def code_version():
    """Which code a run ran: {"commit", "uncommitted_changes", "changes_hash"} in a git checkout (the hash covers
    the diff against the commit and any new .py file not yet added), else {"source_hash"} of the .py files at
    the top and in machinery/. The hashes are short (12 hex digits): enough to tell two versions apart in --compare."""
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
    for name in project_files():
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


def new_record(hp, model, device, amp, argv, mode="train"):
    return {
        "mode": mode, "status": "running",  # (no "folder": where run.json is, is the run's folder, copied or not)
        "model": hp["MODEL"], "parameters": sum(p.numel() for p in model.parameters()),
        "hyperparameters": hp, "dry_run": False,
        "command": shlex.join(["python3", "main_mnist.py", *argv]), "code": code_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
        "device": device_name(device), "precision": precision_name(amp),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "epochs_done": 0, "epochs_planned": hp["EPOCHS"],
        "final_test_acc": None, "best_test_acc": None, "best_epoch": None, "seconds": 0.0,
    }


def open_record(folder, checkpoint, hp, model, device, amp, args, **built):
    """The run.json of a run starting now: a new one, or for a resumed run the one it had, brought up to its
    checkpoint (the truth, should run.json lag behind it: a killed run's does). A resumed run whose run.json is
    missing or damaged gets a new one, and says so. `built`: what the run built (its loss, optimizer, schedule,
    the layers' receptive fields, the number of images), recorded as it is."""
    record = None
    if checkpoint is not None:
        try:
            record = read_record(folder)
        except UserError as error:
            print(f"Note: {error}; a new {RECORD} is started")
    record = record or new_record(hp, model, device, amp, args.argv)
    record.pop("folder", None)  # (a run.json of the version before says where it was written, copied or not)
    record.update(status="running", error=None, epochs_planned=hp["EPOCHS"], dry_run=args.dry_run,
                  hyperparameters=hp, **built)
    if checkpoint is not None:
        record_epochs(record, checkpoint["history"])
        print(f"Resuming {hp['MODEL']} from {args.resume} after epoch {checkpoint['epoch']}")
    return record


def save_record(folder, record):
    atomic_write(os.path.join(folder, RECORD), lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))


def record_epochs(record, history):
    """The record's summary of the epochs so far."""
    best = best_epoch(history)
    record.update(epochs_done=history[-1]["epoch"], final_test_acc=round(history[-1]["test_acc"], 4),
                  best_test_acc=round(best["test_acc"], 4), best_epoch=best["epoch"],
                  seconds=round(sum(row["seconds"] for row in history), 1))


# ---------------------------------------------------------------------------------------------------------------
# Saving an epoch, and what a run that stops early leaves and says.

_signals = {"deferring": False, "received": None, "last": signal.SIGINT}

# The signals that stop a run cleanly: Ctrl-C, `kill`, and a terminal closed under it (SIGHUP, where there is one)
STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def _on_stop_signal(signum, frame):
    _signals["last"] = signum
    if _signals["deferring"]:
        _signals["received"] = signum
    else:
        raise KeyboardInterrupt


def stopped_exit_code():
    """The exit status of a script a signal stopped: 130 for Ctrl-C and SIGTERM (as a shell's Ctrl-C), 129 for a
    closed terminal (128 + SIGHUP)."""
    return 129 if _signals["last"] == getattr(signal, "SIGHUP", None) else 130


@contextmanager
def stop_signals_handled():
    """Ctrl-C (SIGINT), `kill` (SIGTERM) and a closed terminal (SIGHUP) all stop the script as KeyboardInterrupt:
    one mechanism for all. While uninterrupted() writes files, a signal waits until the files are whole."""
    previous = {sig: signal.signal(sig, _on_stop_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def script_ends_cleanly():
    """How main_mnist.py ends whatever happens: a UserError as its one line and exit 1, Ctrl-C or SIGTERM before a
    run started as a word and exit 130 (a run that was training says what it kept), a reader gone away (`| head`)
    in silence; the folder locks let go either way."""
    try:
        with stop_signals_handled():
            yield
            sys.stdout.flush()  # here, so that a reader gone away is caught below, not at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        print("Stopped.", file=sys.stderr)
        sys.exit(stopped_exit_code())
    finally:
        release_locks()


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


def keep_once(folder, name, draw):
    """draw(path) of the file `name` in `folder` unless it is there: a resumed run keeps what it drew at its start."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        with uninterrupted():
            draw(path)


def save_epoch(folder, record, model, optimizer, scheduler, history):
    """After an epoch: the checkpoint, metrics.csv, the plot and run.json, each whole or not at all."""
    checkpoint = dict(hyperparameters=record["hyperparameters"], epoch=history[-1]["epoch"], model=model.state_dict(),
                      optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), history=history,
                      rng=rng_states(), dry_run=record["dry_run"], started=record["started"])
    with uninterrupted():
        atomic_write(os.path.join(folder, CHECKPOINT), lambda f: torch.save(checkpoint, f))
        record_epochs(record, history)  # only now: epochs_done is what the checkpoint on disk holds
        write_metrics(history, os.path.join(folder, METRICS))
        plot_metrics(history, os.path.join(folder, PLOT), f"{os.path.basename(folder)}: {record['model']}",
                     record["hyperparameters"]["SCHEDULE"])
        save_record(folder, record)


def save_model(folder, record, model):
    with uninterrupted():
        atomic_write(os.path.join(folder, FINAL_MODEL), lambda f: torch.save(model.state_dict(), f))
        record.update(status="finished", finished=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))
        save_record(folder, record)
    print(f"Final test accuracy {record['final_test_acc']:.2f}% (best {record['best_test_acc']:.2f}% at epoch "
          f"{record['best_epoch']}); {record['seconds']:.0f} s of training and test")


def print_saved(folder):
    """The files a run saved, and how to compare it with the others."""
    print("Saved: " + ", ".join(os.path.join(folder, name) for name in RUN_FILES
                                if os.path.exists(os.path.join(folder, name))))
    print(f"Run folder: {folder} (compare runs with: python3 main_mnist.py --compare)")


@contextmanager
def run_ends_cleanly(folder, record, dry_run):
    """Whatever stops a training run early, its record says so and one message says what is kept and how to go on.

    Ctrl-C / SIGTERM: exit code 130; SIGHUP (the terminal closed): 129. A write that fails (full disk, folder
    removed), a loss that turns NaN, or memory that runs out: a UserError, so the script prints one line and exits
    non-zero. The last whole checkpoint is never touched."""
    try:
        yield
    except KeyboardInterrupt:
        _mark(folder, record, "stopped", f"stopped by {signal.Signals(_signals['last']).name}")
        print(f"\nStopped {_when(record)}. {_kept(folder, record, dry_run)}", file=sys.stderr)
        sys.exit(stopped_exit_code())
    except NonFiniteLoss as error:
        _mark(folder, record, "failed", one_line(error, with_type=True))
        raise UserError(f"{error} {_when(record)}: the learning rate ({record['hyperparameters']['LR']}) is "
                        f"probably too high; try a lower --lr. {_kept(folder, record, dry_run, resume=False)}") from None
    except OSError as error:
        _mark(folder, record, "failed", one_line(error, with_type=True))
        name = error.filename or f"in {folder}"
        raise UserError(f"could not write {name} {_when(record)}: {error.strerror or error}. "
                        f"{_kept(folder, record, dry_run)}") from None
    except Exception as error:  # memory run out: one line; a bug (in code a learner changed, say): its traceback
        _mark(folder, record, "failed", one_line(error, with_type=True))
        if _out_of_memory(error):
            hp = record["hyperparameters"]
            raise UserError(f"the device ran out of memory {_when(record)} (batch size {hp['BATCH_SIZE']}, test "
                            f"batch size {hp['TEST_BATCH_SIZE']}): try a smaller --batch-size or --test-batch-size. "
                            f"{_kept(folder, record, dry_run)}") from None
        print(f"\nFailed {_when(record)} ({type(error).__name__}). {_kept(folder, record, dry_run)}", file=sys.stderr)
        raise


def _out_of_memory(error):
    """Whether an error is an allocation that failed: the CPU's allocator's or a GPU's (OutOfMemoryError)."""
    gpu_out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # (torch.cuda's before 2.5)
    return isinstance(error, gpu_out_of_memory) or (isinstance(error, RuntimeError) and (
        "not enough memory" in str(error) or "out of memory" in str(error)))


def _when(record):
    return "after the last epoch" if record["status"] == "finished" else f"in epoch {record['epochs_done'] + 1}"


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
