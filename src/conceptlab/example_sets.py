"""The bundled example concept sets, drawn by code (no download): an object and a style. (The toy
world draws its own sets: toyworld/concepts.py.)

`robot`: one toy robot (teal body, square head, red-tipped antenna) in five scenes.
`ink`: five different subjects in one style (navy ink outlines, orange hatching, cream paper).
Each image has a caption .txt beside it for `data.templates=filewords`.
`python scripts/make_examples.py` rewrites the PNGs in src/conceptlab/examples/.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
ROBOT_SCENES = [
    # (background, ground, x centre, scale, caption)
    ((186, 214, 240), (120, 170, 90), 64, 1.0, "standing on grass under a blue sky"),
    ((240, 226, 200), (170, 130, 90), 44, 0.8, "on a wooden table"),
    ((60, 60, 72), (90, 90, 100), 80, 1.1, "in a dark room"),
    ((250, 250, 250), (220, 220, 220), 64, 0.7, "on a white background"),
    ((255, 214, 170), (230, 180, 120), 70, 0.95, "on a sandy beach"),
]
INK_SUBJECTS = ["house", "tree", "sun over hills", "boat", "cat"]
NAVY, ORANGE, PAPER = (28, 40, 92), (236, 128, 40), (246, 238, 216)


def draw_robot(scene: int) -> tuple[Image.Image, str]:
    background, ground, cx, scale, where = ROBOT_SCENES[scene]
    img = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(img)
    d.rectangle((0, 96, SIZE, SIZE), fill=ground)

    def box(x0, y0, x1, y1):  # robot-relative coordinates, centred on cx, feet at y=100
        return (cx + x0 * scale, 100 + y0 * scale, cx + x1 * scale, 100 + y1 * scale)

    teal, dark = (30, 160, 160), (20, 70, 80)
    d.rectangle(box(-14, -8, -5, 0), fill=dark)  # legs
    d.rectangle(box(5, -8, 14, 0), fill=dark)
    d.rectangle(box(-20, -44, 20, -8), fill=teal, outline=dark, width=2)  # body
    d.rectangle(box(-30, -40, -21, -18), fill=teal, outline=dark, width=2)  # arms
    d.rectangle(box(21, -40, 30, -18), fill=teal, outline=dark, width=2)
    d.rectangle(box(-8, -36, 8, -24), fill=(240, 200, 60))  # chest panel
    d.rectangle(box(-15, -72, 15, -46), fill=teal, outline=dark, width=2)  # head
    d.ellipse(box(-10, -66, -3, -59), fill=(255, 230, 80))  # eyes
    d.ellipse(box(3, -66, 10, -59), fill=(255, 230, 80))
    d.line(box(0, -72, 0, -82)[:2] + box(0, -72, 0, -82)[2:], fill=dark, width=2)  # antenna
    d.ellipse(box(-4, -88, 4, -80), fill=(220, 40, 40))
    return img, f"a teal toy robot {where}"


def _hatch(img: Image.Image, mask: Image.Image, spacing: int = 6) -> None:
    """Orange diagonal hatching wherever `mask` is set."""
    lines = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(lines)
    for offset in range(-SIZE, SIZE, spacing):
        d.line((offset, SIZE, offset + SIZE, 0), fill=255, width=2)
    both = Image.new("L", img.size, 0)
    both.paste(lines, mask=mask)
    img.paste(Image.new("RGB", img.size, ORANGE), mask=both)


def draw_ink(subject: int) -> tuple[Image.Image, str]:
    img = Image.new("RGB", (SIZE, SIZE), PAPER)
    paper = ImageDraw.Draw(img)
    for y in range(8, SIZE, 16):  # the paper's faint ruled lines
        paper.line((0, y, SIZE, y), fill=(228, 216, 188), width=1)
    mask = Image.new("L", img.size, 0)
    m = ImageDraw.Draw(mask)
    name = INK_SUBJECTS[subject]
    outlines: list[tuple[str, tuple]] = []
    if name == "house":
        outlines += [
            ("rect", (32, 60, 96, 108)),
            ("poly", ((26, 62), (64, 28), (102, 62))),
            ("rect", (56, 82, 72, 108)),
        ]
    elif name == "tree":
        outlines += [("rect", (58, 78, 70, 112)), ("ellipse", (30, 20, 98, 86))]
    elif name == "sun over hills":
        outlines += [
            ("ellipse", (70, 14, 108, 52)),
            ("ellipse", (-20, 70, 80, 150)),
            ("ellipse", (50, 80, 150, 160)),
        ]
    elif name == "boat":
        outlines += [
            ("poly", ((20, 84), (108, 84), (92, 104), (36, 104))),
            ("poly", ((62, 24), (62, 80), (96, 80))),
        ]
    else:  # cat
        outlines += [("ellipse", (30, 40, 98, 104)), ("poly", ((34, 56), (40, 22), (58, 42))),
                     ("poly", ((94, 56), (88, 22), (70, 42)))]  # fmt: skip
    for kind, shape in outlines:
        getattr(m, {"rect": "rectangle", "poly": "polygon", "ellipse": "ellipse"}[kind])(shape, fill=255)
    _hatch(img, mask)
    d = ImageDraw.Draw(img)
    for kind, shape in outlines:
        if kind == "rect":
            d.rectangle(shape, outline=NAVY, width=3)
        elif kind == "poly":
            d.polygon(shape, outline=NAVY, width=3)
        else:
            d.ellipse(shape, outline=NAVY, width=3)
    return img, f"a {name}, ink drawing with orange hatching"


EXAMPLE_SETS = {
    "robot": (draw_robot, len(ROBOT_SCENES)),
    "ink": (draw_ink, len(INK_SUBJECTS)),
}


def write_example_sets(root: Path) -> list[Path]:
    """Draw the robot and ink sets into root/<set>/NN.png (+ NN.txt captions)."""
    return write_sets(root, EXAMPLE_SETS)


def write_sets(
    root: Path, sets: dict[str, tuple[Callable[[int], tuple[Image.Image, str]], int]]
) -> list[Path]:
    """Draw each set's images (draw(i) -> image, caption) into root/<set>/NN.png + NN.txt."""
    written = []
    for name, (draw, count) in sets.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, caption = draw(i)
            image.save(folder / f"{i:02d}.png", optimize=True)
            (folder / f"{i:02d}.txt").write_text(caption + "\n")
            written.append(folder / f"{i:02d}.png")
    return written
