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

from machinery import runs, settings
from model import MODELS
from utils import (UserError, bfloat16_is_native, data_visualization, describe_data, get_testloader,
                   get_trainloader, memory_format, model_summary, pick_device, step_epoch_schedule, test, train)

# ---- Settings. Edit them here, or override any for one run with its flag (see --help). ----
MODEL = "Net"            # the model of model.py to train; its recipe in RECIPES below changes some settings
DATASET = "MNIST"        # torchvision's MNIST, or FashionMNIST or KMNIST, which have MNIST's shapes
EPOCHS = 20              # passes over the 60,000 training images
BATCH_SIZE = 512         # training images per optimizer step
TEST_BATCH_SIZE = 512    # test images per batch
LR = 0.01                # the learning rate; with SCHEDULE onecycle, the peak of the cycle
MOMENTUM = 0.9           # SGD's momentum; with onecycle, the top of its cycle (it dips by 0.1 as the lr peaks)
NESTEROV = False         # Nesterov momentum
WEIGHT_DECAY = 0.0       # the optimizer's L2 penalty on the weights
SCHEDULE = "step"        # step (StepLR) or onecycle (OneCycleLR), as build_scheduler below builds them
STEP_SIZE = 15           # step schedule: epochs between drops of the lr
GAMMA = 0.1              # step schedule: the factor of each drop
ROTATION = 15.0          # augmentation: each image turned by a random angle within +-ROTATION degrees (0: off)
CROP_P = 0.1             # augmentation: the share of images zoomed in to their centre CROP_SIZE pixels (0: off)
CROP_SIZE = 22           # augmentation: the side of that centre, in pixels
SHIFT = 0                # augmentation: each image moved by up to SHIFT whole pixels across and down (0: off)
LABEL_SMOOTHING = 0.0    # the loss: this share of each target spread evenly over the ten digits (0: off)
DEVICE = "auto"          # cpu, cuda or mps; auto: the best there is
AMP = True               # bfloat16 autocast where the device has it natively: CUDA from Ampere on, AVX512-BF16, AMX
SEED = 1                 # random seed: the same seed gives the same run on a CPU
DRY_RUN = False          # one batch of training and of test an epoch: with --epochs 2, a check of seconds
DATA_DIR = "data"        # the data is read from DATA_DIR/<DATASET>/raw, and downloaded there if missing
OUT_DIR = "outputs"      # each run writes into a new folder OUT_DIR/<date>_<time>_<model>

# What each model's recipe changes from the settings above; Net, the assignment's model, trains with them as they
# are (the original's recipe). A model without a recipe does too.
RECIPES = {
    "CompactNet": dict(EPOCHS=15, BATCH_SIZE=128, LR=0.2, MOMENTUM=0.95, NESTEROV=True, SCHEDULE="onecycle"),
    "FastNet": dict(EPOCHS=1, BATCH_SIZE=128, LR=0.5, NESTEROV=True, SCHEDULE="onecycle", ROTATION=0.0, CROP_P=0.0),
    "FastNet12": dict(EPOCHS=12, BATCH_SIZE=256, LR=0.7, NESTEROV=True, SCHEDULE="onecycle", ROTATION=12.0, SHIFT=2,
                      LABEL_SMOOTHING=0.1),  # FastNet's network, 99.5% within a minute on a CPU
}
# ----
BLOCK = {name: value for name, value in globals().items()  # None or a list too: a setting can't be one, and is told
         if name.isupper() and isinstance(value, (int, float, str, type(None), list, tuple))}


def build_model(hp):
    """The model MODEL names; a setting named as an argument of its constructor reaches it (DROPOUT -> dropout)."""
    return MODELS[hp["MODEL"]](**settings.model_arguments(MODELS[hp["MODEL"]], hp))


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


def loss_function(model, hp):
    """What training minimizes, as loss(output, target); it can see the model (an L1 penalty on its weights:
    docs/changing.md). The test loss is F.nll_loss of the output alone, whatever this adds."""
    def loss(output, target):  # output: log-probabilities, which cross_entropy's log_softmax leaves as they are
        return F.cross_entropy(output, target, label_smoothing=hp["LABEL_SMOOTHING"])
    return loss


def check_forward(model, loader):
    """Checks that the model gives a batch [batch, 10] log-probabilities (log_softmax); UserError saying why not.
    A model that fails in channels_last and not without it (a .view that flattens, as the original's) is moved."""
    model.eval()
    with torch.no_grad():
        images = next(iter(loader))[0][:8]
        try:
            output = model(images).float().cpu()
        except RuntimeError as error:  # x.view(-1, n), the original's flatten, fails on channels_last's strides
            if memory_format(model) != torch.channels_last:
                raise
            try:
                output = model.to(memory_format=torch.contiguous_format)(images).float().cpu()
            except RuntimeError:
                raise error from None  # no matter of layout: the first error is the learner's
            print("Note: the model fails in the channels_last layout (a .view that flattens?) and trains in the "
                  "contiguous one; with x.flatten(1) it could use channels_last, 1.2-1.3x faster on a CPU")
    if output.shape != (len(images), 10) or not torch.allclose(output.logsumexp(1), torch.zeros(len(images)),
                                                               atol=1e-3):
        raise UserError("the model must return log-probabilities [batch, 10] (F.log_softmax(x, dim=1)), not " + (
            f"values of shape {list(output.shape)} for {len(images)} images" if output.shape != (len(images), 10)
            else "raw scores"))


def train_run(args):
    # Settings (printed first, each with where it came from) and, for --resume, the checkpoint and its folder
    checkpoint = runs.load(args.resume, needs=runs.CHECKPOINT_KEYS) if args.resume else None
    hp, sources, notes = settings.merge(BLOCK, RECIPES, args.given, checkpoint, args.resume)
    settings.print_settings(hp, sources, notes)
    folder = runs.resume_folder(args.resume, checkpoint, hp) if checkpoint else None
    device = pick_device(hp["DEVICE"])
    amp = hp["AMP"] and bfloat16_is_native(device)

    # Data: tensors on the device, batched and augmented there (utils.py, augment.py)
    max_batches = 1 if hp["DRY_RUN"] else None
    train_loader = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, max_batches, hp, hp["DATASET"])
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device, max_batches, hp["DATASET"])

    # Model, loss, optimizer and schedule, seeded so that the same seed gives the same run
    torch.manual_seed(hp["SEED"])
    random.seed(hp["SEED"])
    model = build_model(hp)
    if checkpoint:  # the weights before anything is made: model.py may have changed so that they no longer fit
        runs.load_weights(model, checkpoint["model"], args.resume)
    arguments = {name: value for name, value in settings.model_arguments(MODELS[hp["MODEL"]], dict(hp)).items()
                 if name.upper() in hp.read}  # those build_model read: what the model was given
    model = model.to(device, memory_format=memory_format(model))
    optimizer = build_optimizer(model, hp)
    scheduler = build_scheduler(optimizer, hp, len(train_loader))
    criterion = loss_function(model, hp)
    with torch.random.fork_rng(devices=[]):
        check_forward(model, test_loader)
    folder = folder or runs.new_folder(hp["OUT_DIR"], hp["MODEL"])
    print(f"Run folder: {runs.printable(folder)}\nDevice: {runs.device_name(device)}, "
          f"{'bfloat16' if amp else 'float32'}")
    print(describe_data(train_loader.images, test_loader.images))
    model_summary(model)
    history, lr_curve = [], []
    if checkpoint:  # where the run stopped: the optimizer's line shows the state it goes on from
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history, lr_curve = list(checkpoint["history"]), list(checkpoint["lr_curve"])
        runs.set_random_state(checkpoint["random_state"])
    group = {k: v for k, v in optimizer.param_groups[0].items() if k in ("lr", "momentum", "betas", "nesterov",
                                                                          "weight_decay")}
    shown = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in group.items())
    print(f"Optimizer at this run's first step (schedule: {type(scheduler).__name__}): "
          f"{type(optimizer).__name__}({shown})")
    record = runs.new_record(hp, model, device, amp, args.argv, optimizer={"class": type(optimizer).__name__, **group},
                             schedule=type(scheduler).__name__, loss=runs.source_of(criterion), test_loss="F.nll_loss",
                             arguments=arguments)
    if checkpoint:
        record.update(runs.summary(history, lr_curve), resumed_from=os.path.abspath(args.resume),
                      id=checkpoint["id"] if folder == os.path.dirname(os.path.abspath(args.resume)) else record["id"])
    step_lrs = []  # the lr of each optimizer step, as the schedule moved it
    optimizer.register_step_post_hook(lambda optimizer, *_: step_lrs.append(optimizer.param_groups[0]["lr"]))

    with runs.recorded(folder, record):
        runs.save_record(folder, record)
        if not history:
            runs.save_figure(data_visualization(train_loader), os.path.join(folder, runs.SAMPLES))
        for epoch in range(len(history) + 1, hp["EPOCHS"] + 1):
            start, step_lrs[:] = time.perf_counter(), []
            train_loss, train_acc = train(model, device, train_loader, optimizer, criterion, scheduler, amp)
            test_loss, test_acc = test(model, device, test_loader, amp=amp, verbose=False)
            if not math.isfinite(test_loss):  # the last steps can blow the weights up after train() looked
                raise UserError(f"the test loss became {test_loss}: the lr is too high for this model (try a tenth)")
            step_epoch_schedule(scheduler, test_loss)
            history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                                test_acc=test_acc, lr=sum(step_lrs) / len(step_lrs),  # the mean of its steps' lrs
                                seconds=time.perf_counter() - start))
            lr_curve += [[epoch - 1 + i / len(step_lrs), lr] for i, lr in enumerate(step_lrs)][::len(step_lrs) // 25
                                                                                                 or 1]  # 25 an epoch
            runs.save_epoch(folder, record, dict(  # runs.CHECKPOINT_KEYS; where each setting came from, which were read
                id=record["id"], settings=dict(hp), read=sorted(hp.read),
                sources=checkpoint.get("sources") if checkpoint else sources,
                model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                history=history, lr_curve=lr_curve, random_state=runs.random_state()))
            print(f"Epoch {epoch}/{hp['EPOCHS']}: " + runs.row_text(history[-1]))
        from machinery.evaluation import report  # (the end of the run, done again by a resume that finds no epoch)
        record["calibration"], knows = report(model, device, train_loader.images, test_loader.images,
                                              test_loader.labels, amp, folder, hp["DRY_RUN"])
        record.update(model_pt_epoch=history[-1]["epoch"], unused_settings=sorted(set(hp) - hp.read))
        runs.save_torch(folder, runs.CALIBRATION, knows)
        runs.save_torch(folder, runs.FINAL_MODEL, getattr(model, "_orig_mod", model).state_dict())
    if record["unused_settings"]:
        print(f"Settings nothing read in this run: {', '.join(record['unused_settings'])}")
    final = "Dry run (one test batch an epoch): final" if hp["DRY_RUN"] else "Final"
    print(f"{final} test accuracy {history[-1]['test_acc']:.2f}% (best {record['best_test_acc']:.2f}% at epoch "
          f"{record['best_epoch']}, chosen on the test set); {record['seconds']:.0f} s of training and test\nSaved in "
          f"{runs.printable(folder)}: " + ", ".join(sorted(name for name in os.listdir(folder) if name[0] != ".")))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with runs.errors_in_one_line("--traceback" in argv):
        args = settings.parse_args(argv, BLOCK, RECIPES)
        if args.compare is not None:
            from machinery.tools import compare
            return compare(args.compare, args.given.get("OUT_DIR", OUT_DIR))
        if args.resume or not (args.eval_only or args.find_lr):
            return train_run(args)
        hp, sources, notes = settings.merge(BLOCK, RECIPES, args.given)
        device = pick_device(hp["DEVICE"])
        if args.eval_only:
            from machinery.tools import evaluate_only
            return evaluate_only(args.eval_only, device, hp, args.argv, args.given)
        from machinery.tools import find_lr
        settings.print_settings(hp, sources, notes)  # the recipe it tests
        loader = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, 20 if hp["DRY_RUN"] else None, hp,
                                 hp["DATASET"])
        torch.manual_seed(hp["SEED"])
        model = build_model(hp).to(device)
        find_lr(model, build_optimizer(model, hp), loader, loss_function(model, hp), hp)


if __name__ == "__main__":  # so that importing this file (the tests do) runs nothing
    sys.exit(main())
