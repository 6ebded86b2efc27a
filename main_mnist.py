"""Train a digit classifier on MNIST: python3 main_mnist.py [--help]

Edit the hyperparameters below, or override any of them with its flag (--epochs 1, --lr 0.05, ...). Each run writes
into a new folder of its own, OUT_DIR/<date>_<time>_<model>; `python3 main_mnist.py --compare` puts runs side by side.
"""
from machinery.errors import prepare_console

if __name__ == "__main__":  # before torch loads: Ctrl-C, closed or narrow consoles said in a word, not a traceback
    prepare_console()

import random
import time

import torch
import torch.optim as optim

from machinery import compare, evaluation, lr_finder, non_digits, records, runs, settings
from machinery.hardware import LAYOUTS, choose_precision_and_layout, pick_device
from model import MODELS
from utils import (check_finite, check_output, data_visualization, describe_data, get_testloader, get_trainloader,
                   loss_function, model_summary, step_on_metric, test, train, with_non_digits)

# ---- Hyperparameters: the original's recipe. Edit them here, or override any with its flag (see --help). ----
# A run uses this block as it is, except: --model NAME applies that model's recipe (RECIPES below) over the block,
# and every other flag given wins over both. The first lines of a run print its settings, marked where they came from.
MODEL = "Net"            # model class of model.py to train (--model NAME also applies its recipe, RECIPES below)
EPOCHS = 20              # passes over the 60,000 training images
BATCH_SIZE = 512         # training images per SGD step
LR = 0.01                # SGD's learning rate; with SCHEDULE onecycle, the peak of the cycle
MOMENTUM = 0.9           # SGD momentum; with onecycle, the top of its cycle (it dips by 0.1 as the lr peaks)
NESTEROV = False         # Nesterov momentum
WEIGHT_DECAY = 0.0       # the optimizer's L2 penalty on the weights
SCHEDULE = "step"        # learning-rate schedule, as build_scheduler below builds it: step (StepLR) or onecycle (OneCycleLR)
STEP_SIZE = 15           # step schedule: epochs between learning-rate drops
GAMMA = 0.1              # step schedule: the factor of each drop
ROTATION = 15.0          # augmentation: each training image turns by a random angle within +-ROTATION degrees (0: off)
CROP_P = 0.1             # augmentation: probability of a centre crop to CROP_SIZE, resized back to 28 (0: off)
CROP_SIZE = 22           # augmentation: side of that centre crop, in pixels
SHIFT = 0                # augmentation: each training image moves by up to SHIFT whole pixels across and down (0: off)
LABEL_SMOOTHING = 0.0    # loss: this share of each target spread evenly over the ten digits (0: off, the original)
NON_DIGITS = ""          # loss: kinds of non-digits mixed into each batch, trained toward no digit (non_digits.py; "" off)
HELD_BACK = 0.0          # share of training images never trained on, where "not sure" is chosen (0: on test-set halves)
TEST_BATCH_SIZE = 512    # test images per batch (as the original); larger was slower on a CPU, its cache overflowing
AMP = True               # bfloat16 autocast where the device runs it natively: CUDA, CPUs with AVX512-BF16 or AMX
LAYOUT = "auto"          # memory layout: channels_last, contiguous, or auto: timed here once (machinery/hardware.py)
SEED = 1                 # random seed; the same seed gives the same metrics on a CPU
DATA_DIR = "data"        # MNIST is read from DATA_DIR/MNIST/raw, downloaded there if missing
OUT_DIR = "outputs"      # each run gets a new folder OUT_DIR/<date>_<time>_<model>; --out-dir DIR names it exactly
# ----
SETTINGS = {name: value for name, value in globals().items()  # the block above, in its order
            if name.isupper() and isinstance(value, (int, float, bool, str))}

# Each model's recommended settings, applied over the block when --model names the model; other flags still win.
# CompactNet's were picked on an H100 over 6 seeds among 20 variants of its narrower first design (docs/results.md):
# a one-cycle schedule lets its batch-normalized layers take a peak lr of 0.2; 0.1 fell below 99.4% in late epochs.
RECIPES = {
    "Net": {},
    "CompactNet": {"EPOCHS": 15, "BATCH_SIZE": 128, "LR": 0.2, "MOMENTUM": 0.95, "NESTEROV": True,
                   "SCHEDULE": "onecycle", "NON_DIGITS": "letters,shapes", "HELD_BACK": 0.08},
}


def build_model(hp):
    """The model MODEL names, built with the settings named like its constructor's arguments (machinery/settings.py)."""
    return MODELS[hp["MODEL"]](**settings.model_arguments(MODELS[hp["MODEL"]], hp))


def build_optimizer(model, hp):
    return optim.SGD(model.parameters(), lr=hp["LR"], momentum=hp["MOMENTUM"], nesterov=hp["NESTEROV"],
                     weight_decay=hp["WEIGHT_DECAY"])


def build_scheduler(optimizer, hp, steps_per_epoch):
    """The schedule SCHEDULE names; a new one gets a branch here. Both step after every batch (utils.train):
    OneCycleLR over the whole run, StepLR after STEP_SIZE epochs' worth of batches, so that its lr drops where an
    epoch begins. (A schedule whose step() takes a metric, as ReduceLROnPlateau's, steps after each epoch on the
    test loss instead.)"""
    if hp["SCHEDULE"] == "onecycle":
        return optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp["LR"], epochs=hp["EPOCHS"],
                                             steps_per_epoch=steps_per_epoch, max_momentum=hp["MOMENTUM"],
                                             base_momentum=max(0.0, hp["MOMENTUM"] - 0.1))
    if hp["SCHEDULE"] == "step":
        return optim.lr_scheduler.StepLR(optimizer, step_size=hp["STEP_SIZE"] * steps_per_epoch, gamma=hp["GAMMA"])
    raise ValueError(f"SCHEDULE {hp['SCHEDULE']!r} is none of those build_scheduler in main_mnist.py builds")


def train_run(args, device):
    # The settings (printed first), the run's folder, and for --resume the checkpoint it goes on from
    hp, folder, checkpoint = runs.start(args, SETTINGS, RECIPES)

    # Data: MNIST as tensors on the device, augmented per batch with the block's settings (augment.py)
    max_batches = 1 if args.dry_run else None
    train_loader = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, max_batches, augmentation=hp,
                                   add_non_digits=non_digits.batch_adder(hp["NON_DIGITS"]))
    held_back = train_loader.hold_back(hp["HELD_BACK"], hp["TEST_BATCH_SIZE"])  # never trained on
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device, max_batches)
    print(describe_data(train_loader.images, test_loader.images, held_back.images))

    # This machine's precision (bfloat16 where native) and memory layout (the faster, timed once)
    amp = choose_precision_and_layout(hp, device, folder, lambda: build_model(hp), timing=not args.dry_run)
    train_loader.layout = test_loader.layout = held_back.layout = hp["LAYOUT"]
    torch.manual_seed(hp["SEED"])
    random.seed(hp["SEED"])

    # Model, its summary, the loss that fits its output, the optimizer and the learning-rate schedule
    model = build_model(hp).to(device, memory_format=LAYOUTS[hp["LAYOUT"]])
    layers = model_summary(model)  # torchsummary's table, then each layer's receptive field
    outputs = check_output(model, test_loader.sample())  # log-probabilities or raw scores, the same in each call
    criterion = loss_function(outputs, hp["LABEL_SMOOTHING"])
    if train_loader.add_non_digits:  # NON_DIGITS: their answers pushed toward no digit in particular
        criterion = with_non_digits(criterion)
    optimizer = build_optimizer(model, hp)
    scheduler = build_scheduler(optimizer, hp, len(train_loader))
    built = settings.report_training(optimizer, scheduler, criterion, outputs, hp)  # what was built, printed
    history = records.restore(checkpoint, model, optimizer, scheduler) if checkpoint else []
    record = runs.open_record(folder, checkpoint, hp, model, device, amp, args, **built, receptive_fields=layers,
                              train_images=len(train_loader.labels), test_images=len(test_loader.labels))

    with runs.run_ends_cleanly(folder, record, args.dry_run):
        runs.save_record(folder, record)
        runs.keep_once(folder, records.SAMPLES, lambda path: data_visualization(train_loader, path))
        for epoch in range(len(history) + 1, hp["EPOCHS"] + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # metrics.csv's lr: the one the epoch begins with
            train_loss, train_acc = train(model, device, train_loader, optimizer, criterion, scheduler, amp)
            test_loss, test_acc = test(model, device, test_loader, criterion, amp, verbose=False)
            check_finite("the test loss", test_loss, model)  # the last step can blow up unseen by train()
            step_on_metric(scheduler, test_loss)  # ReduceLROnPlateau and its kind: once an epoch, on the test loss
            history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                                test_acc=test_acc, lr=lr, seconds=time.perf_counter() - start))
            runs.save_epoch(folder, record, model, optimizer, scheduler, history)
            print(f"Epoch {epoch}/{hp['EPOCHS']}: train loss {train_loss:.4f}, accuracy {train_acc:.2f}% | "
                  f"test loss {test_loss:.4f}, accuracy {test_acc:.2f}% | lr {lr:.3g} | {history[-1]['seconds']:.1f} s")
        runs.save_model(folder, record, model)
        record["calibration"] = evaluation.report_test_set(model, device, test_loader, amp, folder, held_back)
        runs.save_record(folder, record)
    runs.print_saved(folder)


def main(argv=None):
    args = settings.parse_args(argv, SETTINGS, RECIPES, settings.setting_comments(__file__),
                               builders=(build_model, build_optimizer, build_scheduler))
    device = pick_device()
    with runs.script_ends_cleanly():  # a UserError in one line, Ctrl-C, a reader gone away (| head), locks let go
        if args.compare is not None:
            compare.compare(args.compare, settings.resolve(args, SETTINGS, RECIPES)["OUT_DIR"])
        elif args.eval_only:
            evaluation.evaluate_only(args, device, SETTINGS, RECIPES)
        elif args.find_lr:
            lr_finder.find_learning_rate(args, device, SETTINGS, RECIPES, build_model, build_optimizer)
        else:
            train_run(args, device)


if __name__ == "__main__":  # so that importing this file (the tests do) runs nothing
    main()
