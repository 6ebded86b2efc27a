"""Non-digits to measure a model on, made by code that training never uses (machinery/non_digits.py makes those):
other fonts, other letter sets, other drawing. Each kind is a function of a random.Random, returning a PIL image of
dark ink on light paper, as a person's photo or drawing would be; predict.py's path (machinery/images.to_mnist)
brings it to 28x28. Like training, they leave out what passes for a digit: no O, I, l, S, Z, no ring, no lone bar.

    python3 benchmarks/non_digit_kinds.py [--out non_digit_kinds.png]   draws a few of each kind
"""
import argparse
import math
import os
import random

from PIL import Image, ImageDraw, ImageFont

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


KINDS = {"letters, other fonts": letters_other_fonts, "Greek letters and signs": greek_and_signs,
         "shapes": shapes, "scribbles": scribbles, "doodles": doodles}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="non_digit_kinds.png", help="where to draw a few of each kind")
    parser.add_argument("--each", type=int, default=12, help="how many of each kind")
    args = parser.parse_args()
    rng = random.Random(0)
    sheet = Image.new("L", (args.each * 64, len(KINDS) * 64), 255)
    for row, make in enumerate(KINDS.values()):
        for column in range(args.each):
            sheet.paste(make(rng).resize((60, 60), Image.LANCZOS), (column * 64 + 2, row * 64 + 2))
    sheet.save(args.out)
    print(f"Saved: {args.out} ({', '.join(KINDS)}, a row each)")


if __name__ == "__main__":
    main()
