"""A hostile trial's cases: each gets one line and the exit status a shell expects, and nothing of the user's is
lost, overwritten or read wrong."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import main_mnist
import predict
import utils
from conftest import REPO, assert_png
from machinery import records
from test_damaged import folder_contents, saved_run, train
from test_main import EXTENSIBLE, FAST, exit_message
from test_predict import finished_run, run_predict, seven_on_paper


@pytest.fixture
def seven(tmp_path):
    path = tmp_path / "seven.png"
    seven_on_paper().save(path)
    return path


# ---- predict.py --out writes only where it may, in the format its name says ----

@pytest.mark.parametrize("kind", ["link", "fifo", "the input itself", "no format"])
def test_predict_out_never_replaces_what_is_not_a_new_or_plain_file_of_ones_own(trained_model, tmp_path, seven,
                                                                                capsys, kind):
    kept = tmp_path / "kept.png"
    kept.write_bytes(b"the user's own picture")
    out = {"link": tmp_path / "link.png", "fifo": tmp_path / "fifo.png", "the input itself": seven,
           "no format": tmp_path / "out.txt"}[kind]
    if kind == "link":
        os.symlink(kept, out)
    elif kind == "fifo":
        os.mkfifo(out)
    before = folder_contents(tmp_path) if kind != "fifo" else None
    message, _, _ = run_predict(capsys, seven, "--checkpoint", trained_model, "--out", out)  # sys.exit's message
    assert message.startswith(f"error: --out {out}") and "\n" not in message
    assert kept.read_bytes() == b"the user's own picture" and seven.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if before is not None:
        assert folder_contents(tmp_path) == before
    assert os.path.islink(out) if kind == "link" else True


@pytest.mark.parametrize("name, signature", [("p.jpg", b"\xff\xd8\xff"), ("p.pdf", b"%PDF"), ("p.png", b"\x89PNG")])
def test_predict_out_is_written_in_the_format_its_extension_names(trained_model, tmp_path, seven, capsys, name,
                                                                   signature):
    code, _, _ = run_predict(capsys, seven, "--checkpoint", trained_model, "--out", tmp_path / name)
    assert code == 0 and (tmp_path / name).read_bytes().startswith(signature)


def test_a_fifo_given_as_an_image_is_one_line_and_never_waited_on(trained_model, tmp_path, seven, capsys):
    os.mkfifo(tmp_path / "pipe.png")
    code, out, err = run_predict(capsys, tmp_path / "pipe.png", seven, "--checkpoint", trained_model, "--out",
                                 tmp_path / "p.png")
    assert code == 1 and err == f"error: {tmp_path / 'pipe.png'}: not a plain file (a pipe or a device): only " \
                                "image files are read\n"
    assert f"{seven}: " in out  # the others are still read


# ---- A checkpoint copied into another run's folder never writes over that run ----

@pytest.mark.parametrize("copied_as", ["backup.pt", "checkpoint.pt"])
def test_resuming_a_checkpoint_copied_into_another_runs_folder_is_refused(tiny_mnist, tmp_path, copied_as):
    unfinished = tmp_path / "unfinished"
    train(tiny_mnist, unfinished, "--epochs", "1", *EXTENSIBLE)
    victim = tmp_path / "victim"
    train(tiny_mnist, victim, "--model", "CompactNet", "--seed", "7")
    os.remove(victim / "checkpoint.pt") if copied_as == "checkpoint.pt" else None  # a finished run, its file gone
    shutil.copy(unfinished / "checkpoint.pt", victim / copied_as)
    before = folder_contents(victim)
    message = exit_message(["--resume", str(victim / copied_as), "--epochs", "3"])
    assert message.startswith("error: ") and "\n" not in message
    assert "would write over" in message
    assert folder_contents(victim) == before


# ---- predict.py and app.py never take a dry run for the default model ----

def test_the_default_model_is_never_a_dry_run_and_is_named_with_its_accuracy(trained_model, tmp_path, monkeypatch,
                                                                             capsys, seven):
    real = finished_run(tmp_path / "runs", "2026-01-01_00-00-00_CompactNet", trained_model)
    dry = finished_run(tmp_path / "runs", "2026-01-02_00-00-00_CompactNet", trained_model)
    record = json.loads((dry / "run.json").read_text())
    (dry / "run.json").write_text(json.dumps({**record, "dry_run": True}))  # newer, but one batch an epoch
    (real / "run.json").write_text(json.dumps({**json.loads((real / "run.json").read_text()), "final_test_acc": 98.76}))
    monkeypatch.setattr(predict, "OUT_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(predict.default_checkpoint, "__defaults__", (str(tmp_path / "runs"),))
    code, out, _ = run_predict(capsys, seven, "--out", tmp_path / "p.png")
    assert code == 0 and f"Model: CompactNet from {real / 'model.pt'} (the newest finished run, 98.76% on the test " \
                          f"set)" in out


# ---- torchvision's legacy files are never read in place of the checked originals ----

def test_legacy_processed_files_are_passed_over_for_the_checked_raw_ones(real_data_dir, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(os.path.join(real_data_dir, "MNIST", "raw"), data_dir / "MNIST" / "raw")
    processed = data_dir / "MNIST" / "processed"
    processed.mkdir()
    images, labels = torch.zeros(100, 28, 28, dtype=torch.uint8), torch.full((100,), 11)  # 100 images, label 11
    for name in ("training.pt", "test.pt"):
        torch.save((images, labels), processed / name)
    test_images, test_labels = utils.load_mnist(str(data_dir), train=False)
    assert len(test_images) == 10_000 and int(test_labels.max()) == 9


# ---- Values the parser accepted, then a traceback ----

@pytest.mark.parametrize("argv, named", [(["--lr", "1e39"], "LR"), (["--weight-decay", "1e300"], "WEIGHT_DECAY"),
                                         (["--batch-size", "60001"], "BATCH_SIZE"),
                                         (["--test-batch-size", "10001"], "TEST_BATCH_SIZE")])
def test_values_past_what_can_train_stop_at_the_parser(argv, named, tmp_path, capsys):
    assert exit_message(argv + ["--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: {named} " in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_test_set_of_one_image_finishes_without_a_calibration(tiny_mnist, tmp_path, capsys):
    main_mnist.main(["--data-dir", tiny_mnist, "--dry-run", "--epochs", "1", "--test-batch-size", "1",
                     "--out-dir", str(tmp_path / "run")])
    record = records.read_record(str(tmp_path / "run"))
    assert record["status"] == "finished" and record["calibration"] is None
    assert "Calibration: none, from 1 test image" in capsys.readouterr().out


def test_running_out_of_memory_is_one_line_and_keeps_what_it_had(tiny_mnist, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 8800000000 bytes.")
    monkeypatch.setattr(main_mnist, "train", out_of_memory)
    message = exit_message(["--data-dir", tiny_mnist, *FAST, "--out-dir", str(tmp_path / "run")])
    assert message.startswith("error: the device ran out of memory in epoch 1 (batch size 16") and "\n" not in message
    assert records.read_record(str(tmp_path / "run"))["status"] == "failed"


# ---- Consoles: closed, narrow, or gone ----

def test_closed_stdout_and_stderr_still_finish_the_run(real_data_dir, tmp_path):
    out_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "main_mnist.py", "--dry-run", "--epochs", "1", "--data-dir", real_data_dir,
                           "--out-dir", str(out_dir), *FAST], cwd=REPO, timeout=300,
                          stdin=subprocess.DEVNULL, pass_fds=(), preexec_fn=lambda: (os.close(1), os.close(2)))
    assert done.returncode == 0
    assert records.read_record(str(out_dir))["status"] == "finished"


def test_a_console_that_cannot_encode_a_file_name_still_gets_every_answer(trained_model, tmp_path, seven):
    greek = tmp_path / "ψηφίο.png"
    shutil.copy(seven, greek)
    done = subprocess.run([sys.executable, "predict.py", str(greek), "--checkpoint", trained_model, "--out",
                           str(tmp_path / "p.png")], cwd=REPO, capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert done.returncode == 0, done.stderr
    assert b"\\u03c8" in done.stdout and b"top 3:" in done.stdout  # the name escaped, the answer whole
    assert_png(tmp_path / "p.png")


# ---- --out-dir onto a folder of finished work that is not a training run ----

def test_out_dir_onto_an_evaluation_says_so_and_never_advises_deleting_it(tiny_mnist, tmp_path):
    out_dir, _ = saved_run(tiny_mnist, tmp_path)
    evaluation = tmp_path / "evaluation"
    main_mnist.main(["--eval-only", "--checkpoint", str(out_dir / "checkpoint.pt"), "--data-dir", tiny_mnist,
                     "--dry-run", "--out-dir", str(evaluation)])
    before = folder_contents(evaluation)
    message = exit_message(["--data-dir", tiny_mnist, "--out-dir", str(evaluation)])
    assert message.startswith(f"error: {evaluation} holds the files of --eval-only") and "delete" not in message
    assert folder_contents(evaluation) == before


# ---- Smaller ones ----

def test_an_image_too_small_to_hold_a_digit_is_one_line(trained_model, tmp_path, seven, capsys):
    Image.new("L", (2, 1), 0).save(tmp_path / "tiny.png")
    code, out, err = run_predict(capsys, tmp_path / "tiny.png", seven, "--checkpoint", trained_model, "--out",
                                 tmp_path / "p.png")
    assert code == 1 and err == f"error: {tmp_path / 'tiny.png'} is 2x1 pixels: too small to hold a digit (at " \
                                "least 8 pixels a side)\n"


def test_a_dry_run_of_the_lr_finder_says_its_suggestion_means_nothing(tiny_mnist, tmp_path, capsys):
    main_mnist.main(["--find-lr", "--dry-run", "--data-dir", tiny_mnist, *FAST, "--out-dir", str(tmp_path / "lr")])
    assert "(a dry run: 20 steps over the lrs, too few for the loss to say anything" in capsys.readouterr().out


def test_run_json_does_not_name_a_folder_a_copy_would_leave_behind(tiny_mnist, tmp_path):
    out_dir, _ = saved_run(tiny_mnist, tmp_path)
    shutil.copytree(out_dir, tmp_path / "copy")
    assert "folder" not in records.read_record(str(tmp_path / "copy"))

