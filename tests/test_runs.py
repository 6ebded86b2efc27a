"""Run folders, their lock and record, failed writes, and --compare: what a series of experiments relies on."""
import csv
import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import main_mnist
from machinery import compare, files, hardware, runs
from model import MODELS
from test_main import EXTENSIBLE, FAST, exit_message, read_metrics
from conftest import REPO, assert_png


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Runs with their default folders: OUT_DIR lands in a fresh temporary working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train(tiny_mnist, *flags):
    main_mnist.main(["--data-dir", tiny_mnist, *FAST, "--epochs", "1", *flags])


def folders_in(parent):
    """The folders in `parent` (runs), without the files beside them (hardware.py's fastest.json)."""
    return sorted(path for path in parent.iterdir() if path.is_dir())


def folder_contents(folder):
    """{name: bytes} of every file in a folder."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


# ---- A folder per run ----

def test_two_default_runs_get_two_folders_and_both_keep_their_files(tiny_mnist, in_tmp, capsys):
    train(tiny_mnist)
    train(tiny_mnist, "--lr", "0.0375")
    folders = folders_in(in_tmp / main_mnist.OUT_DIR)
    assert len(folders) == 2
    for folder in folders:  # started in the same second: the second one gets -2
        assert folder.name.endswith((f"_{main_mnist.MODEL}", f"_{main_mnist.MODEL}-2"))
        assert {"run.json", "checkpoint.pt", "metrics.csv", "accuracy_loss.png", "model.pt"} <= set(os.listdir(folder))
    lrs = [json.loads((f / "run.json").read_text())["hyperparameters"]["LR"] for f in folders]
    assert lrs == [main_mnist.LR, 0.0375]
    out = capsys.readouterr().out
    for folder in folders:  # each run says where it writes, at its start and at its end
        assert out.count(f"Run folder: {os.path.join(main_mnist.OUT_DIR, folder.name)}") == 2


def test_run_folders_sort_by_start_and_name_the_model(tiny_mnist, in_tmp):
    train(tiny_mnist, "--model", "CompactNet")
    (folder,) = folders_in(in_tmp / main_mnist.OUT_DIR)
    date, clock, model = folder.name.split("_")
    assert len(date) == 10 and len(clock) == 8 and model == "CompactNet"  # 2026-11-25_11-20-03_CompactNet


def test_out_dir_onto_a_finished_run_is_refused_and_leaves_it_untouched(tiny_mnist, tmp_path):
    out_dir = tmp_path / "exp"
    train(tiny_mnist, "--out-dir", str(out_dir))
    before = folder_contents(out_dir)
    message = exit_message(["--data-dir", tiny_mnist, *FAST, "--epochs", "1", "--lr", "0.05", "--out-dir", str(out_dir)])
    assert message.startswith(f"error: {out_dir} already holds a run's files") and "another --out-dir" in message
    assert "\n" not in message
    assert folder_contents(out_dir) == before


def test_record_says_what_the_run_was_and_how_it_went(tiny_mnist, tmp_path):
    out_dir = tmp_path / "exp"
    train(tiny_mnist, "--out-dir", str(out_dir), "--lr", "0.02")
    record = json.loads((out_dir / "run.json").read_text())
    model = MODELS[main_mnist.MODEL]()
    assert record["status"] == "finished" and record["model"] == main_mnist.MODEL
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    layout = record["hyperparameters"]["LAYOUT"]  # the one LAYOUT chose: "auto" is timed, not recorded
    assert layout in hardware.LAYOUTS and (main_mnist.LAYOUT == "auto" or layout == main_mnist.LAYOUT)
    assert record["hyperparameters"] == {**main_mnist.SETTINGS, "LR": 0.02, "EPOCHS": 1, "BATCH_SIZE": 16,
                                         "TEST_BATCH_SIZE": 16, "DATA_DIR": tiny_mnist, "OUT_DIR": str(out_dir),
                                         "LAYOUT": layout}
    assert {"temperature", "threshold", "ece_before", "ece_after"} <= set(record["calibration"])
    assert "--lr 0.02" in record["command"] and record["command"].startswith("python3 main_mnist.py")
    assert record["torch"] == torch.__version__ and record["device"].startswith("cpu")
    assert record["precision"] in ("bfloat16 autocast", "float32")
    last = read_metrics(out_dir, drop=())[-1]
    assert record["epochs_done"] == record["epochs_planned"] == 1
    assert record["final_test_acc"] == pytest.approx(float(last["test_acc"]), abs=1e-3)
    assert record["best_epoch"] == 1 and record["started"] <= record["finished"]
    assert record["seconds"] == pytest.approx(round(float(last["seconds"]), 1))  # the epoch's, which may be < 0.05 s


def test_resume_continues_in_the_checkpoints_own_folder(tiny_mnist, tmp_path):
    out_dir = tmp_path / "exp"
    train(tiny_mnist, "--out-dir", str(out_dir), *EXTENSIBLE)
    main_mnist.main(["--resume", str(out_dir / "checkpoint.pt"), "--epochs", "2"])
    assert [row["epoch"] for row in read_metrics(out_dir)] == ["1", "2"]
    assert json.loads((out_dir / "run.json").read_text())["epochs_done"] == 2
    assert "leave out --out-dir" in exit_message(["--resume", str(out_dir / "checkpoint.pt"), "--epochs", "3",
                                                  "--out-dir", str(tmp_path / "elsewhere")])


def test_eval_only_writes_into_a_folder_of_its_own(tiny_mnist, in_tmp):
    train(tiny_mnist)
    (run_folder,) = folders_in(in_tmp / main_mnist.OUT_DIR)
    before = folder_contents(run_folder)
    main_mnist.main(["--eval-only", "--checkpoint", str(run_folder / "model.pt"), "--data-dir", tiny_mnist])
    assert folder_contents(run_folder) == before
    (eval_folder,) = [f for f in folders_in(in_tmp / main_mnist.OUT_DIR) if f != run_folder]
    assert eval_folder.name.endswith(f"_{main_mnist.MODEL}_eval")
    assert {"misclassified.png", "confusion_matrix.png", "run.json"} <= set(os.listdir(eval_folder))


# ---- One writer per folder ----

def test_a_second_process_on_a_locked_folder_stops_while_the_first_finishes(real_data_dir, tmp_path, capsys):
    out_dir = tmp_path / "exp"
    first = subprocess.Popen([sys.executable, "main_mnist.py", "--dry-run", "--epochs", "15", "--data-dir",
                              real_data_dir, "--out-dir", str(out_dir), *FAST, *EXTENSIBLE], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out_dir / "metrics.csv").exists():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    # This test's own process is the second one: the lock is the first process's
    second = exit_message(["--dry-run", "--epochs", "1", "--data-dir", real_data_dir, "--out-dir", str(out_dir)])
    assert second == (f"error: {out_dir} is in use by another run (process {first.pid}): "
                      f"wait for it to end, or choose another --out-dir")
    resume = exit_message(["--resume", str(out_dir / "checkpoint.pt"), "--epochs", "50", "--dry-run"])  # there too
    assert f"(process {first.pid})" in resume
    assert first.poll() is None  # both were refused while the first was still training
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert len(read_metrics(out_dir)) == 15  # the first run's epochs only, none of another run's


def test_a_killed_run_leaves_no_stale_lock_and_shows_as_killed(real_data_dir, tmp_path, capsys):
    out_dir = tmp_path / "exp"
    process = subprocess.Popen([sys.executable, "main_mnist.py", "--dry-run", "--epochs", "1000", "--data-dir",
                                real_data_dir, "--out-dir", str(out_dir), *FAST, *EXTENSIBLE], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out_dir / "metrics.csv").exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    assert runs.is_locked(out_dir)
    process.kill()  # SIGKILL: no handler runs, the record still says 'running'
    process.wait()
    assert not runs.is_locked(out_dir)
    assert json.loads((out_dir / "run.json").read_text())["status"] == "running"
    main_mnist.main(["--compare", str(out_dir), "--out-dir", str(tmp_path)])
    assert "killed *" in capsys.readouterr().out
    done = torch.load(out_dir / "checkpoint.pt", weights_only=True)["epoch"]
    main_mnist.main(["--resume", str(out_dir / "checkpoint.pt"), "--epochs", str(done + 1), "--dry-run"])  # lock free
    assert json.loads((out_dir / "run.json").read_text())["status"] == "finished"


def test_concurrent_atomic_writes_use_temporary_files_of_their_own(tmp_path):
    path = tmp_path / "metrics.csv"
    contents = [bytes([65 + i]) * 200_000 for i in range(4)]
    errors = []

    def writer(content):
        try:
            for _ in range(20):
                files.atomic_write(path, lambda f: f.write(content))
        except Exception as error:  # a shared temporary name fails here with FileNotFoundError
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(content,)) for content in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert path.read_bytes() in contents  # one writer's whole file, never a mix
    assert os.listdir(tmp_path) == ["metrics.csv"]  # no temporary file left behind


# ---- Failed writes ----

REAL_FSYNC = os.fsync


def fail_writes(monkeypatch, name, error_number, after=0):
    """Makes atomic writes of the file `name` fail with `error_number` once `after` of them have succeeded (and
    every write to another file from then on, as on a disk that filled up)."""
    state = {"done": 0, "failing": False}

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{name}."):
            state["failing"] = state["failing"] or state["done"] == after
            state["done"] += 1
        if state["failing"]:
            raise OSError(error_number, os.strerror(error_number))
        REAL_FSYNC(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)


def test_a_full_disk_gives_one_line_and_keeps_the_last_checkpoint(tiny_mnist, tmp_path, monkeypatch):
    out_dir = tmp_path / "exp"
    fail_writes(monkeypatch, "checkpoint.pt", errno.ENOSPC, after=1)  # epoch 2's checkpoint finds the disk full
    message = exit_message(["--data-dir", tiny_mnist, *FAST, "--epochs", "3", "--out-dir", str(out_dir)])
    assert message == (f"error: could not write {out_dir / 'checkpoint.pt'} in epoch 2: No space left on device. "
                       f"The checkpoint of "
                       f"epoch 1 is kept in {out_dir / 'checkpoint.pt'}. Resume with: python3 main_mnist.py --resume "
                       f"{out_dir / 'checkpoint.pt'}")
    monkeypatch.setattr(files.os, "fsync", REAL_FSYNC)  # space again
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")]
    main_mnist.main(["--resume", str(out_dir / "checkpoint.pt")])  # and the run goes on from there
    assert len(read_metrics(out_dir)) == 3


def test_a_real_full_filesystem_gives_the_same_message(tiny_mnist, tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out_dir = mount_point / "exp"
        message = exit_message(["--model", "Net", "--data-dir", tiny_mnist, *FAST, "--epochs", "5", "--out-dir",
                                str(out_dir)])  # Net's checkpoint: 4.8 MB, so the 7 MB fill up in epoch 2
        assert message.startswith("error: could not write") and "No space left on device" in message
        assert "\n" not in message
        kept = torch.load(out_dir / "checkpoint.pt", weights_only=True)["epoch"]  # Net's checkpoint is 4.8 MB
        assert f"The checkpoint of epoch {kept} is kept" in message
        assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mount_point)])


def test_a_folder_removed_during_the_run_gives_one_line(tiny_mnist, tmp_path, monkeypatch):
    out_dir = tmp_path / "exp"
    real_save_epoch = runs.save_epoch

    def save_epoch_then_remove_the_folder(folder, *args, **kwargs):
        real_save_epoch(folder, *args, **kwargs)
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)

    monkeypatch.setattr(runs, "save_epoch", save_epoch_then_remove_the_folder)
    message = exit_message(["--data-dir", tiny_mnist, *FAST, "--epochs", "3", "--out-dir", str(out_dir)])
    assert message.startswith("error: could not write") and "No such file or directory" in message
    assert "nothing to resume" in message and "\n" not in message


# ---- Compare ----

def test_compare_lists_what_differs_and_writes_a_figure_and_a_table(tiny_mnist, in_tmp, capsys):
    for lr in ("0.01", "0.02", "0.05"):
        train(tiny_mnist, "--lr", lr)
    capsys.readouterr()
    main_mnist.main(["--compare"])
    out = capsys.readouterr().out.splitlines()
    header = out[0].split()
    assert header == ["run", "model", "lr", "epochs", "status", "final_acc", "best_acc", "best_epoch", "seconds"]
    assert [line.split()[2] for line in out[1:4]] == ["0.01", "0.02", "0.05"]
    assert all(line.split()[3:5] == ["1/1", "finished"] for line in out[1:4])
    assert_png(in_tmp / main_mnist.OUT_DIR / "comparison.png")
    with open(in_tmp / main_mnist.OUT_DIR / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["lr"] for row in rows] == ["0.01", "0.02", "0.05"]
    record = json.loads((in_tmp / main_mnist.OUT_DIR / rows[2]["run"] / "run.json").read_text())
    assert rows[2]["final_acc"] == f"{record['final_test_acc']:.2f}"


def test_compare_marks_unfinished_runs_and_skips_folders_without_a_record(tiny_mnist, in_tmp, capsys):
    train(tiny_mnist, "--seed", str(main_mnist.SEED))
    train(tiny_mnist, "--epochs", "2", "--seed", str(main_mnist.SEED + 1))
    (in_tmp / main_mnist.OUT_DIR / "notes").mkdir()
    unfinished = sorted((in_tmp / main_mnist.OUT_DIR).glob(f"*_{main_mnist.MODEL}*"))[1]
    record = json.loads((unfinished / "run.json").read_text())
    (unfinished / "run.json").write_text(json.dumps({**record, "status": "stopped", "epochs_done": 1}))
    capsys.readouterr()
    folders = folders_in(in_tmp / main_mnist.OUT_DIR)
    main_mnist.main(["--compare", *map(str, folders)])
    out = capsys.readouterr().out
    notes = os.path.join(main_mnist.OUT_DIR, "notes")
    assert f"skipped {notes}: {os.path.join(notes, 'run.json')} does not exist" in out.replace(str(in_tmp) + os.sep, "")
    assert "stopped *" in out and "* unfinished" in out
    header, *rows = [line.split() for line in out.splitlines()[1:4]]
    # The settings that differ: the seed gets a column; EPOCHS shows in the one column of epochs done/planned
    assert header == ["run", "model", "seed", "epochs", "status", "final_acc", "best_acc", "best_epoch", "seconds"]
    assert [row[2:4] for row in rows] == [[str(main_mnist.SEED), "1/1"], [str(main_mnist.SEED + 1), "1/2"]]


def test_compare_with_no_runs_says_so(in_tmp):
    assert exit_message(["--compare"]).startswith("error: no runs to compare")


def test_compare_overlays_the_robustness_curves_of_the_evaluated_models(tiny_mnist, in_tmp, capsys):
    train(tiny_mnist, "--lr", "0.01")
    (trained,) = folders_in(in_tmp / main_mnist.OUT_DIR)
    evaluations = []
    for seed in (1, 2):
        evaluations.append(in_tmp / f"eval{seed}")
        main_mnist.main(["--eval-only", "--checkpoint", str(trained / "model.pt"), "--data-dir", tiny_mnist,
                         "--out-dir", str(evaluations[-1]), "--seed", str(seed)])
    (evaluations[1] / "robustness.csv").write_text("family,strength\nrotation,x\n")  # damaged: left out, said so
    capsys.readouterr()
    main_mnist.main(["--compare", str(trained), *map(str, evaluations)])
    out = capsys.readouterr().out
    assert f"{evaluations[0]}: an evaluation; its robustness curves are drawn" in out
    assert f"Note: {evaluations[1] / 'robustness.csv'} is left out" in out
    assert "the robustness curves of 1 evaluated models" in out
    assert_png(in_tmp / main_mnist.OUT_DIR / compare.ROBUSTNESS_COMPARISON)
    assert_png(in_tmp / main_mnist.OUT_DIR / "comparison.png")  # the training run is compared as before
