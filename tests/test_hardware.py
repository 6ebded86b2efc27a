"""The device, precision and layout a run uses: chosen once per machine, printed, recorded, overridable."""
import json
import os

import pytest
import torch

import hardware
import main_mnist
import records
import settings
from model import CompactNet

FAST = ["--batch-size", "16", "--test-batch-size", "16"]  # tiny_mnist: 4 training and 2 test batches per epoch


def choose(folder, setting="auto", batch_size=16, timing=True):
    return hardware.choose_layout(setting, "CompactNet", CompactNet, batch_size, torch.device("cpu"), False,
                                  str(folder), timing)


@pytest.fixture
def timed(monkeypatch):
    """training_speed replaced by set speeds (img/s per layout); the list of layouts it was asked to time."""
    calls = []
    speeds = {"channels_last": 100.0, "contiguous": 300.0}

    def fake_speed(model_class, layout, batch_size, device, amp):
        calls.append(layout)
        return speeds[layout]
    monkeypatch.setattr(hardware, "training_speed", fake_speed)
    return calls


def test_training_speed_times_real_steps_and_leaves_the_random_state_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    for layout in hardware.LAYOUTS:
        assert hardware.training_speed(CompactNet, layout, 8, torch.device("cpu"), False, seconds=0.05) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_auto_times_each_layout_once_keeps_the_faster_and_remembers_it(tmp_path, timed):
    layout, why = choose(tmp_path / "run1")
    assert layout == "contiguous" and timed == list(hardware.LAYOUTS)
    assert "timed now" in why and "channels_last 100 img/s" in why
    with open(tmp_path / hardware.REMEMBERED) as f:
        (entry,) = json.load(f).values()
    assert entry == {"layout": "contiguous", "images_per_second": {"channels_last": 100, "contiguous": 300}}

    assert choose(tmp_path / "run2") == ("contiguous", f"timed fastest here before ({tmp_path / hardware.REMEMBERED})")
    assert choose(tmp_path / "run3", timing=False)[0] == "contiguous"  # a dry run uses what was timed too
    assert len(timed) == len(hardware.LAYOUTS)  # neither timed again

    choose(tmp_path / "run4", batch_size=32)  # another batch size is another question
    assert len(timed) == 2 * len(hardware.LAYOUTS)


def test_a_set_layout_is_used_as_it_is_and_a_dry_run_times_nothing(tmp_path, timed):
    for layout in hardware.LAYOUTS:
        assert choose(tmp_path / "run", setting=layout) == (layout, "set by LAYOUT")
    assert choose(tmp_path / "run", timing=False)[0] == "channels_last"
    assert timed == [] and not os.path.exists(tmp_path / hardware.REMEMBERED)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 1}'])
def test_a_damaged_memory_is_timed_again(tmp_path, timed, content):
    (tmp_path / hardware.REMEMBERED).write_text(content)
    assert choose(tmp_path / "run")[0] == "contiguous" and timed


def test_an_unwritable_folder_costs_the_memory_not_the_run(tmp_path, timed, monkeypatch):
    monkeypatch.setattr(hardware.os.path, "dirname", lambda path: str(tmp_path / "missing"))
    layout, why = choose(tmp_path / "run")
    assert layout == "contiguous" and "not remembered" in why


def test_a_run_records_the_layout_it_used_and_its_resume_keeps_it(tiny_mnist, tmp_path, timed, capsys):
    out = tmp_path / "run"
    main_mnist.main(["--data-dir", tiny_mnist, "--out-dir", str(out), "--epochs", "1", "--schedule", "step",
                     "--layout", "auto", *FAST])
    printed = capsys.readouterr().out
    assert "Layout: contiguous (timed now" in printed and "Device: cpu (" in printed
    assert records.read_record(str(out))["hyperparameters"]["LAYOUT"] == "contiguous"
    checkpoint = records.load_checkpoint(str(out / records.CHECKPOINT))
    assert checkpoint["hyperparameters"]["LAYOUT"] == "contiguous"
    assert all(p.is_contiguous() for p in checkpoint["model"].values())

    os.remove(tmp_path / hardware.REMEMBERED)  # forgotten: the checkpoint alone says which layout to go on in
    main_mnist.main(["--resume", str(out / records.CHECKPOINT), "--epochs", "2"])
    assert "Layout: contiguous (set by LAYOUT)" in capsys.readouterr().out
    assert records.read_record(str(out))["epochs_done"] == 2


def test_a_checkpoint_from_before_the_setting_resumes_in_channels_last(tmp_path):
    args = settings.parse_args(["--resume", "x"], main_mnist.SETTINGS, main_mnist.RECIPES, {})
    saved = {name: value for name, value in main_mnist.SETTINGS.items() if name != "LAYOUT"}
    hp = settings.resumed_settings(args, main_mnist.SETTINGS, {"hyperparameters": {**saved, "EPOCHS": 3},
                                                               "epoch": 1})
    assert hp["LAYOUT"] == "channels_last"


def test_layout_choices_come_from_hardware_and_a_wrong_one_is_one_line(capsys):
    assert settings.CHOICES["LAYOUT"] == ["auto", *hardware.LAYOUTS]
    with pytest.raises(SystemExit) as stop:
        main_mnist.main(["--layout", "nhwc", "--dry-run"])
    assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(
        f"error: LAYOUT (--layout) must be one of {', '.join(settings.CHOICES['LAYOUT'])}, not 'nhwc' (see --help)")
