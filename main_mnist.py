"""Train a digit classifier on MNIST: python3 main_mnist.py [--help]

Edit the hyperparameters below, or override any of them with its flag (--epochs 1, --lr 0.05, ...). Each run writes
into a new folder of its own, OUT_DIR/<date>_<time>_<model>; `python3 main_mnist.py --compare` puts runs side by side.
"""
import math
import os
import random
import signal
import sys
import time

if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): a word, not the traceback of an import
    signal.signal(signal.SIGINT, lambda *_: sys.exit("Stopped."))

import torch
import torch.nn.functional as F
import torch.optim as optim

import records
import robustness
import runs
import settings
from figures import (data_visualization, plot_confusion_matrix, plot_lr_finder, plot_misclassified, plot_reliability,
                     plot_robustness)
from hardware import LAYOUTS, choose_layout, device_name, pick_device, precision_name, use_bfloat16
from model import MODELS
from utils import (UserError, NonFiniteLoss, get_trainloader, get_testloader, describe_data, loss_function, train, test,
                   predict, confusion_matrix, per_class_accuracy, model_summary, find_lr)

# ---- Hyperparameters: the original's recipe. Edit them here, or override any with its flag (see --help). ----
# A run uses this block as it is, except: --model NAME applies that model's recipe (RECIPES below) over the block,
# and every other flag given wins over both. The first lines of a run print its settings, marked where they came from.
MODEL = "Net"            # model class of model.py to train (--model NAME also applies its recipe, RECIPES below)
EPOCHS = 20              # passes over the 60,000 training images
BATCH_SIZE = 512         # training images per SGD step
LR = 0.01                # SGD's learning rate; with SCHEDULE onecycle, the peak of the cycle
MOMENTUM = 0.9           # SGD momentum; with onecycle, the top of its cycle (it dips by 0.1 as the lr peaks)
NESTEROV = False         # Nesterov momentum
WEIGHT_DECAY = 0.0       # SGD's L2 penalty on the weights
SCHEDULE = "step"        # learning-rate schedule: step (StepLR, a drop every STEP_SIZE epochs) or onecycle (OneCycleLR)
STEP_SIZE = 15           # step schedule: epochs between learning-rate drops
GAMMA = 0.1              # step schedule: the factor of each drop
ROTATION = 15.0          # augmentation: each training image turns by a random angle within +-ROTATION degrees (0: off)
CROP_P = 0.1             # augmentation: probability of a centre crop to CROP_SIZE, resized back to 28 (0: off)
CROP_SIZE = 22           # augmentation: side of that centre crop, in pixels
SHIFT = 0                # augmentation: each training image moves by up to SHIFT whole pixels across and down (0: off)
TEST_BATCH_SIZE = 512    # test images per batch (as the original); larger was slower on a CPU, its cache overflowing
AMP = True               # bfloat16 autocast where the device runs it natively: CUDA, CPUs with AVX512-BF16 or AMX
LAYOUT = "auto"          # memory layout: channels_last, contiguous, or auto: the faster here, timed once (hardware.py)
SEED = 1                 # random seed; the same seed gives the same metrics on a CPU
DATA_DIR = "data"        # MNIST is read from DATA_DIR/MNIST/raw, downloaded there if missing
OUT_DIR = "outputs"      # each run gets a new folder OUT_DIR/<date>_<time>_<model>; --out-dir DIR names it exactly
# ----
SETTINGS = {name: value for name, value in globals().items()  # the block above, in its order
            if name.isupper() and isinstance(value, (int, float, bool, str))}

# Each model's recommended settings, applied over the block when --model names the model; other flags still win.
# CompactNet's were picked on an H100 over 6 seeds among 20 variants of its narrower first design (README): a
# one-cycle schedule lets its batch-normalized layers take a peak lr of 0.2; 0.1 fell below 99.4% in late epochs.
RECIPES = {
    "Net": {},
    "CompactNet": {"EPOCHS": 15, "BATCH_SIZE": 128, "LR": 0.2, "MOMENTUM": 0.95, "NESTEROV": True,
                   "SCHEDULE": "onecycle"},
}


def build_optimizer(model, hp):
    return optim.SGD(model.parameters(), lr=hp["LR"], momentum=hp["MOMENTUM"], nesterov=hp["NESTEROV"],
                     weight_decay=hp["WEIGHT_DECAY"])


def build_scheduler(optimizer, hp, steps_per_epoch):
    """Both schedules step after every batch (in utils.train): OneCycleLR over the whole run, StepLR after
    STEP_SIZE epochs' worth of batches, so that its lr drops where an epoch begins."""
    if hp["SCHEDULE"] == "onecycle":
        return optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp["LR"], epochs=hp["EPOCHS"],
                                             steps_per_epoch=steps_per_epoch, max_momentum=hp["MOMENTUM"],
                                             base_momentum=max(0.0, hp["MOMENTUM"] - 0.1))
    return optim.lr_scheduler.StepLR(optimizer, step_size=hp["STEP_SIZE"] * steps_per_epoch, gamma=hp["GAMMA"])


def train_run(args, device):
    checkpoint = records.load_checkpoint(args.resume) if args.resume else None
    if checkpoint is None:
        hp = settings.resolve(args, SETTINGS, RECIPES)
        settings.print_settings(hp, args, SETTINGS, RECIPES)
        folder = runs.open_run_folder(args, hp)
    else:
        hp = settings.resumed_settings(args, SETTINGS, checkpoint)
        settings.print_settings(hp, args, SETTINGS, RECIPES, resumed=True)
        folder = os.path.dirname(os.path.abspath(args.resume))
        runs.lock_folder(folder)
    print(f"Run folder: {folder}")
    amp = choose_precision_and_layout(hp, device, folder, timing=not args.dry_run)
    torch.manual_seed(hp["SEED"])
    random.seed(hp["SEED"])

    # Data: MNIST as tensors on the device, augmented per batch with the block's settings (augment.py)
    max_batches = 1 if args.dry_run else None
    train_loader = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, max_batches, augmentation=hp,
                                   layout=hp["LAYOUT"])
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device, max_batches, layout=hp["LAYOUT"])
    print(describe_data(train_loader.images, test_loader.images))

    # Model, its summary, the loss that fits its output, the optimizer and the learning-rate schedule
    model = MODELS[hp["MODEL"]]().to(device, memory_format=LAYOUTS[hp["LAYOUT"]])
    model_summary(model)
    criterion = loss_function(model, test_loader.sample())
    print(f"Loss: F.{criterion.__name__} (the model returns "
          f"{'log-probabilities' if criterion is F.nll_loss else 'raw scores'})")
    optimizer = build_optimizer(model, hp)
    scheduler = build_scheduler(optimizer, hp, len(train_loader))
    history = records.restore(checkpoint, model, optimizer, scheduler) if checkpoint else []

    record = runs.open_record(folder, checkpoint, hp, model, device, amp, args)
    record.update(loss=criterion.__name__)
    samples = os.path.join(folder, records.SAMPLES)
    if not os.path.exists(samples):  # a resumed run keeps the one it drew at its start
        with runs.uninterrupted():
            data_visualization(train_loader, samples)
    title = f"{os.path.basename(folder)}: {hp['MODEL']}"

    with runs.run_ends_cleanly(folder, record, args.dry_run):
        runs.save_record(folder, record)
        for epoch in range(len(history) + 1, hp["EPOCHS"] + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # metrics.csv's lr: the one the epoch begins with
            train_loss, train_acc = train(model, device, train_loader, optimizer, criterion, scheduler, amp)
            test_loss, test_acc = test(model, device, test_loader, criterion, amp, verbose=False)
            if not all(torch.isfinite(p).all() for p in model.parameters()):  # the last step can blow up unseen
                raise NonFiniteLoss("the weights became infinite or NaN")
            if not math.isfinite(test_loss):
                raise NonFiniteLoss(f"the test loss became {test_loss}")
            history.append(dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test_loss,
                                test_acc=test_acc, lr=lr, seconds=time.perf_counter() - start))
            runs.save_epoch(folder, record, model, optimizer, scheduler, history, title)
            print(f"Epoch {epoch}/{hp['EPOCHS']}: train loss {train_loss:.4f}, accuracy {train_acc:.2f}% | "
                  f"test loss {test_loss:.4f}, accuracy {test_acc:.2f}% | lr {lr:.3g} | {history[-1]['seconds']:.1f} s")
        runs.save_model(folder, record, model)
        print(f"Final test accuracy {record['final_test_acc']:.2f}% (best {record['best_test_acc']:.2f}% at epoch "
              f"{record['best_epoch']}); {record['seconds']:.0f} s of training and test")
        record["calibration"] = report_test_set(model, device, test_loader, amp, folder)
        runs.save_record(folder, record)
    print("Saved: " + ", ".join(os.path.join(folder, name) for name in records.RUN_FILES
                                if os.path.exists(os.path.join(folder, name))))
    print(f"Run folder: {folder} (compare runs with: python3 main_mnist.py --compare)")


def choose_precision_and_layout(hp, device, folder, timing):
    """The run's precision (`amp`, returned) and memory layout, chosen for this machine by hardware.py and printed
    once. The layout chosen replaces "auto" in hp, so run.json and the checkpoint record it: a resumed run keeps it."""
    amp = use_bfloat16(device, hp["AMP"])
    hp["LAYOUT"], why = choose_layout(hp["LAYOUT"], hp["MODEL"], MODELS[hp["MODEL"]], hp["BATCH_SIZE"], device,
                                      amp, folder, timing)
    unused = " (AMP is on, but bfloat16 is not native here)" if hp["AMP"] and not amp else ""
    print(f"Device: {device_name(device)}; precision: {precision_name(amp)}{unused}\n"
          f"Layout: {hp['LAYOUT']} ({why})")
    return amp


def report_test_set(model, device, test_loader, amp, folder):
    """Per-class accuracy and the calibration on the console; the misclassified grid, the confusion matrix and the
    reliability diagram as figures. Returns the calibration (robustness.calibrate) for run.json."""
    log_probabilities, labels = predict(model, device, test_loader, amp)
    probabilities = log_probabilities.exp()
    matrix = confusion_matrix(probabilities.argmax(dim=1), labels)
    accuracies = per_class_accuracy(matrix)
    print("Per-class test accuracy: " + "  ".join(f"{digit}: {acc:.2f}%" for digit, acc in enumerate(accuracies)))
    calibration = robustness.calibrate(log_probabilities, labels)
    print(f"Calibration: expected calibration error {100 * calibration['ece_before']:.2f}% as trained, "
          f"{100 * calibration['ece_after']:.2f}% at temperature {calibration['temperature']:.2f}; \"not sure\" "
          f"below {100 * calibration['threshold']:.1f}% confidence, which answers "
          f"{100 * calibration['answered']:.1f}% of the test digits, {100 * calibration['answered_error']:.2f}% "
          f"of them wrongly (each half of the test set scored with the other half's fit)")
    scaled = (log_probabilities / calibration["temperature"]).softmax(dim=1)
    with runs.uninterrupted():
        plot_misclassified(test_loader.images, probabilities, labels, os.path.join(folder, records.MISCLASSIFIED))
        plot_confusion_matrix(matrix, os.path.join(folder, records.CONFUSION))
        plot_reliability(robustness.reliability(probabilities, labels), robustness.reliability(scaled, labels),
                         os.path.join(folder, records.RELIABILITY), calibration["ece_before"],
                         calibration["ece_after"], calibration["temperature"])
    return calibration


def report_robustness(model, device, test_loader, amp, folder, record, dry_run):
    """The model's accuracy under each family of shifts (robustness.py) on the first test images (100 in a dry
    run): robustness.csv, robustness.png, and their mean in run.json."""
    curves, images = robustness.robustness_curves(model, device, test_loader.images, test_loader.labels, amp,
                                                  count=100 if dry_run else robustness.ROBUSTNESS_IMAGES)
    mean = robustness.mean_accuracy(curves)
    record.update(robustness_mean=mean, robustness_images=images)
    with runs.uninterrupted():
        records.write_robustness(os.path.join(folder, records.ROBUSTNESS_CSV), curves, images)
        plot_robustness({f"{os.path.basename(folder)}: {record['model']}": curves},
                        os.path.join(folder, records.ROBUSTNESS_PLOT), images)
    print(f"Robustness: accuracy {mean:.1f}% under shifts, the mean over {len(curves)} families of "
          f"{images:,} shifted test images (a point's standard error is at most "
          f"{robustness.standard_error(50, images):.1f} points); each family's curve in {records.ROBUSTNESS_CSV}")


def evaluate_only(args, device):
    """Scores a saved model on the test set, into a folder of its own: nothing a training run made is touched."""
    if not args.checkpoint:
        raise UserError("--eval-only needs --checkpoint PATH (a model.pt or checkpoint.pt)")
    hp = settings.resolve(args, SETTINGS, RECIPES)
    settings.print_settings(hp, args, SETTINGS, RECIPES)
    model_name, model = records.load_model(args.checkpoint, device, hp["MODEL"] if hasattr(args, "MODEL") else None)
    hp["MODEL"] = model_name
    folder = runs.open_run_folder(args, hp, kind="eval")
    amp = choose_precision_and_layout(hp, device, folder, timing=False)  # a test pass is too short to gain from it
    model.to(memory_format=LAYOUTS[hp["LAYOUT"]])
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device,
                                 max_batches=1 if args.dry_run else None, layout=hp["LAYOUT"])
    print(f"Evaluating {model_name} from {args.checkpoint} on {device}; figures go to {folder}")
    record = runs.new_record(folder, hp, model, device, amp, args.argv, mode="eval-only")
    criterion = loss_function(model, test_loader.sample())
    record.update(checkpoint=os.path.abspath(args.checkpoint), epochs_planned=0, loss=criterion.__name__)
    _, record["final_test_acc"] = test(model, device, test_loader, criterion, amp)
    record["calibration"] = report_test_set(model, device, test_loader, amp, folder)
    report_robustness(model, device, test_loader, amp, folder, record, args.dry_run)
    record["status"] = "finished"
    runs.save_record(folder, record)


def find_learning_rate(args, device):
    """An LR range test of the model with its recipe's optimizer, batch size, augmentation and precision, in a
    folder of its own; nothing is trained for keeps and no model is saved."""
    hp = settings.resolve(args, SETTINGS, RECIPES)
    settings.print_settings(hp, args, SETTINGS, RECIPES)
    folder = runs.open_run_folder(args, hp, kind="find-lr")
    print(f"Run folder: {folder}")
    amp = choose_precision_and_layout(hp, device, folder, timing=not args.dry_run)
    torch.manual_seed(hp["SEED"])
    train_loader = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, augmentation=hp, layout=hp["LAYOUT"])
    model = MODELS[hp["MODEL"]]().to(device, memory_format=LAYOUTS[hp["LAYOUT"]])
    criterion = loss_function(model, train_loader.sample())
    record = runs.new_record(folder, hp, model, device, amp, args.argv, mode="find-lr")
    steps = 20 if args.dry_run else 100
    print(f"LR range test of {hp['MODEL']}: {steps} batches of {hp['BATCH_SIZE']}, lr from 1e-07 to 10")
    try:
        result = find_lr(model, build_optimizer(model, hp), train_loader, criterion, device, amp, num_iter=steps)
    except ValueError as error:  # it diverged at once: too few steps to suggest anything
        raise UserError(str(error)) from None
    plot_path = os.path.join(folder, records.LR_PLOT)
    with runs.uninterrupted():
        plot_lr_finder(result, plot_path, title=f"{os.path.basename(folder)}: {hp['MODEL']}, batch {hp['BATCH_SIZE']}")
        record.update(status="finished", suggested_lr=result["suggested_lr"], rule=result["rule"])
        runs.save_record(folder, record)
    print(f"Suggested: --lr {result['suggested_lr']:.3g}, by the rule: {result['rule']}.\n"
          f"The smoothed loss was lowest at lr {result['min_loss_lr']:.3g}. Saved: {plot_path}")


def main(argv=None):
    args = settings.parse_args(argv, SETTINGS, RECIPES, settings.setting_comments(__file__))
    device = pick_device()
    try:
        with runs.stop_signals_handled():
            if args.compare is not None:
                runs.compare(args.compare, settings.resolve(args, SETTINGS, RECIPES)["OUT_DIR"])
            elif args.eval_only:
                evaluate_only(args, device)
            elif args.find_lr:
                find_learning_rate(args, device)
            else:
                train_run(args, device)
            sys.stdout.flush()  # here, so that a reader gone away is caught below, not at exit
    except BrokenPipeError:  # piped into a reader that stopped reading (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except UserError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # before a run started (a run that was training says what it kept, and exits 130)
        print("Stopped.", file=sys.stderr)
        sys.exit(130)
    finally:
        runs.release_locks()


if __name__ == "__main__":  # so that importing this file (the tests do) runs nothing
    main()
