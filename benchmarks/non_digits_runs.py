"""Does CompactNet know a non-digit? The runs behind docs/model-knows.md's "Not a digit" section.

    python3 benchmarks/non_digits_runs.py [--out-dir non-digit-runs] [--data-dir DIR] [--seeds 5] [--dry-run]

Trains CompactNet by its recipe (non-digits in training, 5,000 training digits held back for the threshold) with
seeds 1 to --seeds; once as before (--non-digits "" --held-back 0: no non-digits, the threshold on the test set);
and once without each kind of non-digit the recipe trains on (leave one kind out). Then reads, through predict.py's path
(to_mnist, the run's temperature and threshold), with each model:
  - MNIST's 10,000 test digits: accuracy and the share declined ("not sure" or "not a digit");
  - NON_DIGITS images of each kind in benchmarks/non_digit_kinds.py, made by code training never uses;
  - NON_DIGITS of each training kind, made by machinery/non_digits.py with a seed of their own (for the model
    trained without that kind, they are a kind it never saw);
  - the 1,797 handwritten digits of the UCI set (43 writers, none of MNIST's), if scikit-learn is installed
    (pip install scikit-learn; it ships them), as 8x8 images brought to 28x28 by to_mnist.
Per kind: the share declined, the AUROC of confidence between MNIST's test digits and the kind, and the share of
the kind accepted at the confidence that keeps 95% of test digits (FPR at 95%). Last, --eval-only on the models
before and after (seed 1) for their robustness curves, `--compare` for the curves on one figure, and both
reliability diagrams side by side. A run whose folder already has its model.pt is not trained again.
Prints Markdown tables and writes them, with every number, to OUT_DIR/results.json.
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
import torch  # noqa: E402

import main_mnist  # noqa: E402  (the repo root)
import predict  # noqa: E402
from machinery import non_digits, records, robustness  # noqa: E402
from machinery.figures import plot_reliability  # noqa: E402
from machinery.images import to_mnist  # noqa: E402
from utils import load_mnist  # noqa: E402

spec = importlib.util.spec_from_file_location("non_digit_kinds", os.path.join(REPO, "benchmarks", "non_digit_kinds.py"))
held_out_kinds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(held_out_kinds)

NON_DIGITS = 300  # images of each kind measured: a share's standard error is at most 2.9 points
KEPT = 0.95  # FPR is measured at the confidence that keeps this share of MNIST's test digits


def run_main(*args):
    subprocess.run([sys.executable, os.path.join(REPO, "main_mnist.py"), *args], check=True)


def train(folder, flags, extra):
    if not os.path.exists(os.path.join(folder, records.FINAL_MODEL)):
        run_main("--model", "CompactNet", *flags, "--out-dir", folder, *extra)
    return folder


def auroc(digits, others):
    """The chance that a random digit's confidence exceeds a random non-digit's (ties count half)."""
    scores = torch.cat([digits, others]).double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    for value in scores.unique()[torch.unique(scores, return_counts=True)[1] > 1]:  # ties: their mean rank
        ranks[scores == value] = ranks[scores == value].mean()
    return float((ranks[:len(digits)].sum() - len(digits) * (len(digits) + 1) / 2) / (len(digits) * len(others)))


def read(model, calibration, images):
    """(confidence [N], declined [N] bool, predicted [N]) of 28x28 images in [0, 1], as predict.py reads them."""
    probabilities = torch.cat([predict.classify(model, torch.device("cpu"), images[i:i + 1000], calibration)
                               for i in range(0, len(images), 1000)])
    answers = [predict.answer(p, d, calibration) for p, d in zip(probabilities, images)]
    declined = torch.tensor([isinstance(a, str) for a in answers])
    return probabilities.max(dim=1).values, declined, probabilities.argmax(dim=1)


def uci_digits():
    """(images [1797, 28, 28], labels) of scikit-learn's copy of the UCI handwritten digits, or None."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    from PIL import Image
    data = load_digits()
    images = [to_mnist(Image.fromarray((255 - image * 255 / 16).astype("uint8")).resize((64, 64), Image.BILINEAR))
              for image in data.images]
    return torch.stack(images), torch.as_tensor(data.target)


def measure(folder, test_images, test_labels, kinds_made, uci):
    _, model, _, calibration = predict.load_reader(os.path.join(folder, records.FINAL_MODEL), torch.device("cpu"))
    confidence, declined, predicted = read(model, calibration, test_images)
    digits = confidence
    result = {"test_acc": 100 * float((predicted == test_labels).double().mean()),
              "test_declined": 100 * float(declined.double().mean()), "threshold": calibration["threshold"],
              "not_a_digit": calibration.get("not_a_digit"), "kinds": {}}
    cut = float(digits.double().quantile(1 - KEPT))
    for kind, images in kinds_made.items():
        confidence, declined, _ = read(model, calibration, images)
        result["kinds"][kind] = {"declined": 100 * float(declined.double().mean()),
                                 "auroc": auroc(digits, confidence),
                                 "fpr95": 100 * float((confidence >= cut).double().mean())}
    if uci is not None:
        confidence, declined, predicted = read(model, calibration, uci[0])
        result["uci"] = {"accuracy": 100 * float((predicted == uci[1]).double().mean()),
                         "declined": 100 * float(declined.double().mean()),
                         "accuracy_answered": 100 * float((predicted == uci[1])[~declined].double().mean())}
    return result


def make_kinds(test_images, test_labels, count, seed=0):
    """{kind: images [count, 28, 28]}: each held-out kind through to_mnist, and each training kind as
    machinery/non_digits.py makes it (pieces from test digits), from seeds of their own."""
    rng = random.Random(seed)
    made = {kind: torch.stack([to_mnist(make(rng)) for _ in range(count)])
            for kind, make in held_out_kinds.KINDS.items()}
    torch.manual_seed(seed)
    digits = test_images[:1000].unsqueeze(1)
    for kind in non_digits.KINDS:
        made[f"training's {kind}"] = non_digits.MAKERS[kind](digits, test_labels[:1000], count)[:, 0].clamp(0, 1)
    return made


def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="non-digit-runs", help="where the runs, figures and results go")
    parser.add_argument("--data-dir", default=None, help="folder holding MNIST/raw (default: main_mnist.py's)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the recipe's runs (1 to this)")
    parser.add_argument("--epochs", type=int, default=None, help="each run's epochs (default: the recipe's)")
    parser.add_argument("--dry-run", action="store_true", help="one batch per epoch and 30 images a kind: a check")
    args = parser.parse_args()
    extra = ((["--data-dir", args.data_dir] if args.data_dir else []) + (["--dry-run"] if args.dry_run else [])
             + (["--epochs", str(args.epochs)] if args.epochs else []))
    out = args.out_dir
    runs = {"before": train(os.path.join(out, "before"), ["--non-digits", "", "--held-back", "0"], extra)}
    for seed in range(1, args.seeds + 1):
        runs[f"after, seed {seed}"] = train(os.path.join(out, f"after-seed{seed}"), ["--seed", str(seed)], extra)
    recipe = non_digits.kind_names(main_mnist.RECIPES["CompactNet"]["NON_DIGITS"])
    for kind in recipe:  # leave one kind out
        others = ",".join(k for k in recipe if k != kind)
        runs[f"without {kind}"] = train(os.path.join(out, f"without-{kind}"), ["--non-digits", others], extra)

    test_images, test_labels = load_mnist(args.data_dir or "data", train=False)
    test_images = test_images.float().div(255)
    kinds_made = make_kinds(test_images, test_labels, 30 if args.dry_run else NON_DIGITS)
    uci = uci_digits()
    results = {name: measure(folder, test_images, test_labels, kinds_made, uci) for name, folder in runs.items()}

    # The models before and after: robustness curves (--eval-only), on one figure (--compare), and both
    # reliability diagrams side by side, with the number of test digits in each bin.
    evaluations = []
    for name in ("before", "after, seed 1"):
        evaluation = runs[name] + "-eval"
        if not os.path.exists(os.path.join(evaluation, records.RECORD)):
            run_main("--eval-only", "--checkpoint", os.path.join(runs[name], records.FINAL_MODEL),
                       "--out-dir", evaluation, *[a for a in extra if a != "--epochs" and not a.isdigit()])
        evaluations.append(evaluation)
        results[name]["robustness_mean"] = records.read_record(evaluation)["robustness_mean"]
    run_main("--compare", *evaluations, "--out-dir", out)
    panels = []
    for name in ("before", "after, seed 1"):
        _, model, _, calibration = predict.load_reader(os.path.join(runs[name], records.FINAL_MODEL),
                                                       torch.device("cpu"))
        probabilities = predict.classify(model, torch.device("cpu"), test_images, {"temperature": 1.0})
        scaled = predict.classify(model, torch.device("cpu"), test_images, calibration)
        panels.append((f"CompactNet {name}", robustness.reliability(probabilities, test_labels),
                       robustness.reliability(scaled, test_labels),
                       robustness.expected_calibration_error(probabilities, test_labels),
                       robustness.expected_calibration_error(scaled, test_labels), calibration["temperature"]))
    plot_reliability(panels, os.path.join(out, "reliability_before_after.png"))

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    kinds = list(kinds_made)
    print("\nPer model: MNIST test accuracy, MNIST test digits declined, and per kind the share declined (%):\n")
    uci_header = ["UCI acc. %", "UCI declined %"] if uci else []
    print(table(["model", "test acc. %", "MNIST declined %", *kinds, *uci_header],
                [[name, f"{r['test_acc']:.2f}", f"{r['test_declined']:.2f}",
                  *(f"{r['kinds'][k]['declined']:.0f}" for k in kinds),
                  *([f"{r['uci']['accuracy']:.1f}", f"{r['uci']['declined']:.1f}"] if uci else [])]
                 for name, r in results.items()]))
    print("\nPer kind: declined % / AUROC / FPR at 95% of test digits kept (%):\n")
    print(table(["kind", *results], [[kind, *(f"{r['kinds'][kind]['declined']:.0f} / {r['kinds'][kind]['auroc']:.3f} / "
                                              f"{r['kinds'][kind]['fpr95']:.0f}" for r in results.values())]
                                     for kind in kinds]))
    after = [r for name, r in results.items() if name.startswith("after")]
    print(f"\nAfter, {len(after)} seeds: test accuracy mean {sum(r['test_acc'] for r in after) / len(after):.3f}% "
          f"(" + ", ".join(f"{r['test_acc']:.2f}" for r in after) + ")")


if __name__ == "__main__":
    main()
