"""The toy world's checkpoint folder: a diffusers pipeline folder plus judge/ and toyworld.json.

The bundled one lives in this package (fp16 safetensors, committed); `scripts/pretrain_toyworld.py`
rebuilds it. A folder missing a file, or written by another version of the world, is refused with
the file's name and the command that rebuilds it.

The SDXL-shaped toy (model=toy_xl) ships packed, in `checkpoint_xl/`: its UNet and text encoders, but
of their vocabulary tables only the rows of the tokens pretraining saw (the world's words and the
special tokens: 36 and 37 of 49,408; the rest never moved from their random start), and no VAE, judge
or CLIP of its own (it was pretrained with the SD-1 toy's, `--reuse`). `unpack_toy_folder` builds the
whole folder from it once into the cache: the other rows drawn again from a seed at their spread.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from ..atomic import write_json
from ..backbone import TEXT_PARTS, build_once, cache_root, save_sd_folder
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
# A packed SDXL-shaped toy's kept vocabulary rows: `<part>.ids` and `<part>.rows` for each text encoder.
VOCABULARY = "vocabulary.safetensors"


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
    manifest = read_manifest(folder)
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


def read_manifest(folder: Path) -> dict:
    """A toy folder's toyworld.json (refused in one line, naming the rebuild, when missing or unreadable)."""
    rebuild = REBUILD.format(folder=folder)
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BackboneError(
            f"{path} is missing: {folder} is not a toy-world checkpoint (or a partial copy); "
            f"rebuild it with `{rebuild}`"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BackboneError(f"{path} is unreadable ({err}); rebuild the folder with `{rebuild}`") from err


def unpack_toy_folder(folder: Path, cfg: ModelConfig) -> Path:
    """model=toy_xl's `model.unpack`: a packed toy folder made whole once, in the cache (keyed by the
    packed files' contents); a folder that is not packed, as it is."""
    folder = Path(folder)
    packed = read_manifest(folder).get("packed")
    if not packed:
        return folder
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    target = cache_root(cfg) / f"toy_xl-v{TOY_VERSION}-{digest.hexdigest()[:12]}"
    return build_once(
        target, lambda tmp: _unpack(folder, tmp), "the SDXL-shaped toy world from its packed form"
    )


def _unpack(folder: Path, out: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    manifest = read_manifest(folder)
    packed = manifest.pop("packed")
    shared = (folder.parent / packed["shared"]).resolve()
    missing = [p for p in ("vae", "judge", "clip") if not (shared / p / "config.json").is_file()]
    if missing:
        raise BackboneError(
            f"{folder} takes its {', '.join(missing)} from {shared}, which lacks them; reinstall conceptlab "
            "or rebuild the toy with scripts/pretrain_toyworld.py"
        )
    vocabulary = load_file(folder / VOCABULARY)
    encoders = []
    for k, (part, kind) in enumerate(zip(TEXT_PARTS, (CLIPTextModel, CLIPTextModelWithProjection))):
        config = CLIPTextConfig.from_pretrained(folder / part)
        encoder = kind(config)
        state = load_file(folder / part / "model.safetensors")
        key = next(name for name in encoder.state_dict() if name.endswith("token_embedding.weight"))
        # the rows pretraining never saw: drawn again, from the seed, at the spread they had
        generator = torch.Generator().manual_seed(int(packed["seed"]) * 1000 + k)
        table = torch.randn(config.vocab_size, config.hidden_size, generator=generator) * float(packed["std"])
        table[vocabulary[f"{part}.ids"]] = vocabulary[f"{part}.rows"].float()
        encoder.load_state_dict({**state, key: table}, strict=True)
        encoders.append(encoder.half())
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float16)
    vae = AutoencoderKL.from_pretrained(shared / "vae", torch_dtype=torch.float16)
    save_sd_folder(out, encoders[0], vae, unet, encoders[1])
    for part in ("judge", "clip"):
        shutil.copytree(shared / part, out / part)
    write_json(out / MANIFEST, {**manifest, "unpacked_from": str(folder)})


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
