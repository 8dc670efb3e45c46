"""Generate images with any mix of learned concepts, of any method: concept files or run directories;
words like `<my-cat>` (weighted: `(<my-cat>:1.3)`) and tags like `<hypernet:name:0.7>` /
`<lora:name:0.8>` in the prompt, as in AUTOMATIC1111. The concepts are read and installed by
conceptlab.inference; nothing here knows a method."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from .atomic import atomic_path, write_json
from .backbone import resolve_path
from .config import GenerateConfig, ModelConfig, check_config
from .console import is_verbose, quiet_third_party, say
from .data import check_resolution, open_rgb, to_square
from .errors import ConceptLabError, ConfigError, error_line
from .inference import apply_tags, labelled_grid, prepare, resolve_prompt
from .prompts import has_weights

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


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Generate every (row, seed) image, save them, a labelled grid and generation.json."""
    check_config(cfg, [("", GenerateConfig), ("model.", ModelConfig)])
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler={cfg.scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    inference = prepare(list(cfg.concepts), cfg.model, cfg.device)
    backbone, concepts = inference.backbone, inference.concepts
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
        pipe = backbone.pipeline(SCHEDULERS[cfg.scheduler], "inpaint" if cfg.mask else "img2img")
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
    if not (has_weights(text) or has_weights(negative)):
        # No negative prompt is None to the pipeline: SDXL's then gives it zeros, as its config says.
        return {"prompt": [text] * count, "negative_prompt": [negative] * count if negative else None}
    text, negative = (pipe.maybe_convert_prompt(t, backbone.tokenizer) for t in (text, negative))
    return backbone.prompt_embeds(pipe, [text] * count, negative)


def edit_inputs(cfg: DictConfig, size: int) -> tuple[dict[str, Any], float | None]:
    """init_image (and mask) as size x size RGB images for the pipeline, and the strength to use."""
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


def main(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task of generate.py: a user's mistake is one line on stderr and exit status 2."""
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
