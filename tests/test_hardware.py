"""The device, precision and layout a run uses: chosen once per machine, printed, recorded, overridable."""
import json
import os

import pytest
import torch

import main_mnist
from machinery import hardware, records, settings
from model import CompactNet, Net

FAST = ["--batch-size", "16", "--test-batch-size", "16"]  # tiny_mnist: 4 training and 2 test batches per epoch


def choose(folder, setting="auto", batch_size=16, timing=True, model=CompactNet):
    return hardware.choose_layout(setting, model.__name__, model, batch_size, torch.device("cpu"), False,
                                  str(folder), timing)


def timed_with(monkeypatch, speeds):
    """training_speed replaced by set speeds: {layout: [img/s of each round]}; returns the layouts it was asked
    to time, in order."""
    calls = []

    def fake_speed(make_model, layout, batch_size, device, amp):
        calls.append(layout)
        return speeds[layout][(calls.count(layout) - 1) % len(speeds[layout])]  # round after round
    monkeypatch.setattr(hardware, "training_speed", fake_speed)
    return calls


CLEAR = {"channels_last": [100.0, 90.0, 110.0], "contiguous": [300.0, 280.0, 310.0]}  # contiguous, every round


@pytest.fixture
def timed(monkeypatch):
    return timed_with(monkeypatch, CLEAR)


def test_training_speed_times_real_steps_and_leaves_the_random_state_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    for layout in hardware.LAYOUTS:
        assert hardware.training_speed(CompactNet, layout, 8, torch.device("cpu"), False, seconds=0.05) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_auto_times_the_layouts_in_turns_keeps_a_clear_winner_and_remembers_it(tmp_path, timed):
    layout, why = choose(tmp_path / "run1")
    assert layout == "contiguous" and timed == list(hardware.LAYOUTS) * hardware.LAYOUT_ROUNDS  # interleaved
    assert why.startswith("the clear winner") and "channels_last 100 img/s" in why  # the median of the rounds
    with open(tmp_path / hardware.REMEMBERED) as f:
        (entry,) = json.load(f).values()
    assert entry == {"layout": "contiguous", "clear": True,
                     "images_per_second": {name: [round(v) for v in rounds] for name, rounds in CLEAR.items()}}

    assert choose(tmp_path / "run2") == ("contiguous", f"chosen here before ({tmp_path / hardware.REMEMBERED})")
    assert choose(tmp_path / "run3", timing=False)[0] == "contiguous"  # a dry run uses what was chosen too
    rounds = len(timed)
    choose(tmp_path / "run4", batch_size=32)  # another batch size is another question
    assert len(timed) == 2 * rounds


@pytest.mark.parametrize("speeds", [
    {"channels_last": [100.0, 100.0, 100.0], "contiguous": [105.0, 108.0, 104.0]},  # within the margin
    {"channels_last": [100.0, 100.0, 400.0], "contiguous": [300.0, 300.0, 300.0]},  # a round of load flips one
])
@pytest.mark.parametrize("model", [CompactNet, Net])
def test_without_a_clear_winner_the_default_for_the_models_layers_is_used_and_said(tmp_path, monkeypatch, speeds,
                                                                                    model):
    timed_with(monkeypatch, speeds)
    layout, why = choose(tmp_path / "run", model=model)
    assert layout == hardware.default_layout(model()) and why.startswith("no clear winner")
    with open(tmp_path / hardware.REMEMBERED) as f:
        assert list(json.load(f).values())[0]["clear"] is False


def test_the_default_layout_follows_the_kind_of_layers():
    assert hardware.default_layout(CompactNet()) == "contiguous"  # batch norm: slow in channels_last on a CPU
    assert hardware.default_layout(Net()) == "channels_last"  # plain convolutions


def test_a_set_layout_is_used_as_it_is_and_a_dry_run_times_nothing(tmp_path, timed):
    for layout in hardware.LAYOUTS:
        assert choose(tmp_path / "run", setting=layout) == (layout, "set by LAYOUT")
    assert choose(tmp_path / "run", timing=False)[0] == hardware.default_layout(CompactNet())
    assert timed == [] and not os.path.exists(tmp_path / hardware.REMEMBERED)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 1}', '{"k": {"layout": 5}}', '{"k": [1]}'])
def test_a_damaged_memory_is_timed_again_and_replaced(tmp_path, timed, content):
    (tmp_path / hardware.REMEMBERED).write_text(content)
    layout, why = choose(tmp_path / "run")
    assert layout == "contiguous" and timed and "in place of a damaged file" in why


@pytest.mark.parametrize("kind", ["link to /dev/zero", "fifo"])
def test_a_memory_that_is_no_plain_file_is_neither_read_nor_waited_on(tmp_path, timed, kind):
    path = tmp_path / hardware.REMEMBERED
    if kind == "fifo":
        os.mkfifo(path)
    else:
        os.symlink("/dev/zero", path)
    layout, why = choose(tmp_path / "run")  # returns at once: no endless read, no wait for a writer
    assert layout == "contiguous" and "in place of a damaged file" in why
    assert path.is_file() and not path.is_symlink() and os.path.exists("/dev/zero")


def test_an_unwritable_folder_costs_the_memory_not_the_run(tmp_path, timed, monkeypatch):
    monkeypatch.setattr(hardware.os.path, "dirname", lambda path: str(tmp_path / "missing"))
    layout, why = choose(tmp_path / "run")
    assert layout == "contiguous" and "not remembered" in why


def test_a_run_records_the_layout_it_used_and_its_resume_keeps_it(tiny_mnist, tmp_path, timed, capsys):
    out = tmp_path / "run"
    main_mnist.main(["--data-dir", tiny_mnist, "--out-dir", str(out), "--epochs", "1", "--schedule", "step",
                     "--layout", "auto", "--model", "CompactNet", *FAST])
    printed = capsys.readouterr().out
    assert "Layout: contiguous (the clear winner" in printed and "Device: cpu (" in printed
    assert records.read_record(str(out))["hyperparameters"]["LAYOUT"] == "contiguous"
    checkpoint = records.load_checkpoint(str(out / records.CHECKPOINT))
    assert checkpoint["hyperparameters"]["LAYOUT"] == "contiguous"
    assert all(p.is_contiguous() for p in checkpoint["model"].values())

    os.remove(tmp_path / hardware.REMEMBERED)  # forgotten: the checkpoint alone says which layout to go on in
    main_mnist.main(["--resume", str(out / records.CHECKPOINT), "--epochs", "2"])
    assert "Layout: contiguous (set by LAYOUT)" in capsys.readouterr().out
    assert records.read_record(str(out))["epochs_done"] == 2


def test_the_data_is_checked_before_anything_is_timed(tmp_path, timed, no_network):
    with pytest.raises(SystemExit) as stop:
        main_mnist.main(["--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run"),
                         "--layout", "auto"])
    assert "could not be downloaded" in str(stop.value.code) and timed == []


def test_layout_choices_come_from_hardware_and_a_wrong_one_is_one_line(capsys):
    assert settings.CHOICES["LAYOUT"] == ["auto", *hardware.LAYOUTS]
    with pytest.raises(SystemExit) as stop:
        main_mnist.main(["--layout", "nhwc", "--dry-run"])
    assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(
        f"error: LAYOUT (--layout) must be one of {', '.join(settings.CHOICES['LAYOUT'])}, not 'nhwc' (see --help)")
