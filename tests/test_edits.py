"""The edits learners make most, each made as a learner makes it, and what the run then prints and records.

An edit of a function of main_mnist.py (build_optimizer, build_scheduler) or of a model is made here by putting the
edited function in its place, which is what Python sees after the edit; edits of the block's lines and of
model.py are made on a copy of the repo (test_changing.py's way), where the text is what matters.
"""
import json

import pytest
import torch
import torch.nn as nn

import main_mnist
import model
from machinery import records
from test_changing import DRY, copy, run  # noqa: F401  (copy: a fixture)
from test_main import FAST, exit_message
from test_predict import seven_on_paper

TINY = [*FAST, "--epochs", "1"]


def train(tiny_mnist, out_dir, *flags):
    main_mnist.main(["--data-dir", tiny_mnist, *TINY, "--out-dir", str(out_dir), *flags])
    return records.read_record(str(out_dir))


# ---- The optimizer and the schedule: what was built is what is printed and recorded ----

def test_an_optimizer_swapped_for_adam_is_named_with_its_own_settings_and_noted(tiny_mnist, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.setattr(main_mnist, "build_optimizer",
                        lambda model, hp: torch.optim.Adam(model.parameters(), lr=1e-3))
    record = train(tiny_mnist, tmp_path / "run")
    assert record["optimizer"] == {"class": "Adam", "lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0,
                                   "eps": 1e-08}
    assert record["schedule"]["class"] == "StepLR" and record["schedule"]["starting_lr"] == 1e-3
    out = capsys.readouterr().out
    assert "Optimizer: Adam(lr=0.001, betas=[0.9, 0.999]" in out
    assert "Note: the optimizer is Adam, not SGD" in out and f"not LR={main_mnist.LR:g} of the settings" in out


def test_a_one_cycle_schedule_over_a_typed_in_lr_says_that_it_sets_the_lr_itself(tiny_mnist, tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.setattr(main_mnist, "build_optimizer",
                        lambda model, hp: torch.optim.Adam(model.parameters(), lr=1e-3))
    record = train(tiny_mnist, tmp_path / "run", "--model", "CompactNet")
    peak = main_mnist.RECIPES["CompactNet"]["LR"]
    assert record["schedule"]["class"] == "OneCycleLR" and record["schedule"]["peak_lr"] == peak
    assert f"OneCycleLR sets the lr itself, peaking at {peak:g}: the lr 0.001 the optimizer was built with is not " \
           f"used" in " ".join(capsys.readouterr().out.split())


def test_an_lr_typed_from_the_global_is_caught_when_the_flag_changes_it(tiny_mnist, tmp_path, monkeypatch, capsys):
    # lr=LR: the block's constant, not the run's setting, which --lr changed
    monkeypatch.setattr(main_mnist, "build_optimizer",
                        lambda model, hp: torch.optim.SGD(model.parameters(), lr=main_mnist.LR, momentum=0.9))
    record = train(tiny_mnist, tmp_path / "run", "--lr", str(main_mnist.LR * 5))
    assert record["hyperparameters"]["LR"] == main_mnist.LR * 5 and record["optimizer"]["lr"] == main_mnist.LR
    assert f"the optimizer's lr is {main_mnist.LR:g}, not LR={main_mnist.LR * 5:g}" in capsys.readouterr().out


def test_the_optimizer_as_the_block_builds_it_is_recorded_without_a_note(tiny_mnist, tmp_path, capsys):
    record = train(tiny_mnist, tmp_path / "run", "--schedule", "step")
    assert record["optimizer"] == {"class": "SGD", "lr": main_mnist.LR, "momentum": main_mnist.MOMENTUM,
                                   "weight_decay": main_mnist.WEIGHT_DECAY, "nesterov": main_mnist.NESTEROV}
    assert "Note:" not in capsys.readouterr().out


class Plateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    """ReduceLROnPlateau, as a learner's build_scheduler returns it, keeping the metrics it was stepped on."""
    metrics = []

    def step(self, metrics):
        Plateau.metrics.append(metrics)
        super().step(metrics)


def test_a_schedule_that_steps_on_a_metric_steps_once_an_epoch_on_the_test_loss(tiny_mnist, tmp_path, monkeypatch):
    Plateau.metrics = []
    monkeypatch.setattr(main_mnist, "build_scheduler",
                        lambda optimizer, hp, steps_per_epoch: Plateau(optimizer, factor=0.5, patience=0))
    record = train(tiny_mnist, tmp_path / "run", "--epochs", "3")
    history = records.read_history(str(tmp_path / "run"))
    assert Plateau.metrics == pytest.approx([row["test_loss"] for row in history], rel=1e-5)  # each epoch's
    assert record["schedule"]["class"] == "Plateau" and record["status"] == "finished"


def test_a_schedule_build_scheduler_has_no_branch_for_stops_at_the_parser_naming_it(tmp_path, capsys):
    assert exit_message(["--schedule", "plateau", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "SCHEDULE 'plateau' is none of those build_scheduler in main_mnist.py builds" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


# ---- The loss ----

def test_label_smoothing_is_a_setting_and_the_loss_is_named_as_built(tiny_mnist, tmp_path, capsys):
    record = train(tiny_mnist, tmp_path / "run", "--label-smoothing", "0.1")
    assert record["loss"] == "F.cross_entropy(label_smoothing=0.1)" and record["status"] == "finished"
    assert "Loss: F.cross_entropy(label_smoothing=0.1) (the model returns log-probabilities)" in capsys.readouterr().out


def test_a_loss_module_in_place_of_loss_function_is_named_and_the_output_still_checked(tiny_mnist, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setattr(main_mnist, "loss_function", lambda outputs, smoothing: nn.CrossEntropyLoss(label_smoothing=0.1))
    assert train(tiny_mnist, tmp_path / "run")["loss"] == "CrossEntropyLoss(label_smoothing=0.1)"

    class FiveOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 5)

        def forward(self, x):
            return self.fc(x.flatten(1))
    monkeypatch.setitem(main_mnist.MODELS, "Net", FiveOutputs)
    message = exit_message(["--data-dir", tiny_mnist, *TINY, "--out-dir", str(tmp_path / "five")])
    assert message.startswith("error: the model's forward must return a tensor of shape [batch, 10]")


# ---- New settings reach the model; a setting nothing reads is noted ----

class NetWithDropout(model.Net):
    """Net with a dropout setting, as a learner adds it: the constructor takes it; each instance says what it got."""
    built_with = []

    def __init__(self, dropout=0.5):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        NetWithDropout.built_with.append(dropout)


@pytest.fixture
def dropout_setting(monkeypatch):
    """DROPOUT = 0.1 added to the block, and Net taking it: what every build of the model got."""
    NetWithDropout.built_with = []
    monkeypatch.setitem(main_mnist.SETTINGS, "DROPOUT", 0.1)
    monkeypatch.setitem(main_mnist.MODELS, "Net", NetWithDropout)
    return NetWithDropout.built_with


def test_a_setting_named_like_a_models_argument_reaches_every_build_of_it(tiny_mnist, tmp_path, dropout_setting,
                                                                          capsys):
    record = train(tiny_mnist, tmp_path / "run", "--model", "Net", "--dropout", "0.2", "--layout", "auto")
    assert record["hyperparameters"]["DROPOUT"] == 0.2
    assert dropout_setting and set(dropout_setting) == {0.2}  # the parser's check, the layout timing, the run
    records.load_model(str(tmp_path / "run" / "model.pt"), "cpu")  # and what predict.py and --eval-only build
    assert dropout_setting[-1] == 0.2
    assert "nothing reads" not in capsys.readouterr().out


def test_a_new_settings_bad_value_stops_at_the_parser_before_any_folder(tmp_path, dropout_setting, capsys):
    assert exit_message(["--dropout", "1.5", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "do not build a model" in err and "1.5" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_setting_that_nothing_reads_gets_a_note(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(main_mnist.SETTINGS, "WARMUP_EPOCHS", 2)  # added to the block, read nowhere
    train(tiny_mnist, tmp_path / "run")
    assert "Note: nothing reads WARMUP_EPOCHS" in capsys.readouterr().out


def test_a_model_added_without_a_recipe_says_it_trains_with_the_block(tiny_mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(main_mnist.MODELS, "SmallNet", model.CompactNet)
    monkeypatch.setattr(main_mnist.settings, "CHOICES", {**main_mnist.settings.CHOICES,
                                                         "MODEL": list(main_mnist.MODELS)})
    train(tiny_mnist, tmp_path / "run", "--model", "SmallNet")
    assert "Note: SmallNet has no recipe in RECIPES (main_mnist.py): it trains with the block's settings" in \
           capsys.readouterr().out


def test_a_whole_number_in_the_block_still_takes_a_fraction_on_the_command_line(monkeypatch):
    monkeypatch.setitem(main_mnist.SETTINGS, "CROP_P", 0)  # CROP_P = 0: the crop off, as docs/changing.md says
    args = main_mnist.settings.parse_args(["--crop-p", "0.3", "--weight-decay", "1e-4"], main_mnist.SETTINGS,
                                          main_mnist.RECIPES, {})
    assert (args.CROP_P, args.WEIGHT_DECAY) == (0.3, 1e-4)


# ---- What a learner reads: receptive fields and the data trained on ----

def test_the_summary_gives_each_layers_receptive_field_and_run_json_keeps_them(tiny_mnist, tmp_path, capsys):
    record = train(tiny_mnist, tmp_path / "run", "--model", "Net")
    fields = [(layer, rf, jump) for layer, _, _, rf, jump in record["receptive_fields"]]
    # Net's comments in model.py give them: RF 3, 5, 6 (pool), 10, 14, 16 (pool)
    assert fields == [("conv1", 3, 1), ("conv2", 5, 1), ("forward()", 6, 2), ("conv3", 10, 2), ("conv4", 14, 2),
                      ("forward()", 16, 4)]
    assert "Receptive field of each convolution and pooling" in capsys.readouterr().out
    assert (record["train_images"], record["test_images"]) == (64, 32)  # tiny_mnist's


# ---- Edits of the files themselves, on a copy ----

def replace_first(path, old, new):
    """An edit in an editor: the first `old` in the file becomes `new`."""
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_a_dropout_added_to_the_block_and_net_trains_and_loads_with_it(copy, real_data_dir, tmp_path):
    replace_first(copy / "main_mnist.py", "\n# ----\n", "\nDROPOUT = 0.25           # Net: dropout before fc2\n# ----\n")
    replace_first(copy / "model.py", "def __init__(self):", "def __init__(self, dropout=0.5):")  # Net's, the first
    replace_first(copy / "model.py", "self.fc2 = nn.Linear(50, 10)",
                  "self.fc2 = nn.Linear(50, 10)\n        self.dropout = nn.Dropout(dropout)")
    out_dir = tmp_path / "run"
    result = run(copy, *DRY, "--model", "Net", "--data-dir", real_data_dir, "--out-dir", str(out_dir))
    assert result.returncode == 0, result.stderr
    assert json.loads((out_dir / "run.json").read_text())["hyperparameters"]["DROPOUT"] == 0.25
    assert "DROPOUT=0.25" in result.stdout
    refused = run(copy, "--dropout", "1.5", "--out-dir", str(tmp_path / "bad"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr and "1.5" in refused.stderr


def test_predict_reads_a_folder_of_images(trained_model, tmp_path, capsys):
    import predict
    folder = tmp_path / "digits"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        seven_on_paper().save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert predict.main([str(folder), "--checkpoint", trained_model, "--out", str(tmp_path / "p.png")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "top 3" in line]
    assert [line.split(":")[0] for line in lines] == [str(folder / "a.png"), str(folder / "b.png")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict.main([str(empty), "--checkpoint", trained_model, "--out", str(tmp_path / "q.png")]) == 1
    assert "a folder with no image files in it" in capsys.readouterr().err

