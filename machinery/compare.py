"""--compare: runs side by side, as a table on the console, comparison.csv and comparison.png, and the robustness
curves of the evaluations among them on one figure.
"""
import json
import os
import sys

from machinery.errors import UserError
from machinery.figures import plot_comparison, plot_robustness
from machinery.files import atomic_write
from machinery.records import RECORD, TEXT, check_fields, csv_text, read_history, read_record, read_robustness
from machinery.runs import code_label, is_locked

COMPARISON_PNG, COMPARISON_CSV = "comparison.png", "comparison.csv"
ROBUSTNESS_COMPARISON = "robustness_comparison.png"  # the robustness curves of the evaluations among them


# Settings that say where things are rather than how the model trains; --compare does not list them.
PLACES = ["DATA_DIR", "OUT_DIR"]


def run_folders(parent):
    """The folders directly under `parent` that hold a run's record, oldest first."""
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        raise UserError(f"no runs to compare: cannot read {parent}") from None
    return [os.path.join(parent, name) for name in names if os.path.exists(os.path.join(parent, name, RECORD))]


def run_status(folder, record):
    """The record's status, except that a 'running' run whose lock nobody holds was killed."""
    if record["status"] == "running" and not is_locked(folder):
        return "killed"
    return record["status"]


def compare(folders, out_dir):
    """Prints a table of the runs in `folders` (default: every run in out_dir) and writes comparison.png and
    comparison.csv into out_dir; the robustness curves of the evaluations (--eval-only) among them go on one
    figure, robustness_comparison.png. A folder whose files cannot be read is skipped with a line that says why;
    the others are still compared. Returns the rows of the table."""
    folders = folders or run_folders(out_dir)
    runs, robustness = [], {}
    for folder in folders:
        try:
            record = read_record(folder)
            curves = read_robustness(folder) if record["mode"] == "eval-only" else None
            if curves:
                trained = os.path.basename(os.path.dirname(os.path.abspath(str(record.get("checkpoint", folder)))))
                robustness[f"{trained} ({record['model']})"] = curves
            if record["mode"] != "train":
                print(f"{folder}: an evaluation; its robustness curves are drawn" if curves else
                      f"skipped {folder}: {record['mode']}, not a training run")
                continue
            check_fields(record["hyperparameters"], {"MODEL": TEXT}, os.path.join(folder, RECORD))
            runs.append((folder, record, read_history(folder)))
        except UserError as error:
            print(f"skipped {folder}: {error}")
    if robustness:
        compare_robustness(robustness, out_dir)
    if not runs:
        if robustness:
            return []
        raise UserError(f"no runs to compare in {', '.join(folders) if folders else out_dir}")
    all_settings = [record["hyperparameters"] for _, record, _ in runs]
    # Settings that differ get a column each; EPOCHS has one anyway ("epochs": done/planned).
    differ = [name for name in all_settings[0] if name not in PLACES and name != "EPOCHS"
              and len({json.dumps(hp.get(name)) for hp in all_settings}) > 1]
    codes = [code_label(record.get("code")) for _, record, _ in runs]
    code_differs = len(set(codes)) > 1
    rows = []
    for (folder, record, history), code in zip(runs, codes):
        status = run_status(folder, record)
        rows.append({
            "run": os.path.basename(os.path.normpath(folder)), "model": record["model"],
            **{name.lower(): record["hyperparameters"].get(name) for name in differ},
            **({"code": code} if code_differs else {}),
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
    shown = [name.lower() for name in differ] + (["code"] if code_differs else [])
    curves = [{"label": row["run"] + "".join(f", {name}={row[name]}" for name in shown), "history": history,
               "finished": record["status"] == "finished"} for row, (_, record, history) in zip(rows, runs)]
    try:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write(csv_path, lambda f: f.write(csv_text(rows).encode()))
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


def compare_robustness(curves, out_dir):
    """The robustness curves {label: curves} of several evaluations on one figure, in out_dir."""
    path = os.path.join(out_dir, ROBUSTNESS_COMPARISON)
    try:
        os.makedirs(out_dir, exist_ok=True)
        plot_robustness(curves, path, images=None)
    except OSError as error:
        raise UserError(f"could not write {error.filename or path}: {error.strerror or error}") from None
    print(f"Saved: {path} (the robustness curves of {len(curves)} evaluated models)")


def _percent(value):
    return "" if value is None else f"{value:.2f}"


def _print_table(rows):
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
