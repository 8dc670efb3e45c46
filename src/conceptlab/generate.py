"""Generate images with any mix of learned concepts: embeddings (diffusers or AUTOMATIC1111 files,
or run directories) and hypernetworks (`<hypernet:name:multiplier>` in the prompt, as in A1111)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_path, write_json
from .errors import ConceptFileError, ConceptLabError, ConfigError

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


@dataclass
class LoadedConcepts:
    embeddings: dict[str, Any] = field(default_factory=dict)  # token -> formats.Embedding
    hypernetworks: dict[str, Any] = field(default_factory=dict)  # name -> methods.hypernetwork.Hypernetwork
    files: list[str] = field(default_factory=list)


def concept_files(path: str | Path) -> list[Path]:
    """The concept files a path names: a file, a concepts/ folder, or a run directory."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConceptFileError(f"concept {path} does not exist (give a concept file or a run directory)")
    folder = path / "concepts" if (path / "concepts").is_dir() else path
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".pt", ".bin"))
    # A run writes each concept twice (safetensors and A1111 .pt): load one of the twins.
    chosen = {}
    for file in files:
        if file.stem not in chosen or file.suffix == ".safetensors":
            chosen[file.stem] = file
    if not chosen:
        raise ConceptFileError(f"no concept files (.safetensors, .pt, .bin) in {folder}")
    return sorted(chosen.values())


def load_concepts(paths: list[str]) -> LoadedConcepts:
    """Read every embedding and hypernetwork the paths name; names must be unique."""
    from .formats import HypernetworkFile, read_concept
    from .methods.hypernetwork import hypernetwork_from_source

    loaded = LoadedConcepts()
    for path in paths:
        for file in concept_files(path):
            concept = read_concept(file)
            if isinstance(concept, HypernetworkFile):
                name, table = file.stem, loaded.hypernetworks
                value = hypernetwork_from_source(concept, str(file))
            else:
                # diffusers files carry their token; A1111 files are called by their file name.
                name = concept.name if file.suffix != ".pt" else file.stem
                value, table = concept, loaded.embeddings
            if name in loaded.embeddings or name in loaded.hypernetworks:
                raise ConceptFileError(
                    f"two loaded concepts are called {name!r} ({file}); rename one of the files"
                )
            table[name] = value
            loaded.files.append(str(file))
    return loaded


def build_pipeline(backbone, concepts: LoadedConcepts, scheduler: str):
    """A StableDiffusionPipeline over the backbone, with the embeddings added to its vocabulary."""
    from .methods.hypernetwork import attention_widths

    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler={scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    pipe = backbone.pipeline(SCHEDULERS[scheduler])
    for token, embedding in concepts.embeddings.items():
        if embedding.width != backbone.context_dim:
            raise ConceptFileError(
                f"embedding {token!r} is {embedding.width} wide but this model's text encoder is "
                f"{backbone.context_dim} wide: it was trained for another model (pick the matching model=)"
            )
        if token in backbone.tokenizer.get_vocab():
            raise ConceptFileError(
                f"embedding {token!r} clashes with a word already in the vocabulary; rename its file"
            )
        pipe.load_textual_inversion({token: embedding.vectors}, token=token)
    widths = attention_widths(backbone)
    for name, hypernetwork in concepts.hypernetworks.items():
        if any(size not in widths for size in hypernetwork.sizes):
            raise ConceptFileError(
                f"hypernetwork {name!r} has widths {hypernetwork.sizes}, but this model's attention layers are "
                f"{sorted(widths)} wide: it was trained for another model"
            )
        hypernetwork.to(backbone.unet.device)
    return pipe


def resolve_prompt(prompt: str, concepts: LoadedConcepts, tokenizer) -> tuple[str, list]:
    """The prompt's text and its hypernetworks; unknown names and placeholders are errors."""
    from .prompts import parse_prompt, placeholders

    text, uses = parse_prompt(prompt)
    for use in uses:
        if use.name not in concepts.hypernetworks:
            loaded = ", ".join(sorted(concepts.hypernetworks)) or "none"
            raise ConfigError(
                f"<hypernet:{use.name}> is not loaded (loaded hypernetworks: {loaded}); add its file to concepts="
            )
    vocab = tokenizer.get_vocab()
    for word in placeholders(text):
        if word not in vocab:
            loaded = ", ".join(sorted(concepts.embeddings)) or "none"
            raise ConfigError(
                f"{word} is used in the prompt but no loaded embedding defines it (loaded: {loaded}); add its file to concepts="
            )
    return text, uses


def labelled_grid(images: list, rows: list[str], cols: list[str]):
    """A grid of equally sized images with a label above each column and left of each row."""
    from PIL import Image, ImageDraw

    width, height = images[0].size
    left = 90 if any(rows) else 0
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
    from .methods.hypernetwork import install_hypernetworks

    concepts = load_concepts(list(cfg.concepts))
    backbone = load_backbone(cfg.model)
    device = torch.device(
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    backbone.to(device, resolve_dtype(cfg.model.dtype, device, "16-mixed"))
    pipe = build_pipeline(backbone, concepts, cfg.scheduler)
    text, uses = resolve_prompt(cfg.prompt, concepts, backbone.tokenizer)
    if cfg.multipliers is not None and not uses:
        raise ConfigError("multipliers= compares hypernetwork strengths; put a <hypernet:name> in the prompt")
    stack = install_hypernetworks(backbone.unet)
    seeds = list(cfg.seeds) if cfg.seeds is not None else list(range(cfg.seed, cfg.seed + cfg.num_images))
    rows = [None] if cfg.multipliers is None else [float(m) for m in cfg.multipliers]
    size = cfg.resolution or backbone.native_resolution

    images, files = [], []
    for row, multiplier in enumerate(rows):
        stack.entries = [
            (concepts.hypernetworks[u.name], u.multiplier if multiplier is None else multiplier) for u in uses
        ]
        out = pipe(
            prompt=[text] * len(seeds),
            negative_prompt=[cfg.negative_prompt] * len(seeds),
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            height=size,
            width=size,
        )
        for seed, image in zip(seeds, out.images):
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
        "hypernetworks": [{"name": u.name, "multiplier": u.multiplier} for u in uses],
        "multipliers": rows if cfg.multipliers is not None else None,
        "seeds": seeds,
        "concepts": concepts.files,
        "model": cfg.model.name,
        "scheduler": cfg.scheduler,
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "negative_prompt": cfg.negative_prompt,
        "images": files,
        "grid": "grid.png",
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out_dir / "generation.json", record)
    return record


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


def main(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task of generate.py: a user's mistake is one line on stderr and exit status 2."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConceptLabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
