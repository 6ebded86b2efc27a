"""What a trained model is scored on beyond its accuracy: the report on the test set at the end of every run
(per-class accuracy, the misclassified digits, the confusion matrix, the calibration), and --eval-only, which
scores a saved model in a folder of its own, robustness curves included.
"""
import os

from machinery import records, robustness, runs, settings
from machinery.figures import plot_confusion_matrix, plot_misclassified, plot_reliability, plot_robustness
from machinery.hardware import LAYOUTS, choose_precision_and_layout
from utils import (check_output, confusion_matrix, get_testloader, get_trainloader, loss_function, loss_name,
                   per_class_accuracy, predict, test)


def report_test_set(model, device, test_loader, amp, folder, held_back=None):
    """Per-class accuracy and the calibration on the console; the misclassified grid, the confusion matrix and the
    reliability diagram as figures. Returns the calibration (robustness.calibrate) for run.json, chosen on the
    `held_back` training digits where there are any, else on halves of the test set; None where the images are
    too few to fit one (a dry run with --test-batch-size 1)."""
    log_probabilities, labels = predict(model, device, test_loader, amp)
    probabilities = log_probabilities.exp()
    matrix = confusion_matrix(probabilities.argmax(dim=1), labels)
    accuracies = per_class_accuracy(matrix)
    print("Per-class test accuracy: " + "  ".join(f"{digit}: {acc:.2f}%" for digit, acc in enumerate(accuracies)))
    with runs.uninterrupted():
        plot_misclassified(test_loader.images, probabilities, labels, os.path.join(folder, records.MISCLASSIFIED))
        plot_confusion_matrix(matrix, os.path.join(folder, records.CONFUSION))
    held = predict(model, device, held_back, amp) if held_back is not None and len(held_back.labels) else None
    if held is None and len(labels) < robustness.LEAST_TO_CALIBRATE:
        print(f"Calibration: none, from {len(labels)} test image: each half of the test set must hold one")
        return None
    calibration = robustness.calibrate(log_probabilities, labels, *(held or ()))
    print(f"Calibration, chosen on {calibration['chosen_on']}: expected calibration error on the test set "
          f"{100 * calibration['ece_before']:.2f}% as trained, {100 * calibration['ece_after']:.2f}% at temperature "
          f"{calibration['temperature']:.2f}; \"not sure\" below {100 * calibration['threshold']:.1f}% confidence "
          f"(\"not a digit\" below {100 * calibration['not_a_digit']:.1f}%), which answers "
          f"{100 * calibration['answered']:.1f}% of the test digits, {100 * calibration['answered_error']:.2f}% "
          f"of them wrongly")
    scaled = (log_probabilities / calibration["temperature"]).softmax(dim=1)
    with runs.uninterrupted():
        plot_reliability([(f"{os.path.basename(folder)}: calibration chosen on {calibration['chosen_on']}",
                           robustness.reliability(probabilities, labels), robustness.reliability(scaled, labels),
                           calibration["ece_before"], calibration["ece_after"], calibration["temperature"])],
                         os.path.join(folder, records.RELIABILITY))
    return calibration


def report_robustness(model, device, test_loader, amp, folder, record, dry_run):
    """The model's accuracy under each family of shifts (robustness.py) on the first test images (100 in a dry
    run): robustness.csv, robustness.png, and their mean in run.json."""
    curves, images = robustness.robustness_curves(model, device, test_loader.images, test_loader.labels, amp,
                                                  count=100 if dry_run else robustness.ROBUSTNESS_IMAGES)
    mean = robustness.mean_accuracy(curves)
    record.update(robustness_mean=mean, robustness_images=images)
    with runs.uninterrupted():
        records.write_robustness(os.path.join(folder, records.ROBUSTNESS_CSV), curves, images)
        plot_robustness({f"{os.path.basename(folder)}: {record['model']}": curves},
                        os.path.join(folder, records.ROBUSTNESS_PLOT), images)
    print(f"Robustness: accuracy {mean:.1f}% under shifts, the mean over {len(curves)} families of "
          f"{images:,} shifted test images (a point's standard error is at most "
          f"{robustness.standard_error(50, images):.1f} points); each family's curve in {records.ROBUSTNESS_CSV}")


def held_back_of(checkpoint, hp, device, dry_run):
    """The training digits the run that made `checkpoint` held back (its HELD_BACK, from the run.json beside it),
    as batches, so that its calibration is chosen on them again; None where it held back none or has no record."""
    trained = ((records.record_beside(checkpoint) or {}).get("hyperparameters") or {}).get("HELD_BACK")
    if not isinstance(trained, (int, float)) or isinstance(trained, bool) or not 0 < trained <= 0.5:
        return None
    loader = get_trainloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device, max_batches=1 if dry_run else None,
                             layout=hp["LAYOUT"])
    return loader.hold_back(trained, hp["TEST_BATCH_SIZE"])


def evaluate_only(args, device, defaults, recipes):
    """Scores a saved model on the test set, into a folder of its own: nothing a training run made is touched."""
    hp = settings.start(args, defaults, recipes)
    model_name, model = records.load_model(args.checkpoint, device, hp["MODEL"] if hasattr(args, "MODEL") else None)
    hp["MODEL"] = model_name
    folder = runs.open_run_folder(args, hp, kind="eval")
    amp = choose_precision_and_layout(hp, device, folder, lambda: model, timing=False)  # a test pass gains nothing
    model.to(memory_format=LAYOUTS[hp["LAYOUT"]])
    test_loader = get_testloader(hp["DATA_DIR"], hp["TEST_BATCH_SIZE"], device,
                                 max_batches=1 if args.dry_run else None, layout=hp["LAYOUT"])
    print(f"Evaluating {model_name} from {args.checkpoint} on {device}; figures go to {folder}")
    record = runs.new_record(hp, model, device, amp, args.argv, mode="eval-only")
    criterion = loss_function(check_output(model, test_loader.sample()))
    record.update(checkpoint=os.path.abspath(args.checkpoint), epochs_planned=0, loss=loss_name(criterion))
    _, record["final_test_acc"] = test(model, device, test_loader, criterion, amp)
    record["calibration"] = report_test_set(model, device, test_loader, amp, folder,
                                            held_back_of(args.checkpoint, hp, device, args.dry_run))
    report_robustness(model, device, test_loader, amp, folder, record, args.dry_run)
    record["status"] = "finished"
    runs.save_record(folder, record)
