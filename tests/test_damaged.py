"""Damaged records, odd folders and odd moments: each gets one line that names the file or value and what to do,
and nothing already on disk is lost or changed. Each test is what a user did, then what they saw."""
import errno
import json
import signal
import subprocess
import sys

import matplotlib.colors
import pytest
import torch

from machinery import figures, runs
import main_mnist
import utils
from conftest import REPO
from test_main import EXTENSIBLE, FAST, exit_message, read_metrics
from test_runs import fail_writes, folder_contents as all_files

DRY = ["--dry-run", "--epochs", "1"]


def folder_contents(folder):
    """{name: bytes} of the folder's files but the run's own lock file (which a run that stops at once may make)."""
    return {name: content for name, content in all_files(folder).items() if name != runs.LOCK}


def train(tiny_mnist, out_dir, *flags):
    main_mnist.main(["--data-dir", tiny_mnist, *FAST, "--epochs", "1", "--out-dir", str(out_dir), *flags])


def write_json(path, value):
    path.write_text(json.dumps(value))


# ---- --compare: every run it can read, whatever the others hold ----

def two_runs(tiny_mnist, parent):
    train(tiny_mnist, parent / "good")
    train(tiny_mnist, parent / "odd", "--seed", str(main_mnist.SEED + 1))
    return parent / "good", parent / "odd"


@pytest.mark.parametrize("content, problem", [
    ({}, "lacks 'mode'"),
    ("seconds", "has seconds = None, where a number belongs"),
    ("status", "has status = 5, where a text belongs"),
    ("not json", "cannot be read as JSON"),
])
def test_a_damaged_run_json_is_skipped_with_its_problem_and_the_others_compared(tiny_mnist, tmp_path, capsys,
                                                                                 content, problem):
    good, odd = two_runs(tiny_mnist, tmp_path)
    record = json.loads((odd / "run.json").read_text())
    if content == "not json":
        (odd / "run.json").write_text('{"status": "finished", ')
    elif content == "seconds":
        write_json(odd / "run.json", {**record, "seconds": None})
    elif content == "status":
        write_json(odd / "run.json", {**record, "status": 5})
    else:
        write_json(odd / "run.json", content)
    damaged = (odd / "run.json").read_bytes()
    capsys.readouterr()
    main_mnist.main(["--compare", str(good), str(odd), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"skipped {odd}: {odd / 'run.json'} " in out and problem in out
    assert "good " in out and (tmp_path / "comparison.png").exists()
    assert (odd / "run.json").read_bytes() == damaged  # read, never rewritten


@pytest.mark.parametrize("damage, problem", [
    (lambda lines: lines[:-1] + [lines[-1].rsplit(",", 1)[0]], "the row of epoch 1 does not have the columns"),
    (lambda lines: lines[:-1] + [lines[-1] + ",7"], "the row of epoch 1 does not have the columns"),
    (lambda lines: lines[:-1] + [lines[-1].replace(lines[-1].split(",")[3], "1e308", 1)], "test_loss = 1e+308"),
    (lambda lines: ["epoch;loss"] + lines[1:], "does not start with the header"),
], ids=["short row", "extra column", "1e308", "another header"])
def test_a_damaged_metrics_csv_is_skipped_and_the_others_compared(tiny_mnist, tmp_path, capsys, damage, problem):
    good, odd = two_runs(tiny_mnist, tmp_path)
    lines = (odd / "metrics.csv").read_text().splitlines()
    (odd / "metrics.csv").write_text("\n".join(damage(lines)) + "\n")
    capsys.readouterr()
    main_mnist.main(["--compare", str(good), str(odd), "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"skipped {odd}: {odd / 'metrics.csv'}" in out and problem in out
    assert "good " in out and (tmp_path / "comparison.png").exists()


def test_runs_with_no_finished_epoch_are_listed_without_curves(tiny_mnist, tmp_path, capsys):
    # A run still in its first epoch, and one killed there: a run.json, no metrics.csv, no checkpoint yet.
    for name in ("in-epoch-1", "killed-in-epoch-1"):
        folder = tmp_path / name
        folder.mkdir()
        write_json(folder / "run.json", runs.new_record(main_mnist.SETTINGS, torch.nn.Linear(1, 1),
                                                        torch.device("cpu"), False, []))
    runs.lock_folder(tmp_path / "in-epoch-1")  # its process still lives
    try:
        main_mnist.main(["--compare", str(tmp_path / "in-epoch-1"), str(tmp_path / "killed-in-epoch-1"),
                         "--out-dir", str(tmp_path)])
    finally:
        runs.release_locks()
    out = capsys.readouterr().out
    rows = [line.split()[2:5] for line in out.splitlines()[1:3]]
    assert rows == [[f"0/{main_mnist.EPOCHS}", "running", "*"], [f"0/{main_mnist.EPOCHS}", "killed", "*"]]
    assert "No run has a finished epoch yet: no curves to draw." in out and (tmp_path / "comparison.csv").exists()

    train(tiny_mnist, tmp_path / "finished")  # beside a finished run, they are listed and it is drawn
    main_mnist.main(["--compare", *(str(tmp_path / name) for name in ("in-epoch-1", "finished")),
                     "--out-dir", str(tmp_path)])
    assert f"0/{main_mnist.EPOCHS}" in capsys.readouterr().out and (tmp_path / "comparison.png").exists()


def test_a_full_output_folder_keeps_the_table_and_says_where_to_save(tiny_mnist, tmp_path, monkeypatch, capsys):
    good, odd = two_runs(tiny_mnist, tmp_path)
    fail_writes(monkeypatch, "comparison.csv", errno.ENOSPC)
    message = exit_message(["--compare", str(good), str(odd), "--out-dir", str(tmp_path)])
    assert message.startswith(f"error: could not write {tmp_path / 'comparison.csv'}: No space left on device")
    assert "--out-dir" in message and "\n" not in message
    assert "finished" in capsys.readouterr().out  # the table was printed first


def test_compare_piped_into_head_stops_quietly_and_still_saves(tiny_mnist, tmp_path):
    two_runs(tiny_mnist, tmp_path)
    done = subprocess.run(f"{sys.executable} main_mnist.py --compare --out-dir {tmp_path} | head -1", shell=True,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("run ") and done.stderr == ""
    assert (tmp_path / "comparison.png").exists() and (tmp_path / "comparison.csv").exists()


def test_fifty_runs_get_fifty_colours_and_a_legend_clear_of_the_curves(tmp_path):
    curves = [{"label": f"2026-11-25_10-{i:02d}-00_CompactNet, lr={0.01 * (i + 1):.2f}", "finished": i % 7 != 0,
               "history": [dict(epoch=e, train_loss=1 / e, train_acc=90 + e, test_loss=0.5 / e / (1 + i / 50),
                                test_acc=97 + e / 5 + i / 100, lr=0.01, seconds=1.0) for e in range(1, 11)]}
              for i in range(50)]
    fig = figures.plot_comparison(curves, tmp_path / "comparison.png")
    acc_ax = fig.axes[0]
    colours = {matplotlib.colors.to_hex(line.get_color()) for line in acc_ax.lines if line.get_gid() is None}
    assert len(colours) == 50
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent())


# ---- Resuming: the command printed is the one that goes on ----

def test_a_killed_dry_run_is_resumed_by_the_command_printed_for_it(tiny_mnist, tmp_path, capsys):
    out_dir = tmp_path / "exp"
    main_mnist.main(["--data-dir", tiny_mnist, *FAST, *EXTENSIBLE, "--dry-run", "--epochs", "3", "--out-dir",
                     str(out_dir)])
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    checkpoint["history"], checkpoint["epoch"] = checkpoint["history"][:1], 1
    torch.save(checkpoint, out_dir / "checkpoint.pt")  # as if killed in epoch 2
    (out_dir / "model.pt").unlink()
    message = exit_message(["--data-dir", tiny_mnist, *FAST, "--out-dir", str(out_dir)])
    command = f"python3 main_mnist.py --resume {out_dir / 'checkpoint.pt'} --dry-run"
    assert message.endswith(f"resume it with {command}, or choose another --out-dir")
    without = exit_message(["--resume", str(out_dir / "checkpoint.pt")])  # the flag forgotten: said, not trained
    assert without == f"error: this run was started with --dry-run, and goes on so: {command}"
    main_mnist.main(command.split()[2:])
    assert json.loads((out_dir / "run.json").read_text())["dry_run"] is True
    assert [row["epoch"] for row in read_metrics(out_dir)] == ["1", "2", "3"]


def test_any_error_during_a_run_leaves_run_json_failed_with_its_one_line(tiny_mnist, tmp_path, monkeypatch):
    def train_that_breaks_in_epoch_2(model, device, loader, optimizer, *args, **kwargs):
        if optimizer.state:
            raise ValueError("Tried to step 201 times.\nThe specified number of total steps is 200")
        return utils.train(model, device, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(main_mnist, "train", train_that_breaks_in_epoch_2)
    with pytest.raises(ValueError):  # a bug: its traceback is shown, after the record is written
        train(tiny_mnist, tmp_path / "exp", "--epochs", "3")
    record = json.loads((tmp_path / "exp" / "run.json").read_text())
    assert (record["status"], record["error"]) == ("failed", "ValueError: Tried to step 201 times.")
    assert record["epochs_done"] == 1


# ---- Checkpoints that load safely but are not this version's ----

def saved_run(tiny_mnist, tmp_path):
    out_dir = tmp_path / "exp"
    train(tiny_mnist, out_dir, *EXTENSIBLE)
    return out_dir, torch.load(out_dir / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("change, expected", [
    (lambda c: {"hyperparameters": {}}, "lacks 'epoch'"),
    (lambda c: {**c, "hyperparameters": {}}, "(its hyperparameters) lacks 'MODEL'"),
    (lambda c: {**c, "hyperparameters": {**c["hyperparameters"], "MODEL": "ResNet"}}, "a run of ResNet, which "
                                                                                       "model.py does not define"),
    (lambda c: {**c, "history": c["history"] + c["history"]}, "(its history): epoch 2 has epoch = 1"),
    (lambda c: {**c, "optimizer": [1, 2]}, "has optimizer = [1, 2], where a mapping belongs"),
    (lambda c: {**c, "model": {"conv1.weight": torch.zeros(3)}}, "do not fit"),
], ids=["nothing", "no settings", "unknown model", "history", "optimizer", "other weights"])
def test_a_checkpoint_of_another_structure_gets_one_line_and_nothing_is_written(tiny_mnist, tmp_path, change,
                                                                                 expected):
    out_dir, checkpoint = saved_run(tiny_mnist, tmp_path)
    torch.save(change(checkpoint), out_dir / "checkpoint.pt")
    (out_dir / "samples.png").unlink()
    before = folder_contents(out_dir)
    message = exit_message(["--resume", str(out_dir / "checkpoint.pt"), "--epochs", "2"])
    assert message.startswith("error: ") and expected in message and "\n" not in message
    assert folder_contents(out_dir) == before  # no samples.png drawn, no record changed


def test_a_checkpoint_from_before_a_setting_was_added_resumes_with_the_blocks_value_and_says_so(tiny_mnist, tmp_path,
                                                                                              capsys):
    out_dir, checkpoint = saved_run(tiny_mnist, tmp_path)
    for name in ("SHIFT", "ROTATION", "CROP_P", "CROP_SIZE"):  # as if added to the block after the run began
        del checkpoint["hyperparameters"][name]
    torch.save(checkpoint, out_dir / "checkpoint.pt")
    capsys.readouterr()
    main_mnist.main(["--resume", str(out_dir / "checkpoint.pt"), "--epochs", "2"])
    out = capsys.readouterr().out
    assert "predates the settings ROTATION, CROP_P, CROP_SIZE, SHIFT: the block's values are used" in out
    assert len(read_metrics(out_dir)) == 2


def test_a_checkpoint_without_its_random_state_is_refused_in_one_line(tiny_mnist, tmp_path):
    out_dir, checkpoint = saved_run(tiny_mnist, tmp_path)
    del checkpoint["rng"]  # an exact resume needs it: such a file is no checkpoint of this version
    torch.save(checkpoint, out_dir / "checkpoint.pt")
    message = exit_message(["--resume", str(out_dir / "checkpoint.pt"), "--epochs", "2"])
    assert message == f"error: {out_dir / 'checkpoint.pt'} lacks 'rng': it was not written by this version of main_mnist.py"


# ---- Odd values and odd moments ----

def test_a_nan_test_loss_stops_the_run_before_its_checkpoint(tiny_mnist, tmp_path, monkeypatch):
    monkeypatch.setattr(main_mnist, "test", lambda *args, **kwargs: (float("nan"), 10.0))
    message = exit_message(["--data-dir", tiny_mnist, *FAST, "--epochs", "2", "--out-dir", str(tmp_path / "exp")])
    assert message.startswith("error: the test loss became nan in epoch 1") and "try a lower --lr" in message
    assert not (tmp_path / "exp" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "exp" / "run.json").read_text())["status"] == "failed"


def test_a_seed_too_large_for_torch_is_refused_by_the_parser(capsys):
    assert exit_message(["--seed", "99999999999999999999999"]) == 2
    error = capsys.readouterr().err
    assert "SEED (--seed) must be a whole number from 0 to 2**63 - 1" in error and "Traceback" not in error


def test_a_folder_whose_run_died_in_epoch_1_says_there_is_nothing_to_resume(tiny_mnist, tmp_path):
    out_dir = tmp_path / "exp"
    out_dir.mkdir()
    (out_dir / "run.json").write_text("{}")
    (out_dir / "samples.png").write_bytes(b"png")
    before = folder_contents(out_dir)
    message = exit_message(["--data-dir", tiny_mnist, *FAST, "--out-dir", str(out_dir)])
    assert "ended in its first epoch" in message and "nothing to resume" in message
    assert "delete the folder to use it again" in message
    assert folder_contents(out_dir) == before


def test_orphan_temporary_files_of_killed_writes_are_removed_when_a_run_takes_the_folder(tiny_mnist, tmp_path):
    out_dir, _ = saved_run(tiny_mnist, tmp_path)
    orphan = out_dir / ".checkpoint.pt.12345-0badcafe.tmp"
    orphan.write_bytes(b"half a checkpoint")
    mine = out_dir / ".notes.tmp"  # not a name atomic_write gives: left alone
    mine.write_text("mine")
    main_mnist.main(["--resume", str(out_dir / "checkpoint.pt"), "--epochs", "2"])
    assert not orphan.exists() and mine.read_text() == "mine"


@pytest.mark.parametrize("kind", ["link", "own file"])
def test_the_lock_never_writes_through_a_link_nor_over_a_file_it_did_not_make(tiny_mnist, tmp_path, kind):
    out_dir = tmp_path / "exp"
    out_dir.mkdir()
    outside = tmp_path / "precious.txt"
    outside.write_text("the user's own words\n")
    if kind == "link":
        (out_dir / ".lock").symlink_to(outside)
    else:
        (out_dir / ".lock").write_text("my notes, not a lock\n")
    message = exit_message(["--data-dir", tiny_mnist, *FAST, "--out-dir", str(out_dir)])
    assert message.startswith(f"error: {out_dir / '.lock'} is ") and "\n" not in message
    assert outside.read_text() == "the user's own words\n"
    assert (out_dir / ".lock").read_text() in ("the user's own words\n", "my notes, not a lock\n")


# torch made slow to import (3 s), so that the Ctrl-C below lands inside `import torch` whatever the machine.
SLOW_TORCH = """
import builtins, runpy, sys, time
real_import = builtins.__import__
def slow_import(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        print("importing torch", flush=True)
        time.sleep(3)
    return real_import(name, *args, **kwargs)
builtins.__import__ = slow_import
sys.argv = ["main_mnist.py", "--dry-run"]
runpy.run_path("main_mnist.py", run_name="__main__")
"""


def test_ctrl_c_while_the_libraries_load_prints_no_traceback():
    process = subprocess.Popen([sys.executable, "-c", SLOW_TORCH], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "importing torch"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in stderr and stderr.strip() == "Stopped."
