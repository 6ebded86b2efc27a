"""The modes of main_mnist.py that train nothing for keeps (--compare, --eval-only, --find-lr), and the one place a
saved model is read back, for them, predict.py and the page."""
import contextlib
import math
import os
import shutil
import sys

import torch

from machinery import runs
from machinery.evaluation import FAMILIES, outputs, report, robustness_curves
from machinery.figures import NOT_PLOTTED, plot_comparison, plot_lr_finder, plot_robustness
from model import MODELS
from utils import UserError, get_testloader, get_trainloader

ROBUSTNESS_IMAGES = 2000  # test images per point of a robustness curve: a standard error of 1.1 points at most


def compare(folders, out_dir):
    """A table of runs (default: every folder in out_dir with a run.json): each run's last epoch, every key its
    rows hold, and the settings, model structure and code where the runs differ; comparison.png of their test
    accuracy, dry runs only if there is nothing else. A run whose record is damaged gets a line that says so; a folder
    named that holds no run, one and exit status 1. --eval-only and --find-lr folders are no runs: they are left out."""
    named = bool(folders)
    if not folders:
        folders = sorted(os.path.join(out_dir, name) for name in os.listdir(out_dir)) if os.path.isdir(out_dir) else []
        folders = [f for f in folders if os.path.lexists(os.path.join(f, runs.RECORD))]
    if not folders:
        raise UserError(f"no runs to compare in {out_dir}/: train one with `python3 main_mnist.py`")
    table, damaged, missing = [], [], []  # (row, what the run was made of, history) per readable run
    for folder in folders:
        if os.path.basename(folder) == runs.RECORD:  # RUN/run.json, as a shell completes it, names its run
            folder = os.path.dirname(os.path.abspath(folder))
        name = os.path.basename(os.path.abspath(folder))  # of RUN/ and . too
        if named and not os.path.lexists(os.path.join(folder, runs.RECORD)):
            missing.append(f"{name}  no run here: {folder} has no {runs.RECORD}")
            continue
        try:
            record = runs.read_json(os.path.join(folder, runs.RECORD))
            if record.get("mode", "train") != "train":
                missing += [f"{name}  no training run: {folder} holds --{record['mode']}'s files"] if named else []
                continue
            history, hp = record["history"], record["settings"]
            status = record["status"] if record["status"] != "running" or runs.alive(record["pid"]) else "killed"
            row = {"run": name, "model": record["model"], "status": status + (
                " (dry run)" if hp.get("DRY_RUN") else ""), "epochs": f"{len(history)}/{hp['EPOCHS']}", "best test_acc":
                max((r["test_acc"] for r in history), default=""), "seconds": round(sum(r["seconds"] for r in history)),
                **{k: v for k, v in (history[-1] if history else {}).items() if k not in NOT_PLOTTED}}
            table.append((row, {**hp, "structure": record["structure"]["fingerprint"], "code": record["code"]["files"]},
                          history))
        except Exception as error:  # a record edited by hand can break any field
            reason = runs.first_line(error) if isinstance(error, UserError) else f"{type(error).__name__} {error}"
            damaged.append(f"{name}  damaged or unreadable: {reason[:100]}")
    differ = [name for name in dict.fromkeys(key for _, made, _ in table for key in made)  # settings, structure, code
              if len({repr(made.get(name)) for _, made, _ in table}) > 1]
    for row, made, _ in table:
        row.update({name: made.get(name, "") for name in differ})
    columns = list(dict.fromkeys(key for row, _, _ in table for key in row if key not in differ)) + differ
    cells = [columns] + [[f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
                         for row, _, _ in table]
    flipped = [list(line) for line in zip(*cells)]  # a line per key and a column per run, where that is narrower
    widths, flipped_widths = ([max(len(runs.printable(value)) for value in column) for column in zip(*lines)]
                              for lines in (cells, flipped))
    if sum(widths) > shutil.get_terminal_size().columns - 2 * len(widths) and sum(flipped_widths) < sum(widths):
        cells, widths = flipped, flipped_widths
    for line in cells if table else []:
        print("  ".join(runs.printable(value).ljust(width) for value, width in zip(line, widths)).rstrip())
    for line in damaged + missing:
        print(runs.printable(line))
    real = [(row, made, history) for row, made, history in table if history and not made.get("DRY_RUN")]
    dry = [(row, made, history) for row, made, history in table if history and made.get("DRY_RUN")]
    drawn = real or dry
    shown = [name for name in differ if len({repr(made.get(name)) for _, made, _ in drawn}) > 1 and name not in
             ("MODEL", "structure", "code", "DATA_DIR", "OUT_DIR")]  # the model is in the run's name; hashes and
    if drawn:                                                            # folders tell no one apart at a glance
        os.makedirs(out_dir, exist_ok=True)
        curves = []
        for row, made, history in drawn:
            words = [f"{name}={made[name]}" for name in shown[:4] if name in made] + ["..."] * (len(shown) > 4)
            curves.append((" ".join([row["run"], *words]).replace("$", r"\$"), history))  # a $ would start TeX
        runs.save_figure(plot_comparison(curves), os.path.join(out_dir, "comparison.png"))
        print(f"Saved: {runs.printable(os.path.join(out_dir, 'comparison.png'))}" + (
            " (dry runs only)" if not real else " (dry runs left out)" if dry else ""))
    return 1 if missing else 0


def built_as(path):
    """(the model's name, the arguments it was built with, its settings) that the run.json beside path records, or
    (None, {}, {})."""
    with contextlib.suppress(UserError, KeyError, TypeError):  # no run.json, or one of older code
        record = runs.read_json(os.path.join(os.path.dirname(os.path.abspath(path)), runs.RECORD))
        return record["model"], record["structure"]["arguments"], dict(record["settings"])
    return None, {}, {}


def load_model(path, device):
    """(name, model in eval mode, what it knows to answer with, {} if nothing) of a model.pt (its run.json and
    calibration.pt beside it say which model and how it answers), a checkpoint.pt or a bare state_dict of any model
    in model.py. Checked once, here: every tensor a number, the calibration's values in range and its bank of the
    shapes the model gives; else UserError naming what is damaged."""
    path = runs.file_in(path, runs.FINAL_MODEL)
    saved = runs.load(path, "model")  # weights alone, or a checkpoint
    state = saved.get("model", saved) if isinstance(saved, dict) else saved
    folder = os.path.dirname(os.path.abspath(path))
    name, arguments, _ = built_as(path)
    for candidate in [name] if name in MODELS else list(MODELS):  # without a run.json, every model is tried
        try:
            model = MODELS[candidate](**arguments)
            model.load_state_dict(state)
            name = candidate
            break
        except (RuntimeError, TypeError, AttributeError, ValueError) as error:
            failure = error
    else:
        if name in MODELS:  # run.json names it: its layers or arguments in model.py changed since the run
            raise runs.no_longer_fits(path, name, failure)
        raise UserError(f"{path} holds the weights of no model in model.py ({', '.join(MODELS)})")
    damaged = [key for key, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if damaged:
        raise UserError(f"{path}: {damaged[0]} is not all numbers (NaN or infinite): the run that saved it failed, or "
                        f"the file is damaged")
    model = model.to(device).eval()
    calibration = os.path.join(folder, runs.CALIBRATION)
    if os.path.basename(path) != runs.FINAL_MODEL or not os.path.exists(calibration):
        return name, model, {}
    keys = ("temperature", "threshold", "limits", "bank", "bases", "thickest")
    knows = runs.load(calibration, "calibration")
    missing = [key for key in keys if not isinstance(knows, dict) or key not in knows]
    if missing:  # made by older code: the weights still read digits
        print(f"Note: {runs.printable(calibration)} is from older code (it lacks {', '.join(missing)}); `python3 "
              f"main_mnist.py --eval-only {runs.printable(path)}` makes a new one in a folder of its own",
              file=sys.stderr)
        return name, model, {}
    _, features = outputs(model, device, torch.zeros(1, 28, 28))
    t, threshold, limits, bank, bases, thickest = (knows[key] for key in keys)
    problems = [what for what, bad in [
        ("its temperature is no positive number", not isinstance(t, (int, float)) or not 0 < t < math.inf),
        ("its threshold is not within 0 to 1", not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1),
        ("its thickest ink is not within 0 to 14", not isinstance(thickest, (int, float)) or not 0 <= thickest <= 14),
        ("its limits are not one number per layer", not isinstance(limits, list) or len(limits) != len(features)
         or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in limits)),
        ("its bank does not fit the model's features", not isinstance(bank, list) or not isinstance(bases, list) or
         not len(bank) == len(bases) == len(features) or not all(
             torch.is_tensor(b) and torch.isfinite(b).all() and (basis is None and b.shape[1:] == f.shape[1:] or
             torch.is_tensor(basis) and basis.shape == (f.shape[1], b.shape[1]) and torch.isfinite(basis).all())
             for b, basis, f in zip(bank, bases, features)))] if bad]
    if problems:
        raise UserError(f"{calibration} is damaged: {problems[0]}; `python3 main_mnist.py --eval-only {path}` makes "
                        f"a new one in a folder of its own")
    return name, model, knows


def evaluate_only(path, device, hp, argv, given):
    """Scores a model.pt on the test set into a new folder of its own: the end-of-run report, robustness curves
    (robustness.csv, robustness.png), and the model.pt with a calibration.pt made by this code beside it. The test
    set is its run's DATASET's, unless --dataset names another."""
    name, model, _ = load_model(path, device)
    _, arguments, trained_with = built_as(runs.file_in(path, runs.FINAL_MODEL))  # what load_model built it with
    hp["MODEL"], hp["DATASET"] = name, given.get("DATASET", trained_with.get("DATASET", hp["DATASET"]))
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device, dataset=hp["DATASET"])
    train_images = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, dataset=hp["DATASET"]).images
    folder = runs.new_folder(hp["OUT_DIR"], f"{name}_eval")
    print(f"Evaluating {name} from {runs.printable(path)}; its files go to {runs.printable(folder)}")
    record = runs.new_record(hp, model, device, False, argv, mode="eval-only", evaluated=os.path.abspath(path),
                             arguments=arguments)
    with runs.recorded(folder, record):
        runs.save_record(folder, record)
        record["calibration"], knows = report(model, device, train_images, test_loader.images, test_loader.labels,
                                              False, folder, hp["DRY_RUN"])
        record["final_test_acc"] = record["calibration"]["test_acc"]
        count = 100 if hp["DRY_RUN"] else ROBUSTNESS_IMAGES
        curves = robustness_curves(model, device, test_loader.images[:count], test_loader.labels[:count].cpu())
        rows = [dict(family=f, strength=s, accuracy=round(a, 2)) for f, points in curves.items() for s, a in points]
        runs.write_file(folder, "robustness.csv", lambda f: f.write(runs.csv_text(rows).encode()))
        runs.save_figure(plot_robustness({name: curves}, count), os.path.join(folder, "robustness.png"))
        shifted = [a for family, points in curves.items() for s, a in points if s != FAMILIES[family][1][0]]
        record["robustness_mean"] = sum(shifted) / len(shifted)
        runs.save_torch(folder, runs.CALIBRATION, knows)  # then the weights, as a run saves them: `predict.py --model
        runs.save_torch(folder, runs.FINAL_MODEL, model.state_dict())  # FOLDER` answers with this calibration
        print(f"Test accuracy {record['final_test_acc']:.2f}%. Robustness: {record['robustness_mean']:.1f}% accuracy "
              f"on average over {len(shifted)} altered copies of {count:,} test digits (turned, moved, scaled, "
              f"thinned or thickened, noisy, blurred, of less contrast); each family's curve in robustness.csv "
              f"and robustness.png")


def find_lr(model, optimizer, loader, criterion, hp, steps=100, low=1e-7, high=10):
    """Leslie Smith's range test: the lr grows exponentially from `low` to `high`, one batch a step, and the
    smoothed loss is recorded until it passes 4 times its best. Suggests a tenth of the lr of the lowest loss
    (fastai's rule); lr_finder.png in a new folder. It trains the model it is given, so give it a fresh one."""
    lrs, losses, smoothed = [], [], None
    model.train()
    batches = iter(())
    for step in range(steps):
        lr = low * (high / low) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            data, target = next(batches)
        except StopIteration:
            batches = iter(loader)
            data, target = next(batches)
        optimizer.zero_grad()
        loss = criterion(model(data), target)
        loss.backward()
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if not math.isfinite(smoothed) or (losses and smoothed > 4 * min(losses)):
            break
        lrs.append(lr)
        losses.append(smoothed)
    suggestion = lrs[losses.index(min(losses))] / 10
    folder = runs.new_folder(hp["OUT_DIR"], f"{hp['MODEL']}_find-lr")
    runs.save_figure(plot_lr_finder(lrs, losses, suggestion), os.path.join(folder, "lr_finder.png"))
    print(f"Suggested lr: {suggestion:.3g} (a tenth of where the smoothed loss was lowest); try --lr {suggestion:.2g}"
          f"\nSaved: {runs.printable(os.path.join(folder, 'lr_finder.png'))}")
