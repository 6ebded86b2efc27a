"""What an accident or an attacker does to a run, a model.pt and the data: a checkpoint copied elsewhere, a second
writer, a killed run, a damaged model.pt, damaged data. Each ends in one line, and nothing a person made is lost."""
import glob
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch

import predict
from conftest import only_run, run_main
from machinery import runs
from machinery.tools import load_model
from utils import UserError, load_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stopped_run(capsys, data_dir, out_dir, monkeypatch, epochs=2):
    """A FastNet dry run stopped by Ctrl-C after its first epoch: its folder."""
    real = runs.save_epoch

    def save_then_stop(folder, record, checkpoint):
        real(folder, record, checkpoint)
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(runs, "save_epoch", save_then_stop)
        code, _, _ = run_main(capsys, "--model", "FastNet", "--dry-run", "--epochs", epochs, "--data-dir", data_dir,
                              "--out-dir", out_dir)
    assert code == 130
    return only_run(out_dir)


def snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def test_a_checkpoint_copied_into_another_run_s_folder_goes_on_in_a_new_folder(capsys, data_dir, trained, tmp_path,
                                                                               monkeypatch):
    other = stopped_run(capsys, data_dir, tmp_path / "stopped", monkeypatch)
    victim = shutil.copytree(trained, tmp_path / "finished" / "run")
    before = snapshot(victim)
    shutil.copy(os.path.join(other, runs.CHECKPOINT), os.path.join(victim, "copied.pt"))
    code, out, err = run_main(capsys, "--resume", os.path.join(victim, "copied.pt"))
    assert code == 0 and "holds no record of this checkpoint's run: it goes on in a new folder" in out, err
    assert snapshot(victim) == {**before, "copied.pt": open(os.path.join(other, runs.CHECKPOINT), "rb").read()}
    assert len(os.listdir(tmp_path / "stopped")) == 2  # the stopped run's OUT_DIR got the new folder


def test_a_second_writer_is_refused_and_a_dead_one_does_not_block(capsys, data_dir, tmp_path, monkeypatch):
    folder = stopped_run(capsys, data_dir, tmp_path, monkeypatch)
    record = runs.read_json(os.path.join(folder, runs.RECORD))
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        record.update(status="running", pid=live.pid)  # as the record of a run still training says
        runs.write_file(folder, runs.RECORD, lambda f: f.write(json.dumps(record).encode()))
        code, out, err = run_main(capsys, "--resume", os.path.join(folder, runs.CHECKPOINT))
        live.kill()
    assert code == 1 and f"is being written by process {live.pid}" in err
    open(os.path.join(folder, f".{runs.FINAL_MODEL}.999.tmp"), "wb").write(b"half")  # what kill -9 leaves
    code, out, err = run_main(capsys, "--compare", folder)
    assert "killed" in out
    code, out, err = run_main(capsys, "--resume", os.path.join(folder, runs.CHECKPOINT))
    assert code == 0 and runs.read_json(os.path.join(folder, runs.RECORD))["status"] == "finished", err
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_a_run_as_ctrl_c_does(data_dir, tmp_path, signum):
    command = [sys.executable, "-X", "faulthandler", os.path.join(REPO, "main_mnist.py"), "--model", "FastNet",
               "--dry-run", "--epochs", "500", "--schedule", "step", "--data-dir", data_dir, "--out-dir", tmp_path]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as run:
        deadline = time.time() + 120
        while time.time() < deadline and not any(os.path.exists(os.path.join(tmp_path, name, runs.CHECKPOINT))
                                                  for name in os.listdir(tmp_path)):
            time.sleep(0.2)
        run.send_signal(signum)
        try:
            err = run.communicate(timeout=60)[1]
        except subprocess.TimeoutExpired:  # where it hangs, from faulthandler's dump of every thread
            run.send_signal(signal.SIGABRT)
            pytest.fail(f"the run did not end within 60 s of the signal:\n{run.communicate()[1][-4000:]}")
    folder = only_run(tmp_path)
    assert run.returncode == 128 + signum and "Go on from the last epoch saved" in err
    assert runs.read_json(os.path.join(folder, runs.RECORD))["status"] == "stopped"
    assert runs.read_json(os.path.join(folder, runs.RECORD))["error"] == f"stopped by {signal.Signals(signum).name}"
    assert not [name for name in os.listdir(folder) if name.startswith(".")]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the line Python prints instead
def test_a_stop_that_python_swallowed_ends_the_run_at_the_next_epoch(capsys, tmp_path):
    class Thing:
        pass
    with pytest.raises(SystemExit) as stopped, runs.errors_in_one_line():
        thing = Thing()
        weakref.finalize(thing, runs.stop, signal.SIGTERM, None)  # where SIGTERM met a run 1 time in 15 under load
        del thing  # its KeyboardInterrupt only printed: "Exception ignored in ..."
        runs.save_epoch(str(tmp_path), {}, {})
    assert stopped.value.code == 128 + signal.SIGTERM and os.listdir(tmp_path) == []


def test_a_run_stopped_in_its_first_epoch_says_there_is_nothing_to_resume(capsys, tmp_path):
    with pytest.raises(KeyboardInterrupt), runs.recorded(str(tmp_path), {"mode": "train"}):
        raise KeyboardInterrupt
    assert "nothing to resume" in capsys.readouterr().err
    assert runs.read_json(os.path.join(tmp_path, runs.RECORD))["status"] == "stopped"


@pytest.mark.parametrize("damage, words", [
    (lambda w, c: w["fc1.1.running_var"].fill_(float("nan")), "fc1.1.running_var is not all numbers"),
    (lambda w, c: c.update(temperature=float("nan")), "temperature is no positive number"),
    (lambda w, c: c.update(temperature=-1.0), "temperature is no positive number"),
    (lambda w, c: c.update(threshold=1.5), "threshold is not within 0 to 1"),
    (lambda w, c: c.update(thickest="thick"), "thickest ink is not within 0 to 14"),
    (lambda w, c: c["bank"][0].fill_(float("nan")), "bank does not fit"),
    (lambda w, c: c.update(bank=[b[:, :3] for b in c["bank"]]), "bank does not fit"),
    (lambda w, c: c.update(bases=[None for _ in c["bases"]]), "bank does not fit"),
    (lambda w, c: c.update(limits="far"), "limits are not one number per layer")])
def test_a_damaged_model_pt_or_calibration_is_one_line_wherever_it_is_read(capsys, data_dir, trained, tmp_path, damage,
                                                                           words):
    folder = shutil.copytree(trained, tmp_path / "run")
    weights = torch.load(os.path.join(folder, runs.FINAL_MODEL), weights_only=True)
    calibration = torch.load(os.path.join(folder, runs.CALIBRATION), weights_only=True)
    damage(weights, calibration)
    torch.save(weights, os.path.join(folder, runs.FINAL_MODEL))
    torch.save(calibration, os.path.join(folder, runs.CALIBRATION))
    code, out, err = run_main(capsys, "--eval-only", os.path.join(folder, runs.FINAL_MODEL), "--dry-run",
                              "--data-dir", data_dir, "--out-dir", tmp_path / "eval")
    assert code == 1 and words in err and len(err.strip().splitlines()) == 1
    with pytest.raises(Exception, match=words.replace("(", r"\(")):
        load_model(os.path.join(folder, runs.FINAL_MODEL), torch.device("cpu"))


def test_a_model_that_is_no_file_of_torch_is_one_line(trained, tmp_path):
    shutil.copy(os.path.join(trained, runs.SAMPLES), tmp_path / "model.pt")  # a PNG
    with pytest.raises(UserError, match=r"is damaged or no model \(it holds more than tensors and numbers, or torch "):
        load_model(str(tmp_path / "model.pt"), torch.device("cpu"))


def test_a_calibration_of_older_code_is_a_note_and_the_digits_are_still_read(capsys, trained, tmp_path):
    folder = shutil.copytree(trained, tmp_path / "run")
    calibration = torch.load(os.path.join(folder, runs.CALIBRATION), weights_only=True)
    calibration.pop("bases")  # as the code before 2026-12-07 saved it
    torch.save(calibration, os.path.join(folder, runs.CALIBRATION))
    name, model, knows = load_model(os.path.join(folder, runs.FINAL_MODEL), torch.device("cpu"))
    assert knows == {} and "lacks bases" in capsys.readouterr().err
    assert predict.main([os.path.join(folder, runs.SAMPLES), "--model", os.path.join(folder, runs.FINAL_MODEL),
                         "--out", str(tmp_path / "p.png")]) == 0


def test_the_default_model_is_the_newest_finished_run_that_is_no_dry_run(capsys, data_dir, trained, tmp_path):
    newest = shutil.copytree(trained, tmp_path / "a-real-run")
    os.utime(os.path.join(newest, runs.FINAL_MODEL))  # newer than every other, whatever its name sorts as
    assert run_main(capsys, "--model", "FastNet", "--dry-run", "--data-dir", data_dir, "--out-dir", tmp_path)[0] == 0
    dry = os.path.join(glob.glob(str(tmp_path / "*_FastNet"))[0], runs.FINAL_MODEL)
    assert run_main(capsys, "--eval-only", dry, "--data-dir", data_dir, "--out-dir", tmp_path)[0] == 0  # its copy
    assert predict.newest_model(str(tmp_path)) == os.path.join(newest, runs.FINAL_MODEL)
    out = run_main(capsys, os.path.join(os.path.dirname(dry), runs.SAMPLES), "--model", dry, "--out",
                   tmp_path / "p.png", main=predict.main)[1]
    assert "Note: a dry run's model" in out  # named by hand, it is read, and said


def test_damaged_data_stops_before_training_in_one_line(capsys, data_dir, tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(os.path.join(data_dir, "MNIST", "raw"), raw, ignore=lambda d, names: [n for n in names
                                                                                       if not n.endswith(".gz")])
    labels = bytearray(gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[8] = 200  # the first test label
    (raw / "t10k-labels-idx1-ubyte").write_bytes(labels)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (raw / name).write_bytes(gzip.decompress((raw / f"{name}.gz").read_bytes()))
    with pytest.raises(Exception, match="labels from 0 to 200"):
        load_mnist(str(tmp_path / "data"), train=False)
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not MNIST")
    code, out, err = run_main(capsys, "--model", "FastNet", "--dry-run", "--data-dir", tmp_path / "data",
                              "--out-dir", tmp_path / "out")
    assert code == 1 and "train-images-idx3-ubyte.gz is damaged (not the original file" in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("out_dir", ["runs", os.path.join("runs", "mine")])
def test_an_out_dir_where_a_file_is_names_the_file(capsys, data_dir, tmp_path, out_dir):
    (tmp_path / "runs").write_text("notes")
    code, out, err = run_main(capsys, "--model", "FastNet", "--dry-run", "--data-dir", data_dir, "--out-dir",
                              tmp_path / out_dir)
    assert code == 1 and err.strip() == f"error: {tmp_path / 'runs'} is a file, where a folder is needed"


def test_batches_of_one_image_train_or_stop_in_one_line(capsys, data_dir, tmp_path):
    code, out, err = run_main(capsys, "--model", "FastNet", "--dry-run", "--test-batch-size", "1", "--data-dir",
                              data_dir, "--out-dir", tmp_path / "one-test-image")
    assert code == 0, err
    code, out, err = run_main(capsys, "--model", "FastNet", "--dry-run", "--batch-size", "1", "--data-dir",
                              data_dir, "--out-dir", tmp_path / "one-training-image")
    assert code == 1 and "error: model.py:" in err and "Expected more than 1 value per channel" in err


def test_a_record_that_is_damaged_is_one_line_in_compare_and_escapes_never_reach_the_terminal(capsys, data_dir,
                                                                                               tmp_path):
    out_dir = tmp_path / "runs\x1b[31m"
    code, out, err = run_main(capsys, "--model", "FastNet", "--dry-run", "--data-dir", data_dir, "--out-dir", out_dir)
    assert code == 0 and "\x1b" not in out and "runs\\x1b[31m" in out
    for name, record in [("no-model", {"history": [], "settings": {}}), ("rows", {"history": [1, 2], "status": "x"})]:
        os.mkdir(out_dir / name)
        (out_dir / name / runs.RECORD).write_text(json.dumps(record))
    code, out, err = run_main(capsys, "--compare", "--out-dir", out_dir)
    assert code == 0 and "\x1b" not in out and "no-model  damaged or unreadable" in out and "rows  damaged" in out
