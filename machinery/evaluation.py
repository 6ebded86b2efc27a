"""What a trained model knows beyond its accuracy: the report at the end of a run (per-class accuracy, the
misclassified digits, the confusion matrix, the calibration, "not sure" and "not a digit"), the robustness curves
of --eval-only, and the answer predict.py and app.py give.

"Not a digit" costs the classifier nothing: it is decided after training, from the features the model computed
anyway (Sun et al., "Out-of-distribution detection with deep nearest neighbors", 2022). An image whose features,
at the inputs of the model's last two layers with weights, lie farther from those of every one of BANK training
digits than nearly all other training digits do, is no digit the model knows. Wide features are kept in the
PROJECTED directions that hold most of the bank's (uncentred principal components), each at its whole length: what
an image has off those directions still counts as distance, so the bank measures as the unprojected one did.
And what no training digit has, ink thicker than any of their strokes, is no digit either: a filled oval lies
among the 0s in those features.
"""
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from augment import affine, rotate, scaling, shift
from machinery.figures import plot_confusion, plot_misclassified, plot_reliability
from machinery.runs import save_figure
from utils import autocast, normalize

ANSWERED_ERROR = 0.002  # "not sure" below the lowest confidence at which the answers above it err at most this often
MOST_UNSURE = 0.005     # ... but never declining more than this share of the test digits for it
BANK = 10_000           # training digits whose features are kept in calibration.pt, to measure a new image against
LIMIT_SET = 5_000       # other training digits, to set the limits at: as steady as 10,000 were, at half the cost
KEPT = 0.9975           # "not a digit" beyond the distance that keeps this share of other training digits, per layer
ROUGH = 10              # the report searches the whole bank only where every 10th bank digit leaves it in doubt
PROJECTED = 256         # wider features are kept in this many principal directions: under 10 MB of calibration.pt
BASIS_FROM = 2_000      # bank digits those directions are found from: they hold what all 10,000's do, in a 6th the time
ECE_BINS = 15           # confidence bins of the expected calibration error, as Guo et al. (2017)


def last_layers(model, count=2):
    return [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-count:]


def outputs(model, device, images, amp=False, features=True, batch_size=1000):
    """(log-probabilities [N, 10], [features [N, d] per last layer] or None) of 28x28 images, uint8 or in [0, 1],
    [N, 28, 28] or [N, 1, 28, 28]: the one forward pass over images of the report, the robustness curves,
    predict.py and the page."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model calls no hooks: its own module does
    layers = last_layers(model) if features else []
    captured = [[] for _ in layers]
    hooks = [layer.register_forward_hook(lambda module, inputs, output, i=i: captured[i].append(inputs[0].flatten(1)))
             for i, layer in enumerate(layers)]
    model.eval()
    scores = []
    try:
        with torch.inference_mode(), autocast(device, amp):
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].to(device).float()
                batch = batch / 255 if images.dtype == torch.uint8 else batch
                scores.append(model(normalize(batch.view(-1, 1, 28, 28))).float().log_softmax(dim=1).cpu())
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(scores), [torch.cat(f).float().cpu() for f in captured] if features else None


def principal(features):
    """The PROJECTED directions [d, PROJECTED] that hold most of a layer's features (float16, as calibration.pt
    keeps them), or None if it has no more."""
    if features.shape[1] <= PROJECTED:
        return None
    with torch.random.fork_rng(devices=[]):  # a randomized SVD: seeded, and the run's random state left alone
        torch.manual_seed(0)
        return torch.svd_lowrank(features, q=PROJECTED + 10, niter=1)[2][:, :PROJECTED].contiguous().half()


def project(features, bases):
    """Per layer, the features in its basis (if any), over their whole length: cosines with the bank are products."""
    return [(f if b is None else f @ b.float()) / f.norm(dim=1, keepdim=True).clamp(min=1e-12)
            for f, b in zip(features, bases)]


def distances(features, bank, above=None):
    """Per layer, the distance (1 - cosine) of each image's projected features to the nearest in the bank. Given
    `above` (a number per layer), exact only where it may exceed that: the nearest of every ROUGH-th bank digit is
    no nearer than the bank's, so where it is within `above` it stands in; the whole bank is searched for the rest."""
    def nearest(f, b):  # in blocks of 512 images: their products with a bank of 10,000 take 20 MB
        return torch.cat([1 - (f[i:i + 512] @ b.T).max(dim=1).values for i in range(0, len(f), 512)])
    result = []
    for layer, (f, b) in enumerate(zip(features, bank)):
        b = b.float()
        if above is None:
            result.append(nearest(f, b))
            continue
        d = nearest(f, b[::ROUGH])
        far = d > above[layer]
        if far.any():
            d[far] = nearest(f[far], b)
        result.append(d)
    return torch.stack(result, dim=1)


def limits_of(features, bank):
    """Per layer, the distance within which KEPT of these training digits lie. The whole bank is searched only for
    the tenth of them farthest from every ROUGH-th bank digit: exact whenever the limit lies among that tenth, as it
    does (else all are searched)."""
    bound = distances(features, [b[::ROUGH] for b in bank]).quantile(0.9, dim=0)
    d = distances(features, bank, above=bound).double()
    if not bool((d.quantile(KEPT, dim=0, interpolation="lower") > bound).all()):
        d = distances(features, bank).double()
    return d.quantile(KEPT, dim=0)


def ink_depth(images):
    """How many 3x3 erosions the ink (above half) of each 28x28 image, uint8 or in [0, 1], survives: a training
    digit's strokes 1 to 5, a filled square of side 11 six. The edges count as ink, so a page all ink counts 14."""
    ink = images.reshape(-1, 28, 28) > (127 if images.dtype == torch.uint8 else 0.5)
    depth, alive = torch.zeros(len(ink)), torch.arange(len(ink))
    for _ in range(14):
        kept = ink.flatten(1).any(dim=1)  # only the images with ink left are eroded again: most digits go by 3
        ink, alive = ink[kept], alive[kept]
        depth[alive] += 1
        across = ink.clone()  # a pixel stays where its neighbours left and right are ink, then above and below
        across[:, :, 1:] &= ink[:, :, :-1]
        across[:, :, :-1] &= ink[:, :, 1:]
        ink = across.clone()
        ink[:, 1:] &= across[:, :-1]
        ink[:, :-1] &= across[:, 1:]
    return depth


def answer(probabilities, distance, knows):
    """What an image is read as: "not a digit" (saying why where it is the ink), "not sure", or the digit."""
    if distance is not None and float(distance[-1]) > knows["thickest"]:
        return "not a digit (its ink is thicker than any digit's: drawn small, or with a broad pen?)"
    if distance is not None and bool((distance[:-1] > torch.tensor(knows["limits"])).any()):
        return "not a digit"
    confidence, digit = probabilities.max(dim=0)
    return int(digit) if float(confidence) >= knows["threshold"] else "not sure"


def read(model, device, images, knows):
    """(probabilities [N, 10] at the run's temperature, [N, layers + 1] or None: the distances, then the ink's depth)
    of 28x28 images in [0, 1]; answer() reads them against the limits and the thickest training digit's depth."""
    bank = knows.get("bank")
    scores, features = outputs(model, device, images, features=bank is not None)
    return ((scores / knows["temperature"]).softmax(dim=1), torch.cat(
        [distances(project(features, knows["bases"]), bank), ink_depth(images)[:, None]], dim=1) if bank else None)


def fit_temperature(scores, labels):
    """The temperature whose softmax(scores / T) gives the labels the highest likelihood, among 1/10 to 10: a coarse
    grid of log10(T), then a fine one about its best (the loss has one minimum: it is convex in 1 / T)."""
    best = 0.0
    for step in (0.05, 0.0025):
        grid = best + step * torch.arange(-20, 21, dtype=torch.float64)
        losses = [float(F.cross_entropy(scores.double() / 10 ** t, labels)) for t in grid.clamp(-1, 1)]
        best = float(grid.clamp(-1, 1)[min(range(len(losses)), key=losses.__getitem__)])
    return 10 ** best


def reliability(probabilities, labels):
    """Per confidence bin: (mean confidence, accuracy, count), or None where empty; and the ECE they make."""
    confidence, predicted = probabilities.max(dim=1)
    correct = predicted.eq(labels).double()
    which = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    rows = [(float(confidence[which == b].double().mean()), float(correct[which == b].mean()), int((which == b).sum()))
            if (which == b).any() else None for b in range(ECE_BINS)]
    return rows, sum(n * abs(a - c) for c, a, n in filter(None, rows)) / len(labels)


def not_sure_threshold(probabilities, labels):
    """The lowest confidence above which the answers err at most ANSWERED_ERROR of the time, capped so that at
    most MOST_UNSURE of these digits fall below it."""
    confidence, predicted = probabilities.max(dim=1)
    order = confidence.argsort(descending=True)
    error_rate = (~predicted.eq(labels))[order].double().cumsum(0) / torch.arange(1, len(order) + 1)
    good = (error_rate <= ANSWERED_ERROR).nonzero()
    threshold = float(confidence[order][good[-1, 0]]) if len(good) else 1.0
    return min(threshold, float(confidence.double().quantile(MOST_UNSURE)))


def report(model, device, train_images, test_images, test_labels, amp, folder, dry_run=False):
    """The end of a run: per-class accuracy, misclassified.png, confusion_matrix.png, reliability.png; returns (what
    run.json records of it, what predict.py answers with: {temperature, threshold, limits, bank, bases, thickest}). The
    temperature and "not sure" threshold saved are fitted on the test set; those the run reports are scored out of
    sample, each half of the test set at the values the other half gave. The bank and the "not a digit" limits come
    from training digits (BANK of them, and LIMIT_SET others to set the limits), chosen the same for every seed, and
    so does the thickest ink: beyond the depth of every one of them, an image is no digit. A dry run reports on a
    fifth of the test set, and twice as many training digits."""
    count = 2000 if dry_run else len(test_labels)
    train_images, test_images, test_labels = train_images[:2 * count], test_images[:count], test_labels[:count].cpu()
    scores, test_features = outputs(model, device, test_images, amp)
    probabilities = scores.exp()
    matrix = torch.bincount(test_labels * 10 + probabilities.argmax(1), minlength=100).reshape(10, 10)
    accuracy = 100 * matrix.diag() / matrix.sum(1).clamp(min=1)
    print("Per-class test accuracy: " + "  ".join(f"{d}: {a:.2f}%" for d, a in enumerate(accuracy.tolist())))
    save_figure(plot_misclassified(test_images, probabilities, test_labels), os.path.join(folder, "misclassified.png"))
    save_figure(plot_confusion(matrix), os.path.join(folder, "confusion_matrix.png"))

    half = torch.arange(len(scores)) % 2 == 0
    scaled, thresholds = torch.empty_like(probabilities), torch.empty(len(scores))
    for held, fitted in ((half, ~half), (~half, half)):  # each half at what the other half fitted: out of sample
        t = fit_temperature(scores[fitted], test_labels[fitted])
        scaled[held] = (scores[held] / t).softmax(dim=1)
        thresholds[held] = not_sure_threshold((scores[fitted] / t).softmax(dim=1), test_labels[fitted])
    temperature = fit_temperature(scores, test_labels)
    threshold = not_sure_threshold((scores / temperature).softmax(dim=1), test_labels)
    (before, ece_before), (after, ece_after) = reliability(probabilities, test_labels), reliability(scaled, test_labels)
    save_figure(plot_reliability((before, ece_before), (after, ece_after), temperature),
                os.path.join(folder, "reliability.png"))

    order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))
    size = min(BANK, len(order) // 2)
    chosen = train_images[order[:size + min(LIMIT_SET, size)]]
    _, features = outputs(model, device, chosen, amp)
    thickest = float(ink_depth(chosen).max())
    bases = [principal(f[:BASIS_FROM]) for f in features]
    features = project(features, bases)
    bank = [f[:size] for f in features]
    limits = limits_of([f[size:] for f in features], bank)
    confidence, predicted = scaled.max(dim=1)
    declined = ((distances(project(test_features, bases), bank, above=limits) > limits).any(dim=1)
                | (ink_depth(test_images) > thickest) | (confidence < thresholds))
    wrong = (predicted != test_labels) & ~declined
    print(f"Calibration (each half of the test digits scored at what the other half fitted): expected calibration "
          f"error {100 * ece_before:.2f}% as trained, {100 * ece_after:.2f}% at the fitted temperature (saved: "
          f"{temperature:.2f}); \"not sure\" below {100 * threshold:.1f}% confidence. Declined (\"not sure\" or \"not "
          f"a digit\"): {100 * float(declined.double().mean()):.2f}% of the test digits; "
          f"{100 * int(wrong.sum()) / max(1, int((~declined).sum())):.2f}% of those answered read wrongly")
    knows = {"temperature": temperature, "threshold": threshold, "limits": limits.tolist(),
             "bank": [b.half() for b in bank], "bases": bases, "thickest": thickest}
    return {"test_acc": 100 * float(matrix.diag().sum() / matrix.sum()), "temperature": temperature,
            "threshold": threshold, "not_a_digit_limits": limits.tolist(), "thickest_ink": thickest,
            "ece_before": ece_before, "ece_after_out_of_sample": ece_after,
            "test_declined_out_of_sample": float(declined.double().mean())}, knows


# ---- Robustness: accuracy under families of shifts, each a function of a batch [B, 1, 28, 28] in [0, 1] ----

def stroke(images, steps):
    """Strokes thicker (steps > 0) or thinner (< 0) by that many 3x3 dilations or erosions."""
    sign = 1 if steps > 0 else -1
    for _ in range(abs(steps)):
        images = sign * F.max_pool2d(sign * images, 3, stride=1, padding=1)
    return images


def blur(images, sigma):
    radius = math.ceil(3 * sigma)
    kernel = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma ** 2)).to(images.device)
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1)
    return F.conv2d(F.conv2d(images, kernel, padding=(0, radius)), kernel.transpose(2, 3), padding=(radius, 0))


FAMILIES = {  # name: (function of a batch and a strength, the strengths; the first leaves the images as they are)
    "rotation (degrees)": (lambda x, a: rotate(x, x.new_full((len(x),), a)), [0, 15, 30, 45, 60, 90]),
    "translation (pixels)": (lambda x, p: shift(x, x.new_tensor([[p, 0], [0, p], [-p, 0], [0, -p]]).long()
                                                 .repeat(len(x) // 4 + 1, 1)[:len(x)]), [0, 2, 4, 6, 8]),
    "scale (factor)": (lambda x, f: affine(x, scaling(x, 1 / f)), [1.0, 0.5, 0.75, 1.25, 1.5]),
    "stroke width (- thinner, + thicker)": (stroke, [0, -2, -1, 1, 2, 3]),
    "Gaussian noise (std)": (lambda x, s: (x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
                                           .to(x.device)).clamp(0, 1), [0, 0.2, 0.4, 0.6, 1.0]),
    "blur (sigma in pixels)": (lambda x, s: blur(x, s) if s else x, [0, 1.0, 1.5, 2.0, 3.0]),
    "contrast (1 as is, -1 inverted)": (lambda x, c: x * c + (1 - c) / 2, [1.0, 0.5, 0.25, 0.0, -1.0]),
}


def robustness_curves(model, device, images, labels, amp=False):
    """{family: [(strength, accuracy in %)]} on `images` (uint8 [N, 28, 28]) and their labels."""
    curves = {}
    with tqdm(total=sum(len(s) for _, s in FAMILIES.values()), desc="Robustness", leave=False) as bar:
        for family, (transform, strengths) in FAMILIES.items():
            curves[family] = []
            for strength in strengths:
                batch = transform(images.to(device).unsqueeze(1).float() / 255, strength)
                scores, _ = outputs(model, device, batch, amp, features=False)
                curves[family].append((strength, 100 * float(scores.argmax(1).eq(labels).double().mean())))
                bar.update()
            curves[family].sort()
    return curves
