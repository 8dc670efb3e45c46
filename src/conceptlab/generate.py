"""Generate images with any mix of learned concepts, of any method: concept files or run directories;
words like `<my-cat>` (weighted: `(<my-cat>:1.3)`) and tags like `<hypernet:name:0.7>` /
`<lora:name:0.8>` in the prompt, as in AUTOMATIC1111. Each concept installs itself
(methods.base.Concept); nothing here knows a method."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_path, write_json
from .errors import ConceptFileError, ConceptLabError, ConfigError, error_line
from .methods.base import Concept
from .prompts import TagUse

log = logging.getLogger(__name__)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


def load_concepts(paths: list[str]) -> list[Concept]:
    """Read every concept the paths name (files, run directories, `<run>@best`, `<run>@step=N`);
    names must be unique per kind."""
    from .formats import concept_files, read_concept

    concepts: list[Concept] = []
    for path in paths:
        for file in concept_files(run_concepts(path)):
            concept = read_concept(file)
            if any(c.name == concept.name and c.tag == concept.tag for c in concepts):
                raise ConceptFileError(
                    f"two loaded concepts are called {concept.name!r} ({file}); rename one of the files"
                )
            concepts.append(concept)
    return concepts


def run_concepts(path: str) -> str:
    """`<run dir>@best` / `<run dir>@step=N`: the folder of the concept that run kept at that step."""
    import re

    run_dir, at, which = str(path).rpartition("@")
    if not at or not re.fullmatch(r"best|step=\d+", which):
        return path
    from .backbone import resolve_path
    from .evaluate import concept_paths

    folder = resolve_path(run_dir)
    if not (folder / "summary.json").is_file():
        raise ConceptFileError(f"{path}: {run_dir} is not a run directory (no summary.json)")
    return concept_paths(folder, which)[0][0]


def resolve_prompt(prompt: str, concepts: list[Concept], tokenizer) -> tuple[str, list[TagUse]]:
    """The prompt's text and its tags; unknown names and placeholders are errors."""
    from .methods import registered_methods
    from .prompts import parse_prompt, placeholders

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


def labelled_grid(images: list, rows: list[str], cols: list[str]):
    """A grid of equally sized images with a label above each column and left of each row."""
    from PIL import Image, ImageDraw

    width, height = images[0].size
    left = max(90, 6 * max(map(len, rows)) + 10) if any(rows) else 0  # the default font: ~6 px a letter
    top = 20
    grid = Image.new("RGB", (left + width * len(cols), top + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(cols):
        draw.text((left + c * width + 4, 4), label, fill="black")
    for r, label in enumerate(rows):
        draw.text((4, top + r * height + height // 2 - 5), label, fill="black")
        for c in range(len(cols)):
            grid.paste(images[r * len(cols) + c], (left + c * width, top + r * height))
    return grid


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Generate every (row, seed) image, save them, a labelled grid and generation.json."""
    from .backbone import load_backbone, resolve_dtype
    from .config import GenerateConfig, ModelConfig, check_config
    from .data import check_resolution

    check_config(cfg, [("", GenerateConfig), ("model.", ModelConfig)])
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler={cfg.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    concepts = load_concepts(list(cfg.concepts))
    backbone = load_backbone(cfg.model)
    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    backbone.to(device, resolve_dtype(cfg.model.dtype, device, "16-mixed"))
    for concept in concepts:
        concept.install(backbone)
    pipe = backbone.pipeline(SCHEDULERS[cfg.scheduler])
    text, uses = resolve_prompt(cfg.prompt, concepts, backbone.tokenizer)
    if cfg.multipliers is not None and not uses:
        tags = sorted({c.tag for c in concepts if c.tag}) or ["tag"]
        raise ConfigError(
            "multipliers= compares the strengths of tagged concepts; put one in the prompt "
            f"({', '.join(f'<{t}:name>' for t in tags)})"
        )
    seeds = list(cfg.seeds) if cfg.seeds is not None else list(range(cfg.seed, cfg.seed + cfg.num_images))
    rows = [None] if cfg.multipliers is None else [float(m) for m in cfg.multipliers]
    size = cfg.resolution or backbone.native_resolution
    check_resolution(size, backbone, key="resolution")

    editing, strength = edit_inputs(cfg, size)
    # Pasted back outside the mask after decoding (as AUTOMATIC1111 and diffusers' apply_overlay do): the
    # latents there are the original's, but the VAE's decoder mixes the whole picture (its attention).
    overlay = (editing["image"], editing["mask_image"]) if cfg.mask else None
    if editing:  # the same parts, in the image-to-image or the (blended) inpainting pipeline
        pipe = backbone.pipeline(SCHEDULERS[cfg.scheduler], "StableDiffusionInpaintPipeline" if cfg.mask
                                 else "StableDiffusionImg2ImgPipeline")  # fmt: skip
        editing = {key: [image] * len(seeds) for key, image in editing.items()}
        editing["strength"] = strength
    shape = {} if editing and not cfg.mask else {"height": size, "width": size}  # img2img: the image's size

    images, files = [], []
    for row, multiplier in enumerate(rows):
        apply_tags(concepts, uses, multiplier)
        out = pipe(
            **prompt_inputs(pipe, backbone, text, cfg.negative_prompt, len(seeds)),
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            **shape,
            **editing,
        )
        for seed, image in zip(seeds, out.images):
            if overlay is not None:
                from PIL import Image

                image = Image.composite(image, *overlay)  # the edit where the mask is white
            path = out_dir / "images" / f"{row:02d}_seed{seed}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
            images.append(image)
            files.append(str(path.relative_to(out_dir)))
    row_labels = [""] if cfg.multipliers is None else [f"x{m:g}" for m in rows]
    grid = labelled_grid(images, row_labels, [f"seed {s}" for s in seeds])
    with atomic_path(out_dir / "grid.png") as tmp:
        grid.save(tmp, format="PNG")
    record = {
        "prompt": cfg.prompt,
        "text": text,
        "tags": [{"tag": u.tag, "name": u.name, "multiplier": u.multiplier} for u in uses],
        "multipliers": rows if cfg.multipliers is not None else None,
        "seeds": seeds,
        "concepts": [c.describe() for c in concepts],
        "model": cfg.model.name,
        "scheduler": cfg.scheduler,
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "negative_prompt": cfg.negative_prompt,
        "init_image": cfg.init_image,
        "mask": cfg.mask,
        "strength": strength if editing else None,
        "images": files,
        "grid": "grid.png",
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out_dir / "generation.json", record)
    return record


def prompt_inputs(pipe, backbone, text: str, negative: str, count: int) -> dict[str, Any]:
    """The pipeline's text inputs: the prompts themselves, or with weighted spans (`(<my-cat>:1.3)`)
    their contexts, weighted by the backbone (the pipeline would read the parentheses as words), after
    the pipeline's own spelling out of multi-vector words (`<my-cat>` -> `<my-cat> <my-cat>_1`)."""
    from .prompts import has_weights

    if not (has_weights(text) or has_weights(negative)):
        return {"prompt": [text] * count, "negative_prompt": [negative] * count}
    text, negative = (pipe.maybe_convert_prompt(t, backbone.tokenizer) for t in (text, negative))
    return {
        "prompt_embeds": backbone.encode_prompts([text] * count),
        "negative_prompt_embeds": backbone.encode_prompts([negative] * count),
    }


def edit_inputs(cfg: DictConfig, size: int) -> tuple[dict[str, Any], float | None]:
    """init_image (and mask) as size x size RGB images for the pipeline, and the strength to use."""
    from .backbone import resolve_path
    from .data import open_rgb, to_square

    if cfg.mask and not cfg.init_image:
        raise ConfigError("mask= marks what to redraw in an image: give the image too (init_image=)")
    if cfg.strength is not None and not cfg.init_image:
        raise ConfigError("strength= is how far init_image is noised: give init_image= too")
    if not cfg.init_image:
        return {}, None
    out = {}
    for key, name in (("image", "init_image"), ("mask_image", "mask")):
        if cfg[name]:
            path = resolve_path(cfg[name])
            image = open_rgb(path, size) if path.is_file() else None
            if image is None:
                raise ConfigError(
                    f"{name}={cfg[name]}: {'not a readable image' if path.is_file() else 'no such file'}"
                )
            out[key] = to_square(image, size, center_crop=True)
    if "mask_image" in out:
        out["mask_image"] = out["mask_image"].convert("L")  # white: redraw; black: keep
    strength = cfg.strength if cfg.strength is not None else (1.0 if cfg.mask else 0.75)
    return out, float(strength)


TEXT_KEYS = ("prompt", "negative_prompt")


def quote_text_overrides(argv: list[str]) -> list[str]:
    """Quote `prompt=...` / `negative_prompt=...` for Hydra, whose override grammar rejects `<` and `>`.

    So `python generate.py prompt="a photo of <my-cat>"` works as typed; already quoted values are kept.
    """
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if (
            sep
            and key.lstrip("+") in TEXT_KEYS
            and not (value[:1] in "'\"" and value[:1] == value[-1:] and value)
        ):
            value = "'" + value.replace("'", "\\'") + "'"
        quoted.append(f"{key}{sep}{value}" if sep else arg)
    return quoted


def cli() -> None:
    """Console script `conceptlab-generate` (and `conceptlab generate`): `python generate.py` from any folder."""
    import hydra

    from .config import CONFIG_PATH, register_configs

    register_configs()
    sys.argv[1:] = quote_text_overrides(sys.argv[1:])
    hydra.main(config_path=CONFIG_PATH, config_name="generate", version_base="1.3")(main)()


def main(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task of generate.py: a user's mistake is one line on stderr and exit status 2."""
    from hydra.core.hydra_config import HydraConfig

    from .console import is_verbose, quiet_third_party, say

    quiet_third_party(verbose=is_verbose())
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        record = run(cfg, out_dir)
        say(
            f"conceptlab: {len(record['images'])} images in {out_dir / 'images'}\n  grid: {out_dir / record['grid']}"
        )
        return record
    except ConceptLabError as err:
        print(error_line(err), file=sys.stderr)
        sys.exit(2)
