"""Accuracy over seeds: trains a recipe once per seed (and precision), then tabulates the test accuracy.

    python3 benchmarks/seeds.py --model Net --seeds 1 2 3 --precisions bfloat16 float32
    python3 benchmarks/seeds.py --model CompactNet --seeds 1 2 3 4 5
    python3 benchmarks/seeds.py --model Net --seeds 1 2 3 --table-only     # tabulate the runs already made

Each run is `python3 main_mnist.py --model M --seed S [--no-amp] --out-dir OUT/M-<precision>-seed<S>`; a run whose
folder already holds a model.pt is not trained again, and a stopped one is resumed, so the script can be stopped
and started again. The table gives, per run, the final and best test accuracy, the accuracy in each of the last
three epochs and the median seconds per epoch (train + test; the median, so that a few epochs slowed by other work
on the machine do not move it), then min / mean / max per precision (with the mean of the runs' seconds per
epoch). It is made from each folder's metrics.csv.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from machinery import records  # noqa: E402  (the repo root: metrics.csv as runs write it, and the best epoch)
from machinery import runs  # noqa: E402  (the run folders' lock)
PRECISION_FLAGS = {"bfloat16": [], "float32": ["--no-amp"]}


def run_folder(out_dir, model, precision, seed):
    return os.path.join(out_dir, f"{model}-{precision}-seed{seed}")


def train(folder, model, precision, seed, extra):
    """Trains one run into `folder`, or resumes it there if it was stopped. A run stopped in its first epoch left
    no checkpoint, so nothing to resume: its folder is moved aside (kept, with a name that says so) and the run
    starts again."""
    script = os.path.join(REPO, "main_mnist.py")
    checkpoint = os.path.join(folder, "checkpoint.pt")
    if os.path.exists(checkpoint):
        command = [sys.executable, script, "--resume", checkpoint]
    else:
        if os.path.exists(folder):
            if runs.is_locked(folder):
                sys.exit(f"error: {folder} is in use by a run that is still going: wait for it to end")
            aside = f"{folder}.stopped-in-epoch-1-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
            os.rename(folder, aside)
            print(f"{folder} stopped in its first epoch, with nothing to resume: moved to {aside}", flush=True)
        command = [sys.executable, script, "--model", model, "--seed", str(seed), *PRECISION_FLAGS[precision],
                   "--out-dir", folder, *extra]
    print("running:", " ".join(command), flush=True)
    with open(folder + ".log", "a") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def summary(history):
    accuracies = [row["test_acc"] for row in history]
    best = records.best_epoch(history)
    return {"final": accuracies[-1], "best": best["test_acc"], "best_epoch": best["epoch"], "last3": accuracies[-3:],
            "seconds": statistics.median(row["seconds"] for row in history)}


def print_table(results):
    """results: {(precision, seed): summary}. Markdown, ready for docs/results.md."""
    print("| precision | seed | last 3 epochs (%) | final (%) | best (%) (epoch) | s per epoch (median) |")
    print("|---|---|---|---|---|---|")
    for (precision, seed), s in results.items():
        print(f"| {precision} | {seed} | {' / '.join(f'{a:.2f}' for a in s['last3'])} | {s['final']:.2f} | "
              f"{s['best']:.2f} ({s['best_epoch']}) | {s['seconds']:.1f} |")
    for precision in dict.fromkeys(p for p, _ in results):
        rows = [s for (p, _), s in results.items() if p == precision]
        finals, bests = [s["final"] for s in rows], [s["best"] for s in rows]
        lowest_late = min(min(s["last3"]) for s in rows)
        print(f"| **{precision}**, {len(rows)} seed{'s' * (len(rows) > 1)} | min / mean / max | lowest: {lowest_late:.2f} | "
              f"{min(finals):.2f} / {statistics.mean(finals):.3f} / {max(finals):.2f} | "
              f"{min(bests):.2f} / {statistics.mean(bests):.3f} / {max(bests):.2f} | "
              f"{statistics.mean(s['seconds'] for s in rows):.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Net")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISION_FLAGS), default=["bfloat16"])
    parser.add_argument("--out-dir", default=os.path.join("outputs", "seeds"))
    parser.add_argument("--table-only", action="store_true", help="train nothing: tabulate the finished runs")
    args, extra = parser.parse_known_args()  # anything else goes to main_mnist.py (--data-dir DIR, ...)
    os.makedirs(args.out_dir, exist_ok=True)
    results = {}
    for precision in args.precisions:
        for seed in args.seeds:
            folder = run_folder(args.out_dir, args.model, precision, seed)
            if not os.path.exists(os.path.join(folder, "model.pt")):
                if args.table_only:
                    print(f"not finished: {folder}")
                    continue
                train(folder, args.model, precision, seed, extra)
            results[precision, seed] = summary(records.read_history(folder))
    if results:
        print_table(results)


if __name__ == "__main__":
    main()
