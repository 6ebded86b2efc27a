"""Every figure the scripts draw, each saved whole (runs.write_file) as the format its file name ends in."""
import math
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from machinery.runs import PLOT, write_file

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def save(fig, path):
    folder, name = os.path.split(os.path.abspath(path))
    kind = FORMATS.get(os.path.splitext(name)[1].lower(), "png")
    write_file(folder, name, lambda f: fig.savefig(f, format=kind, dpi=100, bbox_inches="tight"))
    return fig


def image_grid(images, titles, path, title, columns=8, gap=12):
    """Images [N, H, W] in [0, 1], light on black, laid out `columns` to a row under their titles, drawn as one
    picture (an axes per image is ten times slower)."""
    images = images.float().cpu().numpy()
    count, height, width = images.shape
    rows = max(1, math.ceil(count / columns))
    mosaic = np.full((rows * (height + gap) + gap, columns * (width + gap) - gap), np.nan, dtype=np.float32)
    fig = Figure(figsize=(1.4 * columns, 1.6 * rows + 0.5))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for index, (image, text) in enumerate(zip(images, titles)):
        top, left = gap + (index // columns) * (height + gap), (index % columns) * (width + gap)
        mosaic[top:top + height, left:left + width] = image
        ax.text(left + width / 2, top - 1, text, ha="center", va="bottom", fontsize=10)
    ax.imshow(mosaic, cmap=colormaps["gray"].with_extremes(bad="white"), vmin=0, vmax=1)
    fig.suptitle(title, y=1.04)
    return save(fig, path)


def plot_metrics(history, folder, title):
    """The original's four panels, loss and accuracy of training and test per epoch, into folder/accuracy_loss.png."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(15, 10))
    panels = [("train_loss", "Training Loss"), ("test_loss", "Test Loss"), ("train_acc", "Training Accuracy (%)"),
              ("test_acc", "Test Accuracy (%)")]
    for ax, (key, name) in zip(fig.subplots(2, 2).flat, panels):
        ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3)
        ax.set(title=name, xlabel="epoch")
        ax.grid(alpha=0.3)
        if key.endswith("loss"):
            ax.set_yscale("log")
    best = max(history, key=lambda row: row["test_acc"])
    fig.suptitle(f"{title}\ntest accuracy: final {history[-1]['test_acc']:.2f}%, best {best['test_acc']:.2f}% "
                 f"(epoch {best['epoch']})")
    save(fig, os.path.join(folder, PLOT))


def plot_comparison(runs, path):
    """Test accuracy per epoch of each run: runs is [(label, history)]."""
    fig = Figure(figsize=(11, 6))
    ax = fig.subplots()
    for label, history in runs:
        ax.plot([row["epoch"] for row in history], [row["test_acc"] for row in history], marker="o", markersize=3,
                label=f"{label}: {history[-1]['test_acc']:.2f}%")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="Runs compared")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def plot_misclassified(images, probabilities, labels, path, count=24):
    wrong = (probabilities.argmax(1) != labels).nonzero().flatten()[:count]
    titles = [f"{int(labels[i])} read {int(probabilities[i].argmax())}\n{100 * float(probabilities[i].max()):.0f}%"
              for i in wrong]
    image_grid(images[wrong].float() / 255, titles, path, f"The first {len(wrong)} misclassified test digits: "
                                                          f"true label, what the model read, how sure it was")


def plot_confusion(matrix, path):
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    shown = ax.imshow(np.log1p(matrix.numpy()), cmap="Blues")
    for (true, read), count in np.ndenumerate(matrix.numpy()):
        ax.text(read, true, count, ha="center", va="center", fontsize=8, color="white" if true == read else "black")
    ax.set(xlabel="read as", ylabel="true digit", xticks=range(10), yticks=range(10), title="Confusion matrix (test)")
    fig.colorbar(shown, label="log(1 + count)")
    save(fig, path)


def plot_reliability(before, after, temperature, path):
    """Reliability diagrams side by side: rows of (mean confidence, accuracy, count) per confidence bin."""
    fig = Figure(figsize=(12, 5.5))
    for ax, (rows, name) in zip(fig.subplots(1, 2), [(before, "as trained"), (after, f"at T = {temperature:.2f}")]):
        rows = [row for row in rows if row is not None]
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
        ax.scatter([c for c, _, _ in rows], [a for _, a, _ in rows], s=[20 + 200 * n ** 0.5 / 30 for *_, n in rows])
        for confidence, accuracy, n in rows:
            ax.annotate(f"{n}", (confidence, accuracy), fontsize=7, xytext=(4, -10), textcoords="offset points")
        ax.set(xlabel="confidence", ylabel="accuracy", title=f"test digits, {name} (count per bin)",
               xlim=(0, 1.02), ylim=(0, 1.02))
    save(fig, path)


def plot_robustness(curves_by_run, path):
    """One panel per family of shifts: each run's accuracy against the shift's strength."""
    families = list(next(iter(curves_by_run.values())))
    fig = Figure(figsize=(16, 8))
    axes = list(fig.subplots(2, math.ceil(len(families) / 2)).flat)
    for ax, family in zip(axes, families):
        for label, curves in curves_by_run.items():
            ax.plot(*zip(*curves[family]), marker="o", markersize=3, label=label)
        ax.set(title=family, ylabel="accuracy (%)", ylim=(0, 101))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for ax in axes[len(families):]:
        ax.axis("off")
    save(fig, path)


def plot_lr_finder(lrs, losses, suggestion, path):
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="red", linestyle=":", label=f"suggested lr {suggestion:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
    ax.legend()
    save(fig, path)


def plot_predictions(names, images, digits, probabilities, answers, path):
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
    save(fig, path)
