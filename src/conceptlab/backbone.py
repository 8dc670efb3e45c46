"""The frozen Stable Diffusion parts: loaded from any diffusers SD 1.x/2.x folder or hub id, or the
embedded tiny backbone (built once from code, saved with save_pretrained, then loaded like a folder)."""

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
# Bump when the tiny backbone's architecture changes, so stale caches are rebuilt, not reused.
TINY_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Backbone(nn.Module):
    """Tokenizer, text encoder, VAE, UNet and noise scheduler; frozen and in eval mode.

    A method may unfreeze parts (LoRA adds trainable layers to the UNet): it sets their
    requires_grad, and their train/eval mode in its own `train()`, which runs after this one's.
    """

    def __init__(self, tokenizer, text_encoder, vae, unet, scheduler, name: str, path: str,
                 checkpoint_name: str | None = None):  # fmt: skip
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
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
        """trainer.gradient_checkpointing where gradients pass through the text encoder (a method that
        changes the text encoding): transformers' own checkpointing, which recomputes a layer only when it
        is marked as training. The layers themselves are marked, not their attention and MLP, so no
        dropout acts and the encoder computes what it did before."""
        self.text_encoder.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        self._checkpointed_layers = [
            m for m in self.text_encoder.modules() if getattr(m, "gradient_checkpointing", False) is True
        ]
        self.train()

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
        return self.text_encoder.config.hidden_size

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def pipeline(self, scheduler: str = "DDIMScheduler", kind: str = "StableDiffusionPipeline"):
        """A diffusers pipeline over these very parts (no copy), with a sampling scheduler: text-to-image,
        or `StableDiffusionImg2ImgPipeline` / `StableDiffusionInpaintPipeline`."""
        import diffusers

        scheduler_cls = getattr(diffusers, scheduler)
        # SD folders' scheduler configs predate clip_sample, which DDIM/DDPM would otherwise turn on.
        extra = {"clip_sample": False} if "clip_sample" in inspect.signature(scheduler_cls).parameters else {}
        pipe = getattr(diffusers, kind)(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler_cls.from_config(self.scheduler.config, **extra),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

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
                prompt_embeds=self.encode_prompts(chunk),
                negative_prompt_embeds=self.encode_prompts([negative_prompt] * len(chunk)),
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
        scale = torch.stack(weights).to(device)[..., None]
        weighted = context * scale
        before, after = context.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
        # A context whose mean is ~0 (a final layer norm without bias) has no mean to restore.
        usable = after.abs() > 1e-3 * context.abs().mean(dim=(1, 2), keepdim=True)
        weighted = torch.where(usable, weighted * before / torch.where(usable, after, 1.0), weighted)
        return weighted.to(self.unet.dtype)

    def tokenize_weighted(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [77] of a prompt with weighted spans, and each token's weight [77] (1 for the start,
        end and padding tokens); spans are tokenized one by one, so each weight lands on its own words."""

        tok = self.tokenizer
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
        return torch.tensor(ids), torch.tensor(weights)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [len(texts), 77], padded and truncated as Stable Diffusion's pipelines do."""
        return self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's text context (last hidden state) for token ids [batch, 77]."""
        return self.text_encoder(input_ids)[0]


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
    if cfg.check:
        get_method(cfg.check)(Path(source))  # e.g. the toy world's manifest and version check
    if Path(source).is_file():
        tokenizer, text_encoder, vae, unet, scheduler = _load_single_file(Path(source), cfg)
    else:
        tokenizer, text_encoder, vae, unet, scheduler = _load_pretrained(source, cfg)
    if cfg.prediction_type:
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"model.prediction_type={cfg.prediction_type!r}: use epsilon, v_prediction or null"
            )
        scheduler.register_to_config(prediction_type=cfg.prediction_type)
    # transformers keeps a checkpoint's own dtype (fp16 files load as fp16), diffusers loads float32:
    # one dtype for every part until training or generation picks theirs.
    text_encoder.to(unet.dtype)
    # A user's folder or hub id names the checkpoint; the shipped ones (pkg://, the tiny default) go by
    # their model config's name.
    # The webui names a single-file checkpoint by its file name without the extension.
    named = cfg.path and not cfg.path.startswith("pkg://")
    checkpoint_name = Path(source).name if Path(source).is_dir() else Path(source).stem
    checkpoint_name = checkpoint_name if named else cfg.name
    backbone = Backbone(tokenizer, text_encoder, vae, unet, scheduler, name=cfg.name, path=source,
                        checkpoint_name=checkpoint_name)  # fmt: skip
    if cfg.context_dim is not None and backbone.context_dim != cfg.context_dim:
        raise BackboneError(
            f"{source} has a {backbone.context_dim}-wide text context, but model={cfg.name} expects "
            f"{cfg.context_dim}; pick the model config that matches the folder (sd15: 768, sd21: 1024)"
        )
    return backbone


def _load_pretrained(source: str, cfg: ModelConfig) -> tuple:
    """The parts of a diffusers folder or hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(source).is_dir()
    if local:
        missing = [c for c in COMPONENTS if not (Path(source) / c).is_dir()]
        if missing:
            raise BackboneError(
                f"model folder {source} has no {', '.join(m + '/' for m in missing)}: a diffusers Stable "
                f"Diffusion folder holds {', '.join(c + '/' for c in COMPONENTS)}; point model.path at a "
                "complete folder or at a single-file .safetensors/.ckpt checkpoint"
            )
    elif Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise BackboneError(
            f"model.path={cfg.path!r} is neither a diffusers model folder, a single-file checkpoint nor a hub "
            "id (owner/name); point it at a folder holding tokenizer/, text_encoder/, vae/, unet/ and "
            "scheduler/, or at a .safetensors/.ckpt checkpoint file"
        )
    kwargs = {} if local else {"revision": cfg.revision}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", variant=cfg.variant, **kwargs
        )
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", variant=cfg.variant, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=cfg.variant, **kwargs)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as err:
        where = (
            f"folder {source}"
            if local
            else f"hub id {source!r} (is it downloaded, and is the hub reachable?)"
        )
        raise BackboneError(f"could not load the Stable Diffusion backbone from {where}: {err}") from err
    return tokenizer, text_encoder, vae, unet, scheduler


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class _TrainingState:
    """Stands in, when a .ckpt is read, for the training code's objects pickled beside the weights (a
    Lightning checkpoint callback): never constructed from the file's code, and then dropped."""

    def __setstate__(self, state) -> None:
        pass


# What original training code leaves in a .ckpt besides tensors; admitted as inert stand-ins (the
# webui's checker allows the same), so such files load with weights_only=True and nothing else runs.
CKPT_EXTRAS = [(_TrainingState, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]


def _load_single_file(file: Path, cfg: ModelConfig) -> tuple:
    """The parts of a single-file SD 1.x/2.x checkpoint, through diffusers' from_single_file with local
    component configs (model.single_file_config): nothing is fetched from a hub."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if file.suffix not in SINGLE_FILE_SUFFIXES:
        raise BackboneError(
            f"model.path={cfg.path!r} is a {file.suffix or 'suffix-less'} file: a single-file checkpoint is "
            f"{' or '.join(SINGLE_FILE_SUFFIXES)}; otherwise point model.path at a diffusers folder"
        )
    if not cfg.single_file_config:
        raise BackboneError(
            f"model.path={cfg.path!r} is a single-file checkpoint, and model={cfg.name} does not say how its "
            "parts are shaped: pick its family (model=sd15 for SD 1.x, model=sd21 for SD 2.x) or set "
            "model.single_file_config= a diffusers folder whose configs describe it"
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
    # A config folder without a vocabulary (the shipped ones) gets CLIP's, with the folder's special tokens.
    tokenizer_folder = config / "tokenizer"
    extra = {}
    if not any((tokenizer_folder / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        settings = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
        extra["tokenizer"] = clip_tokenizer(pad_token=settings.get("pad_token", "<|endoftext|>"))
    try:
        with torch.serialization.safe_globals(CKPT_EXTRAS):
            pipe = StableDiffusionPipeline.from_single_file(
                str(file), config=str(config), local_files_only=True, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False, **extra,
            )  # fmt: skip
    except Exception as err:  # diffusers raises several kinds for a file that is not what the configs say
        raise BackboneError(
            f"could not load the single-file checkpoint {file} with the configs in {config}: "
            f"{str(err).splitlines()[0]}. Is it an SD 1.x (model=sd15) or SD 2.x (model=sd21) checkpoint, "
            "or does model.single_file_config describe it?"
        ) from err
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler


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
    root = Path(os.environ.get("CONCEPTLAB_CACHE") or cfg.cache_dir).expanduser()
    return root / f"tiny-v{TINY_VERSION}-seed{cfg.tiny_seed}"


def ensure_tiny_backbone(cfg: ModelConfig) -> Path:
    """The cached tiny backbone folder, built on first use (atomically: parallel sweep jobs are safe)."""
    folder = tiny_backbone_dir(cfg)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        log.info("building the embedded tiny backbone in %s (once)", folder)
        save_tiny_backbone(tmp, seed=cfg.tiny_seed)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model_index.json").is_file():  # not a finished twin from another job
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_tiny_backbone(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tiny SD-1.x-shaped pipeline (random weights, fixed seed) and save it as a diffusers folder."""
    with torch.random.fork_rng(devices=[]):  # seeded here, without resetting the caller's random state
        torch.manual_seed(seed)
        return _save_tiny_backbone(folder)


def _save_tiny_backbone(folder: str | os.PathLike) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    text_encoder = clip_text_encoder(width=32, intermediate=64, layers=2, heads=4)
    # Factor-8 VAE (4 blocks) like SD's, so a 64-px image gives an 8x8x4 latent.
    vae = AutoencoderKL(
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


def clip_text_encoder(width: int, intermediate: int, layers: int, heads: int):
    """A randomly initialised CLIP text encoder over CLIP's full vocabulary and 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
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


def save_sd_folder(folder: str | os.PathLike, text_encoder, vae, unet) -> Path:
    """Save SD parts as a diffusers pipeline folder, with CLIP's tokenizer and SD's noise schedule."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    # SD's own schedule (scaled linear 0.00085-0.012, 1000 steps, epsilon prediction).
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return Path(folder)


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
