"""Does a model know a digit from what is not one? The measurements behind docs/model-knows.md.

    python3 -m benchmarks.not_a_digit MODEL_PT [MODEL_PT ...] [--data-dir data] [--each 300]

For each model.pt (a finished run's), the answers predict.py gives, with the run's own calibration, to:
  - MNIST's 10,000 test digits (the share declined, "not sure" or "not a digit", and the accuracy of the rest);
  - --each images of ten kinds of non-digit drawn below, by code that no training uses: five the method was chosen
    on (TUNING_KINDS) and five added after it was, that nothing was tuned on (HELD_OUT_KINDS);
  - the 1,797 handwritten digits of the UCI set (43 writers, none of MNIST's; scikit-learn ships them:
    pip install scikit-learn), and 1,000 MNIST test digits photographed (dark ink on light paper, larger,
    off-centre, with sensor noise), and 1,000 others photographed grainier and lit from one side, all read through
    predict.py's path (images.to_mnist).
Four rules are compared on the same images: confidence alone ("not sure" below the run's threshold), nearest
neighbour on the input of the last layer only, nearest neighbour on the inputs of the last two layers, and what
predict.py uses: those and the ink thicker than any training digit's, then confidence.
"""
import argparse
import math
import os
import random
import tempfile

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from machinery.evaluation import answer, read, report
from machinery.images import to_mnist
from machinery.tools import load_model
from utils import load_mnist

SIZE = 200  # pixels a side of each drawing
LATIN = "AEFHKMNPRUVWXYacefhkmnrtuvwxy"  # capitals and small letters but the digit-like (O, I, l, S, Z, B, g, q, ...)
GREEK_AND_SIGNS = "αγεζηκλμνξπρφχψωΓΔΛΞΠΣΦΨΩ@#%&?≠≈∞√∑♠♣♥♦★☺✓←→↑↓⊕⊗∀∃∈∩∪¶"  # no ο, ι, σ, β, θ, δ, ∂ (0, 1, 6, 8)


def _font_path(name):
    import matplotlib
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name)


def _glyph(rng, text, font):
    image = Image.new("L", (SIZE, SIZE), 255)
    ImageDraw.Draw(image).text((SIZE / 2 + rng.randint(-15, 15), SIZE / 2 + rng.randint(-15, 15)), text, fill=0,
                               font=font, anchor="mm")
    return image.rotate(rng.uniform(-15, 15), fillcolor=255)


def letters_other_fonts(rng):
    """A Latin letter in Pillow's own font (Aileron) or in Computer Modern, upright or italic."""
    size = rng.randint(90, 140)
    font = rng.choice([lambda: ImageFont.load_default(size=size),
                       lambda: ImageFont.truetype(_font_path(rng.choice(["cmr10.ttf", "cmti10.ttf", "cmss10.ttf"])),
                                                  size)])()
    return _glyph(rng, rng.choice(LATIN), font)


def greek_and_signs(rng):
    """A Greek letter, a sign or a symbol (@, %, ?, arrows, card suits, a smiley) in STIX."""
    sign = rng.choice(GREEK_AND_SIGNS)
    letter = sign in GREEK_AND_SIGNS[:GREEK_AND_SIGNS.index("♠")]  # (STIX's bold has none of the signs from ♠ to ✓)
    bold = letter and rng.random() < 0.5
    font = ImageFont.truetype(_font_path("STIXGeneralBol.ttf" if bold else "STIXGeneral.ttf"), rng.randint(90, 130))
    return _glyph(rng, sign, font)


def shapes(rng):
    """A square, triangle or cross outline, or a filled oval: no ring."""
    image = Image.new("L", (SIZE, SIZE), 255)
    draw = ImageDraw.Draw(image)
    width = rng.randint(6, 16)
    c, r = SIZE / 2 + rng.randint(-10, 10), rng.randint(50, 80)
    kind = rng.choice(["square", "triangle", "cross", "oval"])
    if kind == "square":
        draw.rectangle([c - r, c - r, c + r, c + r], outline=0, width=width)
    elif kind == "triangle":
        draw.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], outline=0, width=width)
    elif kind == "cross":
        draw.line([(c - r, c - r), (c + r, c + r)], fill=0, width=width)
        draw.line([(c - r, c + r), (c + r, c - r)], fill=0, width=width)
    else:
        draw.ellipse([c - r, c - r * 0.7, c + r, c + r * 0.7], fill=0)
    return image


def scribbles(rng):
    """A line of 6 to 12 strokes between random points, joined in curves."""
    image = Image.new("L", (SIZE, SIZE), 255)
    points = [(rng.randint(30, SIZE - 30), rng.randint(30, SIZE - 30)) for _ in range(rng.randint(6, 12))]
    ImageDraw.Draw(image).line(points, fill=0, width=rng.randint(6, 14), joint="curve")
    return image


def _wobbly(rng, draw, points, width, closed=False):
    """A line through `points`, each moved by a hand's wobble of up to 4 px."""
    moved = [(x + rng.uniform(-4, 4), y + rng.uniform(-4, 4)) for x, y in points]
    draw.line(moved + moved[:1] if closed else moved, fill=0, width=width, joint="curve")


def doodles(rng):
    """A drawing a person might make on the page instead of a digit: a smiley, a house, a heart, a sun, a tree,
    a stick figure, a fish, a cloud or a zigzag, drawn with a wobbly pen 8-16 px wide."""
    image = Image.new("L", (SIZE, SIZE), 255)
    draw = ImageDraw.Draw(image)
    w, c = rng.randint(8, 16), SIZE / 2

    def arc(cx, cy, rx, ry, start, end, steps=24):
        return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
                for a in (start + (end - start) * k / steps for k in range(steps + 1))]

    kind = rng.choice(["smiley", "house", "heart", "sun", "tree", "stick figure", "fish", "cloud", "zigzag"])
    if kind == "smiley":
        _wobbly(rng, draw, arc(c, c, 70, 70, 0, 360), w)
        for dx in (-25, 25):
            draw.ellipse([c + dx - 8, c - 30, c + dx + 8, c - 14], fill=0)
        _wobbly(rng, draw, arc(c, c + 5, 35, 30, 20, 160), w)
    elif kind == "house":
        _wobbly(rng, draw, [(c - 60, c + 70), (c - 60, c - 10), (c, c - 70), (c + 60, c - 10), (c + 60, c + 70)], w,
                closed=True)
        _wobbly(rng, draw, [(c - 15, c + 70), (c - 15, c + 25), (c + 15, c + 25), (c + 15, c + 70)], w)
    elif kind == "heart":
        _wobbly(rng, draw, arc(c - 30, c - 20, 32, 32, 150, 360) + arc(c + 30, c - 20, 32, 32, 180, 390)
                + [(c, c + 70)], w, closed=True)
    elif kind == "sun":
        _wobbly(rng, draw, arc(c, c, 35, 35, 0, 360), w)
        for k in range(8):
            a = math.radians(45 * k + rng.uniform(-8, 8))
            _wobbly(rng, draw, [(c + 50 * math.cos(a), c + 50 * math.sin(a)),
                                (c + 85 * math.cos(a), c + 85 * math.sin(a))], w)
    elif kind == "tree":
        _wobbly(rng, draw, arc(c, c - 25, 55, 45, 0, 360), w)
        _wobbly(rng, draw, [(c - 10, c + 20), (c - 10, c + 85)], w)
        _wobbly(rng, draw, [(c + 10, c + 20), (c + 10, c + 85)], w)
    elif kind == "stick figure":
        _wobbly(rng, draw, arc(c, c - 60, 22, 22, 0, 360), w)
        _wobbly(rng, draw, [(c, c - 38), (c, c + 30)], w)
        _wobbly(rng, draw, [(c - 45, c - 10), (c, c - 20), (c + 45, c - 10)], w)
        _wobbly(rng, draw, [(c - 35, c + 85), (c, c + 30), (c + 35, c + 85)], w)
    elif kind == "fish":
        _wobbly(rng, draw, arc(c - 10, c, 60, 35, 0, 360), w)
        _wobbly(rng, draw, [(c + 45, c), (c + 85, c - 30), (c + 85, c + 30)], w, closed=True)
        draw.ellipse([c - 48, c - 12, c - 36, c], fill=0)
    elif kind == "cloud":
        _wobbly(rng, draw, arc(c - 45, c + 5, 30, 30, 90, 270) + arc(c - 10, c - 25, 38, 38, 180, 360)
                + arc(c + 40, c, 32, 32, 270, 450), w, closed=True)
    else:
        _wobbly(rng, draw, [(c - 80 + 32 * k, c + (35 if k % 2 else -35)) for k in range(6)], w)
    return image.rotate(rng.uniform(-20, 20), fillcolor=255)


SCRIPTS = "ЖФДЛШЩЮЯЪжфдлшщюяאבהחלמנעפצקשתبتثجحخسشصضطعغفقكمهԱԲԳԴԵԶԷԹԺԽԾԿՀՃՄՆՇՉՊՋՌՎՏՓՖ"  # no digit-like ones
SYMBOLS = "±×÷§©®☼♫⌘✈☂☎♞♜☯☮⚓⚡✂✉✿❄☀☁☘♛♻⚙✌"


def other_scripts(rng):
    """A letter of Cyrillic, Hebrew, Arabic or Armenian in DejaVu Sans, plain or bold (the faces that hold them all)."""
    face = rng.choice(["DejaVuSans.ttf", "DejaVuSans-Bold.ttf"])
    return _glyph(rng, rng.choice(SCRIPTS), ImageFont.truetype(_font_path(face), rng.randint(90, 140)))


def symbols(rng):
    """A symbol of DejaVu: weather, music, chess, tools, hands, signs such as ±, §, ©."""
    return _glyph(rng, rng.choice(SYMBOLS), ImageFont.truetype(_font_path("DejaVuSans.ttf"), rng.randint(90, 140)))


def filled_regions(rng):
    """A solid region: a filled polygon of 3 to 8 random corners, or a blob of 3 to 6 overlapping discs."""
    image = Image.new("L", (SIZE, SIZE), 255)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        corners = rng.randint(3, 8)
        draw.polygon([(rng.randint(20, SIZE - 20), rng.randint(20, SIZE - 20)) for _ in range(corners)], fill=0)
    else:
        for _ in range(rng.randint(3, 6)):
            x, y, r = rng.randint(60, SIZE - 60), rng.randint(60, SIZE - 60), rng.randint(20, 45)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=0)
    return image


def thick_strokes(rng):
    """Three or four strokes, straight or bent, of a pen 22 to 40 px wide (MNIST's are about a tenth of the box)."""
    image = Image.new("L", (SIZE, SIZE), 255)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 4)):
        points = [(rng.randint(25, SIZE - 25), rng.randint(25, SIZE - 25)) for _ in range(rng.randint(2, 3))]
        draw.line(points, fill=0, width=rng.randint(22, 40), joint="curve")
    return image


OBJECTS = {  # outlines of objects in a 200-px box about (100, 100), each a list of polygons
    "star": [[(100 + (80 if k % 2 == 0 else 32) * math.sin(math.pi * k / 5),
               105 - (80 if k % 2 == 0 else 32) * math.cos(math.pi * k / 5)) for k in range(10)]],
    "arrow": [[(20, 80), (120, 80), (120, 45), (180, 100), (120, 155), (120, 120), (20, 120)]],
    "cup": [[(45, 50), (135, 50), (125, 160), (55, 160)], [(135, 70), (170, 75), (170, 120), (130, 125)]],
    "bottle": [[(85, 20), (115, 20), (115, 65), (140, 90), (140, 180), (60, 180), (60, 90), (85, 65)]],
    "car": [[(20, 110), (55, 110), (75, 70), (135, 70), (155, 110), (180, 110), (180, 145), (20, 145)],
            [(40, 135), (70, 135), (70, 165), (40, 165)], [(130, 135), (160, 135), (160, 165), (130, 165)]],
    "flag": [[(45, 20), (55, 20), (55, 185), (45, 185)], [(55, 25), (165, 45), (55, 95)]],
}


def objects(rng):
    """A star, an arrow, a cup, a bottle, a car or a flag, as an outline or as a solid, turned and sized at random."""
    image = Image.new("L", (SIZE, SIZE), 255)
    draw, solid, width = ImageDraw.Draw(image), rng.random() < 0.5, rng.randint(6, 14)
    scale = rng.uniform(0.7, 1.0)
    for polygon in OBJECTS[rng.choice(list(OBJECTS))]:
        polygon = [(100 + scale * (x - 100), 100 + scale * (y - 100)) for x, y in polygon]
        draw.polygon(polygon, fill=0) if solid else draw.polygon(polygon, outline=0, width=width)
    return image.rotate(rng.uniform(-30, 30), fillcolor=255)


TUNING_KINDS = {"letters, other fonts": letters_other_fonts, "Greek letters and signs": greek_and_signs,
                "shapes": shapes, "scribbles": scribbles, "doodles": doodles}  # what the method was chosen on
HELD_OUT_KINDS = {"other scripts": other_scripts, "symbols": symbols, "filled regions": filled_regions,
                  "thick strokes": thick_strokes, "objects, outlines and solids": objects}  # only scored
KINDS = {**TUNING_KINDS, **HELD_OUT_KINDS}


def photo_of(digit, rng, grain=3, slope=0):
    """A MNIST digit as a user's photo of it: dark ink on light paper, larger, off-centre, with a sensor's grain (its
    spread in grey levels) and light that grows by `slope` levels from left to right."""
    enlarged = Image.fromarray(np.uint8(225 - 185 * (digit.numpy() / 255))).resize((84, 84), Image.BICUBIC)
    canvas = Image.new("L", (200, 160), 225)
    canvas.paste(enlarged, (int(rng.integers(0, 116)), int(rng.integers(0, 76))))
    light = slope * (np.arange(200) / 199 - 0.5)
    return Image.fromarray(np.uint8((np.asarray(canvas) + light + rng.normal(0, grain, (160, 200))).clip(0, 255)))


def image_sets(data_dir, each):
    """{name: (images [N, 28, 28] in [0, 1], labels or None)}: MNIST's test digits, the kinds, UCI, photos."""
    images, labels = load_mnist(data_dir, train=False)
    rng, noise = random.Random(0), np.random.default_rng(0)
    sets = {"MNIST test digits": (images.float() / 255, labels)}
    sets.update({kind: (torch.stack([to_mnist(make(rng)) for _ in range(each)]), None) for kind, make in KINDS.items()})
    try:
        from sklearn.datasets import load_digits
        uci = load_digits()
        sets["UCI digits"] = (torch.stack([to_mnist(Image.fromarray(np.uint8(255 - im * 255 / 16)).resize(
            (64, 64), Image.BILINEAR)) for im in uci.images]), torch.as_tensor(uci.target))
    except ImportError:
        print("Note: no scikit-learn, so no UCI digits (pip install scikit-learn)")
    sets["photographed test digits"] = (torch.stack([to_mnist(photo_of(d, noise)) for d in images[:1000]]),
                                        labels[:1000])
    sets["... grainy, lit from one side"] = (torch.stack([to_mnist(photo_of(d, noise, grain=12, slope=50))
                                                          for d in images[1000:2000]]), labels[1000:2000])
    return sets


def declined(model, knows, images, labels):
    """{rule: (% declined, % right among the rest or None)} of the rules compared."""
    probabilities, distance = read(model, torch.device("cpu"), images, knows)
    off = dict(thickest=math.inf)
    rules = {"confidence alone": {**knows, **off, "limits": [math.inf, math.inf]},
             "nearest neighbour, last layer": {**knows, **off, "limits": [math.inf, knows["limits"][-1]]},
             "nearest neighbour, last two layers": {**knows, **off},
             "and the thickest ink (predict.py)": knows}
    result = {}
    for rule, used in rules.items():
        answers = [answer(p, d, used) for p, d in zip(probabilities, distance)]
        kept = [(a, int(y)) for a, y in zip(answers, labels if labels is not None else [0] * len(answers))
                if not isinstance(a, str)]
        right = 100 * sum(a == y for a, y in kept) / len(kept) if labels is not None and kept else None
        result[rule] = (100 * (1 - len(kept) / len(answers)), right)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL_PT")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--each", type=int, default=300, help="images of each non-digit kind")
    args = parser.parse_args()
    sets = image_sets(args.data_dir, args.each)
    for path in args.models:
        name, model, knows = load_model(path, torch.device("cpu"))
        if "bank" not in knows:  # a bare state_dict or an older calibration: the end-of-run report is made again
            with tempfile.TemporaryDirectory() as folder:
                train_images = load_mnist(args.data_dir, train=True)[0][:20000]
                knows = report(model, torch.device("cpu"), train_images, (sets["MNIST test digits"][0] * 255).byte(),
                               sets["MNIST test digits"][1], False, folder)[1]
        print(f"\n{name} from {path}\n")
        for number, (set_name, (images, labels)) in enumerate(sets.items()):
            rules = declined(model, knows, images, labels)
            if number == 0:
                print("| images | " + " | ".join(rules) + " |\n" + "|---" * (len(rules) + 1) + "|")
            set_name += " (held out)" if set_name in HELD_OUT_KINDS else ""
            cells = [f"{d:.1f}%" + (f" ({r:.2f}% right)" if r is not None else "") for d, r in rules.values()]
            print(f"| {set_name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
