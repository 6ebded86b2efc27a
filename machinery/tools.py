"""The modes of main_mnist.py that train nothing for keeps: --compare, --eval-only and --find-lr."""
import copy
import csv
import math
import os

import torch

from machinery import UserError, runs
from machinery.evaluation import FAMILIES, report, robustness_curves
from machinery.figures import plot_comparison, plot_lr_finder, plot_robustness
from model import MODELS
from utils import autocast, get_testloader, get_trainloader, test

ROBUSTNESS_IMAGES = 2000  # test images per point of a robustness curve: a standard error under 1 point


def compare(folders, out_dir):
    """A table of runs (default: every folder in out_dir with a run.json) and comparison.png of their test
    accuracy. A run whose files are damaged gets a line that says so; the others are compared."""
    if not folders:
        folders = sorted(os.path.join(out_dir, name) for name in os.listdir(out_dir)) if os.path.isdir(out_dir) else []
        folders = [f for f in folders if os.path.lexists(os.path.join(f, runs.RECORD))]
    if not folders:
        raise UserError(f"no runs to compare in {out_dir}/: train one with `python3 main_mnist.py`")
    rows, curves = [], []
    for folder in folders:
        try:
            record = runs.read_json(os.path.join(folder, runs.RECORD))
            text = runs.read_bytes(os.path.join(folder, runs.METRICS)).decode()
            history = [{key: float(value) for key, value in row.items()} for row in csv.DictReader(text.splitlines())]
            hp = record["settings"]
            code = record["code"].get("commit", "?")[:7] + ("+" if record["code"].get("changes") else "")
            rows.append([os.path.basename(folder), record["model"], record["status"], f"{record['epochs_done']}/"
                         f"{hp['EPOCHS']}", f"{history[-1]['test_acc']:.2f}",
                         f"{max(r['test_acc'] for r in history):.2f}",
                         f"{record['seconds']:.0f}", f"{hp['BATCH_SIZE']}", f"{hp['LR']:g}", hp["SCHEDULE"], code])
            curves.append((os.path.basename(folder), history))
        except (UserError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                OverflowError) as error:  # a record edited by hand can break any field
            reason = runs.first_line(error) if isinstance(error, UserError) else f"{type(error).__name__} {error}"
            rows.append([os.path.basename(folder), f"damaged or unreadable: {reason[:100]}"])
    header = ["run", "model", "status", "epochs", "final %", "best %", "seconds", "batch", "lr", "schedule", "code"]
    widths = [max(len(str(row[i])) for row in [header] + rows if len(row) > 2) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(runs.printable(value).ljust(width) for value, width in zip(row, widths)).rstrip())
    if curves:
        os.makedirs(out_dir, exist_ok=True)
        plot_comparison(curves, os.path.join(out_dir, "comparison.png"))
        print(f"Saved: {os.path.join(out_dir, 'comparison.png')}")


def load_model(path, device):
    """(name, model in eval mode, what model.pt knows) of a model.pt, checkpoint.pt or bare state_dict, tried on
    each model of model.py; UserError if none fits or a weight is not a number."""
    saved = runs.load(path, "model")
    state = saved.get("state_dict", saved.get("model", saved))
    names = [saved["model_name"]] if saved.get("model_name") in MODELS else list(MODELS)
    for name in names:
        model = MODELS[name]()
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError):
            continue
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"{path}: its weights are not all numbers (NaN or infinite): the run that saved it failed")
        knows = {key: saved[key] for key in ("temperature", "threshold", "limits", "bank") if key in saved}
        return name, model.to(device).eval(), knows
    raise UserError(f"{path} holds the weights of no model in model.py ({', '.join(MODELS)})")


def evaluate_only(args, device, hp):
    """Scores a model.pt on the test set into a new folder of its own: the end-of-run report, and robustness
    curves (robustness.csv, robustness.png)."""
    name, model, _ = load_model(args.eval_only, device)
    hp["MODEL"] = name
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device, 1 if args.dry_run else None,
                                 hp["DATASET"])
    train_images = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, dataset=hp["DATASET"]).images
    folder = runs.new_folder(hp["OUT_DIR"], f"{name}_eval")
    print(f"Evaluating {name} from {args.eval_only}; its files go to {folder}")
    record = runs.new_record(hp, model, device, False, args.argv, mode="eval-only")
    with runs.recorded(folder, record):
        _, record["final_test_acc"] = test(model, device, test_loader)
        labels = test_loader.labels.cpu()
        _, record["calibration"] = report(model, device, train_images, test_loader.images, labels, False, folder)
        count = 100 if args.dry_run else ROBUSTNESS_IMAGES
        curves = robustness_curves(model, device, test_loader.images[:count], labels[:count])
        lines = ["family,strength,accuracy"] + [f"{f},{s},{a:.2f}" for f, points in curves.items() for s, a in points]
        runs.write_file(folder, "robustness.csv", lambda f: f.write(("\n".join(lines) + "\n").encode()))
        plot_robustness({name: curves}, os.path.join(folder, "robustness.png"))
        shifted = [a for family, points in curves.items() for s, a in points if s != FAMILIES[family][1][0]]
        record["robustness_mean"] = sum(shifted) / len(shifted)
        print(f"Robustness: {record['robustness_mean']:.1f}% accuracy under shifts (mean of {len(shifted)} points "
              f"on {count:,} test digits); each curve in robustness.csv and robustness.png")


def find_lr(model, optimizer, loader, criterion, device, hp, steps=100, low=1e-7, high=10):
    """Leslie Smith's range test: the lr grows exponentially from `low` to `high`, one batch a step, and the
    smoothed loss is recorded until it passes 4 times its best. Suggests a tenth of the lr of the lowest loss
    (fastai's rule); lr_finder.png in a new folder. The model and optimizer are left as they were."""
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    lrs, losses, smoothed = [], [], None
    model.train()
    batches = iter(())
    with torch.random.fork_rng(devices=[]):
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
            with autocast(device, False):
                loss = criterion(model(data), target)
            loss.backward()
            optimizer.step()
            smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
            if not math.isfinite(smoothed) or (losses and smoothed > 4 * min(losses)):
                break
            lrs.append(lr)
            losses.append(smoothed)
    model.load_state_dict(saved[0])
    optimizer.load_state_dict(saved[1])
    suggestion = lrs[losses.index(min(losses))] / 10
    folder = runs.new_folder(hp["OUT_DIR"], f"{hp['MODEL']}_find-lr")
    plot_lr_finder(lrs, losses, suggestion, os.path.join(folder, "lr_finder.png"))
    print(f"Suggested lr: {suggestion:.3g} (a tenth of where the smoothed loss was lowest); try --lr {suggestion:.2g}"
          f"\nSaved: {os.path.join(folder, 'lr_finder.png')}")
