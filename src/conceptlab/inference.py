"""Learned concepts at inference, in one place: read the concepts (files, run folders, `<run>@best`),
load the backbone on a device in its inference dtype, install them, and turn a prompt with placeholder
words and `<tag:name:m>` tags into the text the backbone reads with the tagged concepts switched on.

generate.py, evaluate.py and the studies use this; nothing here knows a method (each concept installs
itself: methods.base.Concept).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .backbone import Backbone, load_backbone, resolve_dtype, resolve_path
from .config import ModelConfig
from .errors import ConceptFileError, ConfigError
from .formats import concept_files
from .methods import Concept, read_concept, registered_methods
from .prompts import TagUse, parse_prompt, placeholders
from .runfolder import RunFolder

# Grids a person opens (sample grids, generate's, evaluate's, the studies', the report's, W&B's): each
# image at least this many pixels (the toy world's 32 px ones scaled up), labels in a readable size.
MIN_CELL = 128
LABEL_SIZE = 14
LABEL_WRAP = 32  # characters a row label's line holds before it wraps


def load_concepts(paths: list[str | Path]) -> list[Concept]:
    """Read every concept the paths name (files, run directories, `<run>@best`, `<run>@step=N`);
    names must be unique per kind."""
    concepts: list[Concept] = []
    for path in paths:
        for file in concept_files(run_concepts(str(path))):
            concept = read_concept(file)
            if any(c.name == concept.name and c.tag == concept.tag for c in concepts):
                raise ConceptFileError(
                    f"two loaded concepts are called {concept.name!r} ({file}); rename one of the files"
                )
            concepts.append(concept)
    return concepts


def run_concepts(path: str) -> str:
    """`<run dir>@best` / `<run dir>@step=N`: the folder of the concept that run kept at that step."""
    run_dir, at, which = str(path).rpartition("@")
    if not at or not re.fullmatch(r"best|step=\d+", which):
        return path
    folder = RunFolder(resolve_path(run_dir))
    if not folder.record.is_file():
        raise ConceptFileError(f"{path}: {run_dir} is not a run directory (no summary.json)")
    return str(folder.concepts_at(which)[0])


def inference_device(name: str) -> torch.device:
    """`device=`: auto (CUDA when available), cpu, cuda or cuda:N; a one-line error for anything else."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"device={name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}, but torch sees no CUDA device here: use device=cpu or device=auto")
    return torch.device(name)


@dataclass
class Inference:
    """A backbone with concepts installed, ready to sample."""

    backbone: Backbone
    concepts: list[Concept]

    @property
    def words(self) -> str:
        """The placeholder words of the concepts used as words (textual inversion's)."""
        return " ".join(c.words for c in self.concepts if c.words)

    @property
    def tagged(self) -> list[Concept]:
        return [c for c in self.concepts if c.tag]

    def tags(self, multiplier: float = 1.0) -> str:
        """The prompt tags that switch every tagged concept on at `multiplier` (`<hypernet:ink:1>`)."""
        return tag_text(self.concepts, multiplier)

    def prompt(self, prompt: str, multiplier: float | None = None) -> str:
        """The text the backbone reads for `prompt`, with its tagged concepts switched on (at
        `multiplier` if given, else at the strengths the tags say) and all others off."""
        text, uses = resolve_prompt(prompt, self.concepts, self.backbone.tokenizer)
        apply_tags(self.concepts, uses, multiplier)
        return text


def prepare(paths: list[str | Path], model: ModelConfig, device: str = "auto") -> Inference:
    """Concepts from `paths` installed into the backbone `model` names, on `device` in its inference dtype.

    The concept files are read first: a bad file fails before any model loads."""
    concepts = load_concepts(paths)
    where = inference_device(device)
    backbone = load_backbone(model)
    backbone.to(where, resolve_dtype(model.dtype, where, "16-mixed"))
    for concept in concepts:
        concept.install(backbone)
    return Inference(backbone, concepts)


def resolve_prompt(prompt: str, concepts: list[Concept], tokenizer) -> tuple[str, list[TagUse]]:
    """The prompt's text and its tags; unknown names and placeholders are errors."""
    tags = {m.prompt_tag for m in registered_methods().values() if m.prompt_tag}
    text, uses = parse_prompt(prompt, tags)
    for concept in concepts:
        text = concept.rewrite_prompt(text)
    for use in uses:
        if not any(c.tag == use.tag and c.name == use.name for c in concepts):
            loaded = ", ".join(sorted(c.name for c in concepts if c.tag == use.tag)) or "none"
            raise ConfigError(
                f"<{use.tag}:{use.name}> is not loaded (loaded {use.tag} files: {loaded}); add its file to concepts="
            )
    vocab = tokenizer.get_vocab()
    for word in placeholders(text):
        if word not in vocab:
            loaded = ", ".join(sorted(c.name for c in concepts if c.tag is None)) or "none"
            raise ConfigError(
                f"{word} is used in the prompt but no loaded embedding defines it (loaded: {loaded}); add its file to concepts="
            )
    return text, uses


def apply_tags(concepts: list[Concept], uses: list[TagUse], multiplier: float | None) -> None:
    """Switch the tagged concepts on in prompt order (at `multiplier` if given), and all others off."""
    for concept in concepts:
        if concept.tag:
            concept.deactivate()
    for use in uses:
        concept = next(c for c in concepts if c.tag == use.tag and c.name == use.name)
        concept.activate(use.multiplier if multiplier is None else multiplier)


def tag_text(concepts: list[Concept], multiplier: float = 1.0) -> str:
    """The prompt tags that switch every tagged concept on at `multiplier` (`<hypernet:ink:1>`)."""
    return " ".join(f"<{c.tag}:{c.name}:{multiplier:g}>" for c in concepts if c.tag)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [0, 1] as PIL images."""
    arrays = (pixels.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def readable(image: Image.Image, min_size: int = MIN_CELL) -> Image.Image:
    """An image at least `min_size` px on its short side, for a person to look at: scaled up by a whole
    factor with nearest neighbour (the toy world's 32 px pictures, pixels kept sharp); larger images
    as they are."""
    factor = -(-min_size // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def labelled_grid(
    images: list[Image.Image], rows: list[str], cols: list[str], min_cell: int = MIN_CELL
) -> Image.Image:
    """A grid of equally sized images, each at least `min_cell` px (`readable`), with a label above each
    column (seeds) and left of each row (prompts, wrapped)."""
    images = [readable(image, min_cell) for image in images]
    width, height = images[0].size
    font = ImageFont.load_default(size=LABEL_SIZE)
    wrapped = [textwrap.wrap(label, LABEL_WRAP) or [""] for label in rows]
    line = LABEL_SIZE + 4
    left = (max(font.getlength(t) for lines in wrapped for t in lines) + 16) if any(rows) else 0
    top = line + 8
    grid = Image.new("RGB", (int(left) + width * len(cols), top + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(cols):
        draw.text((int(left) + c * width + 4, 4), label, fill="black", font=font)
    for r, lines in enumerate(wrapped):
        y = top + r * height + max(0, (height - line * len(lines)) // 2)
        for k, text in enumerate(lines):
            draw.text((8, y + k * line), text, fill="black", font=font)
        for c in range(len(cols)):
            grid.paste(images[r * len(cols) + c], (int(left) + c * width, top + r * height))
    return grid
