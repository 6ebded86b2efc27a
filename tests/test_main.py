import contextlib
import csv
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import main_mnist
from machinery import hardware, records, robustness, settings
import utils
from conftest import REPO
from model import CompactNet, Net

FAST = ["--batch-size", "16", "--test-batch-size", "16"]  # tiny_mnist: 4 training and 2 test batches per epoch
EXTENSIBLE = ["--schedule", "step"]  # a run that --resume --epochs N may lengthen (a one-cycle run's length is fixed)
HELPS = settings.setting_comments(main_mnist.__file__)


def run_script(*args, **kwargs):
    """main_mnist.py as a user runs it, in a subprocess; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, os.path.join(REPO, "main_mnist.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300, **kwargs)


def read_metrics(out_dir, drop=("seconds",)):
    with open(os.path.join(out_dir, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


@pytest.fixture
def cpu_only(monkeypatch):
    """Runs on the CPU even where a GPU is: the same-seed and exact-resume promises are the CPU's (CUDA's
    kernels may add in a different order from run to run)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(main_mnist, "pick_device", lambda: torch.device("cpu"))


def exit_message(argv):
    """Runs main() in this process and returns what it exits with (the error message, or a code)."""
    with pytest.raises(SystemExit) as stop:
        main_mnist.main(argv)
    return stop.value.code


# ---- Command line ----

def help_of(flag, text):
    """The help text of one flag in --help's output, on one line."""
    line = next(line for line in text.splitlines() if line.strip().startswith(flag))
    return " ".join(text[text.index(line):].split("\n  --")[0].split())


@pytest.fixture(scope="module")
def help_text():
    """What `python3 main_mnist.py --help` prints (run in this process: the help is the parser's alone)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main_mnist.main(["--help"])
    assert stop.value.code == 0
    return out.getvalue()


def test_help_lists_every_hyperparameter_with_its_default(help_text):
    for name, default in main_mnist.SETTINGS.items():
        assert f"(default: {default}" in help_of(settings.flag_name(name), help_text)
    for flag in ("--dry-run", "--resume", "--eval-only", "--find-lr", "--compare"):
        assert flag in help_text


def settings_of(argv):
    """The settings a run with these flags would use: main_mnist.py's block, the model's recipe, the flags."""
    return settings.resolve(settings.parse_args(argv, main_mnist.SETTINGS, main_mnist.RECIPES, HELPS), main_mnist.SETTINGS,
                         main_mnist.RECIPES)


def test_flags_override_the_constants_and_the_rest_keep_them():
    flags = {"EPOCHS": 7, "BATCH_SIZE": 96, "LR": 0.0375, "AMP": not main_mnist.AMP, "OUT_DIR": "elsewhere"}
    hp = settings_of(["--epochs", "7", "--batch-size", "96", "--lr", "0.0375", "--amp" if flags["AMP"] else "--no-amp",
                      "--out-dir", "elsewhere"])
    assert hp == {**main_mnist.SETTINGS, **flags}


def test_model_selects_its_recipe_and_flags_still_override_it():
    compact = settings_of(["--model", "CompactNet"])
    assert compact == {**main_mnist.SETTINGS, **main_mnist.RECIPES["CompactNet"], "MODEL": "CompactNet"}
    overridden = settings_of(["--model", "CompactNet", "--epochs", "3", "--lr", "0.1"])
    assert overridden == {**compact, "EPOCHS": 3, "LR": 0.1}


def test_a_model_chosen_in_the_block_trains_with_the_block_as_it_is(monkeypatch):
    monkeypatch.setitem(main_mnist.SETTINGS, "MODEL", "CompactNet")  # as if MODEL = "CompactNet" were edited in
    assert settings_of([]) == main_mnist.SETTINGS  # no recipe replaces what the block says


def test_help_shows_every_recipe(help_text):
    out = help_text
    assert "--model {" + ",".join(main_mnist.MODELS) + "}" in out  # every model, with a recipe or not
    for model, recipe in main_mnist.RECIPES.items():
        for name, value in recipe.items():
            assert f"; {model}: {value}" in help_of(settings.flag_name(name), out)


@pytest.mark.parametrize("argv, named", [
    (["--epochs", "0"], "EPOCHS"),
    (["--batch-size", "-4"], "BATCH_SIZE"),
    (["--lr", "0"], "LR"),
    (["--lr", "nan"], "LR"),
    (["--momentum", "1.5"], "MOMENTUM"),
    (["--gamma", "0"], "GAMMA"),
    (["--nesterov", "--momentum", "0"], "NESTEROV"),
])
def test_out_of_range_hyperparameters_stop_before_any_work(argv, named, tmp_path, capsys):
    assert exit_message(argv + ["--out-dir", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "error: " in message and named in message and len(message.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_every_setting_has_its_meaning_from_the_comment_beside_it(help_text):
    assert list(main_mnist.SETTINGS)[:3] == ["MODEL", "EPOCHS", "BATCH_SIZE"] and "RECIPES" not in main_mnist.SETTINGS
    help_text = " ".join(help_text.split())
    for name in main_mnist.SETTINGS:
        assert f"{settings.flag_name(name)} " in help_text and " ".join(HELPS[name].split()) in help_text
    batch = f"(default: {main_mnist.BATCH_SIZE}; CompactNet: {main_mnist.RECIPES['CompactNet']['BATCH_SIZE']})"
    assert f"{HELPS['BATCH_SIZE']} {batch}" in help_text


@pytest.mark.parametrize("argv, named", [
    (["--epochs", "two"], "--epochs"),
    (["--lr", "fast"], "--lr"),
    (["--epoch", "3"], "--epoch"),
    (["--model", "ResNet"], "--model"),
])
def test_non_numbers_and_unknown_flags_get_one_line_and_exit_code_2(argv, named, capsys):
    assert exit_message(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err


def test_an_output_folder_that_cannot_be_written_is_found_before_training(tiny_mnist, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    message = exit_message(["--data-dir", tiny_mnist, "--out-dir", str(blocker / "out")])
    assert message.startswith("error: cannot write to the output folder") and str(blocker) in message


# ---- Runs end to end ----

def test_dry_run_end_to_end_on_real_mnist_writes_the_three_outputs(real_data_dir, tmp_path):
    out_dir = tmp_path / "out"
    result = run_script("--model", "Net", "--epochs", "1", "--dry-run", "--data-dir", real_data_dir, "--out-dir",
                        str(out_dir))
    assert result.returncode == 0, result.stderr
    assert "Total params: 593,200" in result.stdout and "Epoch 1/1" in result.stdout
    assert "Train: 100%" in result.stderr  # the tqdm bar
    rows = read_metrics(out_dir, drop=())
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"]
    with open(out_dir / "accuracy_loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # The saved model is the one that was scored: it gets the same accuracy on the dry run's one test batch
    model = Net().to(memory_format=torch.channels_last)
    model.load_state_dict(torch.load(out_dir / "model.pt", weights_only=True))
    record = json.loads((out_dir / "run.json").read_text())
    amp = record["precision"].startswith("bfloat16")
    test_batch = utils.get_testloader(real_data_dir, main_mnist.TEST_BATCH_SIZE, max_batches=1)
    assert len(rows) == 1 and float(rows[0]["test_acc"]) == pytest.approx(
        utils.test(model, "cpu", test_batch, F.nll_loss, amp)[1], abs=1e-4)
    for name in ("metrics.csv", "accuracy_loss.png", "model.pt", "run.json"):
        assert str(out_dir / name) in result.stdout  # the paths are printed at the end
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Settings (") and "MODEL=Net [flag]" in result.stdout  # first, what the run uses
    assert f"Run folder: {out_dir}" in lines


def test_same_seed_same_metrics(tiny_mnist, tmp_path, cpu_only):
    for name in ("a", "b"):
        main_mnist.main(["--data-dir", tiny_mnist, "--out-dir", str(tmp_path / name), "--epochs", "2", *FAST])
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")


def test_a_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(tiny_mnist, tmp_path, cpu_only):
    common = ["--data-dir", tiny_mnist, *FAST, *EXTENSIBLE]
    main_mnist.main(common + ["--out-dir", str(tmp_path / "whole"), "--epochs", "3"])
    main_mnist.main(common + ["--out-dir", str(tmp_path / "split"), "--epochs", "1"])
    main_mnist.main(["--resume", str(tmp_path / "split" / "checkpoint.pt"), "--epochs", "3"])
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [row["epoch"] for row in split] == ["1", "2", "3"]
    assert split == whole
    checkpoint = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["hyperparameters"]["MODEL"] == main_mnist.MODEL
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "history", "rng"}


@pytest.mark.parametrize("stop_signal, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 130),
                                                    (signal.SIGHUP, 129)])  # SIGHUP: the terminal closed
def test_a_signal_stops_cleanly_and_the_run_resumes_exactly(real_data_dir, tmp_path, stop_signal, exit_code, cpu_only):
    out_dir = tmp_path / "out"
    common = ["--dry-run", "--data-dir", real_data_dir, *FAST, *EXTENSIBLE]
    process = subprocess.Popen([sys.executable, "main_mnist.py", *common, "--epochs", "1000", "--out-dir",
                                str(out_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out_dir / "metrics.csv").exists() or len(read_metrics(out_dir)) < 2:
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == exit_code
    assert "Traceback" not in stderr
    resume_command = f"python3 main_mnist.py --resume {out_dir / 'checkpoint.pt'} --dry-run"
    assert resume_command in stderr
    done = torch.load(out_dir / "checkpoint.pt", weights_only=True)["epoch"]
    assert len(read_metrics(out_dir)) == done >= 2
    record = json.loads((out_dir / "run.json").read_text())
    assert record["status"] == "stopped" and record["epochs_done"] == done

    main_mnist.main(resume_command.split()[2:] + ["--epochs", str(done + 1)])
    main_mnist.main(common + ["--epochs", str(done + 1), "--out-dir", str(tmp_path / "whole")])
    assert read_metrics(out_dir) == read_metrics(tmp_path / "whole")


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_mnist, tmp_path, monkeypatch):
    def train_that_blows_up_from_epoch_2(model, device, loader, optimizer, criterion, *args, **kwargs):
        if optimizer.state:  # a step has been taken: this is the second epoch or a later one
            criterion = lambda output, target: F.nll_loss(output, target) * torch.nan  # noqa: E731
        return utils.train(model, device, loader, optimizer, criterion, *args, **kwargs)

    monkeypatch.setattr(main_mnist, "train", train_that_blows_up_from_epoch_2)
    out_dir = tmp_path / "out"
    message = exit_message(["--data-dir", tiny_mnist, "--out-dir", str(out_dir), *FAST, "--epochs", "5"])
    assert message.startswith("error: the training loss became nan") and "in epoch 2" in message
    assert "try a lower --lr" in message
    assert f"checkpoint of epoch 1 is kept in {out_dir / 'checkpoint.pt'}" in message
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and len(read_metrics(out_dir)) == 1
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())
    assert not (out_dir / "model.pt").exists()


def test_a_far_too_high_learning_rate_stops_the_run_with_advice(tiny_mnist, tmp_path):
    out_dir = tmp_path / "out"
    message = exit_message(["--data-dir", tiny_mnist, "--out-dir", str(out_dir), *FAST, "--epochs", "50",
                            "--lr", str(settings.LARGEST_RATE)])  # the largest the parser takes
    assert message.startswith(("error: the training loss became", "error: the weights became"))
    assert "lower --lr" in message and not (out_dir / "model.pt").exists()
    if (out_dir / "checkpoint.pt").exists():  # only if an epoch ended before the blow-up: then it is a good one
        checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


def test_resuming_with_a_changed_optimizer_setting_or_nothing_left_to_do_is_refused(tiny_mnist, tmp_path):
    main_mnist.main(["--data-dir", tiny_mnist, "--out-dir", str(tmp_path), "--epochs", "1", *FAST])
    checkpoint = str(tmp_path / "checkpoint.pt")
    message = exit_message(["--resume", checkpoint, "--lr", "0.5", "--epochs", "2"])
    assert "keeps its hyperparameters" in message and "LR" in message
    assert "ends at epoch 1, so there is nothing left to train" in exit_message(["--resume", checkpoint])


@pytest.mark.parametrize("content, expected", [
    (None, "no checkpoint at"),
    (b"these are not the weights you are looking for", "is not a checkpoint this script can read"),
    ("model.pt", "holds only model weights"),
])
def test_bad_resume_paths_get_a_clear_message(tmp_path, content, expected):
    path = tmp_path / "checkpoint.pt"
    if content == "model.pt":
        torch.save(Net().state_dict(), path)
    elif content is not None:
        path.write_bytes(content)
    message = exit_message(["--resume", str(path)])
    assert message.startswith("error: ") and expected in message


def test_resuming_a_checkpoint_as_another_model_is_refused(tiny_mnist, tmp_path):
    main_mnist.main(["--model", "Net", "--data-dir", tiny_mnist, "--out-dir", str(tmp_path), "--epochs", "1", *FAST])
    message = exit_message(["--resume", str(tmp_path / "checkpoint.pt"), "--model", "CompactNet"])
    assert "belongs to a Net run" in message


def test_compact_net_trains_with_its_one_cycle_recipe_and_prints_its_summary(tiny_mnist, tmp_path, capsys):
    main_mnist.main(["--model", "CompactNet", "--data-dir", tiny_mnist, "--out-dir", str(tmp_path), "--epochs", "2",
                     *FAST])
    out = capsys.readouterr().out
    assert f"Total params: {sum(p.numel() for p in CompactNet().parameters()):,}" in out and "Epoch 2/2" in out
    assert "SCHEDULE=onecycle [recipe]" in out and "EPOCHS=2 [flag]" in out
    rows = read_metrics(tmp_path)
    peak = main_mnist.RECIPES["CompactNet"]["LR"]
    # metrics.csv's lr is the one each epoch begins with: one cycle starts at a 25th of its peak (OneCycleLR's
    # div_factor), and the second of two epochs begins past the peak (at 30% of the run), on the way down.
    assert float(rows[0]["lr"]) == pytest.approx(peak / 25, rel=1e-5) and float(rows[1]["lr"]) < peak
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["hyperparameters"]["MODEL"] == "CompactNet"


def test_a_fresh_run_does_not_overwrite_an_unfinished_one(tiny_mnist, tmp_path):
    out_dir = str(tmp_path / "out")
    process_args = ["--data-dir", tiny_mnist, "--out-dir", out_dir, *FAST]
    main_mnist.main(process_args + ["--epochs", "1"])
    checkpoint = torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)
    checkpoint["hyperparameters"]["EPOCHS"] = 5  # as if stopped after epoch 1 of 5, before a model.pt
    torch.save(checkpoint, os.path.join(out_dir, "checkpoint.pt"))
    os.remove(os.path.join(out_dir, "model.pt"))
    message = exit_message(process_args + ["--epochs", "5"])
    assert "holds an unfinished run (epoch 1 of 5)" in message
    assert f"python3 main_mnist.py --resume {os.path.join(out_dir, 'checkpoint.pt')}" in message


def test_a_damaged_data_file_stops_the_script_with_its_name(real_data_dir, tmp_path):
    data_dir = tmp_path / "data"
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in os.listdir(os.path.join(real_data_dir, "MNIST", "raw")):
        if name.endswith(".gz"):
            (raw / name).write_bytes(open(os.path.join(real_data_dir, "MNIST", "raw", name), "rb").read())
    damaged = raw / "train-labels-idx1-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    message = exit_message(["--data-dir", str(data_dir), "--out-dir", str(tmp_path / "out"), "--dry-run"])
    assert message.startswith(f"error: {damaged} is damaged") and "\n" not in message


def test_missing_data_and_no_network_stop_the_script_within_seconds(tmp_path, no_network):
    started = time.monotonic()
    message = exit_message(["--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "out")])
    assert time.monotonic() - started < 20
    assert "could not be downloaded" in message and os.path.join(str(tmp_path / "empty"), "MNIST", "raw") in message


# ---- Real data ----

# The original's recipe, as flags: what a test of it trains, whatever the block says now (docs/changing.md).
ORIGINAL = ["--model", "Net", "--lr", "0.01", "--momentum", "0.9", "--no-nesterov", "--weight-decay", "0",
            "--schedule", "step", "--rotation", "15", "--crop-p", "0.1", "--crop-size", "22", "--shift", "0"]


def test_the_originals_net_learns_real_digits_in_a_tenth_of_an_epoch(real_data_dir):
    # The original's functions as a learner calls them: 100 SGD steps of 64 real, augmented images (a tenth of an
    # epoch: 88% on an AVX512-BF16 CPU; a whole epoch reaches 97-98%) take Net from chance past 80% on all 10,000
    # test digits.
    torch.manual_seed(main_mnist.SEED)
    hp = settings_of(ORIGINAL)
    train_loader = utils.get_trainloader(real_data_dir, 64, max_batches=100, augmentation=hp)
    test_loader = utils.get_testloader(real_data_dir, 1000)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=hp["LR"], momentum=hp["MOMENTUM"])
    amp = hardware.use_bfloat16("cpu", hp["AMP"])
    utils.train(model, "cpu", train_loader, optimizer, F.nll_loss, amp=amp)
    _, accuracy = utils.test(model, "cpu", test_loader, F.nll_loss, amp)
    assert accuracy >= 80.0


# ---- Evaluate only ----

def test_eval_only_scores_a_saved_model_and_writes_the_diagnostics(tiny_mnist, tmp_path, capsys):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    main_mnist.main(["--data-dir", tiny_mnist, "--out-dir", str(train_dir), "--epochs", "1", *FAST])
    trained = read_metrics(train_dir)[-1]["test_acc"]
    capsys.readouterr()
    for saved in ("model.pt", "checkpoint.pt"):
        main_mnist.main(["--eval-only", "--checkpoint", str(train_dir / saved), "--data-dir", tiny_mnist,
                         "--out-dir", str(eval_dir / saved)])
        out = capsys.readouterr().out
        assert f"({float(trained):.2f}%)" in out  # the same accuracy as at the end of training
        assert "Per-class test accuracy: 0:" in out
        for name in ("misclassified.png", "confusion_matrix.png", records.RELIABILITY, records.ROBUSTNESS_PLOT):
            with open(eval_dir / saved / name, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert not (eval_dir / saved / "metrics.csv").exists()  # nothing trained
        # the robustness curves, their mean in run.json, and the calibration
        record = records.read_record(str(eval_dir / saved))
        curves = records.read_robustness(str(eval_dir / saved))
        assert set(curves) == set(robustness.FAMILIES) and record["robustness_images"] == 32  # tiny_mnist's test set
        assert record["robustness_mean"] == pytest.approx(robustness.mean_accuracy(curves), abs=0.01)
        assert {"temperature", "threshold", "ece_before", "ece_after"} <= set(record["calibration"])
        assert "Robustness: accuracy" in out and "Calibration, chosen on " in out


@pytest.mark.parametrize("argv, expected", [
    (["--eval-only"], "needs --checkpoint"),
    (["--checkpoint", "outputs/model.pt"], "goes with --eval-only"),
])
def test_eval_only_and_checkpoint_go_together(argv, expected, capsys):
    assert exit_message(argv) == 2  # stopped by the parser, before any work
    error = capsys.readouterr().err
    assert expected in error and len(error.strip().splitlines()) == 1


def test_eval_only_without_a_usable_model_file_says_so():
    assert "no model file at" in exit_message(["--eval-only", "--checkpoint", "nowhere.pt"])


MODES = {"--compare": ["--compare", "runs/a"], "--eval-only": ["--eval-only", "--checkpoint", "model.pt"],
         "--find-lr": ["--find-lr"], "--resume": ["--resume", "checkpoint.pt"]}


@pytest.mark.parametrize("first, second", list(itertools.combinations(MODES, 2)))
def test_modes_that_exclude_each_other_stop_at_the_parser(first, second, capsys):
    assert exit_message([*MODES[first], *MODES[second]]) == 2
    error = capsys.readouterr().err
    assert f"argument {second}: not allowed with argument {first}" in error
    assert len(error.strip().splitlines()) == 1


def test_eval_only_names_the_model_that_plain_weights_fit(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(CompactNet().state_dict(), path)
    message = exit_message(["--eval-only", "--checkpoint", str(path), "--model", "Net", "--out-dir",
                            str(tmp_path / "out")])
    assert "does not hold weights of Net" in message and "--model CompactNet" in message
    assert not (tmp_path / "out").exists()  # nothing is made before the inputs are known to be good


def test_eval_only_finds_the_model_that_plain_weights_fit(tiny_mnist, tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(CompactNet().state_dict(), path)
    main_mnist.main(["--eval-only", "--checkpoint", str(path), "--data-dir", tiny_mnist, "--out-dir",
                     str(tmp_path / "out")])
    assert "Evaluating CompactNet" in capsys.readouterr().out


def test_eval_only_refuses_weights_of_another_architecture(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"conv1.weight": torch.zeros(8, 1, 3, 3)}, path)
    message = exit_message(["--eval-only", "--checkpoint", str(path), "--out-dir", str(tmp_path / "out")])
    assert "does not hold weights of Net" in message
