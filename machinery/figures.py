"""Every figure but the original's data_visualization (utils.py): the accuracy/loss curves of a run, the
comparison of runs, the LR range test, the confusion matrix, the misclassified digits, predict.py's predictions, a
model's robustness curves and its reliability diagram. Each is saved whole or not at all (files.save_figure).
"""
import itertools
import math
import os

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from machinery.files import save_figure
from machinery.records import best_epoch
from utils import image_grid


# Curves. Accuracies are drawn as error rates (100 - accuracy) on an inverted log axis labelled in accuracy: going
# from 99.0% to 99.5% halves the errors, and gets as much room as going from 80% to 90%, so the late epochs' tenths
# of a percent stay apart. Losses go on a log axis for the same reason.

# An accuracy of 100% is drawn at this error rate (%), as log(0) cannot be, and labelled 100: half of one test
# image in 10,000, so it stays apart from 99.99%.
ERROR_FLOOR = 0.005


LOSS_FLOOR = 1e-6  # a loss of 0 (a dry run can score one) is drawn there


ERROR_RANGE = 2.5  # the accuracy axis reaches down to at least this many times the best error rate


TICK_MANTISSAS = ((1,), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9))  # log-axis ticks, coarse to fine


METRICS_PANELS = [("train_loss", "Training Loss"), ("test_loss", "Test Loss"),
                  ("train_acc", "Training Accuracy"), ("test_acc", "Test Accuracy")]


def _error(accuracy):
    return max(100 - accuracy, ERROR_FLOOR)


def _nice(value, up):
    """The nearest value of the form m x 10^k (m in 1..9) above (up) or below `value`: log axes end on a tick."""
    k = math.floor(math.log10(value))
    candidates = [float(f"{m}e{e}") for e in (k, k + 1) for m in range(1, 10)]  # via text: 0.7, not 0.7000000001
    if up:
        return min(c for c in candidates if c >= value * (1 - 1e-9))
    return max(c for c in candidates if c <= value * (1 + 1e-9))


def _log_ticks(low, high):
    """Tick values from low to high: the coarsest of TICK_MANTISSAS giving 5 or more, thinned to about 10."""
    decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in TICK_MANTISSAS:
        values = (float(f"{m}e{e}") for e in decades for m in mantissas)
        ticks = [v for v in values if low * (1 - 1e-9) <= v <= high * (1 + 1e-9)]
        if len(ticks) >= 5:
            break
    return ticks[::max(1, math.ceil(len(ticks) / 10))]


def _log_axis(ax, bottom, top, label, least=0.0):
    """A log y axis from bottom to top (top < bottom inverts it), ticked at _log_ticks from `least` up, each tick
    labelled label(value)."""
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ticks = _log_ticks(min(bottom, top), max(bottom, top))
    ax.yaxis.set_major_locator(FixedLocator([tick for tick in ticks if tick >= least * (1 - 1e-9)]))
    ax.yaxis.set_minor_locator(NullLocator())  # matplotlib's minor labels would mix 2x10^-2 with our 0.02
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: label(value)))


def _loss_panel(ax, curves):
    """Draws curves, [(epochs, losses, plot style)], on a log axis."""
    values = [max(v, LOSS_FLOOR) for _, losses, _ in curves for v in losses]
    low = _nice(min(values) / 1.15, up=False)
    high = max(_nice(max(values) * 1.15, up=True), _nice(3 * low, up=True))  # a flat curve still gets a few ticks
    _log_axis(ax, low, high, lambda loss: f"{loss:g}")
    for epochs, losses, style in curves:
        ax.plot(epochs, [max(v, LOSS_FLOOR) for v in losses], **style)
    ax.set_ylabel("loss (log scale)")


def _accuracy_panel(ax, curves):
    """Draws curves, [(epochs, accuracies in %, plot style)], on the accuracy axis (see above); returns the lines.

    The axis spans the best error rate and ERROR_RANGE times it, or more if a curve's later epochs (the later half
    of the longest curve's) need it; earlier points below its bottom are drawn on the bottom edge as a ▼, and the
    y label says from where. So neither a first epoch at 50% nor a short run hides the spread at the top."""
    errors = [[_error(a) for a in accuracies] for _, accuracies, _ in curves]
    best = min(min(e) for e in errors)
    last_epoch = max(max(epochs) for epochs, _, _ in curves)
    worst_late = max(error for (epochs, _, _), curve_errors in zip(curves, errors)
                     for epoch, error in zip(epochs, curve_errors) if epoch > last_epoch / 2)
    bottom = min(_nice(max(ERROR_RANGE * best, 1.1 * worst_late), up=True), 100)
    _log_axis(ax, bottom, _nice(best / 1.15, up=False), least=ERROR_FLOOR,
              label=lambda error: "100" if error <= ERROR_FLOOR * (1 + 1e-9) else f"{100 - error:.6g}")
    lines = []
    for (epochs, _, style), curve_errors in zip(curves, errors):
        line, = ax.plot(epochs, curve_errors, **style)
        below = [epoch for epoch, error in zip(epochs, curve_errors) if error > bottom]
        if below:
            ax.plot(below, [bottom] * len(below), "v", color=line.get_color(), clip_on=False, gid="below")
        lines.append(line)
    clipped = any(error > bottom for curve_errors in errors for error in curve_errors)
    ax.set_ylabel("accuracy (%), log scale of errors" + (f"\n▼ below {100 - bottom:.6g}%" if clipped else ""))
    return lines


def _epoch_axis(ax, epochs):
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # else a 1-epoch axis gets 0.9, 1.1
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _mark_best(ax, history, color):
    row = best_epoch(history)
    ax.plot(row["epoch"], _error(row["test_acc"]), "*", color=color, markersize=15, markeredgecolor="black",
            gid="best", label=f"best {row['test_acc']:.2f}% (epoch {row['epoch']})")


def lr_events(history, schedule=None):
    """[(x, text)]: where the learning rate schedule turns, to draw a vertical line at x and say text.

    A step schedule gets each change, drawn on the boundary before the epoch that first trains with the new lr.
    A one-cycle schedule gets its peak, at the epoch with the highest lr, once the lr has come down from it.
    schedule: "step", "onecycle", or None to tell them apart from the lrs (one-cycle changes it at most epochs)."""
    lrs = [row["lr"] for row in history]
    changes = [i for i in range(1, len(lrs)) if not math.isclose(lrs[i], lrs[i - 1], rel_tol=1e-6)]
    if schedule is None:
        schedule = "onecycle" if len(lrs) >= 3 and len(changes) > (len(lrs) - 1) / 2 else "step"
    if schedule == "onecycle":
        peak = max(history, key=lambda row: row["lr"])
        past = peak is not history[-1]
        return [(peak["epoch"], f"lr peak {peak['lr']:.3g} at epoch {peak['epoch']}")] if past else []
    return [(history[i]["epoch"] - 0.5, f"lr {lrs[i - 1]:.3g} → {lrs[i]:.3g} from epoch {history[i]['epoch']}")
            for i in changes]


def plot_metrics(history, path, title="", schedule=None):
    """The original's 2x2 figure (training loss, test loss, training accuracy, test accuracy per epoch), with
    log loss and accuracy axes, the final and best test accuracy written above, the best epoch starred and the
    learning rate's changes drawn as dotted lines. history: metrics.csv's rows as dicts, at least one.
    Saves it to `path` and returns the Figure."""
    epochs = [row["epoch"] for row in history]
    events = lr_events(history, schedule)
    fig = Figure(figsize=(15, 10))
    axs = fig.subplots(2, 2, gridspec_kw=dict(top=0.88, hspace=0.3, wspace=0.22))
    for ax, (key, name) in zip(axs.flat, METRICS_PANELS):
        curve = [(epochs, [row[key] for row in history], dict(marker="o", markersize=3))]
        (_accuracy_panel if key.endswith("acc") else _loss_panel)(ax, curve)
        ax.set_title(name)
        _epoch_axis(ax, epochs)
        for x, _ in events:
            ax.axvline(x, color="gray", linestyle=":", linewidth=1.5, gid="lr-change")
    test_ax = axs[1, 1]
    _mark_best(test_ax, history, "gold")
    test_ax.legend(loc="best")
    best = best_epoch(history)
    summary = [f"test accuracy: final {history[-1]['test_acc']:.2f}%",
               f"best {best['test_acc']:.2f}% (epoch {best['epoch']})"]
    summary += [text + " (dotted line)" for _, text in events]
    fig.suptitle(title, y=0.975, fontsize=15)
    fig.text(0.5, 0.93, " | ".join(summary), ha="center", fontsize=12)
    save_figure(fig, path)
    return fig


def _run_label(run):
    history = run["history"]
    best = best_epoch(history)
    return (f"{run['label']}{'' if run['finished'] else ' (unfinished)'}: final {history[-1]['test_acc']:.2f}%, "
            f"best {best['test_acc']:.2f}% (epoch {best['epoch']})")


def plot_comparison(runs, path, title="Run comparison"):
    """Test accuracy and test loss per epoch of several runs, one line each, on the same axes as plot_metrics.

    runs: [{"label": what sets the run apart, "history": metrics.csv's rows, "finished": bool}]; unfinished runs
    are dashed and say so in the legend, which also gives each run's final and best test accuracy. Runs without
    a row are left out. Saves the figure to `path` and returns it."""
    runs = [run for run in runs if run["history"]]
    if not runs:
        raise ValueError("none of the runs has an epoch to plot")
    columns = 1 if len(runs) <= 3 else 2
    legend_rows = math.ceil(len(runs) / columns)
    # The legend goes below the panels, and the figure grows with it, so that 50 runs still leave the curves clear.
    fig = Figure(figsize=(15, 6 + 0.25 * max(0, legend_rows - 4)), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    # Matplotlib's 10 colours for up to 10 runs; beyond, as many as there are runs, spread along one colour map.
    colours = ([f"C{i}" for i in range(len(runs))] if len(runs) <= 10
               else [colormaps["turbo"](i / (len(runs) - 1)) for i in range(len(runs))])
    accuracy_curves, loss_curves = [], []
    for run, colour in zip(runs, colours):
        epochs = [row["epoch"] for row in run["history"]]
        style = dict(color=colour, marker="o", markersize=3, linestyle="-" if run["finished"] else "--",
                     label=_run_label(run))  # colours by hand, so a run has the same one in both panels
        accuracy_curves.append((epochs, [row["test_acc"] for row in run["history"]], style))
        loss_curves.append((epochs, [row["test_loss"] for row in run["history"]], style))
    lines = _accuracy_panel(acc_ax, accuracy_curves)
    _loss_panel(loss_ax, loss_curves)
    for run, colour in zip(runs, colours):
        _mark_best(acc_ax, run["history"], colour)
    epochs = [row["epoch"] for run in runs for row in run["history"]]
    for ax, name in ((acc_ax, "Test Accuracy"), (loss_ax, "Test Loss")):
        ax.set_title(name)
        _epoch_axis(ax, epochs)
    fig.legend(handles=lines, loc="outside lower center", ncol=columns, title="★ best epoch of each run")
    fig.suptitle(title, fontsize=15)
    save_figure(fig, path)
    return fig


def plot_lr_finder(result, path, title=""):
    """find_lr's smoothed loss against the lr (log scale), the suggested lr marked. Returns the Figure."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    ax.plot(result["lrs"], result["losses"], label="training loss, smoothed")
    at_lowest = result["lrs"].index(result["min_loss_lr"])
    ax.scatter([result["min_loss_lr"]], [result["losses"][at_lowest]], color="black", zorder=3,
               label=f"lowest loss, at lr {result['min_loss_lr']:.3g}")
    ax.axvline(result["suggested_lr"], color="red", label=f"suggested lr {result['suggested_lr']:.3g}")
    ax.set_xscale("log")
    # The blow-up at the end dwarfs the dip that matters: show from the lowest loss to as far above the initial one.
    initial, lowest = result["losses"][0], min(result["losses"])
    margin = max(initial - lowest, 1e-3 * initial)
    ax.set_ylim(lowest - 0.1 * margin, initial + margin)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(title or "Learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.text(0.5, -0.02, f"Suggested lr: {result['rule']}.", ha="center", va="top", fontsize=9)
    save_figure(fig, path)
    return fig


def plot_confusion_matrix(matrix, path):
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    shown = ax.imshow(matrix.double().log1p().numpy(), cmap="Blues")  # log scale: errors are tiny beside the diagonal
    classes = matrix.shape[0]
    for true in range(classes):
        for predicted in range(classes):
            count = int(matrix[true, predicted])
            if count:
                ax.text(predicted, true, count, ha="center", va="center", fontsize=8,
                        color="white" if true == predicted else "black")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({int(matrix.trace())}/{int(matrix.sum())} right)")
    fig.colorbar(shown, ax=ax, label="log(1 + count)")
    save_figure(fig, path)


def plot_misclassified(images, probabilities, labels, path, count=25):
    """A grid of the `count` misclassified images (uint8 [N, 28, 28]) the model was surest of, surest first, each
    with its true label, the prediction and the probability given to it. probabilities: float [N, 10].
    Saves the figure to `path` and returns it."""
    confidence, predictions = probabilities.max(dim=1)
    wrong = (predictions != labels).nonzero().flatten()
    shown = wrong[confidence[wrong].argsort(descending=True, stable=True)][:count].tolist()
    columns = 5
    rows = max(1, math.ceil(len(shown) / columns))
    fig = Figure(figsize=(2 * columns, 2.3 * rows))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    if shown:
        mosaic, places = image_grid(images[shown], columns)
        ax.imshow(mosaic, cmap=colormaps["gray_r"].with_extremes(bad="white"), vmin=0, vmax=255)
        for (x, y), i in zip(places, shown):
            # Rounded down, so a 99.7% sure mistake does not read as a certain one.
            percent = math.floor(100 * float(confidence[i]))
            ax.text(x, y - 1, f"true {int(labels[i])}, said {int(predictions[i])} ({percent}%)\n#{i}", fontsize=9,
                    ha="center", va="bottom")
    fig.suptitle(f"{len(wrong)} of {len(labels)} test images misclassified; "
                 f"the {len(shown)} most confident mistakes, most confident first", y=1.05)
    save_figure(fig, path)
    return fig


SHOWN_SIZE = (256, 256)  # predict.py keeps each image this small once read, for predictions.png; not whole

def likeliest(probs, count=3):
    """"7 92%, 1 5%, 2 1%": the `count` likeliest digits and their probabilities."""
    top = probs.topk(count)
    return ", ".join(f"{int(d)} {100 * float(p):.0f}%" for p, d in zip(top.values, top.indices))


def plot_predictions(paths, images, digits, probabilities, path, answers, threshold):
    """A row per image: as given, as the model saw it (28x28, light on black), and its ten probabilities, with the
    confidence `threshold` below which the answer is "not sure". answers: predict.answer's, the digit, or the words
    it says instead ("not sure", "not a digit"; the top 3 are named then)."""
    count = len(paths)
    fig = Figure(figsize=(9, 2.4 * count), layout="constrained")  # titles clear of the axes above
    axs = fig.subplots(count, 3, squeeze=False, width_ratios=[1, 1, 2])
    for row, (name, image, digit, probs, answer) in enumerate(zip(paths, images, digits, probabilities, answers)):
        shown = image.convert("RGBA")
        shown.thumbnail(SHOWN_SIZE)  # a 12-megapixel photo is drawn as small as it is shown
        axs[row, 0].imshow(shown)
        axs[row, 0].set_title(os.path.basename(name), fontsize=9)
        axs[row, 1].imshow(digit.numpy(), cmap="gray", vmin=0, vmax=1)
        axs[row, 1].set_title("model input (28x28)", fontsize=9)
        for ax in axs[row, :2]:
            ax.set_xticks([])
            ax.set_yticks([])
        best = int(probs.argmax())
        sure = not isinstance(answer, str)
        axs[row, 2].bar(range(10), probs.numpy(),
                        color=["tab:blue" if d == best and sure else "tab:gray" for d in range(10)])
        axs[row, 2].axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
        axs[row, 2].set_xticks(range(10))
        axs[row, 2].set_ylim(0, 1)
        axs[row, 2].set_title(f"read as {best} ({100 * float(probs[best]):.1f}%)" if sure else
                              f"{answer}: {likeliest(probs)}", fontsize=9)
    save_figure(fig, path)


def plot_robustness(runs, path, images):
    """A panel per family of robustness.FAMILIES: test accuracy (%) against the shift's strength, a line per run.
    runs: {label: {family: [(strength, accuracy), ...]}}; `images`: how many test images each point is measured
    on, for the title, if known."""
    families = list(next(iter(runs.values())))
    columns = 4
    fig = Figure(figsize=(4 * columns, 3.4 * math.ceil(len(families) / columns)))
    axes = fig.subplots(math.ceil(len(families) / columns), columns, squeeze=False).flatten()
    colors = colormaps["tab10"].colors
    for ax, family in zip(axes, families):
        for color, (label, curves) in zip(itertools.cycle(colors), runs.items()):
            if curves.get(family):  # a run measured before a family was added has no curve of it
                strengths, accuracies = zip(*curves[family])
                ax.plot(strengths, accuracies, marker="o", markersize=3, color=color, label=label)
        ax.set_title(family)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes[len(families):]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    per_point = f"{images:,} test images per point; " if images else ""
    fig.suptitle(f"Accuracy under shifts of the test images ({per_point}chance is 10%)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_reliability(panels, path):
    """Reliability diagrams side by side, one per panel (title, before, after, ece_before, ece_after, temperature):
    above, per confidence bin, accuracy against mean confidence, before and after temperature scaling (bins as
    robustness.reliability gives them), with the diagonal a calibrated model would follow; below, how many test
    images each bin holds (after scaling), so that a reader sees which points rest on a few images."""
    fig = Figure(figsize=(6 * len(panels), 7), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=[3, 1])
    for column, (title, before, after, ece_before, ece_after, temperature) in enumerate(panels):
        ax, counts = axes[0, column], axes[1, column]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
        for rows, label, color in ((before, f"as trained: ECE {100 * ece_before:.2f}%", "tab:red"),
                                   (after, f"temperature {temperature:.2f}: ECE {100 * ece_after:.2f}%", "tab:blue")):
            points = [row for row in rows if row is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=label)
        ax.set_ylabel("accuracy in that confidence bin")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        ax.set_title(title, fontsize=10)
        bins = len(after)
        heights = [row[2] if row else 0 for row in after]
        counts.bar([(b + 0.5) / bins for b in range(bins)], heights, width=0.9 / bins, color="tab:blue")
        for b, height in enumerate(heights):
            if height:
                counts.text((b + 0.5) / bins, height, f"{height:,}", ha="center", va="bottom", fontsize=7)
        counts.set_yscale("log")
        counts.set_ylim(0.8, max(heights + [1]) * 4)
        counts.set_xlim(0, 1)
        counts.set_xlabel("confidence (top probability)")
        counts.set_ylabel("test images in the bin")
    fig.suptitle("Reliability on the test set (the temperature chosen where the run's calibration says)", fontsize=10)
    save_figure(fig, path)
