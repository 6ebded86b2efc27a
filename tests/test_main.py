"""main_mnist.py as a learner runs it: its flags, a run's folder and files, stop and exact resume, and the edits a
learner makes (another optimizer, schedule, layer, loss or recipe) seen as they are. Dry runs on the real data."""
import csv
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main_mnist
import model as model_py
from conftest import only_run, run_main
from machinery import runs, settings, tools
from machinery.evaluation import FAMILIES
from machinery.figures import plot_comparison
from utils import UserError


def dry_run(capsys, data_dir, out_dir, *flags):
    return run_main(capsys, "--model", "FastNet", "--dry-run", "--data-dir", data_dir, "--out-dir", out_dir, *flags)


def metrics(folder):
    with open(os.path.join(folder, runs.METRICS)) as f:
        return list(csv.DictReader(f))


def test_help_lists_every_setting_with_its_comment_and_default(capsys):
    code, out, _ = run_main(capsys, "--help")
    out = " ".join(out.split())  # argparse wraps the help at any space
    with open(main_mnist.__file__) as f:
        helps = settings.setting_help(f.read())
    for name, value in main_mnist.BLOCK.items():
        assert settings.flag(name) in out and helps[name].split()[0] in out and f"(default: {value}" in out, name
    assert code == 0 and "--dry-run" in out and "--compare" in out
    assert "one of " + ", ".join(model_py.MODELS) in out  # the models a learner may name


@pytest.mark.parametrize("flags, words", [
    (["--epochs", "0"], "EPOCHS (--epochs) must be from 1"), (["--lr", "nan"], "LR (--lr) must be from"),
    (["--batch-size", "2.5"], "BATCH_SIZE (--batch-size) must be a whole number"),
    (["--model", "Nett"], "MODEL (--model) must be one of"),
    (["--crop-p", "1.5"], "CROP_P (--crop-p) must be from 0 to 1"),
    (["--dataset", "CIFAR10"], "DATASET (--dataset) must be one of"),
    (["--epoks", "3"], "unrecognized arguments: --epoks"),
    (["--eval-only", "model.pt", "--model", "CompactNet"], "--eval-only reads the model from MODEL_PT")])
def test_a_bad_flag_is_one_line_and_a_non_zero_exit(capsys, flags, words):
    code, out, err = run_main(capsys, *flags)
    assert code != 0 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_dry_run_leaves_a_finished_run_with_every_file(capsys, data_dir, tmp_path):
    code, out, err = dry_run(capsys, data_dir, tmp_path)
    folder = only_run(tmp_path)
    assert code == 0 and "Dry run (one test batch an epoch): final test accuracy" in out, err
    assert {runs.RECORD, runs.METRICS, runs.CHECKPOINT, runs.FINAL_MODEL, runs.CALIBRATION, runs.PLOT, runs.SAMPLES,
            "misclassified.png", "confusion_matrix.png", "reliability.png"} == set(os.listdir(folder))
    record = runs.read_json(os.path.join(folder, runs.RECORD))
    assert record["status"] == "finished" and record["settings"]["EPOCHS"] == main_mnist.RECIPES["FastNet"]["EPOCHS"]
    assert record["final_test_acc"] == float(metrics(folder)[-1]["test_acc"])
    assert {"temperature", "threshold", "not_a_digit_limits"} <= set(record["calibration"])
    assert "MODEL=FastNet [flag]" in out and "Total params" in out and f"Run folder: {folder}" in out
    assert record["settings"]["DRY_RUN"] is True and record["model_pt_epoch"] == record["epochs_done"]


def test_a_setting_edited_in_a_recipe_is_the_one_trained_with(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(main_mnist.RECIPES, "FastNet", {**main_mnist.RECIPES["FastNet"], "LR": 0.0123,
                                                          "SCHEDULE": "step"})
    code, out, err = dry_run(capsys, data_dir, tmp_path)
    record = runs.read_json(os.path.join(only_run(tmp_path), runs.RECORD))
    assert code == 0 and record["settings"]["LR"] == 0.0123 and record["optimizer"]["lr"] == 0.0123
    assert re.search(r"\bLR=0.0123 \[recipe\]", out)


def test_two_runs_in_one_second_get_folders_of_their_own(tmp_path, monkeypatch):
    folders = [runs.new_folder(str(tmp_path), "Net") for _ in range(120)]
    assert len(set(folders)) == 120 and all(os.path.isdir(f) for f in folders)


def stop_after_epoch(monkeypatch, last):
    """Ctrl-C once epoch `last` is saved, as a learner presses it."""
    real = runs.save_epoch

    def save_then_stop(folder, record, checkpoint):
        real(folder, record, checkpoint)
        if len(checkpoint["history"]) == last:
            raise KeyboardInterrupt
    monkeypatch.setattr(runs, "save_epoch", save_then_stop)


def test_resume_goes_on_exactly_as_an_unbroken_run(capsys, data_dir, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert dry_run(capsys, data_dir, whole, "--epochs", "3")[0] == 0
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        code, out, err = dry_run(capsys, data_dir, parts, "--epochs", "3")
    folder = only_run(parts)
    assert code == 130 and runs.read_json(os.path.join(folder, runs.RECORD))["status"] == "stopped"
    code, out, err = run_main(capsys, "--resume", os.path.join(folder, runs.CHECKPOINT))
    assert code == 0 and only_run(parts) == folder, err
    columns = ("train_loss", "test_loss", "test_acc", "lr")
    assert [[row[c] for c in columns] for row in metrics(only_run(whole))] == \
           [[row[c] for c in columns] for row in metrics(folder)]
    assert runs.read_json(os.path.join(folder, runs.RECORD))["status"] == "finished"
    for flags in ([], ["--epochs", "5"]):  # the run folder stands for its checkpoint
        code, out, err = run_main(capsys, "--resume", folder, *flags)
        assert code == 1 and "its run is finished (3 of 3 epochs); a one-cycle run's length is set" in err


def test_a_finished_step_run_trains_further_in_a_new_folder_and_is_left_as_it_was(capsys, data_dir, tmp_path,
                                                                                     monkeypatch):
    assert dry_run(capsys, data_dir, tmp_path, "--epochs", "1", "--schedule", "step")[0] == 0
    first = only_run(tmp_path)
    files = {name: os.path.getmtime(os.path.join(first, name)) for name in os.listdir(first)}

    class FastNet(model_py.FastNet):  # a layer edited since: refused before a folder is made
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(128, 10, bias=False)
    with monkeypatch.context() as patch:
        patch.setitem(model_py.MODELS, "FastNet", FastNet)
        code, out, err = run_main(capsys, "--resume", os.path.join(first, runs.CHECKPOINT), "--epochs", "2")
    assert code == 1 and "no longer takes (Unexpected key" in err and only_run(tmp_path) == first
    code, out, err = run_main(capsys, "--resume", os.path.join(first, runs.CHECKPOINT), "--epochs", "2")
    second = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path) if os.path.join(tmp_path, n) != first]
    assert code == 0 and "go into a new folder" in out and len(second) == 1, err
    assert [row["epoch"] for row in metrics(second[0])] == ["1", "2"]
    assert files == {name: os.path.getmtime(os.path.join(first, name)) for name in os.listdir(first)}


def test_a_resume_names_what_was_edited_since_and_keeps_the_dry_run(capsys, data_dir, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        dry_run(capsys, data_dir, tmp_path, "--epochs", "2")
    checkpoint = os.path.join(only_run(tmp_path), runs.CHECKPOINT)
    with pytest.raises(UserError, match="its run has not finished: --resume"):
        tools.load_model(only_run(tmp_path), torch.device("cpu"))  # no model.pt yet
    code, out, err = run_main(capsys, "--resume", checkpoint, "--no-dry-run")
    assert code == 1 and "not --dry-run" in err

    class FastNet(model_py.FastNet):  # a layer edited since: one more bias
        def __init__(self):
            super().__init__()
            self.fc2 = nn.Linear(128, 10, bias=False)
    with monkeypatch.context() as patch:
        patch.setitem(model_py.MODELS, "FastNet", FastNet)
        code, out, err = run_main(capsys, "--resume", checkpoint)
    assert code == 1 and "holds a FastNet that model.py's FastNet no longer takes (Unexpected key" in err
    monkeypatch.setitem(main_mnist.RECIPES, "FastNet", {**main_mnist.RECIPES["FastNet"], "LR": 0.3})
    monkeypatch.setitem(main_mnist.BLOCK, "L1", 1e-5)  # a setting added since, as docs/changing.md adds it
    monkeypatch.setattr(runs, "code_version", lambda: {"files": "edited"})
    code, out, err = run_main(capsys, "--resume", checkpoint)
    lr = main_mnist.RECIPES["FastNet"]["LR"]
    out = " ".join(out.split())  # the note is wrapped to the console's width
    assert code == 0 and f"edited since {checkpoint}: LR=0.3; the run goes on with its own LR=" in out, err
    assert f"new since {checkpoint}: L1=1e-05; the run goes on with it, though its first 1 epochs" in out
    assert "the project's .py files changed since this run last started" in out
    record = runs.read_json(os.path.join(only_run(tmp_path), runs.RECORD))
    assert record["settings"]["DRY_RUN"] is True and record["settings"]["LR"] != lr and len(record["history"]) == 2


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
    code, out, err = run_main(capsys, "--resume", os.path.join(folder, runs.CHECKPOINT))
    record = runs.read_json(os.path.join(folder, runs.RECORD))
    assert code == 0, err
    assert record["status"] == "finished" and "calibration" in record
    assert os.path.exists(os.path.join(folder, runs.FINAL_MODEL))
    assert not {"LABEL_SMOOTHING", "OUT_DIR"} & set(record["unused_settings"])  # read by the epochs before the stop


@pytest.mark.parametrize("text, kind", [("def forward(self:", "SyntaxError"), ("if x:\ny = 1", "IndentationError")])
def test_a_syntax_error_in_model_py_is_one_line_though_met_on_import(text, kind):
    code = f"from machinery import runs; exec(compile({text!r}, 'model.py', 'exec'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=runs.REPO, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.startswith(f"error: model.py:{text.count(chr(10)) + 1}: {kind}: ")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.parametrize("damage, words", [
    (lambda c: c["settings"].update(NESTEROV="no"), "NESTEROV ("), (lambda c: c.pop("model"), "it lacks model"),
    (lambda c: c["settings"].update(SCHEDULE="cosine"), "main_mnist.py:"),
    (lambda c: c["settings"].update(LR=float("inf")), "checkpoint.pt) must be from 1e-12 to 10, not inf")])
def test_a_damaged_checkpoint_is_one_line(capsys, data_dir, tmp_path, monkeypatch, damage, words):
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        dry_run(capsys, data_dir, tmp_path, "--epochs", "2", "--schedule", "step")
    path = os.path.join(only_run(tmp_path), runs.CHECKPOINT)
    checkpoint = torch.load(path, weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, path)
    code, out, err = run_main(capsys, "--resume", path)
    assert code == 1 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_checkpoint_that_is_no_checkpoint_is_one_line(capsys, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, out, err = run_main(capsys, "--resume", tmp_path / "checkpoint.pt")
    assert code == 1 and "is damaged or no checkpoint" in err


def test_a_diverging_loss_stops_with_one_line(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(main_mnist, "loss_function",  # a loss that overflows float32, as a far too high lr makes one
                        lambda model, hp: lambda output, target: F.nll_loss(output, target) * 1e39)
    code, out, err = dry_run(capsys, data_dir, tmp_path)
    assert code == 1 and re.search(r"the (training|test) loss became (nan|inf)", err) and "Traceback" not in err
    assert runs.read_json(os.path.join(only_run(tmp_path), runs.RECORD))["status"] == "failed"


def test_an_unwritable_output_folder_is_one_line(capsys, data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    code, out, err = dry_run(capsys, data_dir, tmp_path / "file" / "runs")
    assert code == 1 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_a_run_whose_folder_is_deleted_stops_in_one_line(capsys, data_dir, tmp_path, monkeypatch):
    real = runs.save_epoch

    def delete_folder(folder, *args):
        shutil.rmtree(folder)
        return real(folder, *args)
    monkeypatch.setattr(runs, "save_epoch", delete_folder)
    code, out, err = dry_run(capsys, data_dir, tmp_path)
    assert code == 1 and "No such file or directory" in err.splitlines()[-1] and "Traceback" not in err
    assert os.listdir(tmp_path) == []


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
    """The original's way to flatten, x.view(-1, ...), in a model wide enough for channels_last."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 32, 3)
        self.fc = nn.Linear(32 * 26 * 26, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(F.relu(self.conv(x)).view(-1, 32 * 26 * 26)), dim=1)


def test_a_model_whose_layers_do_not_fit_is_one_line_at_the_learner_s_line(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(model_py.MODELS, "Narrowed", Narrowed)
    code, out, err = run_main(capsys, "--model", "Narrowed", "--dry-run", "--data-dir", data_dir, "--out-dir", tmp_path)
    lines, first = inspect.getsourcelines(model_py.Net.forward)
    line = first + next(i for i, text in enumerate(lines) if "self.conv2(x)" in text)
    assert code == 1 and f"error: model.py:{line} in forward: RuntimeError: " in err and "32 channels" in err
    assert len(err.strip().splitlines()) == 1 and "--traceback" in err and os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):  # the whole trace, one flag away
        main_mnist.main(["--model", "Narrowed", "--dry-run", "--data-dir", data_dir, "--out-dir", str(tmp_path),
                         "--traceback"])


def test_view_flattening_and_a_model_without_a_recipe_train(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(model_py.MODELS, "ViewFlattened", ViewFlattened)
    code, out, err = run_main(capsys, "--model", "ViewFlattened", "--dry-run", "--epochs", "1", "--data-dir", data_dir,
                              "--out-dir", tmp_path)
    assert main_mnist.memory_format(ViewFlattened()) == torch.channels_last
    assert code == 0 and "[recipe]" not in out and "trains in the contiguous one" in out, err
    monkeypatch.setattr(main_mnist, "build_model", lambda hp: torch.compile(ViewFlattened(), backend="eager"))
    code, out, err = run_main(capsys, "--model", "ViewFlattened", "--dry-run", "--epochs", "1", "--data-dir", data_dir,
                              "--out-dir", tmp_path / "compiled")
    assert code == 0 and "trains in the contiguous one" in out, err


class WithDropout(nn.Module):
    """A model with a constructor argument, as a learner adds one: DROPOUT in the block reaches it."""

    def __init__(self, dropout=0.1):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(self.drop(x.flatten(1))), dim=1)


def test_a_setting_named_as_a_model_argument_reaches_it_and_one_nothing_reads_is_said(capsys, data_dir, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setitem(model_py.MODELS, "WithDropout", WithDropout)
    monkeypatch.setitem(main_mnist.BLOCK, "DROPOUT", 0.1)
    monkeypatch.setitem(main_mnist.BLOCK, "UNREAD", 7)
    built = []
    real = main_mnist.build_model
    monkeypatch.setattr(main_mnist, "build_model", lambda hp: built.append(real(hp)) or built[-1])
    code, out, err = run_main(capsys, "--model", "WithDropout", "--dropout", "0.25", "--dry-run", "--epochs", 1,
                              "--data-dir", data_dir, "--out-dir", tmp_path)
    record = runs.read_json(os.path.join(only_run(tmp_path), runs.RECORD))
    assert code == 0 and built[0].drop.p == 0.25 and record["structure"]["arguments"] == {"dropout": 0.25}, err
    assert "UNREAD" in record["unused_settings"] and "DROPOUT" not in record["unused_settings"]
    assert re.search(r"Settings nothing read in this run: .*UNREAD", out)
    monkeypatch.setattr(main_mnist, "build_model", lambda hp: WithDropout())  # an edit that passes no argument
    assert run_main(capsys, "--model", "WithDropout", "--dry-run", "--epochs", 1, "--data-dir", data_dir, "--out-dir",
                    tmp_path / "ignored")[0] == 0
    record = runs.read_json(os.path.join(only_run(tmp_path / "ignored"), runs.RECORD))
    assert record["structure"]["arguments"] == {} and "DROPOUT" in record["unused_settings"]


@pytest.mark.parametrize("model, name, value, words", [
    ("Net", "LR", "0.01", "LR (main_mnist.py:{line}) must be a number, not '0.01'"),
    ("Net", "EPOCHS", 2.5, "EPOCHS (main_mnist.py:{line}) must be a whole number, not 2.5"),
    ("FastNet", "NESTEROV", "False", "NESTEROV (main_mnist.py:{line}) is the string 'False': write False without "
                                     "quotes")])  # though FastNet's recipe sets its own
def test_a_bad_value_written_in_the_block_is_named_at_its_line(monkeypatch, model, name, value, words):
    with open(main_mnist.__file__) as f:
        lines = f.read().splitlines()
    line = 1 + next(i for i, text in enumerate(lines) if text.startswith(f"{name} = "))
    monkeypatch.setitem(main_mnist.BLOCK, name, value)
    args = settings.parse_args(["--model", model], main_mnist.BLOCK, main_mnist.RECIPES)
    with pytest.raises(UserError, match=re.escape(words.format(line=line))):
        settings.merge(main_mnist.BLOCK, main_mnist.RECIPES, args.given)


def test_a_setting_a_learner_adds_is_checked_and_one_misspelt_in_their_code_is_named_there(capsys, data_dir, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setitem(main_mnist.BLOCK, "NORM", "1e-5")  # a number in quotes: it may be a name, but it is said
    assert "NORM='1e-5' (main_mnist.py) is a string: a number is written without quotes" in settings.merge(
        main_mnist.BLOCK, main_mnist.RECIPES, {})[2]
    monkeypatch.delitem(main_mnist.BLOCK, "NORM")
    monkeypatch.setitem(main_mnist.BLOCK, "L1", 1e-5)

    def loss_function(model, hp):
        return lambda output, target: F.nll_loss(output, target) + hp["l1"] * sum(p.abs().sum() for p in model.parameters())
    monkeypatch.setattr(main_mnist, "loss_function", loss_function)
    code, out, err = run_main(capsys, "--model", "FastNet", "--dry-run", "--epochs", 1, "--data-dir", data_dir,
                              "--out-dir", tmp_path)
    line = inspect.getsourcelines(loss_function)[1] + 1
    assert code == 1 and f"error: tests/test_main.py:{line} in <lambda> (raised in machinery/settings.py:" in err, err
    assert "KeyError: " in err and "L1?" in err


def test_numbers_take_whole_or_decimal_values_and_a_recipe_s_override_of_the_block_is_named(monkeypatch):
    monkeypatch.setitem(main_mnist.RECIPES, "FastNet", {**main_mnist.RECIPES["FastNet"], "CROP_P": 0})
    monkeypatch.setitem(main_mnist.BLOCK, "BATCH_SIZE", 64)
    args = settings.parse_args(["--model", "FastNet", "--crop-p", "0.3", "--epochs", "2.0"], main_mnist.BLOCK,
                               main_mnist.RECIPES)
    hp, sources, notes = settings.merge(main_mnist.BLOCK, main_mnist.RECIPES, args.given)
    assert hp["CROP_P"] == 0.3 and hp["EPOCHS"] == 2 and type(hp["EPOCHS"]) is int and sources["CROP_P"] == "flag"
    assert sources["BATCH_SIZE"] == "recipe" and "BATCH_SIZE=64" in notes[0] and "RECIPES['FastNet']" in notes[0]
    assert "CROP_P" not in notes[0]  # the flag set it, not the recipe
    monkeypatch.setitem(main_mnist.BLOCK, "LABEL_SMOOTHING", 0)  # "0: off", as its comment says; FastNet12 sets 0.1
    args = settings.parse_args(["--model", "FastNet12"], main_mnist.BLOCK, main_mnist.RECIPES)
    assert settings.merge(main_mnist.BLOCK, main_mnist.RECIPES, args.given)[0]["LABEL_SMOOTHING"] == 0.1
    monkeypatch.setitem(main_mnist.RECIPES, "FastNet", {"EPOCH": 2})  # a typo
    with pytest.raises(UserError, match=re.escape("RECIPES['FastNet'] in main_mnist.py sets EPOCH, which the block "
                                                  "above it does not have: EPOCHS?")):
        settings.merge(main_mnist.BLOCK, main_mnist.RECIPES, {})
    monkeypatch.setitem(main_mnist.RECIPES, "FastNet", {"LR": -1})
    with pytest.raises(UserError, match=r"LR \(RECIPES\['FastNet'\] at main_mnist.py:\d+\) must be from 1e-12"):
        settings.merge(main_mnist.BLOCK, main_mnist.RECIPES, {"MODEL": "FastNet"})


def test_a_device_that_is_not_there_is_one_line_and_bfloat16_only_where_native(capsys, monkeypatch):
    import utils
    if not torch.cuda.is_available():
        code, out, err = run_main(capsys, "--device", "cuda", "--dry-run")
        assert code == 1 and "DEVICE cuda: there is no such device" in err
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: emulated
    assert not utils.bfloat16_is_native(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    assert utils.bfloat16_is_native(torch.device("cuda"))


def test_a_loss_that_sees_the_model_is_recorded_and_the_test_loss_stays_the_digits_own(capsys, data_dir, tmp_path,
                                                                                        monkeypatch):
    def loss_function(model, hp):  # an L1 penalty, as docs/changing.md shows it
        def loss(output, target):
            return F.nll_loss(output, target) + 0.01 * sum(p.abs().sum() for p in model.parameters())
        return loss
    monkeypatch.setattr(main_mnist, "loss_function", loss_function)
    code, out, err = dry_run(capsys, data_dir, tmp_path)
    record = runs.read_json(os.path.join(only_run(tmp_path), runs.RECORD))
    row = record["history"][-1]
    assert code == 0 and "p.abs().sum()" in record["loss"] and record["test_loss"] == "F.nll_loss", err
    assert row["train_loss"] > 10 > 3 > row["test_loss"]  # the penalty is trained on, not tested


def test_a_compiled_model_saves_a_model_pt_that_loads(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(main_mnist, "build_model", lambda hp: torch.compile(model_py.MODELS[hp["MODEL"]](),
                                                                            backend="eager"))
    assert dry_run(capsys, data_dir, tmp_path)[0] == 0
    from machinery.tools import load_model
    name, model, knows = load_model(os.path.join(only_run(tmp_path), runs.FINAL_MODEL), torch.device("cpu"))
    record = runs.read_json(os.path.join(only_run(tmp_path), runs.RECORD))
    assert name == "FastNet" and "bank" in knows and record["compiled"] is True


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


def test_compare_lists_runs_and_one_line_for_each_damaged_one(capsys, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # a terminal wide enough for a line per run
    assert dry_run(capsys, data_dir, tmp_path)[0] == 0
    good = only_run(tmp_path)
    for name, text in [("deep", "[" * 200_000 + "]" * 200_000), ("digits", '{"model": ' + "9" * 200_001 + "}"),
                       ("huge", '{"model": "Net", "seconds": 1e400}'), ("code", '{"code": "abc"}')]:
        os.mkdir(tmp_path / name)
        (tmp_path / name / runs.RECORD).write_text(text)
        (tmp_path / name / runs.METRICS).write_text("epoch\n1\n")
    os.mkdir(tmp_path / "fifo")
    os.mkfifo(tmp_path / "fifo" / runs.RECORD)
    shutil.copytree(good, tmp_path / "dollar")  # a setting's value in the figure's legend is no TeX
    record = runs.read_json(os.path.join(good, runs.RECORD))
    record["settings"]["TAG"] = "$HOME/mnist_$x"
    (tmp_path / "dollar" / runs.RECORD).write_text(json.dumps(record))
    code, out, err = run_main(capsys, "--compare", "--out-dir", tmp_path)
    assert code == 0, err
    assert re.search(rf"{os.path.basename(good)}\s+FastNet\s+finished", out)
    assert all(re.search(rf"^{name}\s+damaged or unreadable", out, re.MULTILINE)
               for name in ("deep", "digits", "huge", "code", "fifo"))
    assert os.path.isfile(tmp_path / "comparison.png")
    assert run_main(capsys, "--eval-only", os.path.join(good, runs.FINAL_MODEL), "--dry-run", "--data-dir", data_dir,
                    "--out-dir", tmp_path)[0] == 0
    code, out, err = run_main(capsys, "--compare", good + os.sep, tmp_path / "typo", "--out-dir", tmp_path)
    assert code == 1 and re.search(rf"^{os.path.basename(good)}\s+FastNet", out, re.MULTILINE)  # a trailing / too
    assert "typo  no run here" in out and "_eval" not in out  # an --eval-only folder is no run
    assert "_eval" not in run_main(capsys, "--compare", "--out-dir", tmp_path)[1]
    evaluated = next(name for name in os.listdir(tmp_path) if name.endswith("_eval"))
    code, out, err = run_main(capsys, "--compare", os.path.join(good, runs.RECORD), tmp_path / evaluated,
                              "--out-dir", tmp_path)  # a run's run.json names its run; an --eval-only folder is said
    assert code == 1 and re.search(rf"^{os.path.basename(good)}\s+FastNet", out, re.MULTILINE)
    assert f"{evaluated}  no training run" in out
    monkeypatch.chdir(good)  # run.json of the folder one is in
    assert re.search(rf"^{os.path.basename(good)}\s+FastNet", run_main(capsys, "--compare", runs.RECORD, "--out-dir",
                                                                      tmp_path)[1], re.MULTILINE)


def test_find_lr_suggests_an_lr_and_draws_its_curve(capsys, data_dir, tmp_path):
    code, out, err = run_main(capsys, "--model", "FastNet", "--find-lr", "--dry-run", "--data-dir", data_dir,
                              "--out-dir", tmp_path)
    assert code == 0, err
    assert re.search(r"Suggested lr: [\d.e-]+", out)
    assert os.path.isfile(os.path.join(only_run(tmp_path), "lr_finder.png"))


def test_eval_only_writes_robustness_curves_into_a_folder_of_its_own(capsys, data_dir, trained, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setitem(main_mnist.BLOCK, "DATASET", "FashionMNIST")  # not here: the run's own MNIST is read
    code, out, err = run_main(capsys, "--eval-only", os.path.join(trained, runs.FINAL_MODEL), "--dry-run",
                              "--data-dir", data_dir, "--out-dir", tmp_path)
    folder = only_run(tmp_path)
    assert code == 0, err
    assert {"robustness.csv", "robustness.png", "reliability.png", runs.RECORD, runs.CALIBRATION, runs.FINAL_MODEL} \
        <= set(os.listdir(folder))
    assert json.loads(open(os.path.join(folder, runs.RECORD)).read())["mode"] == "eval-only"
    with open(os.path.join(folder, "robustness.csv")) as f:  # names with commas in them quoted
        assert {row["family"] for row in csv.DictReader(f)} == set(FAMILIES)
    from machinery.tools import load_model
    name, model, knows = load_model(folder, torch.device("cpu"))  # what predict.py --model FOLDER reads
    assert name == "FastNet" and {"bank", "bases", "limits"} <= set(knows)


def test_the_gpu_check_runs_on_any_device_and_says_where_bfloat16_was_not_native(data_dir):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--models", "FastNet",
                           "--data-dir", data_dir, "--", "--dry-run"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(main_mnist.__file__)))
    rows = [line for line in done.stdout.splitlines() if line.startswith("| FastNet |")]
    assert len(rows) == 2 and "| float32 |" in rows[0] and "Seed 1's accuracy" in done.stdout, done.stderr
    if "| float32 |" in rows[1]:  # no native bfloat16 here: the same computation twice, the same accuracy
        assert done.returncode == 0 and "both rows ran in float32" in done.stdout


def test_the_record_says_what_was_built_and_model_pt_loads_as_pytorch_s_examples_load_it(trained):
    record = runs.read_json(os.path.join(trained, runs.RECORD))
    model = model_py.MODELS[record["model"]]()
    model.load_state_dict(torch.load(os.path.join(trained, runs.FINAL_MODEL)))  # as pytorch/examples do
    assert record["structure"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert record["structure"] == runs.structure(model, {}) and record["code"]["files"] == runs.code_version()["files"]
    assert record["model_pt_epoch"] == record["history"][-1]["epoch"] and record["compiled"] is False
    assert "F.cross_entropy" in record["loss"] and record["id"] == torch.load(
        os.path.join(trained, runs.CHECKPOINT), weights_only=True)["id"]
    lrs = [lr for _, lr in record["lr_curve"]]  # the one-cycle as it moved, its peak included
    assert max(lrs) == pytest.approx(record["settings"]["LR"], rel=0.05) and lrs[0] < lrs[-1] * 1e6


def test_every_key_of_an_epoch_s_row_is_plotted_and_the_lr_as_the_schedule_moved_it():
    from machinery.figures import plot_metrics
    history = [dict(epoch=e, train_loss=1 / e, test_loss=1.1 / e, val_loss=1.2 / e, train_acc=90 + e,
                    test_acc=91 + e, val_acc=89 + e, gap=e / 10, lr=0.1, seconds=1.0) for e in (1, 2, 3)]
    figure = plot_metrics(history, [[0, 0.01], [0.3, 0.5], [3, 0.001]], "a run")
    labels = {line.get_label() for ax in figure.axes for line in ax.get_lines()}
    assert {"train_loss", "test_loss", "val_loss", "train_acc", "test_acc", "val_acc", "gap"} <= labels
    assert any(list(line.get_ydata()) == [0.01, 0.5, 0.001] for ax in figure.axes for line in ax.get_lines())


def test_a_learner_s_edited_copy_flows_through_files_plot_and_compare(capsys, data_dir, tmp_path, monkeypatch):
    """The course's exercise, in a copy of the repo: GroupNorm for BatchNorm, a key added to the epoch's row."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    copy = tmp_path / "copy"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "data", "__pycache__"))
    model_text = (copy / "model.py").read_text()
    (copy / "model.py").write_text(model_text.replace("nn.BatchNorm2d(out_channels)", "nn.GroupNorm(4, out_channels)"))
    main_text = (copy / "main_mnist.py").read_text()
    assert "test_acc=test_acc, " in main_text and "BatchNorm2d(out_channels)" in model_text
    (copy / "main_mnist.py").write_text(main_text.replace("test_acc=test_acc, ", "test_acc=test_acc, "
                                                                               "gap=train_acc - test_acc, "))
    flags = ["--model", "FastNet", "--dry-run", "--data-dir", data_dir, "--out-dir", tmp_path / "runs"]
    assert run_main(capsys, *flags, "--seed", "2")[0] == 0  # a run without the key, listed first
    plain = only_run(tmp_path / "runs")
    done = subprocess.run([sys.executable, copy / "main_mnist.py", *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    edited = next(str(f) for f in (tmp_path / "runs").iterdir() if str(f) != plain)
    assert "gap" in metrics(edited)[0] and "gap" in runs.read_json(os.path.join(edited, runs.RECORD))["history"][0]
    assert "GroupNorm" in " ".join(runs.read_json(os.path.join(edited, runs.RECORD))["structure"]["layers"])
    monkeypatch.setenv("COLUMNS", "100")  # narrower than the table: a line per key, a column per run
    drawn = []
    monkeypatch.setattr(tools, "plot_comparison", lambda curves: drawn.extend(curves) or plot_comparison(curves))
    code, out, err = run_main(capsys, "--compare", "--out-dir", tmp_path / "runs")
    keys = [line.split()[0] for line in out.splitlines()]
    assert code == 0 and {"run", "gap", "structure", "code", "SEED"} <= set(keys) and "finished (dry run)" in out, err
    assert keys.index("gap") < keys.index("SEED")  # with the epoch's other keys, before the settings that differ
    assert sorted(label.split()[-1] for label, history in drawn) == ["SEED=1", "SEED=2"]  # the legend tells them apart
    assert max(len(line) for line in out.splitlines() if not line.startswith("Saved:")) <= 100
    assert "Saved:" in out and "(dry runs only)" in out
    (copy / "main_mnist.py").write_text(main_text.replace("DRY_RUN = False", "NORM = None\nDRY_RUN = False"))
    done = subprocess.run([sys.executable, copy / "main_mnist.py", *flags], capture_output=True, text=True)
    line = 1 + main_text.splitlines().index(next(t for t in main_text.splitlines() if t.startswith("DRY_RUN = ")))
    assert done.returncode == 1 and f"NORM (main_mnist.py:{line}) must be a number, a string" in done.stderr


def test_the_layers_point_one_way(tmp_path):
    """machinery/ uses the core (utils, model, augment); the core, predict.py and app.py never import main_mnist,
    and no import circle, lazy imports included."""
    import ast
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [name for name in os.listdir(repo) if name.endswith(".py")] + \
        [os.path.join("machinery", n) for n in os.listdir(os.path.join(repo, "machinery")) if n.endswith(".py")]
    imports = {}
    for name in files:
        module = name[:-3].replace(os.sep, ".").removesuffix(".__init__")
        tree = ast.parse(open(os.path.join(repo, name)).read())
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
            {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imports[module] = {m for m in found if m.split(".")[0] in {f[:-3].split(os.sep)[0] for f in files}} - {module}
    for core in ("utils", "model", "augment"):
        assert not {m for m in imports[core] if m.startswith(("machinery", "main_mnist"))}, core
    assert not any("main_mnist" in imports[m] for m in imports if m != "main_mnist")

    def reaches(start, target, seen=()):
        return any(m == target or (m not in seen and reaches(m, target, seen + (m,))) for m in imports.get(start, ()))
    assert not [m for m in imports if reaches(m, m)]
