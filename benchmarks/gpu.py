"""The GPU check: FastNet's run, a CompactNet epoch and a Net epoch, each in float32 and in bfloat16, timed on this
machine's GPU; a seed's accuracy compared between the two; a table for README.

    python3 -m benchmarks.gpu [--device cuda] [--seed 1] [--data-dir data] [--models FastNet CompactNet Net] [-- FLAGS]

Each cell is one `python3 main_mnist.py --model M --epochs 1 --seed S --device D --no-amp` (or `--amp`) in a
temporary folder, read back from its run.json: the seconds of training and test, the whole command's seconds,
the precision it ran in and the test accuracy. bfloat16 runs only where the device computes it natively (a CUDA GPU
of compute capability 8 or later): elsewhere both rows are float32, and the table says so.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = 0.3  # points of test accuracy between float32 and bfloat16 runs of one seed, after one epoch, taken as noise


def run(model, amp, args, out_dir):
    command = [sys.executable, os.path.join(REPO, "main_mnist.py"), "--model", model, "--epochs", "1", "--seed",
               str(args.seed), "--device", args.device, "--amp" if amp else "--no-amp", "--data-dir", args.data_dir,
               "--out-dir", out_dir, *args.extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: {' '.join(command[1:])} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    folder = max((os.path.join(out_dir, f) for f in os.listdir(out_dir)), key=os.path.getmtime)
    with open(os.path.join(folder, "run.json")) as f:
        record = json.load(f)
    return record, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--models", nargs="+", default=["FastNet", "CompactNet", "Net"], help="one epoch of each")
    parser.add_argument("extra", nargs="*", help="more flags for main_mnist.py, after --")
    args = parser.parse_args()
    print("| model (1 epoch) | precision | training and test (s) | whole command (s) | test accuracy |\n"
          "|---|---|---|---|---|")
    same = True
    with tempfile.TemporaryDirectory() as out_dir:
        for model in args.models:
            accuracies = []
            for amp in (False, True):
                record, seconds = run(model, amp, args, out_dir)
                accuracies.append(record["final_test_acc"])
                print(f"| {model} | {record['precision']} | {record['seconds']:.1f} | {seconds:.1f} | "
                      f"{record['final_test_acc']:.2f}% |", flush=True)
            same = same and abs(accuracies[0] - accuracies[1]) <= NOISE
        print(f"\nDevice: {record['device']}; torch {record['torch']}. Seed {args.seed}'s accuracy the same in float32 "
              f"and bfloat16 within {NOISE} points for every model: {'yes' if same else 'NO'}"
              + (" (no native bfloat16 here: both rows ran in float32)" if record["precision"] == "float32" else ""))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
