"""main_mnist.py as a learner runs it: its flags, a run's folder and files, stop and exact resume, and the edits a
learner makes (another optimizer, schedule, layer or recipe) seen as they are. Dry runs on the real data."""
import csv
import json
import math
import os
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main_mnist
import model as model_py
from conftest import only_run, run_main
from machinery import runs, settings


def dry_run(capsys, data_dir, out_dir, *flags):
    return run_main(capsys, "--model", "FastNet", "--dry-run", "--data-dir", data_dir, "--out-dir", out_dir, *flags)


def metrics(folder):
    with open(os.path.join(folder, runs.METRICS)) as f:
        return list(csv.DictReader(f))


def test_help_lists_every_setting_with_its_comment_and_default(capsys):
    code, out, _ = run_main(capsys, "--help")
    with open(main_mnist.__file__) as f:
        helps = settings.setting_help(f.read())
    for name, value in settings.defaults(main_mnist.BLOCK, main_mnist.RECIPES).items():
        assert settings.flag(name) in out and helps[name].split()[0] in out and f"(default: {value})" in out, name
    assert code == 0 and "--dry-run" in out and "--compare" in out


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], "EPOCHS (--epochs) must be from 1"), (["--lr", "nan"], "LR (--lr) must be from"),
    (["--batch-size", "2.5"], "BATCH_SIZE must be int"), (["--model", "Nett"], "MODEL must be one of"),
    (["--crop-p", "1.5"], "CROP_P (--crop-p) must be from 0 to 1"),
    (["--dataset", "CIFAR10"], "DATASET must be one of"),
    (["--epoks", "3"], "unrecognized arguments: --epoks")])
def test_a_bad_flag_is_one_line_and_a_non_zero_exit(capsys, flags, words):
    code, out, err = run_main(capsys, *flags)
    assert code != 0 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_dry_run_leaves_a_finished_run_with_every_file(capsys, data_dir, tmp_path):
    code, out, err = dry_run(capsys, data_dir, tmp_path)
    folder = only_run(tmp_path)
    assert code == 0, err
    assert {runs.RECORD, runs.METRICS, runs.CHECKPOINT, runs.FINAL_MODEL, runs.PLOT, runs.SAMPLES, "misclassified.png",
            "confusion_matrix.png", "reliability.png"} <= set(os.listdir(folder))
    record = runs.read_json(os.path.join(folder, runs.RECORD))
    assert record["status"] == "finished" and record["settings"]["EPOCHS"] == main_mnist.RECIPES["FastNet"]["EPOCHS"]
    assert record["final_test_acc"] == float(metrics(folder)[-1]["test_acc"])
    assert {"temperature", "threshold", "not_a_digit_limits"} <= set(record["calibration"])
    assert "MODEL=FastNet [flag]" in out and "Total params" in out and f"Run folder: {folder}" in out


def test_a_setting_edited_in_a_recipe_is_the_one_trained_with(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(main_mnist.RECIPES, "FastNet", {**main_mnist.RECIPES["FastNet"], "LR": 0.0123,
                                                          "SCHEDULE": "step"})
    code, out, err = dry_run(capsys, data_dir, tmp_path)
    record = runs.read_json(os.path.join(only_run(tmp_path), runs.RECORD))
    assert code == 0 and record["settings"]["LR"] == 0.0123 and record["optimizer"]["lr"] == 0.0123
    assert re.search(r"\bLR=0.0123\b", out)


def test_two_runs_in_one_second_get_folders_of_their_own(tmp_path, monkeypatch):
    folders = [runs.new_folder(str(tmp_path), "Net") for _ in range(120)]
    assert len(set(folders)) == 120 and all(os.path.isdir(f) for f in folders)


def test_resume_goes_on_exactly_as_an_unbroken_run(capsys, data_dir, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert dry_run(capsys, data_dir, whole, "--epochs", "3", "--schedule", "step")[0] == 0
    assert dry_run(capsys, data_dir, parts, "--epochs", "1", "--schedule", "step")[0] == 0
    checkpoint = os.path.join(only_run(parts), runs.CHECKPOINT)
    code, out, err = run_main(capsys, "--resume", checkpoint, "--epochs", "3", "--dry-run")
    assert code == 0, err
    columns = ("train_loss", "test_loss", "test_acc", "lr")
    assert [[row[c] for c in columns] for row in metrics(only_run(whole))] == \
           [[row[c] for c in columns] for row in metrics(only_run(parts))]
    code, out, err = run_main(capsys, "--resume", checkpoint, "--dry-run")
    assert code == 1 and "is finished; add --epochs N" in err


def test_a_stop_in_the_final_report_is_completed_by_resume(capsys, data_dir, tmp_path, monkeypatch):
    import machinery.evaluation

    def stop(*args):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(machinery.evaluation, "report", stop)
        code, out, err = dry_run(capsys, data_dir, tmp_path)
    folder = only_run(tmp_path)
    assert code == 130 and "--resume" in err and not os.path.exists(os.path.join(folder, runs.FINAL_MODEL))
    assert runs.read_json(os.path.join(folder, runs.RECORD))["status"] == "stopped"
    code, out, err = run_main(capsys, "--resume", os.path.join(folder, runs.CHECKPOINT), "--dry-run")
    record = runs.read_json(os.path.join(folder, runs.RECORD))
    assert code == 0 and record["status"] == "finished" and "calibration" in record
    assert os.path.exists(os.path.join(folder, runs.FINAL_MODEL))


@pytest.mark.parametrize("damage, words", [
    (lambda c: c["settings"].update(NESTEROV="no"), "NESTEROV in"), (lambda c: c.pop("model"), "is damaged"),
    (lambda c: c["settings"].update(SCHEDULE="cosine"), "build no model, optimizer and schedule"),
    (lambda c: c["settings"].update(LR=float("inf")), "LR (--lr) in")])
def test_a_damaged_checkpoint_is_one_line(capsys, data_dir, tmp_path, damage, words):
    assert dry_run(capsys, data_dir, tmp_path, "--epochs", "1", "--schedule", "step")[0] == 0
    path = os.path.join(only_run(tmp_path), runs.CHECKPOINT)
    checkpoint = torch.load(path, weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, path)
    code, out, err = run_main(capsys, "--resume", path, "--epochs", "2", "--dry-run")
    assert code == 1 and words in err and "Traceback" not in err


def test_a_checkpoint_that_is_no_checkpoint_is_one_line(capsys, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, out, err = run_main(capsys, "--resume", tmp_path / "checkpoint.pt")
    assert code == 1 and "is damaged or no checkpoint" in err


def test_a_diverging_loss_stops_with_one_line(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(main_mnist, "loss_function",  # a loss that overflows float32, as a far too high lr makes one
                        lambda hp: lambda output, target: F.nll_loss(output, target) * 1e39)
    code, out, err = dry_run(capsys, data_dir, tmp_path)
    assert code == 1 and re.search(r"the (training|test) loss became (nan|inf)", err) and "Traceback" not in err
    assert runs.read_json(os.path.join(only_run(tmp_path), runs.RECORD))["status"] == "failed"


def test_an_unwritable_output_folder_is_one_line(capsys, data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    code, out, err = dry_run(capsys, data_dir, tmp_path / "file" / "runs")
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_a_run_whose_folder_is_deleted_and_made_again_writes_nothing_there(capsys, data_dir, tmp_path, monkeypatch):
    real = runs.save_epoch

    def replace_folder(folder, *args):
        os.rename(folder, folder + "-moved")
        os.mkdir(folder)
        return real(folder, *args)
    monkeypatch.setattr(runs, "save_epoch", replace_folder)
    code, out, err = dry_run(capsys, data_dir, tmp_path)
    assert code == 1 and "was deleted or replaced" in err
    assert os.listdir(os.path.join(tmp_path, [n for n in os.listdir(tmp_path) if not n.endswith("moved")][0])) == []


def test_an_adamw_swap_with_one_cycle_records_the_betas_it_cycles(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(main_mnist, "build_optimizer",
                        lambda model, hp: torch.optim.AdamW(model.parameters(), hp["LR"]))
    code, out, err = dry_run(capsys, data_dir, tmp_path, "--momentum", "0.5")
    record = runs.read_json(os.path.join(only_run(tmp_path), runs.RECORD))
    optimizer = torch.optim.AdamW(model_py.FastNet().parameters(), record["settings"]["LR"])
    main_mnist.build_scheduler(optimizer, record["settings"], 1)  # a dry run's epoch is one batch
    assert code == 0 and record["optimizer"]["class"] == "AdamW"
    assert record["optimizer"]["betas"] == list(optimizer.param_groups[0]["betas"])
    assert 0.4 <= record["optimizer"]["betas"][0] <= 0.5  # cycled by OneCycleLR from MOMENTUM, not AdamW's 0.9


def test_an_epoch_schedule_steps_once_an_epoch(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(main_mnist, "build_scheduler", lambda optimizer, hp, steps:
                        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp["EPOCHS"]))
    code, out, err = dry_run(capsys, data_dir, tmp_path, "--epochs", "4", "--lr", "0.1", "--batch-size", "8")
    lrs = [float(row["lr"]) for row in metrics(only_run(tmp_path))]
    assert code == 0 and lrs == pytest.approx([0.1 * (1 + math.cos(e * math.pi / 4)) / 2 for e in range(4)])


class Narrowed(model_py.Net):
    """Net with conv1 narrowed to 16 channels and conv2 left as it was: a layer that no longer fits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3)


class ViewFlattened(nn.Module):
    """The original's way to flatten: x.view(-1, ...)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(F.relu(self.conv(x)).view(-1, 4 * 26 * 26)), dim=1)


def test_a_model_whose_layers_do_not_fit_is_one_line_and_view_flattening_trains(capsys, data_dir, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setitem(model_py.MODELS, "Narrowed", Narrowed)
    code, out, err = run_main(capsys, "--model", "Narrowed", "--dry-run", "--data-dir", data_dir, "--out-dir", tmp_path)
    assert code == 1 and "the model's forward fails" in err and "Traceback" not in err
    monkeypatch.setitem(model_py.MODELS, "ViewFlattened", ViewFlattened)
    code, out, err = run_main(capsys, "--model", "ViewFlattened", "--dry-run", "--epochs", "1", "--data-dir", data_dir,
                              "--out-dir", tmp_path / "view")
    assert code == 0, err
    assert "Net's recipe (ViewFlattened has none)" in out


def test_a_compiled_model_saves_a_model_pt_that_loads(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(main_mnist, "build_model", lambda hp: torch.compile(model_py.MODELS[hp["MODEL"]](),
                                                                            backend="eager"))
    assert dry_run(capsys, data_dir, tmp_path)[0] == 0
    from machinery.tools import load_model
    name, model, knows = load_model(os.path.join(only_run(tmp_path), runs.FINAL_MODEL), torch.device("cpu"))
    assert name == "FastNet" and "bank" in knows


def test_an_augmentation_a_learner_adds_trains(capsys, data_dir, tmp_path, monkeypatch):
    import utils
    monkeypatch.setattr(utils, "random_augment", lambda images, hp: images.flip(3))
    code, out, err = dry_run(capsys, data_dir, tmp_path, "--epochs", "2")
    assert code == 0 and len(metrics(only_run(tmp_path))) == 2


def test_another_dataset_is_named_as_itself_when_it_is_missing(capsys, tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "mirrors", ["file:///nonexistent/"])
    code, out, err = run_main(capsys, "--dataset", "FashionMNIST", "--dry-run", "--data-dir", tmp_path / "data",
                              "--out-dir", tmp_path / "out")
    assert code == 1 and "FashionMNIST is not in" in err and "FashionMNIST/raw" in err and " MNIST" not in err


def test_compare_lists_runs_and_one_line_for_each_damaged_one(capsys, data_dir, tmp_path):
    assert dry_run(capsys, data_dir, tmp_path)[0] == 0
    good = only_run(tmp_path)
    for name, text in [("deep", "[" * 200_000 + "]" * 200_000), ("digits", '{"model": ' + "9" * 200_001 + "}"),
                       ("huge", '{"model": "Net", "seconds": 1e400}'), ("code", '{"code": "abc"}')]:
        os.mkdir(tmp_path / name)
        (tmp_path / name / runs.RECORD).write_text(text)
        (tmp_path / name / runs.METRICS).write_text("epoch\n1\n")
    os.mkdir(tmp_path / "fifo")
    os.mkfifo(tmp_path / "fifo" / runs.RECORD)
    code, out, err = run_main(capsys, "--compare", "--out-dir", tmp_path)
    assert code == 0, err
    assert re.search(rf"{os.path.basename(good)}\s+FastNet\s+finished", out)
    assert all(re.search(rf"^{name}\s+damaged or unreadable", out, re.MULTILINE)
               for name in ("deep", "digits", "huge", "code", "fifo"))
    assert os.path.isfile(tmp_path / "comparison.png")


def test_find_lr_suggests_an_lr_and_leaves_the_model_as_it_was(capsys, data_dir, tmp_path):
    code, out, err = run_main(capsys, "--model", "FastNet", "--find-lr", "--dry-run", "--data-dir", data_dir,
                              "--out-dir", tmp_path)
    assert code == 0, err
    assert re.search(r"Suggested lr: [\d.e-]+", out)
    assert os.path.isfile(os.path.join(only_run(tmp_path), "lr_finder.png"))


def test_eval_only_writes_robustness_curves_into_a_folder_of_its_own(capsys, data_dir, trained, tmp_path):
    code, out, err = run_main(capsys, "--eval-only", os.path.join(trained, runs.FINAL_MODEL), "--dry-run",
                              "--data-dir", data_dir, "--out-dir", tmp_path)
    folder = only_run(tmp_path)
    assert code == 0, err
    assert {"robustness.csv", "robustness.png", "reliability.png", runs.RECORD} <= set(os.listdir(folder))
    assert json.loads(open(os.path.join(folder, runs.RECORD)).read())["mode"] == "eval-only"
