"""The procedural world: one object on a background, drawn at 32x32, and the captions that describe it.

Some attributes are in images but never named (the star shape, the checkered style) or never shown
in pretraining at all (the moon shape, the pastel style): they are what methods get to learn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RESOLUTION = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "moon")
NAMED_SHAPES = SHAPES[:6]  # captions name these; a star is only ever "a shape"
PRETRAIN_SHAPES = SHAPES[:7]  # the moon is never shown
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (135, 55, 190),
    "orange": (245, 135, 25),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = {"small": 5.5, "large": 9.5}  # radius in pixels
STYLES = ("plain", "striped", "outline", "framed", "checkered", "pastel")
NAMED_STYLES = STYLES[:4]  # checkered is drawn but never named; pastel is never shown
PRETRAIN_STYLES = STYLES[:5]
GOLD = (212, 170, 50)
PREFIXES = ("a photo of", "a picture of", "an image of", "a drawing of", "a rendering of")

# What the judge reads, in its heads' order; each value is a class index into the tuple.
ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
    "size": tuple(SIZES),
    "style": STYLES,
}


@dataclass(frozen=True)
class Scene:
    """One image's ground truth: every attribute the judge reads, plus where the object sits."""

    shape: str
    colour: str
    background: str
    size: str
    style: str
    x: float  # the object's centre, in pixels
    y: float

    def label(self, attribute: str) -> int:
        return ATTRIBUTES[attribute].index(getattr(self, attribute))


@dataclass(frozen=True)
class WorldMix:
    """How pretraining draws scenes and captions (the study's recipe: mostly large objects)."""

    p_large: float = 0.8
    p_drop: float = 0.3  # each attribute left out of the caption
    p_generic_shape: float = 0.2  # "shape" instead of the shape's name
    p_empty: float = 0.1  # empty captions, for classifier-free guidance
    p_plain: float = 0.3  # the rest of the styles share the remainder
    shapes: tuple[str, ...] = PRETRAIN_SHAPES
    styles: tuple[str, ...] = PRETRAIN_STYLES


def random_scene(rng: random.Random, mix: WorldMix = WorldMix(), **fixed: str) -> Scene:
    """A scene drawn from the mix; keyword arguments pin attributes (`colour="purple"`)."""
    others = [s for s in mix.styles if s != "plain"]
    style = "plain" if "plain" in mix.styles and rng.random() < mix.p_plain else rng.choice(others)
    size = "large" if rng.random() < mix.p_large else "small"
    attrs = {
        "shape": rng.choice(mix.shapes),
        "colour": rng.choice(tuple(COLOURS)),
        "background": rng.choice(tuple(BACKGROUNDS)),
        "size": size,
        "style": style,
    }
    attrs.update(fixed)
    return place(Scene(**attrs, x=0.0, y=0.0), rng)


def place(scene: Scene, rng: random.Random) -> Scene:
    """The same scene at a random position that keeps the object (and a frame's border) in view."""
    margin = SIZES[scene.size] + 4
    return replace(
        scene, x=rng.uniform(margin, RESOLUTION - margin), y=rng.uniform(margin, RESOLUTION - margin)
    )


def caption(scene: Scene, rng: random.Random | None = None, mix: WorldMix | None = None) -> str:
    """The world's caption grammar: "[prefix] a [size] [colour] <shape> [on a <bg> background][, <style> style]".

    Without `rng` every attribute the grammar can name is named (the evaluation prompts); with it,
    attributes are dropped and prefixes drawn as in pretraining.
    """
    if rng is None:
        shape = scene.shape if scene.shape in NAMED_SHAPES else "shape"
        style = f", {scene.style} style" if scene.style in NAMED_STYLES else ""
        return f"a {scene.size} {scene.colour} {shape} on a {scene.background} background{style}"
    mix = mix or WorldMix()
    if rng.random() < mix.p_empty:
        return ""

    named = scene.shape in NAMED_SHAPES and rng.random() >= mix.p_generic_shape
    return drop_words(scene, rng, mix.p_drop, scene.shape if named else "shape", scene.style in NAMED_STYLES)


def drop_words(scene: Scene, rng: random.Random, p_drop: float, shape: str, name_style: bool) -> str:
    """The grammar with each word but the shape dropped with p_drop (a prefix drawn when kept);
    the style said only if `name_style`."""

    def keep() -> bool:
        return rng.random() >= p_drop

    words = [rng.choice(PREFIXES)] if keep() else []
    words.append("a")
    if keep():
        words.append(scene.size)
    if keep():
        words.append(scene.colour)
    words.append(shape)
    if keep():
        words.append(f"on a {scene.background} background")
    text = " ".join(words)
    if name_style and keep():
        text += f", {scene.style} style"
    return text


def render(scene: Scene) -> np.ndarray:
    """The scene as a [32, 32, 3] uint8 image."""
    alpha = _mask(scene)
    if scene.style == "outline":
        hi = _mask_hi(scene)
        inner = hi.filter(ImageFilter.MinFilter(4 * SUPERSAMPLE + 1))  # erode by 2 px
        alpha = alpha - _downsample(inner)
    colour = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    img = bg * (1 - alpha[..., None]) + colour * alpha[..., None]
    rows, cols = np.mgrid[0:RESOLUTION, 0:RESOLUTION]
    if scene.style == "striped":
        img[(rows // 2) % 2 == 1] *= 0.5
    elif scene.style == "checkered":
        img[(rows // 4 + cols // 4) % 2 == 1] *= 0.5
    elif scene.style == "framed":
        border = 3
        edge = (
            (rows < border) | (rows >= RESOLUTION - border) | (cols < border) | (cols >= RESOLUTION - border)
        )
        img[edge] = GOLD
    elif scene.style == "pastel":
        img = img * 0.45 + 255 * 0.55
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_image(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene))


def _mask(scene: Scene) -> np.ndarray:
    return _downsample(_mask_hi(scene))


def _downsample(hi: Image.Image) -> np.ndarray:
    a = np.asarray(hi, np.float32) / 255.0
    return a.reshape(RESOLUTION, SUPERSAMPLE, RESOLUTION, SUPERSAMPLE).mean(axis=(1, 3))


def _mask_hi(scene: Scene) -> Image.Image:
    """The object's coverage mask at 4x resolution."""
    s = SUPERSAMPLE
    size = RESOLUTION * s
    r, cx, cy = SIZES[scene.size] * s, scene.x * s, scene.y * s
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)

    def box(radius: float) -> tuple[float, float, float, float]:
        return (cx - radius, cy - radius, cx + radius, cy + radius)

    if scene.shape == "circle":
        d.ellipse(box(r), fill=255)
    elif scene.shape == "ring":
        d.ellipse(box(r), fill=255)
        d.ellipse(box(r * 0.55), fill=0)
    elif scene.shape == "square":
        d.rectangle(box(r * 0.85), fill=255)
    elif scene.shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=255)
    elif scene.shape == "cross":
        arm = r * 0.35
        d.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=255)
        d.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=255)
    elif scene.shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=255)
    elif scene.shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = np.pi * i / 5 - np.pi / 2
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        d.polygon(points, fill=255)
    elif scene.shape == "moon":
        d.ellipse(box(r), fill=255)
        d.ellipse((cx - r * 0.35, cy - r * 1.05, cx + r * 1.65, cy + r * 0.95), fill=0)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; the world has {', '.join(SHAPES)}")
    return mask
