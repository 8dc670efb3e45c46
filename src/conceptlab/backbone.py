"""The frozen Stable Diffusion parts: loaded from any diffusers SD 1.x/2.x or SDXL folder or hub id, a
single-file checkpoint, or the embedded tiny backbones (built once from code, saved with save_pretrained,
then loaded like a folder).

SDXL has two text encoders and conditions its UNet on their pooled output and on each image's size and
crop as well. Its parts of the text conditioning travel as one tensor, so caching, batching and packing
need not know the family: `encode_text` gives [batch, 78, 2048], the 77 token rows of both encoders'
penultimate layers side by side and one row whose first 1280 entries are the second encoder's pooled
projection; `denoise` takes them apart again for the UNet."""

from __future__ import annotations

import functools
import gzip
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata, resources
from pathlib import Path

import torch
from hydra.utils import get_method
from torch import nn
from tqdm.auto import tqdm

from .config import ModelConfig
from .errors import BackboneError, ConfigError
from .formats import refuse_unsafe_pickle
from .prompts import has_weights, weighted_spans

# diffusers and transformers load inside the functions that use them, not here: importing them costs diffusers ~5 s, transformers ~1 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

log = logging.getLogger(__name__)

COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
XL_COMPONENTS = (*COMPONENTS, "tokenizer_2", "text_encoder_2")
TEXT_PARTS = ("text_encoder", "text_encoder_2")  # the text encoders' attribute names (SD: the first only)
FAMILIES = ("sd", "sdxl")
# Bump when a tiny backbone's architecture changes, so stale caches are rebuilt, not reused.
TINY_VERSION = 1
# diffusers' pipeline of each task, per family.
PIPELINES = {
    "sd": {"text": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
           "inpaint": "StableDiffusionInpaintPipeline"},
    "sdxl": {"text": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
             "inpaint": "StableDiffusionXLInpaintPipeline"},
}  # fmt: skip
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Backbone(nn.Module):
    """Tokenizer, text encoder, VAE, UNet and noise scheduler (SDXL: a second tokenizer and text
    encoder); frozen and in eval mode.

    A method may unfreeze parts (LoRA adds trainable layers to the UNet): it sets their
    requires_grad, and their train/eval mode in its own `train()`, which runs after this one's.
    """

    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, name: str, path: str,
                 checkpoint_name: str | None = None, tokenizer_2=None, text_encoder_2=None):  # fmt: skip
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.vae = vae
        self.unet = unet
        self.scheduler = scheduler
        self.name = name
        self.path = path
        # What the webui calls the checkpoint in the files it writes (sd_checkpoint_name).
        self.checkpoint_name = checkpoint_name or name
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # The frozen parts never train (no dropout), whatever Lightning asks of the module holding us.
        super().train(False)
        for layer in getattr(self, "_checkpointed_layers", ()):
            layer.training = True  # the layer alone (see checkpoint_text_encoder): its children stay in eval
        return self

    def checkpoint_text_encoder(self) -> None:
        """trainer.gradient_checkpointing where gradients pass through the text encoders (a method that
        changes the text encoding): transformers' own checkpointing, which recomputes a layer only when it
        is marked as training. The layers themselves are marked, not their attention and MLP, so no
        dropout acts and the encoder computes what it did before."""
        for encoder in self.text_encoders:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._checkpointed_layers = [
            m
            for encoder in self.text_encoders
            for m in encoder.modules()
            if getattr(m, "gradient_checkpointing", False) is True
        ]
        self.train()

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def family(self) -> str:
        return "sdxl" if self.is_xl else "sd"

    @property
    def text_parts(self) -> list[str]:
        """The text encoders' attribute names: text_encoder (and SDXL's text_encoder_2)."""
        return list(TEXT_PARTS if self.is_xl else TEXT_PARTS[:1])

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [getattr(self, part) for part in self.text_parts]

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2] if self.is_xl else [self.tokenizer]

    @property
    def text_widths(self) -> list[int]:
        """Each text encoder's width (SDXL: 768 and 1280); its token vectors are this wide."""
        return [encoder.config.hidden_size for encoder in self.text_encoders]

    @property
    def pooled_dim(self) -> int:
        """SDXL: the width of the pooled text embedding the UNet adds to its time embedding."""
        return self.text_encoder_2.config.projection_dim

    @functools.cached_property
    def checkpoint_hash(self) -> str | None:
        """The webui's short hash of a checkpoint (sha256, 10 hex digits): of the file itself for a
        single-file checkpoint (exactly the webui's), of the UNet's weights for a diffusers folder.
        Identifies the backbone a concept was trained on (sd_checkpoint). None for hub ids."""
        path = Path(self.path)
        unet = path / "unet"
        files = [path] if path.is_file() else sorted(unet.glob("diffusion_pytorch_model*.safetensors"))
        files = files or sorted(unet.glob("diffusion_pytorch_model*.bin"))
        if not files:
            return None
        digest = hashlib.sha256()
        for file in files:
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        return digest.hexdigest()[:10]

    @property
    def context_dim(self) -> int:
        """The UNet's text-context width (SDXL: both encoders' side by side)."""
        return sum(self.text_widths)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def pipeline(self, scheduler: str = "DDIMScheduler", task: str = "text"):
        """A diffusers pipeline of the backbone's family over these very parts (no copy), with a sampling
        scheduler: task = text (to image), img2img or inpaint."""
        import diffusers

        scheduler_cls = getattr(diffusers, scheduler)
        # SD folders' scheduler configs predate clip_sample, which DDIM/DDPM would otherwise turn on.
        extra = {"clip_sample": False} if "clip_sample" in inspect.signature(scheduler_cls).parameters else {}
        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                 "unet": self.unet, "scheduler": scheduler_cls.from_config(self.scheduler.config, **extra)}  # fmt: skip
        if self.is_xl:
            parts.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        else:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe = getattr(diffusers, PIPELINES[self.family][task])(**parts)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def prompt_embeds(self, pipe, prompts: list[str], negative_prompt: str) -> dict:
        """A pipeline's text inputs, encoded here (`encode_prompts`: weighted spans, multi-vector words as in
        training) as the pipeline would encode them itself; SDXL's pipelines give an empty negative prompt
        zeros where their config says so."""
        conditioning = self.encode_prompts(prompts)
        negative = self.encode_prompts([negative_prompt] * len(prompts))
        if self.is_xl and not negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
            negative = torch.zeros_like(negative)
        out = {}
        for prefix, cond in (("", conditioning), ("negative_", negative)):
            if self.is_xl:
                out[f"{prefix}prompt_embeds"] = cond[:, :-1]
                out[f"{prefix}pooled_prompt_embeds"] = cond[:, -1, : self.pooled_dim]
            else:
                out[f"{prefix}prompt_embeds"] = cond
        return out

    def size_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """SDXL's size ids of uncropped images at the latents' own size, as its pipelines give them:
        [batch, 6] = (height, width, 0, 0, height, width)."""
        height, width = (side * self.vae_scale_factor for side in latents.shape[-2:])
        ids = torch.tensor([height, width, 0, 0, height, width], device=latents.device)
        return ids.repeat(latents.shape[0], 1)

    def denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor,
                time_ids: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The UNet's prediction for noisy latents. SDXL: `conditioning` from encode_text is taken apart
        into the context and the pooled embedding, and `time_ids` [batch, 6] (original height and width,
        crop top and left, target height and width) default to the latents' own size, uncropped."""
        if not self.is_xl:
            return self.unet(noisy, timesteps, conditioning).sample
        time_ids = self.size_ids(noisy) if time_ids is None else time_ids
        added = {"text_embeds": conditioning[:, -1, : self.pooled_dim], "time_ids": time_ids.to(noisy.dtype)}
        return self.unet(noisy, timesteps, conditioning[:, :-1], added_cond_kwargs=added).sample

    def sample(self, *args, **kwargs) -> torch.Tensor:
        """`_sample` (below), leaving the global random state as it found it: samples and evaluations
        in the middle of training never shift the stream training draws dropout masks from."""
        devices = [self.unet.device] if self.unet.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._sample(*args, **kwargs)

    @torch.no_grad()
    def _sample(
        self, prompts: list[str], seeds: list[int], num_inference_steps: int, guidance_scale: float,
        negative_prompt: str = "", batch_size: int = 64, progress: str | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """One DDIM sample of prompts[i] at seeds[i] each, in batches: [len(prompts), 3, H, W] in [0, 1].

        `progress`: a description for a transient progress bar over the denoising steps."""

        pipe = self.pipeline("DDIMScheduler")
        size = self.native_resolution
        out = []
        chunks = range(0, len(prompts), batch_size)
        bar = tqdm(total=len(chunks) * num_inference_steps, desc=progress, unit="step", leave=False,
                   disable=progress is None, dynamic_ncols=True)  # fmt: skip

        def advance(pipe, step, timestep, kwargs):
            bar.update(1)
            return kwargs

        for start in chunks:
            chunk = prompts[start : start + batch_size]
            # Encoded here (not by the pipeline) so a multi-vector placeholder reads exactly as in training.
            images = pipe(
                **self.prompt_embeds(pipe, chunk, negative_prompt),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[
                    torch.Generator(device="cpu").manual_seed(s) for s in seeds[start : start + batch_size]
                ],
                height=size,
                width=size,
                output_type="pt",
                callback_on_step_end=advance,
            ).images
            out.append(images.float().cpu())
        bar.close()
        return torch.cat(out)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text contexts for prompts, in the UNet's dtype. Weighted spans (`(<my-cat>:1.3)`) scale their
        tokens' outputs as AUTOMATIC1111 does: each prompt's context times the weights, then rescaled to
        its unweighted mean (where it has one)."""

        if not any(has_weights(p) for p in prompts):
            return self.encode_text(self.tokenize(prompts).to(self.text_encoder.device)).to(self.unet.dtype)
        ids, weights = zip(*(self.tokenize_weighted(p) for p in prompts))
        device = self.text_encoder.device
        context = self.encode_text(torch.stack(ids).to(device)).float()
        if self.is_xl:  # the token rows are weighted, the pooled row is left as it is
            pooled, context = context[:, -1:], context[:, :-1]
        scale = torch.stack(weights).to(device)[..., None]
        weighted = context * scale
        before, after = context.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
        # A context whose mean is ~0 (a final layer norm without bias) has no mean to restore.
        usable = after.abs() > 1e-3 * context.abs().mean(dim=(1, 2), keepdim=True)
        weighted = torch.where(usable, weighted * before / torch.where(usable, after, 1.0), weighted)
        if self.is_xl:
            weighted = torch.cat([weighted, pooled], 1)
        return weighted.to(self.unet.dtype)

    def tokenize_weighted(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [77] (SDXL: [2, 77], one row per tokenizer) of a prompt with weighted spans, and each
        token's weight [77] (1 for the start, end and padding tokens); spans are tokenized one by one, so
        each weight lands on its own words."""

        rows = []
        for tok in self.tokenizers:
            ids, weights = [tok.bos_token_id], [1.0]
            for text, weight in weighted_spans(prompt):
                pieces = tok(text, add_special_tokens=False).input_ids
                ids += pieces
                weights += [weight] * len(pieces)
            length = tok.model_max_length
            ids, weights = ids[: length - 1] + [tok.eos_token_id], weights[: length - 1] + [1.0]
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            ids += [pad] * (length - len(ids))
            weights += [1.0] * (length - len(weights))
            rows.append(torch.tensor(ids))
        return torch.stack(rows) if self.is_xl else rows[0], torch.tensor(weights)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [len(texts), 77] (SDXL: [len(texts), 2, 77], each tokenizer's with its own padding),
        padded and truncated as Stable Diffusion's pipelines do."""
        ids = [
            tok(
                texts,
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids  # fmt: skip
            for tok in self.tokenizers
        ]
        return torch.stack(ids, 1) if self.is_xl else ids[0]

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's text conditioning for token ids from `tokenize`: SD, the last hidden state
        [batch, 77, width]; SDXL, both encoders' penultimate hidden states side by side and a last row
        holding the pooled projection of the second (see the module's doc): [batch, 78, 2048]."""
        if not self.is_xl:
            return self.text_encoder(input_ids)[0]
        first = self.text_encoder(input_ids[:, 0], output_hidden_states=True)
        second = self.text_encoder_2(input_ids[:, 1], output_hidden_states=True)
        context = torch.cat(
            [first.hidden_states[-2], second.hidden_states[-2].to(first.hidden_states[-2])], -1
        )
        pooled = torch.nn.functional.pad(second.text_embeds, (0, context.shape[-1] - self.pooled_dim))
        return torch.cat([context, pooled[:, None].to(context)], 1)


def resolve_dtype(name: str, device: torch.device, precision: str) -> torch.dtype:
    """The frozen parts' dtype: `auto` = half precision on CUDA, float32 elsewhere."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if "bf16" in str(precision) else torch.float16
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_backbone(cfg: ModelConfig) -> Backbone:
    """Load the frozen backbone a model config names: a diffusers folder, a hub id, a single-file
    checkpoint (.safetensors/.ckpt, what webui users have), or the tiny default."""
    source = str(resolve_path(cfg.path)) if cfg.path else str(ensure_tiny_backbone(cfg))
    if cfg.unpack:  # e.g. the packed SDXL-shaped toy, made a whole folder once in the cache
        source = str(get_method(cfg.unpack)(Path(source), cfg))
    if cfg.check:
        get_method(cfg.check)(Path(source))  # e.g. the toy world's manifest and version check
    if cfg.family is not None and cfg.family not in FAMILIES:
        raise ConfigError(f"model.family={cfg.family!r}: use {', '.join(FAMILIES)} or null")
    if Path(source).is_file():
        parts = _load_single_file(Path(source), cfg)
    else:
        parts = _load_pretrained(source, cfg)
    if cfg.vae_path:
        parts["vae"] = _load_vae(cfg.vae_path, cfg)
    tokenizer, text_encoder, vae, unet, scheduler = (parts[c] for c in COMPONENTS)
    if cfg.prediction_type:
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"model.prediction_type={cfg.prediction_type!r}: use epsilon, v_prediction or null"
            )
        scheduler.register_to_config(prediction_type=cfg.prediction_type)
    # transformers keeps a checkpoint's own dtype (fp16 files load as fp16), diffusers loads float32:
    # one dtype for every part until training or generation picks theirs.
    for encoder in (text_encoder, parts.get("text_encoder_2")):
        if encoder is not None:
            encoder.to(unet.dtype)
    # A user's folder or hub id names the checkpoint; the shipped ones (pkg://, the tiny default) go by
    # their model config's name.
    # The webui names a single-file checkpoint by its file name without the extension.
    named = cfg.path and not cfg.path.startswith("pkg://")
    checkpoint_name = Path(source).name if Path(source).is_dir() else Path(source).stem
    checkpoint_name = checkpoint_name if named else cfg.name
    backbone = Backbone(tokenizer, text_encoder, vae, unet, scheduler, name=cfg.name, path=source,
                        checkpoint_name=checkpoint_name, tokenizer_2=parts.get("tokenizer_2"),
                        text_encoder_2=parts.get("text_encoder_2"))  # fmt: skip
    if cfg.context_dim is not None and backbone.context_dim != cfg.context_dim:
        raise BackboneError(
            f"{source} has a {backbone.context_dim}-wide text context, but model={cfg.name} expects "
            f"{cfg.context_dim}; pick the model config that matches the folder (sd15: 768, sd21: 1024, sdxl: 2048)"
        )
    return backbone


def _load_vae(path: str, cfg: ModelConfig):
    """model.vae_path: a diffusers VAE folder or hub id, in place of the model's own."""
    from diffusers import AutoencoderKL

    local = resolve_path(path)
    try:
        return AutoencoderKL.from_pretrained(str(local) if local.exists() else path)
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"model.vae_path={path!r}: could not load a diffusers VAE from it ({str(err).splitlines()[0]}); "
            "give a folder holding config.json and diffusion_pytorch_model.safetensors, or a hub id"
        ) from err


def _load_pretrained(source: str, cfg: ModelConfig) -> dict:
    """The parts of a diffusers folder or hub id (SDXL's two text encoders where the folder has them)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    local = Path(source).is_dir()
    xl = (Path(source) / "text_encoder_2").is_dir() if local else cfg.family == "sdxl"
    if cfg.family is not None and xl != (cfg.family == "sdxl"):
        raise BackboneError(
            f"{source} is an {'SDXL' if xl else 'SD 1.x/2.x'} model, but model={cfg.name} says family={cfg.family}; "
            "pick the model config of its family (sd15, sd21, sdxl) or set model.family"
        )
    components = XL_COMPONENTS if xl else COMPONENTS
    if local:
        missing = [c for c in components if not (Path(source) / c).is_dir()]
        if missing:
            raise BackboneError(
                f"model folder {source} has no {', '.join(m + '/' for m in missing)}: a diffusers "
                f"{'SDXL' if xl else 'Stable Diffusion'} folder holds {', '.join(c + '/' for c in components)}; "
                "point model.path at a complete folder or at a single-file .safetensors/.ckpt checkpoint"
            )
    elif Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise BackboneError(
            f"model.path={cfg.path!r} is neither a diffusers model folder, a single-file checkpoint nor a hub "
            "id (owner/name); point it at a folder holding tokenizer/, text_encoder/, vae/, unet/ and "
            "scheduler/, or at a .safetensors/.ckpt checkpoint file"
        )
    kwargs = {} if local else {"revision": cfg.revision}
    weights = {"variant": cfg.variant, **kwargs}
    loaders = {
        "tokenizer": (CLIPTokenizer, kwargs), "text_encoder": (CLIPTextModel, weights),
        "tokenizer_2": (CLIPTokenizer, kwargs), "text_encoder_2": (CLIPTextModelWithProjection, weights),
        "vae": (AutoencoderKL, weights), "unet": (UNet2DConditionModel, weights),
        "scheduler": (DDPMScheduler, kwargs),
    }  # fmt: skip
    try:
        parts = {c: loaders[c][0].from_pretrained(source, subfolder=c, **loaders[c][1]) for c in components}
    except (OSError, ValueError) as err:
        where = (
            f"folder {source}"
            if local
            else f"hub id {source!r} (is it downloaded, and is the hub reachable?)"
        )
        raise BackboneError(f"could not load the Stable Diffusion backbone from {where}: {err}") from err
    return parts


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class _TrainingState:
    """Stands in, when a .ckpt is read, for the training code's objects pickled beside the weights (a
    Lightning checkpoint callback): never constructed from the file's code, and then dropped."""

    def __setstate__(self, state) -> None:
        pass


# What original training code leaves in a .ckpt besides tensors; admitted as inert stand-ins (the
# webui's checker allows the same), so such files load with weights_only=True and nothing else runs.
CKPT_EXTRAS = [(_TrainingState, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def _load_single_file(file: Path, cfg: ModelConfig) -> dict:
    """The parts of a single-file SD 1.x/2.x or SDXL checkpoint, through diffusers' from_single_file with
    local component configs (model.single_file_config): nothing is fetched from a hub."""
    import diffusers
    from diffusers import DDPMScheduler

    if file.suffix not in SINGLE_FILE_SUFFIXES:
        raise BackboneError(
            f"model.path={cfg.path!r} is a {file.suffix or 'suffix-less'} file: a single-file checkpoint is "
            f"{' or '.join(SINGLE_FILE_SUFFIXES)}; otherwise point model.path at a diffusers folder"
        )
    if not cfg.single_file_config:
        raise BackboneError(
            f"model.path={cfg.path!r} is a single-file checkpoint, and model={cfg.name} does not say how its "
            "parts are shaped: pick its family (model=sd15 for SD 1.x, model=sd21 for SD 2.x, model=sdxl for "
            "SDXL) or set model.single_file_config= a diffusers folder whose configs describe it"
        )
    config = resolve_path(cfg.single_file_config)
    if not (config / "model_index.json").is_file():
        raise BackboneError(
            f"model.single_file_config={cfg.single_file_config!r}: {config} holds no model_index.json; give a "
            "diffusers SD folder (its config files suffice)"
        )
    if file.suffix == ".ckpt":
        refuse_unsafe_pickle(
            file, "convert it to .safetensors with a tool you trust", BackboneError, CKPT_EXTRAS
        )
    xl = (config / "text_encoder_2").is_dir()
    if cfg.family is not None and xl != (cfg.family == "sdxl"):
        raise BackboneError(
            f"model.single_file_config={cfg.single_file_config!r} describes an {'SDXL' if xl else 'SD 1.x/2.x'} "
            f"model, but model={cfg.name} says family={cfg.family}; give the configs of its family"
        )
    if file.suffix == ".safetensors" and (found := _single_file_family(file)) and (found == "sdxl") != xl:
        raise BackboneError(
            f"model.path={cfg.path!r} is an {'SDXL' if found == 'sdxl' else 'SD 1.x/2.x'} checkpoint, but "
            f"the configs in {config} describe an {'SDXL' if xl else 'SD 1.x/2.x'} model; "
            f"use {'model=sdxl' if found == 'sdxl' else 'model=sd15 (SD 1.x) or model=sd21 (SD 2.x)'}"
        )
    # A config folder without a vocabulary (the shipped ones) gets CLIP's, with the folder's special tokens.
    extra = (
        {} if xl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    for name in ("tokenizer", "tokenizer_2") if xl else ("tokenizer",):
        folder = config / name
        if not any((folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            settings = json.loads((folder / "tokenizer_config.json").read_text())
            extra[name] = clip_tokenizer(pad_token=settings.get("pad_token", "<|endoftext|>"))
    try:
        with torch.serialization.safe_globals(CKPT_EXTRAS):
            pipeline = getattr(diffusers, PIPELINES["sdxl" if xl else "sd"]["text"])
            pipe = pipeline.from_single_file(str(file), config=str(config), local_files_only=True, **extra)
    except Exception as err:  # diffusers raises several kinds for a file that is not what the configs say
        raise BackboneError(
            f"could not load the single-file checkpoint {file} with the configs in {config}: "
            f"{str(err).splitlines()[0]}. Is it an SD 1.x (model=sd15), SD 2.x (model=sd21) or SDXL (model=sdxl) "
            "checkpoint, or does model.single_file_config describe it?"
        ) from err
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    parts = {c: getattr(pipe, c) for c in (XL_COMPONENTS if xl else COMPONENTS)}
    return {**parts, "scheduler": scheduler}


def _single_file_family(file: Path) -> str | None:
    """ "sdxl" or "sd" by the text encoders' names in a .safetensors checkpoint (SDXL's sit under
    `conditioner.embedders.`, SD 1.x/2.x's under `cond_stage_model.`); None if it has neither."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        prefixes = {key.split(".", 1)[0] for key in f.keys()}
    return "sdxl" if "conditioner" in prefixes else "sd" if "cond_stage_model" in prefixes else None


def resolve_path(path: str) -> Path:
    """A path, or `pkg://package/sub/path` (inside an installed Python package); `~` and $VARIABLES expanded."""
    if path.startswith("pkg://"):
        package, _, inside = path.removeprefix("pkg://").partition("/")
        try:
            root = resources.files(package)
        except ModuleNotFoundError as err:
            raise ConfigError(f"{path}: no installed package {package!r}") from err
        # joinpath: a data folder without __init__.py is a namespace package, whose root is a MultiplexedPath
        return Path(str(root.joinpath(inside) if inside else root))
    return Path(os.path.expandvars(path)).expanduser()


def tiny_backbone_dir(cfg: ModelConfig) -> Path:
    root = cache_root(cfg)
    kind = "tiny_xl" if cfg.family == "sdxl" else "tiny"
    return root / f"{kind}-v{TINY_VERSION}-seed{cfg.tiny_seed}"


def ensure_tiny_backbone(cfg: ModelConfig) -> Path:
    """The cached tiny backbone folder, built on first use."""
    return build_once(
        tiny_backbone_dir(cfg),
        lambda tmp: save_tiny_backbone(tmp, seed=cfg.tiny_seed, family=cfg.family or "sd"),
        "the embedded tiny backbone",
    )


def cache_root(cfg: ModelConfig) -> Path:
    """Where built backbones are kept: $CONCEPTLAB_CACHE, else model.cache_dir."""
    return Path(os.environ.get("CONCEPTLAB_CACHE") or cfg.cache_dir).expanduser()


def build_once(folder: Path, build, what: str) -> Path:
    """A diffusers folder built by `build(tmp)` on first use and renamed into place whole (atomically:
    parallel sweep jobs are safe, and an interrupted build leaves nothing that looks finished)."""
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        log.info("building %s in %s (once)", what, folder)
        build(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model_index.json").is_file():  # not a finished twin from another job
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_tiny_backbone(folder: str | os.PathLike, seed: int = 0, family: str = "sd") -> Path:
    """Build the tiny SD-1.x- or SDXL-shaped pipeline (random weights, fixed seed) and save it as a
    diffusers folder."""
    with torch.random.fork_rng(devices=[]):  # seeded here, without resetting the caller's random state
        torch.manual_seed(seed)
        return _save_tiny_xl(folder) if family == "sdxl" else _save_tiny_backbone(folder)


def _save_tiny_backbone(folder: str | os.PathLike) -> Path:
    from diffusers import UNet2DConditionModel

    text_encoder = clip_text_encoder(width=32, intermediate=64, layers=2, heads=4)
    vae = tiny_vae()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return save_sd_folder(folder, text_encoder, vae, unet)


def _save_tiny_xl(folder: str | os.PathLike) -> Path:
    """SDXL's shape at a toy's size: two CLIP text encoders of different widths (32 and 48; the second
    with a projection, whose pooled output joins the time embedding with the six size ids), a UNet with
    SDXL's block pattern (no attention at the first level, two transformer layers at the second), linear
    projections and `text_time` conditioning, and the same factor-8 VAE; CLIP's vocabulary in both
    tokenizers, the second padding with "!" as SDXL's does."""
    from diffusers import UNet2DConditionModel

    text_encoder = clip_text_encoder(width=32, intermediate=64, layers=2, heads=4)
    text_encoder_2 = clip_text_encoder(width=48, intermediate=96, layers=2, heads=4, projection=True)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32 + 48,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=48 + 6 * time_dim,
        norm_num_groups=8,
    )
    return save_sd_folder(folder, text_encoder, tiny_vae(), unet, text_encoder_2)


def tiny_vae():
    """A factor-8 VAE (4 blocks) like SD's, so a 64-px image gives an 8x8x4 latent."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def clip_text_encoder(width: int, intermediate: int, layers: int, heads: int, projection: bool = False):
    """A randomly initialised CLIP text encoder over CLIP's full vocabulary and 77 positions (with
    `projection`, CLIPTextModelWithProjection: SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=width,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def save_sd_folder(folder: str | os.PathLike, text_encoder, vae, unet, text_encoder_2=None) -> Path:
    """Save SD parts as a diffusers pipeline folder, with CLIP's tokenizer and SD's noise schedule; with
    `text_encoder_2`, an SDXL folder (its second tokenizer pads with "!", as SDXL's does)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": clip_tokenizer(), "unet": unet,
             "scheduler": sd_scheduler()}  # fmt: skip
    if text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(
            **parts, text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(pad_token="!")
        )
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(folder)
    return Path(folder)


def sd_scheduler():
    """SD's own schedule (scaled linear 0.00085-0.012, 1000 steps, epsilon prediction)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """OpenAI's CLIP tokenizer (49,408 tokens), built from the BPE file the openai-clip package ships.
    SD 2.x pads with "!" where SD 1.x pads with the end-of-text token."""
    from transformers import CLIPTokenizer

    try:
        bpe_file = metadata.distribution("openai-clip").locate_file("clip/bpe_simple_vocab_16e6.txt.gz")
    except metadata.PackageNotFoundError as err:
        raise BackboneError(
            "the CLIP vocabulary comes from the openai-clip package: pip install openai-clip"
        ) from err
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    # CLIP keeps the first 48,894 merges; its vocabulary is the 256 byte symbols, the same with an
    # end-of-word mark, one entry per merge, then the two special tokens (OpenAI's simple_tokenizer).
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _byte_symbols()
    words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges, model_max_length=77,
                         pad_token=pad_token)  # fmt: skip


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte-to-character map, in CLIP's vocabulary order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
