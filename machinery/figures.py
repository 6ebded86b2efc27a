"""Every figure the scripts draw, each returned as a matplotlib Figure for runs.save_figure to write whole."""
import math
import os

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utils import image_grid

NOT_PLOTTED = ("epoch", "lr", "seconds")  # a history row's keys that are no curve of their own (nor compared)


def plot_metrics(history, lr_curve, title):
    """The run's curves per epoch: one panel of every `*_loss` key of the rows, one of every `*_acc` key, one of
    each other number a row holds, and the learning rate as the schedule moved it (lr_curve: [epoch, lr] pairs)."""
    keys = [key for key in dict.fromkeys(k for row in history for k in row) if key not in NOT_PLOTTED]
    panels = {"loss (log scale)": [k for k in keys if k.endswith("_loss")],
              "accuracy (%)": [k for k in keys if k.endswith("_acc")]}
    panels.update({key: [key] for key in keys if not key.endswith(("_loss", "_acc"))})
    panels = {name: group for name, group in panels.items() if group}
    columns = min(3, len(panels) + 1)
    rows = math.ceil((len(panels) + 1) / columns)  # the panels and the learning rate's
    fig = Figure(figsize=(5.5 * columns, 4.5 * rows), layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    for ax, (name, group) in zip(axes, panels.items()):
        for key in group:
            points = [row for row in history if isinstance(row.get(key), (int, float))]
            ax.plot([row["epoch"] for row in points], [row[key] for row in points], marker="o", markersize=3, label=key)
        ax.set(title=name, xlabel="epoch", yscale="log" if name.startswith("loss") else "linear")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[len(panels)]
    if lr_curve:
        ax.plot(*zip(*lr_curve))
    ax.set(title="learning rate, as the schedule moved it", xlabel="epoch")
    ax.grid(alpha=0.3)
    for ax in axes[len(panels) + 1:]:
        ax.axis("off")
    best = max(history, key=lambda row: row["test_acc"])
    fig.suptitle(f"{title}\ntest accuracy: final {history[-1]['test_acc']:.2f}%, best "
                 f"{best['test_acc']:.2f}% (epoch {best['epoch']}, chosen on the test set)")
    return fig


def plot_comparison(runs):
    """Test accuracy per epoch of each run: runs is [(label, history)]."""
    fig = Figure(figsize=(11, 6))
    ax = fig.subplots()
    for label, history in runs:
        ax.plot([row["epoch"] for row in history], [row["test_acc"] for row in history], marker="o", markersize=5,
                label=f"{label}: {history[-1]['test_acc']:.2f}%")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Runs compared")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_misclassified(images, probabilities, labels, count=24):
    wrong = (probabilities.argmax(1) != labels).nonzero().flatten()[:count]
    titles = [f"{int(labels[i])} read {int(probabilities[i].argmax())}\n{100 * float(probabilities[i].max()):.0f}%"
              for i in wrong]
    return image_grid(images[wrong].float() / 255, titles, f"The first {len(wrong)} misclassified test digits: "
                                                          f"true label, what the model read, how sure it was")


def plot_confusion(matrix):
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    shown = ax.imshow(np.log1p(matrix.numpy()), cmap="Blues")
    for (true, read), count in np.ndenumerate(matrix.numpy()):
        ax.text(read, true, count, ha="center", va="center", fontsize=8, color="white" if true == read else "black")
    ax.set(xlabel="read as", ylabel="true digit", xticks=range(10), yticks=range(10), title="Confusion matrix (test)")
    fig.colorbar(shown, label="log(1 + count)")
    return fig


def plot_reliability(before, after, temperature):
    """Reliability diagrams side by side: (rows of (mean confidence, accuracy, count) per confidence bin, expected
    calibration error), as trained and temperature-scaled, each half of the test digits at the temperature the other
    half gave."""
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    for ax, ((rows, ece), name) in zip(fig.subplots(1, 2), [(before, "as trained"), (after, "temperature-scaled")]):
        rows = [row for row in rows if row is not None]
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
        ax.scatter([c for c, _, _ in rows], [a for _, a, _ in rows], s=[20 + 200 * n ** 0.5 / 30 for *_, n in rows])
        for confidence, accuracy, n in rows:
            ax.annotate(f"{n}", (confidence, accuracy), fontsize=7, xytext=(-4, -10), textcoords="offset points",
                        ha="right")
        ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02),
               title=f"test digits, {name}: ECE {100 * ece:.2f}% (count per bin)")
    fig.suptitle(f"Calibration scored out of sample: each half of the test set at the temperature fitted on the "
                 f"other\n(calibration.pt keeps T = {temperature:.2f}, fitted on all of it)")
    return fig


def plot_robustness(curves_by_run, count):
    """One panel per family of shifts: each run's accuracy against the shift's strength, on `count` test digits."""
    families = list(next(iter(curves_by_run.values())))
    fig = Figure(figsize=(16, 8), layout="constrained")
    fig.suptitle(f"Accuracy on {count:,} test digits, each altered by a family of shifts (as they are: at 0, or at "
                 f"1 for scale and contrast)")
    axes = list(fig.subplots(2, math.ceil(len(families) / 2)).flat)
    for ax, family in zip(axes, families):
        for label, curves in curves_by_run.items():
            ax.plot(*zip(*curves[family]), marker="o", markersize=3, label=label)
        ax.set(title=family, ylabel="accuracy (%)", ylim=(0, 101))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for ax in axes[len(families):]:
        ax.axis("off")
    return fig


def plot_lr_finder(lrs, losses, suggestion):
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", linestyle=":", label=f"suggested lr {suggestion:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
    ax.legend()
    return fig


def plot_predictions(names, images, digits, probabilities, answers):
    """Per image: the image as given, the 28x28 digit the model saw, and its ten probabilities."""
    fig = Figure(figsize=(12, 2.2 * len(names)))
    for row, axes in enumerate(fig.subplots(len(names), 3, squeeze=False)):
        axes[0].imshow(np.asarray(images[row]))
        axes[0].set_title(os.path.basename(names[row])[:40], fontsize=9)
        axes[1].imshow(digits[row].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1].set_title(f"read: {answers[row]}", fontsize=9)
        for ax in axes[:2]:
            ax.axis("off")
        axes[2].bar(range(10), probabilities[row].numpy())
        axes[2].set(xticks=range(10), ylim=(0, 1), ylabel="probability")
    return fig
