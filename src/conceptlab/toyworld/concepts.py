"""Concept sets drawn from the toy world (bundled as tiny PNGs, deterministic): what methods learn.

`toy_combo`: a purple object on a gray background, striped - an attribute combination the model can
draw but has no single word for (textual inversion's classic case); five different shapes.
`toy_pastel`: twenty varied scenes in the pastel style, which pretraining never showed (a style for
a hypernetwork). Captions beside the images name what the concept does not fix.
`toy_gem`: an orange diamond on varied backgrounds, sizes and styles (an object the model can draw, for
the object-variation, composition and localized-editing studies).
`toy_balanced`: every drawable shape at both sizes equally often (the bias-reduction study: the bare
model draws "a shape" mostly large and often as a star); its captions name neither.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from PIL import Image

from ..example_sets import write_sets
from .world import NAMED_SHAPES, PRETRAIN_SHAPES, Scene, WorldMix, place, random_scene, render_image


@dataclass(frozen=True)
class ToyConcept:
    truth: dict[str, str]  # the attributes every image of the concept shares (what the judge checks)
    count: int
    seed: int
    # The judge's fixed evaluation prompts ({} = the concept); any attribute a prompt names is checked too.
    prompts: tuple[str, ...] = ("a photo of a {}",)
    # Attributes the set varies on purpose and its captions leave unnamed (besides the truth's).
    unnamed: tuple[str, ...] = ()


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
    "toy_gem": ToyConcept(
        {"shape": "diamond", "colour": "orange"}, count=8, seed=13,
        prompts=("a photo of a {}", "a picture of a {}"),
    ),
    "toy_balanced": ToyConcept(
        {}, count=28, seed=14, prompts=("a photo of a {}",), unnamed=("shape", "size"),
    ),
}  # fmt: skip


def toy_concept_of(data_path: str) -> tuple[str, ToyConcept] | None:
    """The toy-world concept set a data path names (`bundled:toy_combo`), or None for any other folder."""
    name = data_path.removeprefix("bundled:") if data_path.startswith("bundled:") else None
    return (name, TOY_CONCEPTS[name]) if name in TOY_CONCEPTS else None


def concept_scenes(name: str) -> list[Scene]:
    """The concept's scenes: its truth fixed, everything else varied (shapes in turn for toy_combo;
    both sizes for toy_gem; every drawable shape at both sizes in turn for toy_balanced)."""
    concept = TOY_CONCEPTS[name]
    rng = random.Random(concept.seed)
    mix = WorldMix(shapes=NAMED_SHAPES)
    scenes = []
    for i in range(concept.count):
        scene = random_scene(rng, mix, size="large", **concept.truth)
        if name == "toy_combo":
            scene = place(replace(scene, shape=NAMED_SHAPES[i % len(NAMED_SHAPES)]), rng)
        elif name == "toy_gem":
            scene = place(replace(scene, size=("large", "small")[i % 2]), rng)
        elif name == "toy_balanced":
            shape, size = (
                PRETRAIN_SHAPES[i % len(PRETRAIN_SHAPES)],
                ("large", "small")[i // len(PRETRAIN_SHAPES) % 2],
            )
            scene = place(replace(scene, shape=shape, size=size), rng)
        scenes.append(scene)
    return scenes


def concept_caption(scene: Scene, truth: dict[str, str], unnamed: tuple[str, ...] = ()) -> str:
    """The world's caption of a scene, leaving out what the concept itself stands for (and `unnamed`)."""
    left_out = {*truth, *unnamed}
    words = ["a"]
    if "size" not in left_out:
        words.append(scene.size)
    if "colour" not in left_out:
        words.append(scene.colour)
    words.append(scene.shape if "shape" not in left_out and scene.shape in NAMED_SHAPES else "shape")
    if "background" not in left_out:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def draw_toy_concept(name: str, index: int) -> tuple[Image.Image, str]:
    scene = concept_scenes(name)[index]
    concept = TOY_CONCEPTS[name]
    return render_image(scene), concept_caption(scene, concept.truth, concept.unnamed)


def write_toy_concept_sets(root: Path) -> list[Path]:
    """Draw every toy-world concept set into root/<set>/NN.png (+ NN.txt captions)."""

    return write_sets(
        root, {name: (partial(draw_toy_concept, name), c.count) for name, c in TOY_CONCEPTS.items()}
    )
