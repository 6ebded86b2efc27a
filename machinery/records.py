"""What a run writes and reads back: run.json, metrics.csv and checkpoint.pt, each checked where it is read (from
this version, an older one, or a hand's edit), the random states of an exact resume, and a saved model loaded.
"""
import csv
import io
import json
import math
import os
import random

import torch

from machinery.errors import UserError, one_line
from machinery.files import atomic_write
from machinery.robustness import standard_error
from machinery.settings import model_arguments
from model import MODELS

# The files of a run folder. Any of RUN_FILES in a folder means a run wrote there, and no other run may.
RECORD, CHECKPOINT, METRICS, PLOT, FINAL_MODEL = "run.json", "checkpoint.pt", "metrics.csv", "accuracy_loss.png", "model.pt"


SAMPLES, MISCLASSIFIED, CONFUSION, LR_PLOT = "samples.png", "misclassified.png", "confusion_matrix.png", "lr_finder.png"


RELIABILITY, ROBUSTNESS_CSV, ROBUSTNESS_PLOT = "reliability.png", "robustness.csv", "robustness.png"


RUN_FILES = (RECORD, SAMPLES, CHECKPOINT, METRICS, PLOT, FINAL_MODEL, MISCLASSIFIED, CONFUSION, RELIABILITY,
             ROBUSTNESS_CSV, ROBUSTNESS_PLOT, LR_PLOT)


METRICS_HEADER = "epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds"


# ---------------------------------------------------------------------------------------------------------------
# Records as they are read back, from this version, an older one or a hand's edit: one check per kind of file.

NUMBER, WHOLE, TEXT, MAPPING, ROWS, FLAG = "a number", "a whole number", "a text", "a mapping", "a list", "true or false"


RECORD_FIELDS = {"mode": TEXT, "status": TEXT, "model": TEXT, "hyperparameters": MAPPING, "epochs_done": WHOLE,
                 "epochs_planned": WHOLE, "final_test_acc": (NUMBER, None), "best_test_acc": (NUMBER, None),
                 "best_epoch": (WHOLE, None), "seconds": NUMBER}


CHECKPOINT_FIELDS = {"hyperparameters": MAPPING, "epoch": WHOLE, "model": MAPPING, "optimizer": MAPPING,
                     "scheduler": MAPPING, "history": ROWS, "rng": MAPPING, "dry_run": FLAG}


LARGEST = float(torch.finfo(torch.float32).max)  # no metric of a float32 training is larger; a figure can draw it


def _is(value, kind):
    if kind is None:
        return value is None
    if kind in (NUMBER, WHOLE):
        whole = isinstance(value, int) and not isinstance(value, bool)
        return whole or (kind == NUMBER and isinstance(value, float) and abs(value) <= LARGEST)
    return isinstance(value, {TEXT: str, MAPPING: dict, ROWS: list, FLAG: bool}[kind])


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
# metrics.csv: a row per epoch.

def best_epoch(history):
    """The row of `history` (metrics.csv's rows) with the best test accuracy; the earliest of equals. The one
    definition of the best epoch, for run.json, the figures and benchmarks/seeds.py."""
    return max(history, key=lambda row: row["test_acc"])

def write_metrics(history, path):
    """metrics.csv: one row per epoch (a dict with METRICS_HEADER's keys), accuracies in percent."""
    keys = METRICS_HEADER.split(",")
    lines = [METRICS_HEADER] + [",".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k]) for k in keys)
                                for row in history]
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


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
    check_known_model(checkpoint["hyperparameters"]["MODEL"], path)
    return checkpoint


def check_known_model(name, path):
    """UserError if the model a file at `path` names is not one model.py defines."""
    if name not in MODELS:
        raise UserError(f"{path} is a run of {name}, which model.py does not define (it has {', '.join(MODELS)})")


def restore(checkpoint, model, optimizer, scheduler):
    """Puts a resumed run back where its checkpoint left it; returns the history of its epochs so far. UserError,
    before anything is written, if the checkpoint does not fit: a model whose layers changed since the run began."""
    name = checkpoint["hyperparameters"]["MODEL"]
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError) as error:
        raise UserError(f"the checkpoint's weights do not fit {name} as model.py defines it now (changed since the "
                        f"run began?): {one_line(error)}") from None
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_states(checkpoint["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"the checkpoint's optimizer, schedule or random state cannot be restored "
                        f"({one_line(error, with_type=True)})") from None
    return checkpoint["history"]


# ---------------------------------------------------------------------------------------------------------------
# A saved model, for --eval-only, predict.py and app.py.

def load_weights(path):
    """(model name or None, the run's settings or {}, state_dict) from a model.pt or a checkpoint.pt. The name and
    settings come from the checkpoint, or from the run.json beside a model.pt; None and {} if neither says."""
    saved = read_saved(path, "model file")
    if isinstance(saved, dict) and "hyperparameters" in saved:
        checkpoint = check_checkpoint(saved, path)
        return checkpoint["hyperparameters"]["MODEL"], checkpoint["hyperparameters"], checkpoint["model"]
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise UserError(f"{path} does not hold a model's state_dict")
    try:
        record = read_record(os.path.dirname(path) or ".")
    except UserError:  # no run.json beside it (a file of its own), or one this script cannot read
        return None, {}, saved
    return record["model"], record["hyperparameters"], saved


def load_model(path, device, model_name=None):
    """(model name, model in eval mode on `device`) from a model.pt or checkpoint.pt, built with the settings of
    its run that name its constructor's arguments (a DROPOUT a learner added), as main_mnist.py built it.

    The model's class is the one the file (or its run.json) names, else `model_name`, else whichever fits."""
    saved_name, hp, state_dict = load_weights(path)
    if saved_name and model_name and saved_name != model_name:
        raise UserError(f"{path} holds a {saved_name}, not a {model_name}")
    name = saved_name or model_name
    candidates = [name] if name else list(MODELS)
    for candidate in candidates:
        check_known_model(candidate, path)
        model = MODELS[candidate](**model_arguments(MODELS[candidate], hp))
        if _fits(model, state_dict):
            return candidate, model.to(device).eval()
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


ROBUSTNESS_HEADER = "family,strength,accuracy,standard_error"


def write_robustness(path, curves, images):
    """robustness.csv: a row per family and strength, with the accuracy (%) and its standard error on `images`."""
    keys = ROBUSTNESS_HEADER.split(",")
    rows = [dict(zip(keys, (family, strength, f"{accuracy:.2f}", f"{standard_error(accuracy, images):.2f}")))
            for family, points in curves.items() for strength, accuracy in points]
    atomic_write(path, lambda f: f.write(csv_text(rows).encode()))


def csv_text(rows):
    """Rows (dicts with the same keys, in the columns' order) as the text of a CSV file with its header."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def read_robustness(folder):
    """The curves of `folder`'s robustness.csv, {family: [(strength, accuracy), ...]}; None if it has none, or
    one this version cannot read (it is then left out of a comparison, and said so)."""
    path = os.path.join(folder, ROBUSTNESS_CSV)
    curves = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != ROBUSTNESS_HEADER.split(","):
                raise ValueError("not its columns")
            for row in reader:
                strength, accuracy = float(row["strength"]), float(row["accuracy"])
                if not (math.isfinite(strength) and 0 <= accuracy <= 100):
                    raise ValueError(f"a value out of range in {row}")
                curves.setdefault(row["family"], []).append((strength, accuracy))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, csv.Error) as error:
        print(f"Note: {path} is left out: it cannot be read ({error})")
        return None
    return curves or None


def record_beside(model_path):
    """The run.json in the folder of a model file, or None: a file of its own, or a record this script cannot
    read."""
    try:
        return read_record(os.path.dirname(os.path.abspath(model_path)))
    except UserError:
        return None


def calibration_of(record):
    """The temperature, "not sure" threshold and "not a digit" level a training run fitted for its model (its run.json's calibration,
    `record`), or None: no record beside a plain state_dict, a run from before calibration, a damaged record."""
    calibration = (record or {}).get("calibration")
    if not isinstance(calibration, dict):
        return None
    temperature, threshold = calibration.get("temperature"), calibration.get("threshold")
    if (isinstance(temperature, (int, float)) and isinstance(threshold, (int, float)) and 0 < temperature < 1e3
            and 0 <= threshold <= 1):
        level = calibration.get("not_a_digit")  # runs from before it have none: they say "not sure" only
        known = isinstance(level, (int, float)) and not isinstance(level, bool) and 0 <= level <= threshold
        return {"temperature": float(temperature), "threshold": float(threshold),
                **({"not_a_digit": float(level)} if known else {})}
    return None


def latest_finished_run(parent):
    """The newest folder under `parent` whose run finished training and left its model.pt, a dry run never (one
    batch an epoch: a model that reads nothing); None if there is none."""
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
        if (record["mode"] == "train" and record["status"] == "finished" and not record.get("dry_run")
                and os.path.isfile(os.path.join(folder, FINAL_MODEL))):
            return folder
    return None
