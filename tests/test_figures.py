"""figures.py: the accuracy/loss figure and the numbers written on it, the comparison, the samples, the
misclassified digits and the confusion matrix; and metrics.csv, whose rows they draw."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from machinery import figures, records
import utils
from conftest import assert_png
from test_utils import AUGMENTED, smooth_digits
from utils import MnistBatches, data_visualization





def history(epochs=3):
    return [dict(epoch=e, train_loss=1 / e, train_acc=90 + e, test_loss=0.5 / e, test_acc=95 + e, lr=0.01, seconds=1.5)
            for e in range(1, epochs + 1)]


def test_metrics_csv_has_the_documented_header_and_a_row_per_epoch(tmp_path):
    path = tmp_path / "metrics.csv"
    records.write_metrics(history(), path)
    lines = path.read_text().splitlines()
    assert lines[0] == "epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds"
    assert lines[1] == "1,1,91,0.5,96,0.01,1.5" and len(lines) == 4


def test_confusion_matrix_and_misclassified_figures_are_valid_pngs(tmp_path):
    predictions = torch.tensor([0, 1, 2, 3, 3, 5])
    labels = torch.tensor([0, 1, 2, 2, 4, 5])
    figures.plot_confusion_matrix(utils.confusion_matrix(predictions, labels), tmp_path / "confusion.png")
    figures.plot_misclassified(smooth_digits(6)[:, 0], F.one_hot(predictions, 10).float(), labels, tmp_path / "wrong.png")
    for name in ("confusion.png", "wrong.png"):
        assert_png(tmp_path / name)


# Net's default run (step schedule: lr 0.01, then 0.001 from epoch 16), as its metrics.csv has it.
NET_TEST_ACC = [50.92, 95.92, 97.33, 98.27, 98.29, 98.72, 98.80, 98.82, 99.10, 99.14,
                99.05, 98.94, 99.09, 99.07, 99.05, 99.25, 99.25, 99.23, 99.30, 99.30]
NET_TEST_LOSS = [1.5328, 0.1253, 0.0862, 0.0563, 0.0507, 0.0426, 0.0406, 0.0343, 0.0298, 0.0285,
                 0.0289, 0.0301, 0.0299, 0.0274, 0.0241, 0.0204, 0.0209, 0.0204, 0.0198, 0.0202]
NET_TRAIN_LOSS = [2.2618, 0.3947, 0.1455, 0.1070, 0.0883, 0.0755, 0.0672, 0.0597, 0.0553, 0.0512,
                  0.0475, 0.0449, 0.0415, 0.0404, 0.0392, 0.0304, 0.0287, 0.0297, 0.0293, 0.0277]
NET_TRAIN_ACC = [22.27, 87.84, 95.50, 96.64, 97.26, 97.64, 97.90, 98.11, 98.27, 98.41,
                 98.54, 98.61, 98.77, 98.74, 98.72, 99.03, 99.09, 99.06, 99.09, 99.16]


def net_history(lrs=None):
    lrs = lrs or [0.01] * 15 + [0.001] * 5
    return [dict(epoch=i + 1, train_loss=NET_TRAIN_LOSS[i], train_acc=NET_TRAIN_ACC[i], test_loss=NET_TEST_LOSS[i],
                 test_acc=NET_TEST_ACC[i], lr=lrs[i], seconds=9.5) for i in range(20)]


def dry_run_history(train_acc, test_acc, test_loss):
    """A --dry-run's single epoch on one batch: any accuracy is possible, and a loss of 0."""
    return [dict(epoch=1, train_loss=2.3, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc, lr=0.01,
                 seconds=0.2)]


def one_cycle_lrs(peak_epoch=6, epochs=20, top=0.05):
    rising = [top * e / peak_epoch for e in range(1, peak_epoch + 1)]
    return rising + [top * (1 - e / (epochs - peak_epoch + 1)) for e in range(1, epochs - peak_epoch + 1)]


def all_texts(fig):
    """Every string written on a figure: its own texts, the axes' titles, texts and legends."""
    texts = [text.get_text() for text in fig.texts]
    for ax in fig.axes:
        texts += [ax.get_title()] + [text.get_text() for text in ax.texts]
        texts += [text.get_text() for text in ax.get_legend().get_texts()] if ax.get_legend() else []
    for legend in fig.legends:
        texts += [text.get_text() for text in legend.get_texts()]
    return texts


def lines_with_gid(ax, gid):
    return [line for line in ax.lines if line.get_gid() == gid]


def panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


@pytest.mark.parametrize("history", [history(1), history(3), net_history(), dry_run_history(0.0, 100.0, 0.0),
                                     dry_run_history(100.0, 0.0, 1e-9), dry_run_history(9.8, 10.2, 2.31)],
                         ids=["1 epoch", "3 epochs", "Net's 20 epochs", "dry run 100%", "dry run 0%", "dry run"])
def test_the_metrics_figure_is_a_png_with_the_originals_four_panels(tmp_path, history):
    fig = figures.plot_metrics(history, tmp_path / "curves.png", title="2026-11-25_11-20-03_Net: Net")
    assert_png(tmp_path / "curves.png")
    assert [ax.get_title() for ax in fig.axes] == ["Training Loss", "Test Loss", "Training Accuracy",
                                                   "Test Accuracy"]
    assert "2026-11-25_11-20-03_Net: Net" in all_texts(fig)
    for ax in fig.axes:
        ticks = ax.get_xticks()
        assert all(tick == int(tick) for tick in ticks)  # whole epochs only, even for a single one
        assert ax.get_yscale() == "log"


def test_the_metrics_figure_says_the_final_and_best_test_accuracy_and_stars_the_best_epoch(tmp_path):
    rows = net_history()
    rows[9]["test_acc"] = 99.41  # the best epoch is now the 10th, not the last
    fig = figures.plot_metrics(rows, tmp_path / "curves.png")
    assert "final 99.30%" in " ".join(all_texts(fig)) and "best 99.41% (epoch 10)" in " ".join(all_texts(fig))
    star, = lines_with_gid(panel(fig, "Test Accuracy"), "best")
    assert star.get_xdata().tolist() == [10]


def test_the_first_of_equal_best_epochs_is_the_best(tmp_path):
    fig = figures.plot_metrics(net_history(), tmp_path / "curves.png")  # 99.30% at epochs 19 and 20
    assert "best 99.30% (epoch 19)" in " ".join(all_texts(fig))


def test_the_accuracy_axis_keeps_a_twentieth_of_a_point_apart_at_the_top(tmp_path):
    fig = figures.plot_metrics(net_history(), tmp_path / "curves.png")
    ax = panel(fig, "Test Accuracy")
    line = ax.lines[0]
    y = ax.transData.transform(list(zip(line.get_xdata(), line.get_ydata())))[:, 1]  # pixels, upwards
    assert y[18] - y[17] > 10  # 99.30% (epoch 19) stands clearly above 99.23% (epoch 18)
    labels = [label.get_text() for label in ax.get_yticklabels()]
    assert "99.3" in labels and "99" in labels  # ticks are labelled in accuracy


def test_accuracies_below_the_axis_are_marked_on_its_bottom_edge(tmp_path):
    fig = figures.plot_metrics(net_history(), tmp_path / "curves.png")
    ax = panel(fig, "Test Accuracy")
    below, = lines_with_gid(ax, "below")
    bottom = max(ax.get_ylim())  # the axis is inverted: the largest error rate is at the bottom
    assert below.get_xdata().tolist() == [1, 2, 3]  # 50.92%, 95.92% and 97.33%
    assert set(below.get_ydata().tolist()) == {bottom}
    assert f"below {100 - bottom:g}%" in ax.get_ylabel()


def lr_lines(fig):
    return {title: [line.get_xdata()[0] for line in lines_with_gid(panel(fig, title), "lr-change")]
            for title in ("Training Loss", "Test Loss", "Training Accuracy", "Test Accuracy")}


def test_a_step_schedules_drop_is_drawn_before_the_first_epoch_with_the_new_lr(tmp_path):
    fig = figures.plot_metrics(net_history(), tmp_path / "curves.png")
    assert set(map(tuple, lr_lines(fig).values())) == {(15.5,)}
    assert "lr 0.01 → 0.001 from epoch 16" in " ".join(all_texts(fig))


def test_a_one_cycle_schedules_peak_is_drawn_at_its_epoch(tmp_path):
    fig = figures.plot_metrics(net_history(one_cycle_lrs(peak_epoch=6)), tmp_path / "curves.png")
    assert set(map(tuple, lr_lines(fig).values())) == {(6,)}
    assert "lr peak 0.05 at epoch 6" in " ".join(all_texts(fig))


def test_a_constant_lr_draws_no_lr_line(tmp_path):
    fig = figures.plot_metrics(net_history([0.01] * 20), tmp_path / "curves.png")
    assert set(map(tuple, lr_lines(fig).values())) == {()}
    assert not any("lr " in text for text in all_texts(fig))


def test_lr_events_of_two_drops_and_of_a_short_history():
    rows = history(6)
    for row, lr in zip(rows, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]):
        row["lr"] = lr
    assert [x for x, _ in figures.lr_events(rows)] == [2.5, 4.5]
    assert figures.lr_events(history(1)) == []


def test_a_one_cycle_run_shows_no_peak_while_its_lr_is_still_rising():
    rising = net_history(one_cycle_lrs(peak_epoch=6))[:2]
    assert figures.lr_events(rising, "onecycle") == []
    assert figures.lr_events(rising, "step") == [(1.5, "lr 0.00833 → 0.0167 from epoch 2")]
    assert figures.lr_events(net_history(one_cycle_lrs(peak_epoch=6))[:8], "onecycle") == [(6, "lr peak 0.05 at epoch 6")]


def comparison_runs():
    net = net_history()
    faster = [dict(row, test_acc=min(row["test_acc"] + 0.2, 99.6)) for row in net[:8]]
    return [dict(label="2026-11-25_11-20-03_Net: lr=0.01", history=net, finished=True),
            dict(label="2026-11-25_12-00-00_Net: lr=0.05", history=faster, finished=False),
            dict(label="2026-11-25_13-00-00_Net: dry run", history=dry_run_history(9.8, 10.2, 2.31),
                 finished=True)]


def test_the_comparison_has_a_line_per_run_and_says_each_runs_final_and_best(tmp_path):
    fig = figures.plot_comparison(comparison_runs(), tmp_path / "comparison.png", title="lr sweep")
    assert_png(tmp_path / "comparison.png")
    assert [ax.get_title() for ax in fig.axes] == ["Test Accuracy", "Test Loss"]
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == ["2026-11-25_11-20-03_Net: lr=0.01: final 99.30%, best 99.30% (epoch 19)",
                      "2026-11-25_12-00-00_Net: lr=0.05 (unfinished): final 99.02%, best 99.02% (epoch 8)",
                      "2026-11-25_13-00-00_Net: dry run: final 10.20%, best 10.20% (epoch 1)"]
    assert "lr sweep" in all_texts(fig)
    for ax in fig.axes:
        drawn = [line for line in ax.lines if line.get_gid() is None]
        assert [len(line.get_xdata()) for line in drawn] == [20, 8, 1]
        assert [line.get_linestyle() for line in drawn] == ["-", "--", "-"]  # the unfinished run is dashed
        assert all(tick == int(tick) for tick in ax.get_xticks())


def test_a_short_run_does_not_stretch_the_comparisons_accuracy_axis(tmp_path):
    fig = figures.plot_comparison(comparison_runs(), tmp_path / "comparison.png")
    ax = panel(fig, "Test Accuracy")
    assert 100 - max(ax.get_ylim()) >= 97  # the dry run's 10% sits on the bottom edge, not at the bottom of a long axis
    assert 1 in [x for line in lines_with_gid(ax, "below") for x in line.get_xdata()]


@pytest.mark.parametrize("epochs", [1, 20])
def test_a_comparison_of_one_run(tmp_path, epochs):
    run = dict(label="2026-11-25_11-20-03_Net: Net", history=net_history()[:epochs], finished=True)
    fig = figures.plot_comparison([run], tmp_path / "comparison.png")
    assert_png(tmp_path / "comparison.png")
    assert "Run comparison" in all_texts(fig)
    assert len(fig.legends[0].get_texts()) == 1


def test_misclassified_shows_the_most_confident_mistakes_first(tmp_path):
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    probabilities = torch.full((6, 10), 0.01)
    said = {0: (9, 0.60), 1: (1, 0.99), 2: (7, 0.97), 3: (8, 0.75), 4: (4, 0.50), 5: (6, 0.999)}  # 1 and 4 right
    for i, (prediction, p) in said.items():
        probabilities[i, prediction] = p
    fig = figures.plot_misclassified(smooth_digits(6)[:, 0], probabilities, labels, tmp_path / "wrong.png")
    assert_png(tmp_path / "wrong.png")
    titles = [text.get_text() for text in fig.axes[0].texts]  # one picture, a title over each image
    assert titles == ["true 5, said 6 (99%)\n#5", "true 2, said 7 (97%)\n#2", "true 3, said 8 (75%)\n#3",
                      "true 0, said 9 (60%)\n#0"]
    assert fig.texts[0].get_text().startswith("4 of 6 test images misclassified")


def test_misclassified_shows_count_images_at_most(tmp_path):
    labels = torch.zeros(40, dtype=torch.long)
    probabilities = F.one_hot(torch.ones(40, dtype=torch.long), 10).float()  # all 40 wrong
    fig = figures.plot_misclassified(smooth_digits(40)[:, 0], probabilities, labels, tmp_path / "wrong.png", count=7)
    assert len(fig.axes[0].texts) == 7
    assert fig.texts[0].get_text().startswith("40 of 40")


def test_data_visualization_shows_a_batch_as_the_model_gets_it_unnormalized_and_labelled(tmp_path):
    images, labels = smooth_digits(12)[:, 0], torch.arange(12) % 10
    fig = data_visualization(MnistBatches(images, labels, batch_size=12), tmp_path / "plain.png", count=10)
    assert_png(tmp_path / "plain.png")
    (ax,) = fig.axes  # one picture of the grid, a label over each image
    assert [text.get_text() for text in ax.texts] == [str(label) for label in labels[:10].tolist()]
    assert np.allclose(shown_images(ax, 10), images[:10].numpy() / 255, atol=1e-6)  # normalization undone

    loader = MnistBatches(images, labels, batch_size=12, shuffle=True, augmentation=AUGMENTED)
    fig = data_visualization(loader, tmp_path / "augmented.png")
    assert_png(tmp_path / "augmented.png")
    pixels = shown_images(fig.axes[0], 12)
    assert len(pixels) == 12 and -1e-6 < pixels.min() and pixels.max() < 1 + 1e-6
    assert "augmented training images" in fig._suptitle.get_text()


def shown_images(ax, count):
    """The `count` 28x28 images of a grid drawn by utils.image_grid, cut out where its titles stand."""
    mosaic = np.asarray(ax.images[0].get_array())
    tops = [(round(text.get_position()[0] - 14), round(text.get_position()[1] + 1)) for text in ax.texts[:count]]
    return np.stack([mosaic[top:top + 28, left:left + 28] for left, top in tops])


def test_drawing_the_samples_leaves_the_random_state_as_it_was(tmp_path):
    loader = MnistBatches(smooth_digits(8)[:, 0], torch.arange(8), batch_size=8, shuffle=True,
                          augmentation=AUGMENTED)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    data_visualization(loader, tmp_path / "samples.png")
    assert torch.equal(torch.get_rng_state(), before)  # so a run trains the same with the picture or without it
