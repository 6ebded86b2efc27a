"""Train a digit classifier on MNIST: python3 main_mnist.py [--model NAME] [--help]

Edit the settings below, or override any of them for one run with its flag (--epochs 1, --lr 0.05, ...). Each run
writes into a new folder of its own, OUT_DIR/<date>_<time>_<model>; `--compare` puts runs side by side.
"""
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
import torch.optim as optim

from machinery import UserError, runs, settings
from model import MODELS
from utils import (bfloat16_is_native, data_visualization, describe_data, get_testloader, get_trainloader,
                   model_summary, pick_device, step_epoch_schedule, test, train)

# ---- Settings. Edit them here, or override any for one run with its flag (see --help). ----
MODEL = "Net"            # the model of model.py to train; its recipe in RECIPES below sets how (--model NAME)
DATASET = "MNIST"        # torchvision's MNIST, or FashionMNIST or KMNIST, which have MNIST's shapes
TEST_BATCH_SIZE = 512    # test images per batch (the original's)
AMP = True               # bfloat16 autocast where the device has it natively: CUDA, CPUs with AVX512-BF16 or AMX
SEED = 1                 # random seed: the same seed gives the same run on a CPU
DATA_DIR = "data"        # the data is read from DATA_DIR/<DATASET>/raw, and downloaded there if missing
OUT_DIR = "outputs"      # each run writes into a new folder OUT_DIR/<date>_<time>_<model>

# Each model's recipe: how it is trained. What each setting does:
#   EPOCHS           passes over the 60,000 training images
#   BATCH_SIZE       training images per optimizer step
#   LR               the learning rate; with SCHEDULE onecycle, the peak of the cycle
#   MOMENTUM         SGD's momentum; with onecycle, the top of its cycle (it dips by 0.1 as the lr peaks)
#   NESTEROV         Nesterov momentum
#   WEIGHT_DECAY     the optimizer's L2 penalty on the weights
#   SCHEDULE         step (StepLR) or onecycle (OneCycleLR), as build_scheduler below builds them
#   STEP_SIZE        step schedule: epochs between drops of the lr
#   GAMMA            step schedule: the factor of each drop
#   ROTATION         augmentation: each image turned by a random angle within +-ROTATION degrees (0: off)
#   CROP_P           augmentation: the share of images zoomed in to their centre CROP_SIZE pixels (0: off)
#   CROP_SIZE        augmentation: the side of that centre, in pixels
#   SHIFT            augmentation: each image moved by up to SHIFT whole pixels across and down (0: off)
#   LABEL_SMOOTHING  the loss: this share of each target spread evenly over the ten digits (0: off)
RECIPES = {
    "Net": dict(EPOCHS=20, BATCH_SIZE=512, LR=0.01, MOMENTUM=0.9, NESTEROV=False, WEIGHT_DECAY=0.0,  # the original's
                SCHEDULE="step", STEP_SIZE=15, GAMMA=0.1, ROTATION=15.0, CROP_P=0.1, CROP_SIZE=22, SHIFT=0,
                LABEL_SMOOTHING=0.0),
    "CompactNet": dict(EPOCHS=15, BATCH_SIZE=128, LR=0.2, MOMENTUM=0.95, NESTEROV=True, WEIGHT_DECAY=0.0,
                       SCHEDULE="onecycle", STEP_SIZE=15, GAMMA=0.1, ROTATION=15.0, CROP_P=0.1, CROP_SIZE=22, SHIFT=0,
                       LABEL_SMOOTHING=0.0),
    "FastNet": dict(EPOCHS=1, BATCH_SIZE=128, LR=0.5, MOMENTUM=0.9, NESTEROV=True, WEIGHT_DECAY=0.0,
                    SCHEDULE="onecycle", STEP_SIZE=15, GAMMA=0.1, ROTATION=0.0, CROP_P=0.0, CROP_SIZE=22, SHIFT=0,
                    LABEL_SMOOTHING=0.0),
}
# ----
BLOCK = {name: value for name, value in globals().items() if name.isupper() and isinstance(value, (int, float, str))}


def build_model(hp):
    return MODELS[hp["MODEL"]]()


def build_optimizer(model, hp):
    return optim.SGD(model.parameters(), lr=hp["LR"], momentum=hp["MOMENTUM"], nesterov=hp["NESTEROV"],
                     weight_decay=hp["WEIGHT_DECAY"])


def build_scheduler(optimizer, hp, steps_per_epoch):
    """One-cycle schedules step after every batch, the others after every epoch (utils.steps_every_batch)."""
    if hp["SCHEDULE"] == "onecycle":
        return optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp["LR"], epochs=hp["EPOCHS"],
                                             steps_per_epoch=steps_per_epoch, max_momentum=hp["MOMENTUM"],
                                             base_momentum=max(0.0, hp["MOMENTUM"] - 0.1))
    if hp["SCHEDULE"] == "step":
        return optim.lr_scheduler.StepLR(optimizer, step_size=hp["STEP_SIZE"], gamma=hp["GAMMA"])
    raise ValueError(f"SCHEDULE {hp['SCHEDULE']!r}: build_scheduler in main_mnist.py builds step and onecycle")


def loss_function(hp):
    return F.nll_loss if hp["LABEL_SMOOTHING"] == 0 else lambda output, target: F.cross_entropy(
        output, target, label_smoothing=hp["LABEL_SMOOTHING"])


def build(hp, steps_per_epoch, device):
    """The model, optimizer and schedule the settings make; a learner's edit that cannot build them is one line."""
    try:
        model = build_model(hp).to(device)
        optimizer = build_optimizer(model, hp)
        return model, optimizer, build_scheduler(optimizer, hp, steps_per_epoch)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
        raise UserError(f"these settings build no model, optimizer and schedule: {type(error).__name__}: "
                        f"{runs.first_line(error)}") from None


def check_forward(model, loader):
    """The model's output on a batch: [batch, 10] log-probabilities (log_softmax), or a one-line reason why not."""
    model.eval()
    try:
        with torch.no_grad():
            output = model(next(iter(loader))[0][:8]).float().cpu()
    except RuntimeError as error:  # a layer that does not fit the one before it, typically
        raise UserError(f"the model's forward fails on a batch of [8, 1, 28, 28]: {runs.first_line(error)}") from None
    if output.shape != (8, 10) or not torch.allclose(output.logsumexp(1), torch.zeros(8), atol=1e-3):
        raise UserError(f"the model must return log-probabilities [batch, 10] (F.log_softmax(x, dim=1)), not "
                        f"{'values of shape ' + str(list(output.shape)) if output.shape != (8, 10) else 'raw scores'}")


def train_run(args, device):
    # Settings (printed first) and the run's folder; for --resume, the checkpoint it goes on from
    checkpoint = runs.load(args.resume, needs=("settings", "history")) if args.resume else None
    hp = settings.resumed(args, checkpoint, BLOCK, RECIPES) if checkpoint else settings.resolve(args, BLOCK, RECIPES)
    settings.print_settings(hp, args.given, RECIPES, args.resume)
    folder = runs.take_folder(os.path.dirname(os.path.abspath(args.resume))) if checkpoint else None
    if checkpoint and len(checkpoint["history"]) >= hp["EPOCHS"] and os.path.exists(f"{folder}/{runs.FINAL_MODEL}"):
        raise UserError(f"{args.resume}: its run is finished; add --epochs N, N over {hp['EPOCHS']}, to train further")
    amp = bool(hp["AMP"]) and bfloat16_is_native(device)

    # Data: tensors on the device, batched and augmented there (utils.py, augment.py)
    max_batches = 1 if args.dry_run else None
    train_loader = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, max_batches, hp, hp["DATASET"])
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device, max_batches, hp["DATASET"])

    # Model, loss, optimizer and schedule, seeded so that the same seed gives the same run
    torch.manual_seed(hp["SEED"])
    random.seed(hp["SEED"])
    model, optimizer, scheduler = build(hp, len(train_loader), device)
    with torch.random.fork_rng(devices=[]):
        check_forward(model, test_loader)
    criterion = loss_function(hp)
    folder = folder or runs.new_folder(hp["OUT_DIR"], hp["MODEL"])
    print(f"Run folder: {folder}\nDevice: {runs.device_name(device)}, {'bfloat16' if amp else 'float32'}")
    print(describe_data(train_loader.images, test_loader.images))
    model_summary(model)
    group = {k: v for k, v in optimizer.param_groups[0].items() if k in ("lr", "momentum", "betas", "nesterov",
                                                                          "weight_decay")}
    print(f"Optimizer: {type(optimizer).__name__}({group}); schedule: {type(scheduler).__name__}")

    history = []
    if checkpoint:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            history = list(checkpoint["history"])
            runs.set_random_state(checkpoint["random_state"])
            record = runs.read_json(os.path.join(folder, runs.RECORD))
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            raise UserError(f"{args.resume} is damaged or from other code ({runs.first_line(error)})") from None
        except UserError as error:  # the record alone is damaged: the checkpoint is the truth
            print(f"Note: {error}; a new {runs.RECORD} is started")
            record = runs.new_record(hp, model, device, amp, args.argv)
        record.update(settings=hp, status="running", error=None)
    else:
        record = runs.new_record(hp, model, device, amp, args.argv)
    record.update(optimizer={"class": type(optimizer).__name__, **group}, schedule=type(scheduler).__name__,
                  dry_run=args.dry_run, loss="F.nll_loss" if criterion is F.nll_loss else "F.cross_entropy")

    with runs.recorded(folder, record):
        runs.save_record(folder, record)
        if not history:
            data_visualization(train_loader, os.path.join(folder, runs.SAMPLES))
        for epoch in range(len(history) + 1, hp["EPOCHS"] + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # the lr the epoch begins with
            train_loss, train_acc = train(model, device, train_loader, optimizer, criterion, scheduler, amp)
            test_loss, test_acc = test(model, device, test_loader, criterion, amp, verbose=False)
            if not math.isfinite(test_loss):  # the last steps can blow the weights up after train() looked
                raise UserError(f"the test loss became {test_loss}: the lr is too high for this model (try a tenth)")
            step_epoch_schedule(scheduler, test_loss)
            history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                                test_acc=test_acc, lr=lr, seconds=time.perf_counter() - start))
            runs.save_epoch(folder, record, history, {
                "settings": hp, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "history": history, "random_state": runs.random_state()})
            print(f"Epoch {epoch}/{hp['EPOCHS']}: train loss {train_loss:.4f}, accuracy {train_acc:.2f}% | test loss "
                  f"{test_loss:.4f}, accuracy {test_acc:.2f}% | lr {lr:.3g} | {history[-1]['seconds']:.1f} s")
        from machinery.evaluation import report  # (the end of the run, said again by a resume that finds no epoch)
        count = 2000 if args.dry_run else len(test_loader.labels)  # a dry run reports on a fifth of the test set
        knows, record["calibration"] = report(model, device, train_loader.images[:2 * count],
                                              test_loader.images[:count], test_loader.labels[:count].cpu(), amp, folder)
        runs.save_torch(folder, runs.FINAL_MODEL, {"model_name": hp["MODEL"], "state_dict": getattr(
            model, "_orig_mod", model).state_dict(), **knows})  # (_orig_mod: a torch.compile'd model's own)
    print(f"Final test accuracy {history[-1]['test_acc']:.2f}% (best {record['best_test_acc']:.2f}% at epoch "
          f"{record['best_epoch']}); {record['seconds']:.0f} s of training and test\nSaved in {folder}: "
          + ", ".join(sorted(name for name in os.listdir(folder) if not name.startswith("."))))


def main(argv=None):
    with runs.errors_in_one_line():
        with open(__file__, encoding="utf-8") as f:
            args = settings.parse_args(argv, BLOCK, RECIPES, f.read())
        device = pick_device()
        if args.compare is not None:
            from machinery.tools import compare
            compare(args.compare, args.given.get("OUT_DIR", OUT_DIR))
        elif args.eval_only:
            from machinery.tools import evaluate_only
            evaluate_only(args, device, settings.resolve(args, BLOCK, RECIPES))
        elif args.find_lr:
            from machinery.tools import find_lr
            hp = settings.resolve(args, BLOCK, RECIPES)
            loader = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, 20 if args.dry_run else None, hp,
                                     hp["DATASET"])
            torch.manual_seed(hp["SEED"])
            model, optimizer, _ = build(hp, len(loader), device)
            find_lr(model, optimizer, loader, loss_function(hp), device, hp)
        else:
            train_run(args, device)


if __name__ == "__main__":  # so that importing this file (the tests do) runs nothing
    sys.exit(main())
