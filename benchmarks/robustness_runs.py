"""What each model knows, and what augmentation buys: the runs behind docs/model-knows.md's robustness and calibration figures.

    python3 benchmarks/robustness_runs.py [--out-dir robustness-runs] [--net-epochs 20] [--compact-epochs 15] [--dry-run]

Trains Net and CompactNet (each with its recipe), each with the augmentation as the block has it and with the
rotation off (--rotation 0), then evaluates each saved model with `main_mnist.py --eval-only`: its robustness
curves, its calibration (expected calibration error before and after temperature scaling) and its "not sure"
threshold. `main_mnist.py --compare` then draws the four models' curves on one figure. Last, each model reads
NON_DIGITS images of each kind of benchmarks/non_digit_kinds.py (letters, signs, shapes, scribbles, doodles: dark
on light, as a person's photo of paper would be) through predict.py's path, and the share it calls "not sure" is counted,
beside the share of real test digits it calls "not sure" (the held-out halves of the calibration).

A run whose folder already has its model.pt is not trained again. Prints a Markdown table for docs/model-knows.md.
"""
import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import predict  # noqa: E402  (the repo root)
from machinery import records  # noqa: E402
from machinery.images import to_mnist  # noqa: E402

import torch  # noqa: E402

spec = importlib.util.spec_from_file_location("non_digit_kinds", os.path.join(REPO, "benchmarks", "non_digit_kinds.py"))
held_out_kinds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(held_out_kinds)

NON_DIGITS = 60  # per kind of benchmarks/non_digit_kinds.py
AUGMENTATION = {"on": [], "off": ["--rotation", "0"]}


def not_sure_share(model_path, device, count=NON_DIGITS, seed=0):
    """{kind: share of `count` made images of that kind the model calls "not sure"} through predict.py's path."""
    _, model, _, calibration = predict.load_reader(model_path, device)
    rng = random.Random(seed)
    shares = {}
    for kind, make in held_out_kinds.KINDS.items():
        digits = torch.stack([to_mnist(make(rng)) for _ in range(count)])
        probabilities = predict.classify(model, device, digits, calibration)
        shares[kind] = sum(isinstance(predict.answer(p, d, calibration), str)
                           for p, d in zip(probabilities, digits)) / count
    return shares


def main_mnist(*args):
    subprocess.run([sys.executable, os.path.join(REPO, "main_mnist.py"), *args], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="robustness-runs", help="where the runs and the figure go")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: main_mnist.py's)")
    parser.add_argument("--net-epochs", type=int, default=None, help="Net's epochs (default: its recipe's)")
    parser.add_argument("--compact-epochs", type=int, default=None, help="CompactNet's epochs (default: its recipe's)")
    parser.add_argument("--dry-run", action="store_true", help="one batch per epoch and per evaluation: a check")
    args = parser.parse_args()

    extra = (["--data-dir", args.data_dir] if args.data_dir else []) + (["--dry-run"] if args.dry_run else [])
    epochs = {"Net": args.net_epochs, "CompactNet": args.compact_epochs}
    rows, evaluations = [], []
    for model in ("Net", "CompactNet"):
        for augmentation, flags in AUGMENTATION.items():
            name = f"{model}-augmentation-{augmentation}"
            folder, evaluation = os.path.join(args.out_dir, name), os.path.join(args.out_dir, name + "-eval")
            model_path = os.path.join(folder, records.FINAL_MODEL)
            if not os.path.exists(model_path):
                main_mnist("--model", model, *flags, "--out-dir", folder, *extra,
                           *(["--epochs", str(epochs[model])] if epochs[model] else []))
            if not os.path.exists(os.path.join(evaluation, records.RECORD)):
                main_mnist("--eval-only", "--checkpoint", model_path, "--out-dir", evaluation, *extra)
            evaluations.append(evaluation)
            trained, evaluated = records.read_record(folder), records.read_record(evaluation)
            calibration = trained["calibration"]
            shares = not_sure_share(model_path, torch.device("cpu"))
            rows.append([model, augmentation, f"{trained['epochs_done']}", f"{trained['final_test_acc']:.2f}",
                         f"{evaluated['robustness_mean']:.1f}", f"{100 * calibration['ece_before']:.2f}",
                         f"{100 * calibration['ece_after']:.2f}", f"{calibration['temperature']:.2f}",
                         f"{100 * calibration['threshold']:.1f}", f"{100 * (1 - calibration['answered']):.1f}",
                         f"{100 * calibration['answered_error']:.2f}",
                         *(f"{100 * share:.0f}" for share in shares.values())])
            with open(os.path.join(evaluation, "not_sure.json"), "w") as f:
                json.dump(shares, f)
    main_mnist("--compare", *evaluations, "--out-dir", args.out_dir)
    header = ["model", "augmentation", "epochs", "test acc. %", "acc. under shifts %", "ECE %", "ECE after T %",
              "T", "not sure below %", "real digits not sure %", "error of answers %",
              *(f"{kind} not sure %" for kind in held_out_kinds.KINDS)]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
