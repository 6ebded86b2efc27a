"""Train a digit classifier on MNIST: python3 main_mnist.py [--help]

Edit the hyperparameters below, or override any of them on the command line (--epochs 1, --batch-size 128, ...).
Outputs land in OUT_DIR: metrics.csv, accuracy_loss.png, model.pt, checkpoint.pt and two diagnostic figures.
"""
import argparse
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torch.optim as optim

from model import Net, CompactNet
from utils import (UserError, NonFiniteLoss, pick_device, bfloat16_is_fast, get_trainloader, get_testloader,
                   train, test, predict, model_summary, atomic_write, write_metrics, plot_metrics,
                   confusion_matrix, per_class_accuracy, plot_confusion_matrix, plot_misclassified)

# ---- Hyperparameters: the original's recipe. Edit them here, or override any with a flag (see --help). ----
MODEL = "Net"          # the class of model.py to train; RECIPES below holds the other models' own settings
EPOCHS = 20
BATCH_SIZE = 512
LR = 0.01              # SGD's learning rate; with SCHEDULE = "onecycle", the peak of the cycle
MOMENTUM = 0.9         # with SCHEDULE = "onecycle", the top of the momentum cycle (it dips 0.1 as the lr peaks)
NESTEROV = False
WEIGHT_DECAY = 0.0
SCHEDULE = "step"      # "step": lr x GAMMA every STEP_SIZE epochs (StepLR); "onecycle": OneCycleLR over the run
STEP_SIZE = 15
GAMMA = 0.1
TEST_BATCH_SIZE = 2048  # evaluation keeps no activations for backward, so large batches cost little memory
AMP = True             # bfloat16 autocast, where the device runs it natively (CUDA, CPUs with AVX512-BF16 or AMX)
SEED = 1
DATA_DIR = "data"
OUT_DIR = "outputs"

MODELS = {"Net": Net, "CompactNet": CompactNet}
# Each model's recommended settings, applied over the constants above when it is selected; flags still win.
# CompactNet's were picked on an H100 over 6 seeds among 20 variants (README): a one-cycle schedule lets its
# batch-normalized layers take a peak lr of 0.2; 0.1 fell below 99.4% in late epochs for some seeds.
RECIPES = {
    "Net": {},
    "CompactNet": {"EPOCHS": 15, "BATCH_SIZE": 128, "LR": 0.2, "MOMENTUM": 0.95, "NESTEROV": True,
                   "SCHEDULE": "onecycle"},
}

HYPERPARAMETERS = ["MODEL", "EPOCHS", "BATCH_SIZE", "LR", "MOMENTUM", "NESTEROV", "WEIGHT_DECAY", "SCHEDULE", "STEP_SIZE",
                   "GAMMA", "TEST_BATCH_SIZE", "AMP", "SEED", "DATA_DIR", "OUT_DIR"]
HELP = {
    "MODEL": "model class from model.py",
    "EPOCHS": "number of epochs to train",
    "BATCH_SIZE": "training batch size",
    "LR": "learning rate (the peak one for --schedule onecycle)",
    "MOMENTUM": "SGD momentum (with onecycle: the top of its cycle)",
    "NESTEROV": "Nesterov momentum",
    "WEIGHT_DECAY": "SGD weight decay",
    "SCHEDULE": "learning-rate schedule: step (StepLR) or onecycle (OneCycleLR)",
    "STEP_SIZE": "StepLR: epochs between learning-rate drops",
    "GAMMA": "StepLR: factor of each drop",
    "TEST_BATCH_SIZE": "evaluation batch size",
    "AMP": "bfloat16 mixed precision where the device supports it natively",
    "SEED": "random seed (runs with the same seed give the same metrics on CPU)",
    "DATA_DIR": "folder holding MNIST (downloaded into DATA_DIR/MNIST/raw if missing)",
    "OUT_DIR": "folder for metrics, plots, the model and the checkpoint",
}
# What may change when a run resumes: the optimizer and scheduler come back from the checkpoint as they were.
RESUMABLE_CHANGES = ["EPOCHS", "DATA_DIR", "OUT_DIR"]
CHECKPOINT, METRICS, PLOT, FINAL_MODEL = "checkpoint.pt", "metrics.csv", "accuracy_loss.png", "model.pt"
MISCLASSIFIED, CONFUSION = "misclassified.png", "confusion_matrix.png"


# ---- Command line ----

def flag_name(name):
    """The command-line flag of a hyperparameter: BATCH_SIZE -> --batch-size."""
    return "--" + name.lower().replace("_", "-")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line that names the problem, rather than the whole usage text
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None):
    """The flags given: hyperparameters that were set on the command line only, plus the run's options."""
    recipes = "\n".join(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in recipe.items()) or "the constants as they are")
                        for name, recipe in RECIPES.items())
    parser = _Parser(description="Train a digit classifier on MNIST.", formatter_class=argparse.RawTextHelpFormatter,
                     allow_abbrev=False,  # --epoch is a typo, not --epochs
                     epilog=f"recipes applied by --model (flags given still win):\n{recipes}")
    for name in HYPERPARAMETERS:
        default = globals()[name]
        kwargs = {"action": argparse.BooleanOptionalAction} if isinstance(default, bool) else {"type": type(default)}
        if name == "MODEL":
            kwargs["choices"] = list(MODELS)
        if name == "SCHEDULE":
            kwargs["choices"] = ["step", "onecycle"]
        recipes = "".join(f"; {model}: {recipe[name]}" for model, recipe in RECIPES.items() if name in recipe)
        parser.add_argument(flag_name(name), dest=name, default=argparse.SUPPRESS,
                            help=f"{HELP[name]} (default: {default}{recipes})", **kwargs)
    parser.add_argument("--dry-run", action="store_true", help="one batch of training and one of test per epoch")
    parser.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint.pt")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint on the test set")
    parser.add_argument("--checkpoint", metavar="PATH", help="with --eval-only: a model.pt or checkpoint.pt")
    return parser.parse_args(argv)


def flags_given(args):
    return {name: getattr(args, name) for name in HYPERPARAMETERS if hasattr(args, name)}


def hyperparameters(args, saved=None):
    """The run's hyperparameters: the constants, then the model's recipe (or those of the run being resumed),
    then the flags given."""
    given = flags_given(args)
    if saved is not None:
        return {**saved, **given}
    hp = {name: globals()[name] for name in HYPERPARAMETERS}
    model_name = given.get("MODEL", hp["MODEL"])
    if model_name not in RECIPES:
        raise UserError(f"MODEL = {model_name!r} is not one of {', '.join(RECIPES)}")
    return {**hp, **RECIPES[model_name], **given}


def check_hyperparameters(hp):
    """Raises UserError for the first value that would make the run fail or train garbage."""
    rules = [
        ("EPOCHS", hp["EPOCHS"] >= 1, "must be at least 1"),
        ("BATCH_SIZE", hp["BATCH_SIZE"] >= 1, "must be at least 1"),
        ("TEST_BATCH_SIZE", hp["TEST_BATCH_SIZE"] >= 1, "must be at least 1"),
        ("LR", math.isfinite(hp["LR"]) and hp["LR"] > 0, "must be a positive number"),
        ("MOMENTUM", 0 <= hp["MOMENTUM"] < 1, "must be in [0, 1)"),
        ("WEIGHT_DECAY", math.isfinite(hp["WEIGHT_DECAY"]) and hp["WEIGHT_DECAY"] >= 0, "must be 0 or more"),
        ("SCHEDULE", hp["SCHEDULE"] in ("step", "onecycle"), "must be 'step' or 'onecycle'"),
        ("STEP_SIZE", hp["STEP_SIZE"] >= 1, "must be at least 1"),
        ("GAMMA", 0 < hp["GAMMA"] <= 1, "must be in (0, 1]"),
        ("MODEL", hp["MODEL"] in MODELS, f"must be one of {', '.join(MODELS)}"),
        ("NESTEROV", not hp["NESTEROV"] or hp["MOMENTUM"] > 0, "needs a MOMENTUM above 0"),
    ]
    for name, ok, requirement in rules:
        if not ok:
            raise UserError(f"{name} ({flag_name(name)}) {requirement}, not {hp[name]!r}")


def check_writable(folder):
    """Makes the output folder and proves it writable now, rather than after hours of training."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write-test")
        atomic_write(probe, lambda f: f.write(b"ok"))
        os.remove(probe)
    except OSError as error:
        raise UserError(f"cannot write to the output folder {folder}: {error.strerror or error}") from None


# ---- Checkpoints ----

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
    """The dict run_training() saves after each epoch, checked to be one."""
    checkpoint = read_saved(path, "checkpoint")
    if not isinstance(checkpoint, dict) or "hyperparameters" not in checkpoint:
        hint = ""
        if isinstance(checkpoint, dict):
            hint = " It holds only model weights (a model.pt?): resume from checkpoint.pt."
        raise UserError(f"{path} is not a training checkpoint.{hint}")
    return checkpoint


@contextmanager
def signals_deferred():
    """Ctrl-C or SIGTERM while files are written takes effect just after, so no file is left half-written."""
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            raise KeyboardInterrupt


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


# ---- The run ----

def build_optimizer(model, hp, steps_per_epoch):
    """SGD with momentum, and its schedule: StepLR steps once per epoch, OneCycleLR once per batch."""
    optimizer = optim.SGD(model.parameters(), lr=hp["LR"], momentum=hp["MOMENTUM"], nesterov=hp["NESTEROV"],
                          weight_decay=hp["WEIGHT_DECAY"])
    if hp["SCHEDULE"] == "onecycle":
        scheduler = optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp["LR"], epochs=hp["EPOCHS"],
                                                  steps_per_epoch=steps_per_epoch, max_momentum=hp["MOMENTUM"],
                                                  base_momentum=max(0.0, hp["MOMENTUM"] - 0.1))
    else:
        scheduler = optim.lr_scheduler.StepLR(optimizer, step_size=hp["STEP_SIZE"], gamma=hp["GAMMA"])
    return optimizer, scheduler


def report_test_set(model, device, test_loader, amp, out_dir):
    """Per-class accuracy on the console; the misclassified grid and the confusion matrix as figures."""
    probabilities, labels = predict(model, device, test_loader, amp)
    matrix = confusion_matrix(probabilities.argmax(dim=1), labels)
    accuracies = per_class_accuracy(matrix)
    print("Per-class test accuracy: " + "  ".join(f"{digit}: {acc:.2f}%" for digit, acc in enumerate(accuracies)))
    plot_misclassified(test_loader.images, probabilities, labels, os.path.join(out_dir, MISCLASSIFIED))
    plot_confusion_matrix(matrix, os.path.join(out_dir, CONFUSION))
    return [os.path.join(out_dir, name) for name in (MISCLASSIFIED, CONFUSION)]


def load_weights(path, model_name):
    """(model name, state_dict) from a model.pt or a checkpoint.pt; the name is the checkpoint's if it has one."""
    saved = read_saved(path, "model file")
    if isinstance(saved, dict) and "hyperparameters" in saved:
        return saved["hyperparameters"]["MODEL"], saved["model"]
    if not isinstance(saved, dict):
        raise UserError(f"{path} does not hold a model's state_dict")
    return model_name, saved


def build_model(model_name, device, state_dict=None, source=None):
    model = MODELS[model_name]()
    if state_dict is not None and not _load_if_fits(model, state_dict):
        fits = [name for name, cls in MODELS.items() if name != model_name and _load_if_fits(cls(), state_dict)]
        hint = f"; it fits --model {fits[0]}" if fits else ""
        raise UserError(f"{source} does not hold weights of {model_name}{hint}")
    return model.to(device, memory_format=torch.channels_last)


def _load_if_fits(model, state_dict):
    """Loads state_dict into model if its names and shapes match; says whether they did."""
    try:
        model.load_state_dict(state_dict)
        return True
    except RuntimeError:
        return False


def evaluate_only(args, device):
    if not args.checkpoint:
        raise UserError("--eval-only needs --checkpoint PATH (a model.pt or checkpoint.pt)")
    hp = hyperparameters(args)
    check_hyperparameters(hp)
    model_name, state_dict = load_weights(args.checkpoint, hp["MODEL"])
    if "MODEL" in flags_given(args) and model_name != args.MODEL:
        raise UserError(f"{args.checkpoint} holds a {model_name}, not a {args.MODEL}")
    model = build_model(model_name, device, state_dict, source=args.checkpoint)
    check_writable(hp["OUT_DIR"])
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device,
                                 max_batches=1 if args.dry_run else None)
    print(f"Evaluating {model_name} from {args.checkpoint} on {device}")
    test(model, device, test_loader, F.nll_loss, hp["AMP"])
    figures = report_test_set(model, device, test_loader, hp["AMP"], hp["OUT_DIR"])
    print("Saved: " + ", ".join(figures))


def run_training(args, device):
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is None:
        hp = hyperparameters(args)
    else:
        saved = dict(checkpoint["hyperparameters"], OUT_DIR=os.path.dirname(args.resume) or ".")
        if "MODEL" in flags_given(args) and args.MODEL != saved["MODEL"]:
            raise UserError(f"{args.resume} belongs to a {saved['MODEL']} run, not to --model {args.MODEL}")
        fixed = [name for name, value in flags_given(args).items()
                 if name not in RESUMABLE_CHANGES and value != saved[name]]
        if fixed:
            raise UserError(f"a resumed run keeps its hyperparameters; only "
                            f"{', '.join(map(flag_name, RESUMABLE_CHANGES))} may change, not {', '.join(fixed)}")
        hp = hyperparameters(args, saved)
        if hp["EPOCHS"] <= checkpoint["epoch"]:
            raise UserError(f"{args.resume} ends at epoch {checkpoint['epoch']}, so there is nothing left to train: "
                            f"add --epochs N with N above {checkpoint['epoch']} to train further")
        if hp["SCHEDULE"] == "onecycle" and hp["EPOCHS"] != saved["EPOCHS"]:
            raise UserError("a onecycle run's length is fixed when it starts: resume it without --epochs")
    check_hyperparameters(hp)
    out_dir = hp["OUT_DIR"]
    paths = {name: os.path.join(out_dir, name) for name in (CHECKPOINT, METRICS, PLOT, FINAL_MODEL)}
    check_writable(out_dir)
    if checkpoint is None and os.path.exists(paths[CHECKPOINT]):
        previous = load_checkpoint(paths[CHECKPOINT])
        if previous["epoch"] < previous["hyperparameters"]["EPOCHS"]:
            raise UserError(f"{out_dir} holds an unfinished run (epoch {previous['epoch']} of "
                            f"{previous['hyperparameters']['EPOCHS']}): resume it with --resume {paths[CHECKPOINT]}, "
                            f"or choose another --out-dir")

    torch.manual_seed(hp["SEED"])
    random.seed(hp["SEED"])
    amp = hp["AMP"] and bfloat16_is_fast(device)
    print(f"Device: {device}; mixed precision: {'bfloat16' if amp else 'off (float32)'}")
    max_batches = 1 if args.dry_run else None
    train_loader = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, max_batches)
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device, max_batches)
    model = build_model(hp["MODEL"], device)
    model_summary(model)
    optimizer, scheduler = build_optimizer(model, hp, len(train_loader))
    batch_scheduler = scheduler if hp["SCHEDULE"] == "onecycle" else None

    history, first_epoch = [], 1
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history, first_epoch = checkpoint["history"], checkpoint["epoch"] + 1
        set_rng_states(checkpoint["rng"])
        print(f"Resuming {hp['MODEL']} from {args.resume} after epoch {checkpoint['epoch']}")

    previous_sigterm = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # `kill` stops as Ctrl-C does
    epoch = first_epoch
    try:
        for epoch in range(first_epoch, hp["EPOCHS"] + 1):
            start = time.perf_counter()
            train_loss, train_acc = train(model, device, train_loader, optimizer, F.nll_loss, batch_scheduler, amp)
            test_loss, test_acc = test(model, device, test_loader, F.nll_loss, amp)
            if not all(torch.isfinite(p).all() for p in model.parameters()):  # the last step can blow up unseen
                raise NonFiniteLoss("the weights became infinite or NaN")
            lr = optimizer.param_groups[0]["lr"]
            if batch_scheduler is None:
                scheduler.step()
            history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                                test_acc=test_acc, lr=lr, seconds=time.perf_counter() - start))
            with signals_deferred():
                checkpoint = dict(hyperparameters=hp, epoch=epoch, model=model.state_dict(),
                                  optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                  history=history, rng=rng_states())
                atomic_write(paths[CHECKPOINT], lambda f: torch.save(checkpoint, f))
                write_metrics(history, paths[METRICS])
                plot_metrics(history, paths[PLOT])
            print(f"Epoch {epoch}/{hp['EPOCHS']}: train loss {train_loss:.4f}, accuracy {train_acc:.2f}% | "
                  f"test loss {test_loss:.4f}, accuracy {test_acc:.2f}% | lr {lr:.3g} | {history[-1]['seconds']:.1f} s")
    except KeyboardInterrupt:
        print(f"\nStopped during epoch {epoch}.", file=sys.stderr)
        if history:
            print(f"Kept epochs 1-{history[-1]['epoch']} in {paths[CHECKPOINT]}, {paths[METRICS]} and {paths[PLOT]}.\n"
                  f"Resume with: python3 main_mnist.py --resume {shlex.quote(paths[CHECKPOINT])}"
                  f"{' --dry-run' if args.dry_run else ''}", file=sys.stderr)
        else:
            print("No epoch had finished, so there is nothing to resume.", file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss as error:
        kept = (f"The checkpoint of epoch {history[-1]['epoch']} is kept in {paths[CHECKPOINT]}."
                if history else "No epoch had finished.")
        raise UserError(f"{error} in epoch {epoch}: the learning rate ({hp['LR']}) is probably too high; "
                        f"try a lower --lr. {kept}") from None
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)

    with signals_deferred():
        atomic_write(paths[FINAL_MODEL], lambda f: torch.save(model.state_dict(), f))
    best = max(history, key=lambda row: row["test_acc"])
    print(f"Final test accuracy {history[-1]['test_acc']:.2f}% (best {best['test_acc']:.2f}% at epoch "
          f"{best['epoch']}); {sum(row['seconds'] for row in history[first_epoch - 1:]):.0f} s of training and test")
    figures = report_test_set(model, device, test_loader, amp, out_dir)
    print("Saved: " + ", ".join([paths[METRICS], paths[PLOT], paths[FINAL_MODEL], paths[CHECKPOINT]] + figures))


def main(argv=None):
    args = parse_args(argv)
    device = pick_device()
    try:
        if args.checkpoint and not args.eval_only:
            raise UserError("--checkpoint goes with --eval-only; to continue training, use --resume PATH")
        if args.resume and args.eval_only:
            raise UserError("--resume continues training; to only evaluate, use --eval-only --checkpoint PATH")
        if args.eval_only:
            evaluate_only(args, device)
        else:
            run_training(args, device)
    except UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # before training started (during training, run_training says what was kept)
        print("Stopped.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # so that importing this file (the tests do) runs nothing
    main()
