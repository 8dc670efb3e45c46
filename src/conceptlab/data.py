"""Concept images, captions from templates, and cached VAE latents.

The images are read and checked before anything heavy loads (bad input fails in a second). The VAE
encodes each image once per flip; every training sample is then a pure function of (seed, global
position in the sample stream): which image, flip, caption, latent draw, noise and timestep. That
makes a resumed run see exactly the batches an uninterrupted one would, and a run on W devices with
batch B the same samples as one device with batch W*B.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .backbone import Backbone, resolve_path
from .config import DataConfig
from .errors import ConceptDataError, ConfigError
from .evalcache import EvaluationCache, backbone_identity
from .methods.base import PriorSpec
from .prompts import fill_prompt

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# The textual-inversion paper's neutral templates (Gal et al. 2022).
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]  # fmt: skip
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]  # fmt: skip
# AUTOMATIC1111's [filewords]: the caption in a .txt beside each image.
FILEWORDS_TEMPLATES = [
    "a photo of a [name], [filewords]", "a rendering of a [name], [filewords]",
    "a close-up photo of a [name], [filewords]", "a good photo of a [name], [filewords]",
    "a photo of the [name], [filewords]", "a rendition of the [name], [filewords]",
]  # fmt: skip
# The placeholder alone: a control for how much the neutral wording matters.
BARE_TEMPLATES = ["{}"]
BUILTIN_TEMPLATES = {
    "object": OBJECT_TEMPLATES,
    "style": STYLE_TEMPLATES,
    "filewords": FILEWORDS_TEMPLATES,
    "bare": BARE_TEMPLATES,
}


@dataclass
class ConceptImage:
    path: Path
    image: Image.Image  # decoded RGB, any size
    caption: str  # the [filewords] text ("" when unused)
    mask: Image.Image | None = None  # data.mask: grayscale, the image's size (None: trains unmasked)


def class_images(backbone: Backbone, spec: PriorSpec, draw: Callable[[list[str], list[int]], torch.Tensor],
                 cache: EvaluationCache | None) -> list[Image.Image]:  # fmt: skip
    """The prior's images, seeds 0..count-1 of `spec.prompt` drawn by `draw` (the bare backbone), each kept
    in the evaluation cache under a key of the backbone's identity and every setting, so every run and
    sweep that asks for the same ones reads them; another backbone never does."""
    keys = [
        EvaluationCache.key(
            kind="class-image",
            backbone=backbone_identity(backbone),
            prompt=spec.prompt,
            seed=seed,
            steps=spec.steps,
            guidance=spec.guidance,
            sampler="DDIM",
        )  # fmt: skip
        for seed in range(spec.count)
    ]
    found = [cache.get_bytes(key, ".png") if cache is not None else None for key in keys]
    missing = [seed for seed, data in enumerate(found) if data is None]
    if missing:
        log.info("drawing %d class images of %r (kept for other runs)", len(missing), spec.prompt)
        for seed, pixels in zip(missing, draw([spec.prompt] * len(missing), missing)):
            buffer = io.BytesIO()
            Image.fromarray(
                (pixels.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
            ).save(buffer, format="PNG")
            found[seed] = buffer.getvalue()
            if cache is not None:
                cache.put_bytes(keys[seed], ".png", found[seed])
    return [Image.open(io.BytesIO(data)).convert("RGB") for data in found]


def resolve_data_path(path: str) -> Path:
    """A concept folder: a path, or `bundled:NAME` for an example set shipped with conceptlab."""
    if path.startswith("bundled:"):
        name = path.removeprefix("bundled:")
        folder = Path(str(resources.files("conceptlab") / "examples" / name))
        if not folder.is_dir():
            available = sorted(
                p.name for p in Path(str(resources.files("conceptlab") / "examples")).iterdir()
            )
            raise ConceptDataError(f"no bundled example set {name!r}; available: {', '.join(available)}")
        return folder
    return resolve_path(path)


def list_images(folder: Path) -> list[Path]:
    """Image files in `folder` (not recursive), sorted by name."""
    if not folder.exists():
        raise ConceptDataError(f"image folder {folder} does not exist; set data.path to a folder of images")
    if not folder.is_dir():
        raise ConceptDataError(f"data.path={folder} is a file; point it at the folder that holds the images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConceptDataError(
            f"no images in {folder} (looked for {' '.join(IMAGE_EXTENSIONS)}); add 3-5 or more pictures of the concept"
        )
    return files


def open_rgb(path: Path, resolution: int) -> Image.Image | None:
    """Decode an image as 8-bit RGB (EXIF-rotated, transparency over white); None if unreadable."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (resolution * 2, resolution * 2))  # JPEG: decode huge photos at a reduced size
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    # Pillow raises many kinds for malformed bytes (SyntaxError for a broken PNG chunk, struct.error,
    # IndexError, ...): any of them means "skip this file", never "end the run".
    except Exception as err:  # noqa: BLE001
        log.warning("skipping %s: not a readable image (%s: %s)", path, type(err).__name__, err)
        return None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit / 32-bit grayscale
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        img = Image.fromarray((array / top * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        array = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((array.clip(0, 1) * 255).round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def to_square(img: Image.Image, resolution: int, center_crop: bool) -> Image.Image:
    """Crop the central square (or squash the whole image), then resize to resolution x resolution."""
    return fit(img, (resolution, resolution), center_crop)


def fit(img: Image.Image, size: tuple[int, int], center_crop: bool = True) -> Image.Image:
    """Crop the largest central region of the target's aspect ratio (or squash the whole image), then
    resize to size = (width, height)."""
    if center_crop:
        width, height = img.size
        if width * size[1] > height * size[0]:  # wider than the target: keep the full height
            width = max(1, round(height * size[0] / size[1]))
        else:
            height = max(1, round(width * size[1] / size[0]))
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    return img.resize(size, Image.Resampling.BICUBIC)


def size_ids(size: tuple[int, int], target: tuple[int, int], center_crop: bool) -> list[int]:
    """SDXL's size conditioning of an image of `size` (width, height) fitted to `target` as `fit` does:
    its original height and width, the crop's top and left in the pixels of the image scaled to cover the
    target (as diffusers' and kohya's SDXL scripts give them), and the target's height and width."""
    (width, height), (target_w, target_h) = size, target
    top = left = 0
    if center_crop:
        scale = max(target_w / width, target_h / height)
        left, top = round((width * scale - target_w) / 2), round((height * scale - target_h) / 2)
    return [height, width, top, left, target_h, target_w]


def bucket_sizes(resolution: int, multiple: int) -> list[tuple[int, int]]:
    """data.buckets: (width, height) pairs of about resolution² pixels (never more), each side a multiple of
    `multiple` between half and twice the resolution, as kohya's sd-scripts makes them."""
    low, high = max(multiple, resolution // 2 // multiple * multiple), 2 * resolution
    sizes = set()
    for width in range(low, high + 1, multiple):
        height = min(high, resolution * resolution // width // multiple * multiple)
        if height >= low:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (on a log scale; the larger area on a tie)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


AUTO_VAL_FOLDER = 10  # data.val_images=auto holds a fifth out of a folder of at least this many images


def held_out_count(val_images: Any, total: int) -> int:
    """How many of `total` usable images data.val_images holds out of training."""
    if val_images == "auto":
        return total // 5 if total >= AUTO_VAL_FOLDER else 0
    if val_images is None or val_images is False:
        return 0
    if isinstance(val_images, bool) or not isinstance(val_images, int) or val_images < 0:
        raise ConfigError(f"data.val_images={val_images!r}: give a number of images (0 = none) or auto")
    if val_images >= total:
        raise ConceptDataError(
            f"data.val_images={val_images} but the folder holds only {total} usable images: hold out fewer "
            "(some must train), or data.val_images=0"
        )
    return val_images


def split_images(paths: list[Path], cfg: DataConfig) -> tuple[list[Path], list[Path]]:
    """(training, held out): one seeded shuffle (data.subset_seed) whose last data.val_images are held out
    and whose first data.num_images train (all the others when null), so subsets and held-out sets of
    growing size are nested, and the training subsets are those of a run without held-out images."""
    held = held_out_count(cfg.val_images, len(paths))
    available = len(paths) - held
    num_images = cfg.num_images
    if num_images is not None and num_images < 1:
        raise ConfigError(f"data.num_images={num_images}: use at least 1 (or null for all images)")
    if num_images is not None and num_images > available:
        held_note = (
            f" once data.val_images holds {held} out (data.val_images=0 trains on all)" if held else ""
        )
        raise ConceptDataError(
            f"data.num_images={num_images} but the folder holds only {available} usable images{held_note}; "
            f"use data.num_images<={available} or null for all"
        )
    order = list(paths)
    random.Random(cfg.subset_seed).shuffle(order)
    train = order[:available] if num_images is None else order[:num_images]
    return sorted(train), sorted(order[available:])


def filewords(path: Path) -> str:
    """The caption beside an image (`img.txt`), else words from its file name (as AUTOMATIC1111 does)."""
    caption_file = path.with_suffix(".txt")
    if caption_file.is_file():
        return read_text(caption_file, "a caption file").strip()
    log.warning("no caption file %s; using words from the file name for [filewords]", caption_file.name)
    return re.sub(r"[\d_\-()\[\]]+", " ", path.stem).strip()


def load_templates(templates: str) -> list[str]:
    """Caption templates: a built-in set's name or a file with one template per line ({} or [name]),
    also `pkg://package/file` (the toy world ships its grammar so)."""
    if templates in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[templates]
    path = Path(resolve_path(templates))
    if not path.is_file():
        raise ConfigError(
            f"data.templates={templates!r} is neither {', '.join(BUILTIN_TEMPLATES)} nor a template file"
        )
    lines = [line.strip() for line in read_text(path, "a template file").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ConceptDataError(f"template file {path} has no templates (one per line, with {{}} or [name])")
    for number, line in enumerate(lines, 1):
        if "{}" not in line and "[name]" not in line:
            raise ConceptDataError(
                f"{path}: template {number} {line!r} has no {{}} or [name] for the concept"
            )
    return lines


def read_text(path: Path, what: str) -> str:
    """A text file as UTF-8 (a byte-order mark allowed); otherwise one line naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConceptDataError(
            f"{path} ({what}) is not UTF-8 text: line {line} holds byte 0x{data[err.start]:02x}; save it as UTF-8"
        ) from None


def tag_orders(caption: str, cfg: DataConfig, seed: int, image: int) -> list[str]:
    """data.shuffle_tags: `data.shuffle_orders` orders of the caption's comma-separated tags, the first
    `data.keep_tokens` in place, drawn once from the run's seed (so cached text encodings stay valid)."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    fixed, rest = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
    rng = random.Random(sample_seed(seed, -(10**6) - image))
    orders = []
    for _ in range(cfg.shuffle_orders):
        shuffled = list(rest)
        rng.shuffle(shuffled)
        orders.append(", ".join(fixed + shuffled))
    return orders


def fill_template(template: str, name: str, caption: str) -> str:
    text = fill_prompt(template, name).replace("[filewords]", caption)
    return re.sub(r"\s+", " ", text).strip(" ,")


def read_concept_images(cfg: DataConfig) -> list[ConceptImage]:
    """The training images, read and checked; raise before any model loads if they cannot work."""
    return read_concept_split(cfg)[0]


def read_concept_split(cfg: DataConfig) -> tuple[list[ConceptImage], list[ConceptImage]]:
    """(training images, held-out images) of the concept folder (`split_images`); the held-out ones carry
    their captions but no masks (they are measured, never trained on)."""
    folder = resolve_data_path(cfg.path)
    decode_size = cfg.resolution or 1024
    readable = []
    for path in list_images(folder):
        image = open_rgb(path, decode_size)
        if image is not None:
            readable.append((path, image))
    if not readable:
        raise ConceptDataError(f"none of the files in {folder} is a readable image; add PNG or JPEG pictures")
    train, held = (set(part) for part in split_images([p for p, _ in readable], cfg))
    wants_captions = "[filewords]" in " ".join(load_templates(cfg.templates))

    def chosen(paths: set[Path]) -> list[ConceptImage]:
        return [ConceptImage(path, image, filewords(path) if wants_captions else "")
                for path, image in readable if path in paths]  # fmt: skip

    images = chosen(train)
    if cfg.mask is not None:
        read_masks(images, cfg, folder)
    return images, chosen(held)


MASK_KINDS = ("alpha", "folder")


def read_masks(images: list[ConceptImage], cfg: DataConfig, folder: Path) -> None:
    """data.mask: each image's loss mask (its alpha channel, or a grayscale image of the same name in the
    masks' folder), at the image's decoded size; images without one keep None and train unmasked."""
    if cfg.mask not in MASK_KINDS:
        raise ConfigError(f"data.mask={cfg.mask!r}: use alpha, folder or null")
    masks = Path(cfg.mask_path).expanduser() if cfg.mask_path else folder / "masks"
    if cfg.mask == "folder" and not masks.is_dir():
        raise ConceptDataError(
            f"data.mask=folder but {masks} is not a folder; put the masks there or set data.mask_path"
        )
    for item in images:
        if cfg.mask == "alpha":
            mask = read_alpha(item.path)
        else:
            found = sorted(
                p for p in masks.glob(f"{item.path.stem}.*") if p.suffix.lower() in IMAGE_EXTENSIONS
            )
            mask = read_mask_file(found[0], item.path) if found else None
        item.mask = None if mask is None else mask.resize(item.image.size, Image.Resampling.BILINEAR)
    count = sum(item.mask is not None for item in images)
    log.info(
        "data.mask=%s: %d of %d images have a mask (the others train unmasked)", cfg.mask, count, len(images)
    )


def read_alpha(path: Path) -> Image.Image | None:
    """The image's alpha channel as a grayscale mask (EXIF-rotated), or None if it has none."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode not in ("RGBA", "LA", "PA", "RGBa"):
            return None
        return img.getchannel("A").copy()


def read_mask_file(mask_path: Path, image_path: Path) -> Image.Image:
    """A mask image for `image_path`: readable, and of the image's own size (one line naming both if not)."""
    try:
        with Image.open(mask_path) as mask:
            mask = ImageOps.exif_transpose(mask).convert("L")
    except Exception as err:  # noqa: BLE001 - any decoding failure is this file's
        raise ConceptDataError(
            f"mask {mask_path} is not a readable image ({err}); replace or remove it"
        ) from err
    with Image.open(image_path) as img:
        size = ImageOps.exif_transpose(img).size
    if mask.size != size:
        raise ConceptDataError(
            f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but {image_path.name} is {size[0]}x{size[1]}: "
            "make the mask the image's size"
        )
    return mask


DREAMBOOTH_CLASSES = "prompts_and_classes.txt"  # the DreamBooth data set's subject -> class table
LIVE_CLASSES = {"cat", "dog"}  # DreamBooth's live subjects (their own prompt list)


def dreambooth_class(folder: Path) -> str | None:
    """The class of a subject folder of the DreamBooth data set (its parent's prompts_and_classes.txt)."""
    table = folder.parent / DREAMBOOTH_CLASSES
    if not table.is_file():
        return None
    for line in read_text(table, "the DreamBooth class table").splitlines():
        subject, _, cls = line.strip().partition(",")
        if subject == folder.name and cls:
            return cls.strip()
    return None


def concept_class(cfg: DataConfig) -> tuple[str, str]:
    """(class word, kind) of the concept: data.class_word / data.kind, else what the data says."""
    folder = resolve_data_path(cfg.path)
    class_word = cfg.class_word if cfg.class_word is not None else (dreambooth_class(folder) or "")
    kind = cfg.kind
    if kind is None:
        if cfg.templates == "style" or "style" in Path(cfg.templates).name:
            kind = "style"
        else:
            kind = "live" if class_word in LIVE_CLASSES else "object"
    if kind not in ("object", "live", "style"):
        raise ConceptDataError(f"data.kind={kind!r}: use object, live or style")
    return class_word, kind


def size_multiple(backbone: Backbone) -> int:
    """What every image side must be a multiple of: the VAE's factor times the UNet's downsampling."""
    return backbone.vae_scale_factor * 2 ** (len(backbone.unet.config.block_out_channels) - 1)


def check_resolution(resolution: int, backbone: Backbone, key: str = "data.resolution") -> None:
    """A size the VAE and the UNet can take: a multiple of the VAE's factor times the UNet's downsampling."""
    multiple = size_multiple(backbone)
    if resolution < multiple or resolution % multiple:
        raise ConfigError(
            f"{key}={resolution} must be a multiple of {multiple} for this backbone "
            f"(native: {backbone.native_resolution})"
        )


def check_captions_fit(tokenizer, prompt_text: str, captions: set[str]) -> None:
    """The concept's tokens must lie inside the text encoder's window in every caption: past it they
    are cut off and never train (a placeholder of too many vectors, or a long template)."""
    window = tokenizer.model_max_length
    concept = set(tokenizer(prompt_text, add_special_tokens=False).input_ids)
    for caption in sorted(captions, key=len, reverse=True):
        ids = tokenizer(caption).input_ids
        if len(ids) <= window:
            continue
        last = max((i for i, t in enumerate(ids) if t in concept), default=-1)
        if last >= window - 1:
            raise ConfigError(
                f"the caption {caption[:60]!r}... is {len(ids)} tokens and the concept's ({prompt_text[:40]!r}) "
                f"reach past the text encoder's {window}: fewer method.num_vectors, or shorter templates"
            )


def sample_seed(seed: int, position: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) % (2**63)


class ConceptLatents(Dataset):
    """Training samples drawn from cached latents; item = (image index, global stream position).

    Captions are token ids [images, templates, 77], or, for methods that leave the text encoding
    alone, the text encoder's cached output [images, templates, 77, width].
    """

    def __init__(self, mean, std, captions, flip_p: float, seed: int, scaling_factor: float, num_timesteps: int,
                 captions_are_contexts: bool = False, noise_offset: float | None = None,
                 loss_weights: torch.Tensor | None = None, masks: torch.Tensor | None = None,
                 caption_dropout: float = 0.0, prior: tuple | None = None,
                 time_ids: torch.Tensor | None = None):  # fmt: skip
        """noise_offset: each sample's noise plus this times one normal draw per channel (drawn after the
        rest of the sample, so a run without it draws what it always drew). loss_weights: a weight per
        timestep for the sample's loss (min-SNR-γ, `snr_weights`), given with the sample. time_ids: SDXL's
        size conditioning of each image [images, 6] (`size_ids`), given with its samples."""
        self.mean, self.std = mean, std  # [images, flips, C, h, w], or per image [flips, C, h, w] (buckets)
        self.noise_offset, self.loss_weights = noise_offset, loss_weights
        self.masks = masks  # [images, flips, 1, h, w] at the latent grid, or None (data.mask off)
        self.captions = captions
        # With caption dropout each image's last caption is the bare template's, drawn with that probability.
        self.caption_dropout = caption_dropout
        self.regular_captions = captions.shape[1] - (1 if caption_dropout else 0)
        self.caption_key = "context" if captions_are_contexts else "input_ids"
        self.flip_p, self.seed = flip_p, seed
        self.scaling_factor, self.num_timesteps = scaling_factor, num_timesteps
        self.prior = prior  # (mean, std [class images, C, h, w], each one's caption's ids or context) or None
        self.time_ids = time_ids

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, position = item
        gen = torch.Generator().manual_seed(sample_seed(self.seed, position))
        flip = int(len(self.mean[index]) > 1 and torch.rand((), generator=gen).item() < self.flip_p)
        template = int(torch.randint(self.regular_captions, (), generator=gen))
        mean, std = self.mean[index][flip], self.std[index][flip]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling_factor
        sample = {
            "latents": latents,
            "noise": torch.randn(mean.shape, generator=gen),
            "timesteps": torch.randint(self.num_timesteps, (), generator=gen),
            self.caption_key: self.captions[index, template],
        }
        # Drawn after the rest of the sample: with dropout off, the stream is what it always was.
        if self.caption_dropout and torch.rand((), generator=gen).item() < self.caption_dropout:
            sample[self.caption_key] = self.captions[index, -1]
        if self.noise_offset:
            offset = torch.randn((mean.shape[0], 1, 1), generator=gen)
            sample["noise"] = sample["noise"] + self.noise_offset * offset
        if self.loss_weights is not None:
            sample["loss_weight"] = self.loss_weights[sample["timesteps"]]
        if self.masks is not None:
            sample["loss_mask"] = self.masks[index][flip]
        if self.time_ids is not None:
            sample["time_ids"] = self.time_ids[index]
        if self.prior is not None:  # drawn last: a run without a prior draws what it always drew
            sample.update(self._prior_sample(gen))
        return sample

    def _prior_sample(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """A class image's sample beside the concept's (`prior_` keys): its own image, latent draw, noise and
        timestep, no flip or noise offset, min-SNR's weight where on."""
        mean, std, captions = self.prior
        k = int(torch.randint(mean.shape[0], (), generator=gen))
        caption = captions[k]
        out = {
            "prior_latents": (mean[k] + std[k] * torch.randn(mean[k].shape, generator=gen))
            * self.scaling_factor,
            "prior_noise": torch.randn(mean[k].shape, generator=gen),
            "prior_timesteps": torch.randint(self.num_timesteps, (), generator=gen),
            f"prior_{self.caption_key}": caption,
        }
        if self.loss_weights is not None:
            out["prior_loss_weight"] = self.loss_weights[out["prior_timesteps"]]
        return out


def snr_weights(alphas_cumprod: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """min-SNR-γ loss weights per timestep (Hang et al., 2023): min(SNR, γ) / SNR for a model that
    predicts the noise, min(SNR, γ) / (SNR + 1) for v-prediction; SNR_t = ᾱ_t / (1 - ᾱ_t)."""
    alphas = alphas_cumprod.double()
    snr = alphas / (1 - alphas)
    return (torch.clamp(snr, max=gamma) / (snr + 1 if v_prediction else snr)).float()


class StreamSampler(Sampler):
    """This rank's share of one seeded stream of samples, continuing from a given global batch.

    Position p of the stream shows image perm_k[p mod n] with k = p div n (one shuffle per pass over
    the images). Global batch g holds positions [g*B*W, (g+1)*B*W); rank r takes its r-th slice of B.
    An "epoch" is a fixed number of global batches; iterating continues from `next_batch`.
    """

    def __init__(self, num_images: int, batch_size: int, world_size: int, rank: int, seed: int,
                 batches_per_epoch: int, next_batch: int = 0, buckets: list[list[int]] | None = None):  # fmt: skip
        """buckets (data.buckets): the images of each bucket; every global batch then holds one bucket's."""
        self.n, self.batch_size, self.world_size, self.rank = num_images, batch_size, world_size, rank
        self.seed, self.batches_per_epoch, self.next_batch = seed, batches_per_epoch, next_batch
        self.buckets = buckets if buckets is not None and len(buckets) > 1 else None
        self._order: tuple[int, list[int]] | None = None
        self._chunks: tuple[int, list[list[int]]] | None = None

    def _image(self, position: int) -> int:
        shuffle = position // self.n
        if self._order is None or self._order[0] != shuffle:  # one shuffle per pass, drawn once
            gen = torch.Generator().manual_seed(sample_seed(self.seed, -1 - shuffle))
            self._order = (shuffle, torch.randperm(self.n, generator=gen).tolist())
        return self._order[1][position % self.n]

    def _bucket_batch(self, batch: int) -> list[int]:
        """With buckets: the images of global batch `batch`. Pass k over the images shuffles each bucket,
        cuts it into global batches (a bucket's last one filled up with its own first images, so every
        batch is whole), and shuffles the batches of all buckets, all from one seeded generator."""
        size = self.batch_size * self.world_size
        per_pass = sum(math.ceil(len(images) / size) for images in self.buckets)
        which, index = divmod(batch, per_pass)
        if self._chunks is None or self._chunks[0] != which:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, -1 - which))
            chunks = []
            for images in self.buckets:
                order = [images[i] for i in torch.randperm(len(images), generator=gen).tolist()]
                for first in range(0, len(order), size):
                    chunk = order[first : first + size]
                    chunks.append(chunk + [order[k % len(order)] for k in range(size - len(chunk))])
            self._chunks = (which, [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()])
        return self._chunks[1][index]

    def __iter__(self):
        end = (self.next_batch // self.batches_per_epoch + 1) * self.batches_per_epoch
        start, self.next_batch = self.next_batch, end
        for batch in range(start, end):
            first = (batch * self.world_size + self.rank) * self.batch_size
            if self.buckets is None:
                for position in range(first, first + self.batch_size):
                    yield self._image(position), position
            else:
                images = self._bucket_batch(batch)[self.rank * self.batch_size :]
                for k in range(self.batch_size):
                    yield images[k], first + k

    def __len__(self) -> int:
        # The full epoch: Lightning counts a resumed epoch's batches from where it stopped.
        return self.batches_per_epoch * self.batch_size


class ConceptDataModule(pl.LightningDataModule):
    """Concept images -> cached latents and tokenized captions -> a resumable stream of samples."""

    def __init__(self, cfg: DataConfig, images: list[ConceptImage], backbone: Backbone,
                 prompt_text: str | list[str], seed: int, resolution: int, cache_context: bool = False,
                 memo: dict | None = None, noise_offset: float | None = None, snr_gamma: float | None = None,
                 prior: PriorSpec | list[PriorSpec] | None = None, prior_draw: Callable | None = None,
                 cache: EvaluationCache | None = None):  # fmt: skip
        """prompt_text: what stands for the concept in the captions, or one per image (several concepts
        trained jointly). memo: where jobs of one process that share a backbone (a packed sweep's pack)
        keep the latents and text contexts they compute, keyed by what these depend on, so the same
        images and captions are encoded once. prior: class images to train beside the concept's
        (`class_images`, drawn by `prior_draw` on the training device at set-up, kept in `cache`); with
        several specs their images are pooled, each with its own caption."""
        super().__init__()
        prior = [prior] if isinstance(prior, PriorSpec) else list(prior or [])
        if prior and cfg.buckets:
            raise ConfigError(
                "data.buckets=true with prior preservation: the class images are squares; use data.buckets=false"
            )
        self.prior, self.prior_draw, self.cache = prior, prior_draw, cache
        self.memo = memo
        self.noise_offset, self.snr_gamma = noise_offset, snr_gamma
        check_resolution(resolution, backbone)
        self.cfg, self.images, self.backbone, self.seed = cfg, images, backbone, seed
        self.resolution = resolution
        self.cache_context = cache_context
        templates = load_templates(cfg.templates)
        orders = [tag_orders(image.caption, cfg, seed, k) if cfg.shuffle_tags else [image.caption]
                  for k, image in enumerate(images)]  # fmt: skip
        texts = [prompt_text] * len(images) if isinstance(prompt_text, str) else list(prompt_text)
        # Per image: every template with every order of its caption, then (data.caption_dropout) the bare one.
        self.captions = [
            [fill_template(t, text, c) for t in templates for c in cs] for cs, text in zip(orders, texts)
        ]
        self.caption_dropout = cfg.caption_dropout or 0.0
        if self.caption_dropout:
            for captions, text in zip(self.captions, texts):
                captions.append(fill_template("{}", text, ""))
        for text in sorted(set(texts)):
            check_captions_fit(
                backbone.tokenizer, text, {c for cs, t in zip(self.captions, texts) if t == text for c in cs}
            )
        # data.buckets: each image at the size of its aspect ratio's bucket; else all at resolution².
        if cfg.buckets:
            sizes = bucket_sizes(resolution, size_multiple(backbone))
            self.sizes = [choose_bucket(im.image.size, sizes) for im in images]
        else:
            self.sizes = [(resolution, resolution)] * len(images)
        self.buckets = {
            size: [k for k, s in enumerate(self.sizes) if s == size] for size in sorted(set(self.sizes))
        }
        small = [f"{w}x{h} ({len(ks)})" for (w, h), ks in self.buckets.items() if len(ks) < cfg.batch_size]
        if cfg.buckets and small:
            log.warning(
                "data.buckets: %s hold fewer images than the batch of %d; their batches repeat their images "
                "(each with its own noise and timestep)", ", ".join(small), cfg.batch_size,
            )  # fmt: skip
        self.dataset: ConceptLatents | None = None

    def bucket_counts(self) -> dict[str, int]:
        """The run record's buckets: images per size, "WxH"."""
        return {f"{w}x{h}": len(images) for (w, h), images in self.buckets.items()}

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        pictures = [fit(im.image, size, self.cfg.center_crop) for im, size in zip(self.images, self.sizes)]
        flips = self.cfg.flip_p > 0
        mean, std = self._once(
            ("latents", str(device), self.sizes, flips, *(np.asarray(im).tobytes() for im in pictures)),
            lambda: self._encode(pictures, flips, device),
        )
        texts = [c for captions in self.captions for c in captions]
        tokenizer = self.backbone.tokenizer  # the same words (added ones too) tokenize the same
        ids = self._once(
            (
                "ids",
                tokenizer.name_or_path,
                len(tokenizer),
                sorted(tokenizer.get_added_vocab().items()),
                texts,
            ),
            lambda: self.backbone.tokenize(texts),
        )
        if self.cache_context:  # the text encoder is the backbone's own: its output is the same for every job
            captions = self._once(
                ("contexts", str(device), tuple(ids.shape), ids.numpy().tobytes()),
                lambda: encode_contexts(self.backbone, ids, device),
            )
        else:
            captions = ids
        self.dataset = ConceptLatents(
            mean, std, captions.view(len(self.images), -1, *captions.shape[1:]), self.cfg.flip_p, self.seed,
            self.backbone.vae.config.scaling_factor, self.backbone.scheduler.config.num_train_timesteps,
            captions_are_contexts=self.cache_context, noise_offset=self.noise_offset,
            loss_weights=self._loss_weights(), masks=self._latent_masks([m.shape[-2:] for m in mean], flips),
            caption_dropout=self.caption_dropout, prior=self._prior(device) if self.prior else None,
            time_ids=torch.tensor([size_ids(im.image.size, size, self.cfg.center_crop)
                                   for im, size in zip(self.images, self.sizes)]) if self.backbone.is_xl else None,
        )  # fmt: skip

    def _prior(self, device: torch.device) -> tuple:
        """The class images' latents (no flip) and each one's caption's ids or text context (every spec's
        images pooled, in the order of the specs)."""
        self.backbone.to(device)  # drawn where training runs (Lightning moves the module there next)
        images = [(im, spec.prompt) for spec in self.prior
                  for im in class_images(self.backbone, spec, self.prior_draw, self.cache)]  # fmt: skip
        pictures = [fit(im, (self.resolution, self.resolution), True) for im, _ in images]
        mean, std = self._once(
            ("latents", str(device), self.resolution, False, *(np.asarray(im).tobytes() for im in pictures)),
            lambda: encode_latents(self.backbone, pictures, False, device),
        )
        prompts = [spec.prompt for spec in self.prior]
        ids = self.backbone.tokenize(prompts)
        captions = encode_contexts(self.backbone, ids, device) if self.cache_context else ids
        which = torch.tensor([prompts.index(prompt) for _, prompt in images])
        return mean[:, 0], std[:, 0], captions[which]

    def _encode(self, pictures: list[Image.Image], flips: bool, device: torch.device):
        """Latent (mean, std) per image: [images, flips, C, h, w], or per image [flips, C, h, w] when
        buckets give them several sizes (each bucket encoded in batches of its own)."""
        if len(self.buckets) == 1:
            return encode_latents(self.backbone, pictures, flips, device)
        mean: list = [None] * len(pictures)
        std: list = [None] * len(pictures)
        for images in self.buckets.values():
            means, stds = encode_latents(self.backbone, [pictures[k] for k in images], flips, device)
            for k, m, s in zip(images, means, stds):
                mean[k], std[k] = m, s
        return mean, std

    def _latent_masks(self, grids: list, flips: bool) -> torch.Tensor | list | None:
        """Each image's mask cropped and resized as its image is, averaged down to its latent grid (and
        mirrored for the flipped view): [images, flips, 1, h, w] in [0, 1] (per image with buckets); ones
        for an image without one."""
        if not any(image.mask is not None for image in self.images):
            return None
        masks = []
        for image, size, grid in zip(self.images, self.sizes, grids):
            if image.mask is None:
                mask = torch.ones(1, *grid)
            else:
                fitted = fit(image.mask, size, self.cfg.center_crop)
                pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0)[None, None]
                mask = torch.nn.functional.adaptive_avg_pool2d(pixels, tuple(grid))[0].clamp(
                    0, 1
                )  # no ringing
            masks.append(torch.stack([mask, mask.flip(-1)] if flips else [mask]))
        return torch.stack(masks) if len(self.buckets) == 1 else masks

    def _loss_weights(self) -> torch.Tensor | None:
        if self.snr_gamma is None:
            return None
        scheduler = self.backbone.scheduler
        v_prediction = scheduler.config.prediction_type == "v_prediction"
        return snr_weights(scheduler.alphas_cumprod, self.snr_gamma, v_prediction)

    def _once(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """compute(), or what it gave for the same key before (self.memo); keyed by a digest of `key`'s
        parts (bytes as they are: image pixels, token ids)."""
        if self.memo is None:
            return compute()
        digest = hashlib.sha256()
        for part in key:
            digest.update(part if isinstance(part, bytes) else repr(part).encode())
        name = digest.hexdigest()
        if name not in self.memo:
            self.memo[name] = compute()
        return self.memo[name]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        accumulate = trainer.accumulate_grad_batches if trainer else 1
        done = trainer.global_step * accumulate if trainer else 0  # restored before this is called
        per_epoch = max(1, math.ceil(len(self.images) * self.cfg.repeats / (self.cfg.batch_size * world)))
        sampler = StreamSampler(
            len(self.images), self.cfg.batch_size, world, rank, self.seed, per_epoch, done,
            buckets=list(self.buckets.values()),
        )  # fmt: skip
        return DataLoader(self.dataset, batch_size=self.cfg.batch_size, sampler=sampler,
                          num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0)  # fmt: skip


VAL_TIMESTEPS = 8  # the validation loss's timesteps per image, evenly spaced over the noise schedule
VAL_SEED = 0  # its noise: the same draws in every run, so its values compare across runs


@torch.no_grad()
def validation_batch(backbone: Backbone, images: list[ConceptImage], templates: str, prompt_text: str,
                     resolution: int, center_crop: bool, device: torch.device) -> dict[str, torch.Tensor]:  # fmt: skip
    """Fixed samples of `images` for a loss that compares across steps, methods and seeds: each image's
    latent mean (no flip) at VAL_TIMESTEPS evenly spaced timesteps, each with noise drawn from VAL_SEED,
    captioned with the first template (and the image's [filewords])."""
    squares = [to_square(im.image, resolution, center_crop) for im in images]
    mean, _ = encode_latents(backbone, squares, False, device)
    latents = mean[:, 0] * backbone.vae.config.scaling_factor
    total = backbone.scheduler.config.num_train_timesteps
    timesteps = ((torch.arange(VAL_TIMESTEPS) + 0.5) * total / VAL_TIMESTEPS).long()
    generator = torch.Generator().manual_seed(VAL_SEED)
    noise = torch.randn((len(images) * VAL_TIMESTEPS, *latents.shape[1:]), generator=generator)
    template = load_templates(templates)[0]
    ids = backbone.tokenize([fill_template(template, prompt_text, im.caption) for im in images])
    return {
        "latents": latents.repeat_interleave(VAL_TIMESTEPS, 0),
        "noise": noise,
        "timesteps": timesteps.repeat(len(images)),
        "input_ids": ids.repeat_interleave(VAL_TIMESTEPS, 0),
    }


@torch.no_grad()
def encode_latents(backbone: Backbone, images: list[Image.Image], flips: bool, device: torch.device):
    """Latent distribution (mean, std) of each image, and of its mirror image: [images, flips, C, h, w]."""

    vae = backbone.vae.to(device)
    # SDXL's own VAE overflows in float16 (its config says force_upcast, as diffusers' pipelines read it):
    # it encodes in float32, then goes back (a fixed VAE, model.vae_path, needs none of this).
    if not (vae.dtype == torch.float16 and vae.config.get("force_upcast", False)):
        return _encode_views(vae, images, flips, device)
    vae.to(torch.float32)
    try:
        return _encode_views(vae, images, flips, device)
    finally:
        vae.to(torch.float16)


def _encode_views(vae, images: list[Image.Image], flips: bool, device: torch.device):
    pixels = torch.stack([image_to_tensor(im) for im in images])
    views = [pixels, pixels.flip(-1)] if flips else [pixels]
    means, stds = [], []
    # Seconds for a handful of images; a progress bar for a large folder on a large VAE.
    bar = tqdm(total=len(views) * len(images), desc="caching latents", unit="image", leave=False,
               disable=len(images) < 32, dynamic_ncols=True)  # fmt: skip
    for view in views:
        mean, std = [], []
        for chunk in view.split(8):
            dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
            mean.append(dist.mean.float().cpu())
            std.append(dist.std.float().cpu())
            bar.update(len(chunk))
        means.append(torch.cat(mean))
        stds.append(torch.cat(std))
    bar.close()
    return torch.stack(means, 1), torch.stack(stds, 1)


@torch.no_grad()
def encode_contexts(backbone: Backbone, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The text encoder's output for every caption, computed once: [captions, 77, width] on the CPU."""
    for encoder in backbone.text_encoders:
        encoder.to(device)
    return torch.cat([backbone.encode_text(chunk.to(device)).cpu() for chunk in ids.split(64)])


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
