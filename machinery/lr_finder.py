"""The learning-rate range test of --find-lr (Leslie Smith, "Cyclical Learning Rates for Training Neural
Networks", 2017), run by torch-lr-finder: the lr grows exponentially from far too small to far too large, one batch
per step, while the smoothed training loss is recorded; the test stops early once that loss exceeds 5 times its
best (divergence).
"""
import contextlib
import io
import math
import os

import torch

from machinery import records, runs, settings
from machinery.errors import UserError
from machinery.figures import plot_lr_finder
from machinery.hardware import LAYOUTS, choose_precision_and_layout, random_state_kept
from utils import check_output, get_trainloader, loss_function

STEPS, DRY_RUN_STEPS = 100, 20  # batches of a range test, and of a dry run's
LR_RULE = "a tenth of the lr where the smoothed loss is lowest (fastai's 'minimum' rule)"


def find_lr(model, optimizer, loader, criterion, device, amp, start_lr=1e-7, end_lr=10, num_iter=100):
    """Runs the range test from start_lr to end_lr over num_iter batches of `loader` (restarted if it is shorter),
    training `model` with `optimizer` (SGD with its momentum, say) under the same mixed precision as train().

    The model's weights and buffers and the optimizer's state are restored afterwards, and the random number
    generators too, so a run trains the same with or without a range test first. Call it before a scheduler is
    attached to the optimizer (torch-lr-finder refuses one that has). Returns a dict: lrs and losses (the smoothed
    loss after each step, up to divergence), suggested_lr and rule (how it was chosen), and min_loss_lr (the lr of the
    lowest smoothed loss)."""
    # Imported here: torch-lr-finder imports pyplot and tqdm.autonotebook, which training does not need.
    from torch_lr_finder import LRFinder, TrainDataLoaderIter

    device = torch.device(device)
    amp_config = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": amp}
    # The loss in float32 from bfloat16 outputs, as train() computes it.
    finder = LRFinder(model, optimizer, lambda output, target: criterion(output.float(), target), device,
                      amp_backend="torch", amp_config=amp_config,
                      grad_scaler=torch.amp.GradScaler(device.type, enabled=False))  # bfloat16 needs no scaling
    was_training = model.training
    try:
        with random_state_kept(device), contextlib.redirect_stdout(io.StringIO()):
            # (stdout hidden: the library prints a fixed sentence at the end; its progress bar is on stderr)
            # TrainDataLoaderIter takes any iterable of (inputs, labels), such as MnistBatches, and restarts it
            # when it runs out; range_test accepts a DataLoader or one of these only.
            finder.range_test(TrainDataLoaderIter(loader), start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
                              step_mode="exp", smooth_f=0.05, diverge_th=5)
    finally:
        finder.reset()
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    return _suggest_lr(finder.history["lr"], finder.history["loss"], num_iter)


def _suggest_lr(lrs, losses, num_iter):
    """The result dict of find_lr from the test's lrs and smoothed losses.

    The suggestion is a tenth of the lr at the lowest loss (LR_RULE). torch-lr-finder's own suggestion, the lr
    where the loss falls fastest, is not used: the smoothed loss lags the raw one
    by about 20 steps (smooth_f 0.05), so the curve falls fastest late, or even while it recovers from a spike:
    on MNIST it pointed at lrs where Net's loss blows up. docs/tools.md ("A learning rate") gives what each rule said
    for each model over 3 seeds, beside the lrs known to train them well."""
    finite = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
    lrs, losses = lrs[:finite], losses[:finite]  # a NaN loss never counts as diverged there: drop it and after
    # Both libraries leave out the first tenth of the steps (noise around the initial loss) and the last 5 of 100
    # (the blow-up) when they suggest an lr; the same fractions of shorter tests.
    start, end = num_iter // 10, len(losses) - num_iter // 20
    if end - start < 2:
        raise ValueError(f"the range test diverged after {len(losses)} of {num_iter} steps, too few to suggest an "
                         f"lr: lower end_lr or raise num_iter")
    window = torch.tensor(losses[start:end], dtype=torch.float64)
    lowest = start + int(window.argmin())
    return {"lrs": lrs, "losses": losses, "suggested_lr": lrs[lowest] / 10, "rule": LR_RULE,
            "min_loss_lr": lrs[lowest]}


def find_learning_rate(args, device, defaults, recipes, build_model, build_optimizer):
    """--find-lr: an LR range test of the model with its recipe's optimizer, batch size, augmentation and
    precision, in a folder of its own; nothing is trained for keeps and no model is saved."""
    hp = settings.start(args, defaults, recipes)
    folder = runs.open_run_folder(args, hp, kind="find-lr")
    print(f"Run folder: {folder}")
    train_loader = get_trainloader(hp["DATA_DIR"], hp["BATCH_SIZE"], device, augmentation=hp)
    amp = choose_precision_and_layout(hp, device, folder, lambda: build_model(hp), timing=not args.dry_run)
    train_loader.layout = hp["LAYOUT"]
    torch.manual_seed(hp["SEED"])
    model = build_model(hp).to(device, memory_format=LAYOUTS[hp["LAYOUT"]])
    criterion = loss_function(check_output(model, train_loader.sample()), hp["LABEL_SMOOTHING"])
    record = runs.new_record(hp, model, device, amp, args.argv, mode="find-lr")
    steps = DRY_RUN_STEPS if args.dry_run else STEPS
    print(f"LR range test of {hp['MODEL']}: {steps} batches of {hp['BATCH_SIZE']}, lr from 1e-07 to 10")
    try:
        result = find_lr(model, build_optimizer(model, hp), train_loader, criterion, device, amp, num_iter=steps)
    except ValueError as error:  # it diverged at once: too few steps to suggest anything
        raise UserError(str(error)) from None
    plot_path = os.path.join(folder, records.LR_PLOT)
    with runs.uninterrupted():
        plot_lr_finder(result, plot_path, title=f"{os.path.basename(folder)}: {hp['MODEL']}, batch {hp['BATCH_SIZE']}")
        record.update(status="finished", suggested_lr=result["suggested_lr"], rule=result["rule"], dry_run=args.dry_run)
        runs.save_record(folder, record)
    caveat = (f" (a dry run: {steps} steps over the lrs, too few for the loss to say anything; a real range test "
              f"takes {STEPS} steps without --dry-run)" if args.dry_run else "")
    print(f"Suggested: --lr {result['suggested_lr']:.3g}, by the rule: {result['rule']}{caveat}.\n"
          f"The smoothed loss was lowest at lr {result['min_loss_lr']:.3g}. Saved: {plot_path}")
