import importlib.util
import os

from machinery import records

from conftest import REPO

spec = importlib.util.spec_from_file_location("seeds", os.path.join(REPO, "benchmarks", "seeds.py"))
seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seeds)


def write_metrics(folder, test_accuracies, seconds):
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.csv"), "w") as f:
        f.write("epoch,train_loss,train_acc,test_loss,test_acc,lr,seconds\n")
        for epoch, (accuracy, second) in enumerate(zip(test_accuracies, seconds), start=1):
            f.write(f"{epoch},0.1,97.0,0.05,{accuracy},0.01,{second}\n")


def test_seed_table_gives_each_run_and_min_mean_max_per_precision(tmp_path, capsys):
    # Two finished runs of one precision; the table-only mode trains nothing and reads their metrics.csv.
    write_metrics(tmp_path / "Net-float32-seed1", [98.0, 99.2, 99.4, 99.3], [10, 11, 50, 12])
    write_metrics(tmp_path / "Net-float32-seed2", [98.5, 99.1, 99.0, 99.5], [9, 9, 9, 9])
    first = seeds.summary(records.read_history(seeds.run_folder(str(tmp_path), "Net", "float32", 1)))
    assert first == {"final": 99.3, "best": 99.4, "best_epoch": 3, "last3": [99.2, 99.4, 99.3], "seconds": 11.5}

    seeds.print_table({("float32", 1): first,
                       ("float32", 2): seeds.summary(records.read_history(tmp_path / "Net-float32-seed2"))})
    out = capsys.readouterr().out
    assert "| float32 | 1 | 99.20 / 99.40 / 99.30 | 99.30 | 99.40 (3) | 11.5 |" in out  # median: 50 s is ignored
    assert "| float32 | 2 | 99.10 / 99.00 / 99.50 | 99.50 | 99.50 (4) | 9.0 |" in out
    assert "| **float32**, 2 seeds | min / mean / max | lowest: 99.00 | 99.30 / 99.400 / 99.50 |" in out


def test_a_run_stopped_in_its_first_epoch_is_moved_aside_and_trained_again(tmp_path, monkeypatch, capsys):
    folder = seeds.run_folder(str(tmp_path), "CompactNet", "float32", 3)
    os.makedirs(folder)
    for name in ("run.json", "samples.png"):  # what a run killed before its first checkpoint leaves
        open(os.path.join(folder, name), "w").close()
    commands = []
    monkeypatch.setattr(seeds.subprocess, "run", lambda command, **kwargs: commands.append(command))
    seeds.train(folder, "CompactNet", "float32", 3, ["--data-dir", "data"])
    (aside,) = [name for name in os.listdir(tmp_path) if ".stopped-in-epoch-1-" in name]
    assert sorted(os.listdir(tmp_path / aside)) == ["run.json", "samples.png"]  # kept, not deleted
    assert "--resume" not in commands[0] and commands[0][-4:] == ["--out-dir", folder, "--data-dir", "data"]
    assert "nothing to resume" in capsys.readouterr().out
