"""The toy world's checkpoint folder: a diffusers pipeline folder plus judge/ and toyworld.json.

The bundled one lives in this package (fp16 safetensors, committed); `scripts/pretrain_toyworld.py`
rebuilds it. A folder missing a file, or written by another version of the world, is refused with
the file's name and the command that rebuilds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import write_json
from ..config import ModelConfig
from ..errors import BackboneError
from .judge import Judge
from .world import RESOLUTION

# Bump when the world (shapes, colours, captions) or the architecture changes: old checkpoints then
# fail loudly instead of drawing a different world than the one the judge and the data sets assume.
TOY_VERSION = 1
MANIFEST = "toyworld.json"
# Every file a toy checkpoint needs, relative to its folder.
FILES = (
    "model_index.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/tokenizer.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "judge/config.json",
    "judge/diffusion_pytorch_model.safetensors",
)
# ... and an SDXL-shaped one's second text encoder.
XL_FILES = (
    "tokenizer_2/tokenizer_config.json",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
)
REBUILD = "python scripts/pretrain_toyworld.py --out {folder}"


def bundled_checkpoint() -> Path:
    return Path(__file__).resolve().parent / "checkpoint"


def write_manifest(folder: Path, extra: dict) -> None:
    write_json(folder / MANIFEST, {"version": TOY_VERSION, "resolution": RESOLUTION, **extra})


def check_toy_folder(folder: Path) -> dict:
    """The folder's manifest, after checking that every part is there and of this world's version.

    model=toy names this as its `model.check`: load_backbone calls it before loading the folder."""
    folder = Path(folder)
    rebuild = REBUILD.format(folder=folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise BackboneError(
            f"{manifest_path} is missing: {folder} is not a toy-world checkpoint (or a partial copy); "
            f"rebuild it with `{rebuild}`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BackboneError(
            f"{manifest_path} is unreadable ({err}); rebuild the folder with `{rebuild}`"
        ) from err
    if manifest.get("version") != TOY_VERSION:
        raise BackboneError(
            f"{manifest_path} says toy-world version {manifest.get('version')!r}, but this conceptlab draws "
            f"version {TOY_VERSION}; rebuild the checkpoint with `{rebuild}`"
        )
    needed = FILES + (XL_FILES if manifest.get("family") == "sdxl" else ())
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise BackboneError(
            f"toy-world checkpoint {folder} is missing {', '.join(missing)}; rebuild it with `{rebuild}`"
        )
    return manifest


def toy_model_config(folder: str | Path):
    """The model config of a toy-world folder, as model=toy composes it (with its folder check); an
    SDXL-shaped one's family and joint text width."""
    xl = check_toy_folder(Path(folder)).get("family") == "sdxl"
    return ModelConfig(name="toy_xl" if xl else "toy", path=str(folder), check=f"{__name__}.check_toy_folder",
                       context_dim=160 if xl else 64, family="sdxl" if xl else "sd")  # fmt: skip


def load_judge(folder: Path):
    """The judge that came with a toy checkpoint, in float32 and eval mode."""

    check_toy_folder(folder)
    return Judge.from_pretrained(folder / "judge", torch_dtype=torch.float32).eval()
