"""Accuracy over seeds: a model's recipe trained once per seed, then a table of each run's test accuracy.

    python3 -m benchmarks.seeds --model CompactNet --seeds 1 2 3 4 5 [--out-dir seed-runs] [-- --no-amp ...]

Each run is `python3 main_mnist.py --model M --seed S --out-dir OUT/M-seedS ...`; a seed whose folder holds a
finished run is not trained again. The table: per run, the final and best test accuracy, the last three epochs'
and the seconds of training and test (metrics.csv's sum); then the mean, and whether every run held the line.
"""
import argparse
import csv
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="CompactNet")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--out-dir", default="seed-runs")
    parser.add_argument("--line", type=float, default=99.4, help="the accuracy each of the last 3 epochs must hold")
    parser.add_argument("extra", nargs="*", help="more flags for main_mnist.py, after --")
    args = parser.parse_args()
    finals = []
    print("| seed | final % | best % | last 3 epochs % | seconds |\n|---|---|---|---|---|")
    held = True
    for seed in args.seeds:
        parent = os.path.join(args.out_dir, f"{args.model}-seed{seed}")
        done = [f for f in (os.listdir(parent) if os.path.isdir(parent) else [])
                if os.path.isfile(os.path.join(parent, f, "model.pt"))]
        if not done:
            ran = subprocess.run([sys.executable, os.path.join(REPO, "main_mnist.py"), "--model", args.model, "--seed",
                                  str(seed), "--out-dir", parent, *args.extra], capture_output=True, text=True)
            if ran.returncode:
                sys.exit(f"seed {seed}: {(ran.stderr.strip().splitlines() or ['failed'])[-1]}")
            done = [f for f in os.listdir(parent) if os.path.isfile(os.path.join(parent, f, "model.pt"))]
        with open(os.path.join(parent, sorted(done)[-1], "metrics.csv")) as f:
            rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        last = [row["test_acc"] for row in rows[-3:]]
        held = held and min(last) >= args.line
        finals.append(rows[-1]["test_acc"])
        print(f"| {seed} | {finals[-1]:.2f} | {max(r['test_acc'] for r in rows):.2f} | "
              f"{' / '.join(f'{a:.2f}' for a in last)} | {sum(r['seconds'] for r in rows):.1f} |", flush=True)
    print(f"\nmean of {len(finals)}: {sum(finals) / len(finals):.3f}% (min {min(finals):.2f}, max {max(finals):.2f}); "
          f"every run at least {args.line}% in each of its last 3 epochs: {'yes' if held else 'no'}")


if __name__ == "__main__":
    main()
