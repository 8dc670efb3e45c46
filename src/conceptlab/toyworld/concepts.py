"""Concept sets drawn from the toy world (bundled as tiny PNGs, deterministic): what methods learn.

`toy_combo`: a purple object on a gray background, striped - an attribute combination the model can
draw but has no single word for (textual inversion's classic case); five different shapes.
`toy_pastel`: twenty varied scenes in the pastel style, which pretraining never showed (a style for
a hypernetwork). Captions beside the images name what the concept does not fix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from PIL import Image

from .world import NAMED_SHAPES, Scene, WorldMix, place, random_scene, render_image


@dataclass(frozen=True)
class ToyConcept:
    truth: dict[str, str]  # the attributes every image of the concept shares (what the judge checks)
    count: int
    seed: int
    # The judge's fixed evaluation prompts ({} = the concept); any attribute a prompt names is checked too.
    prompts: tuple[str, ...] = ("a photo of a {}",)


TOY_CONCEPTS = {
    "toy_combo": ToyConcept(
        {"colour": "purple", "background": "gray", "style": "striped"}, count=5, seed=11,
        # concept accuracy: all three right; prompt accuracy: the named size/shape
        prompts=("a photo of a {}", "a picture of a {}", "a photo of a large {}"),
    ),
    "toy_pastel": ToyConcept(
        {"style": "pastel"}, count=20, seed=12,
        # concept accuracy: pastel; prompt accuracy: shape, colour, background obeyed
        prompts=(
            "a photo of a large red circle on a white background, {} style",
            "a photo of a large blue square on a black background, {} style",
            "a photo of a large yellow triangle on a gray background, {} style",
            "a photo of a large green cross on a white background, {} style",
        ),
    ),
}  # fmt: skip


def toy_concept_of(data_path: str) -> tuple[str, ToyConcept] | None:
    """The toy-world concept set a data path names (`bundled:toy_combo`), or None for any other folder."""
    name = data_path.removeprefix("bundled:") if data_path.startswith("bundled:") else None
    return (name, TOY_CONCEPTS[name]) if name in TOY_CONCEPTS else None


def concept_scenes(name: str) -> list[Scene]:
    """The concept's scenes: its truth fixed, everything else varied (shapes in turn for toy_combo)."""
    concept = TOY_CONCEPTS[name]
    rng = random.Random(concept.seed)
    mix = WorldMix(shapes=NAMED_SHAPES)
    scenes = []
    for i in range(concept.count):
        scene = random_scene(rng, mix, size="large", **concept.truth)
        if name == "toy_combo":
            scene = place(replace(scene, shape=NAMED_SHAPES[i % len(NAMED_SHAPES)]), rng)
        scenes.append(scene)
    return scenes


def concept_caption(scene: Scene, truth: dict[str, str]) -> str:
    """The world's caption of a scene, leaving out what the concept itself stands for."""
    words = ["a", scene.size]
    if "colour" not in truth:
        words.append(scene.colour)
    words.append(scene.shape)
    if "background" not in truth:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def draw_toy_concept(name: str, index: int) -> tuple[Image.Image, str]:
    scene = concept_scenes(name)[index]
    return render_image(scene), concept_caption(scene, TOY_CONCEPTS[name].truth)


def write_toy_concept_sets(root: Path) -> list[Path]:
    """Draw every toy-world concept set into root/<set>/NN.png (+ NN.txt captions)."""
    from ..example_sets import write_sets

    return write_sets(
        root, {name: (partial(draw_toy_concept, name), c.count) for name, c in TOY_CONCEPTS.items()}
    )
