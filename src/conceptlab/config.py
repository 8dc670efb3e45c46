"""Structured configs: the schema every yaml in conf/ is checked against, and the one home of defaults.

Each key is declared once, here (or in its method's module), with its default and a one-line help
that `python train.py --help` prints. A key that is not declared is an error at composition time (a
typo in `method.num_vectorz=4` fails before anything loads). The yaml files in conf/ hold choices -
the values that make `data=styles` a style set or `trainer=gpu` a GPU run - never copies of these
defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, ListConfig

from .errors import ConfigError

# Where Hydra finds conceptlab's own configs: inside the installed package, from any folder.
CONFIG_PATH = "pkg://conceptlab.conf"


def opt(default: Any = MISSING, help: str = "", valid: str | None = None, nonempty: bool = False) -> Any:  # noqa: A002
    """A config field with its one-line help (lists and nested configs get a fresh default each time).

    `valid`: the interval a number (or each number of a list) must lie in, e.g. "(0, inf)" or "[0, 1)";
    always finite. `nonempty`: a list that must hold at least one entry. Checked by `validate` before
    anything loads; `--help` shows them."""
    meta = {"help": help, "valid": valid, "nonempty": nonempty}
    if isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def in_interval(value: float, interval: str) -> bool:
    """Whether a finite number lies in an interval written "(low, high]" (inf allowed as a bound)."""
    low, high = (float(b) for b in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return math.isfinite(value) and above and below


def validate(cfg: Any, schema: type, prefix: str = "") -> list[str]:
    """Every value of `cfg` outside its schema's declared range, as `key=value: what is valid`."""
    problems = []
    for f in dataclasses.fields(schema):
        if f.name not in cfg:
            continue
        value, key = cfg[f.name], f"{prefix}{f.name}"
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            problems += validate(value, factory, f"{key}.")
            continue
        if value is None:
            continue
        values = list(value) if isinstance(value, list | tuple | ListConfig) else [value]
        shown = (
            f"[{', '.join(str(v) for v in values)}]"
            if isinstance(value, list | tuple | ListConfig)
            else value
        )
        if f.metadata.get("nonempty") and not values:
            problems.append(f"{key}=[]: give at least one")
        interval = f.metadata.get("valid")
        if interval:
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | float)
                   or not in_interval(float(v), interval)]  # fmt: skip
            if bad:
                what = "each must be" if isinstance(value, list | tuple | ListConfig) else "must be"
                problems.append(f"{key}={shown}: {what} a finite number in {interval}")
    return problems


def check_config(cfg: Any, schemas: list[tuple[str, type]]) -> None:
    """Stop with one line listing every value outside its range (the value as given, what is valid)."""

    problems = []
    for prefix, schema in schemas:
        node = cfg[prefix.rstrip(".")] if prefix else cfg
        if node is not None:
            problems += validate(node, schema, prefix)
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass
class ModelConfig:
    """The frozen backbone."""

    name: str = opt("tiny", "label used in run names and in exported files' sd_checkpoint_name")
    path: str | None = opt(
        None,
        "a local diffusers SD 1.x/2.x or SDXL folder, a single-file SD 1.x/2.x or SDXL checkpoint (.safetensors/.ckpt), a hub id, or "
        "pkg://package/folder inside an installed package; "
        "null = the embedded tiny backbone",
    )
    single_file_config: str | None = opt(
        None,
        "for model.path= a single-file .safetensors/.ckpt checkpoint: a diffusers folder whose configs describe "
        "its parts (pkg:// too); sd15, sd21 and sdxl name the shipped configs of their family",
    )
    revision: str | None = opt(None, "hub revision (ignored for local folders)")
    variant: str | None = opt(None, "weight variant to load, e.g. fp16")
    dtype: str = opt(
        "auto",
        "frozen parts' dtype: auto (float16 on CUDA, bfloat16 with bf16 precision, float32 on CPU), float32, float16, bfloat16",
    )
    prediction_type: str | None = opt(None, "epsilon | v_prediction | null (the folder's scheduler config)")
    context_dim: int | None = opt(
        None, "text-context width the folder must have (768 SD 1.x, 1024 SD 2.x, 2048 SDXL); null = any"
    )
    cache_dir: str = opt(
        "~/.cache/conceptlab", "where the embedded tiny backbone is built once (env CONCEPTLAB_CACHE wins)"
    )
    tiny_seed: int = opt(0, "seed of the tiny backbone's random weights")
    family: str | None = opt(
        None,
        "sd (SD 1.x/2.x: one text encoder) | sdxl (two text encoders and size conditioning); null = what the "
        "folder holds (text_encoder_2/ means SDXL); a single file and the tiny backbone need it said",
    )
    vae_path: str | None = opt(
        None,
        "a diffusers VAE folder or hub id used instead of the model's own (SDXL's overflows in float16: "
        "madebyollin/sdxl-vae-fp16-fix)",
    )
    check: str | None = opt(
        None,
        "a function (dotted path) that checks the model folder before loading, e.g. the toy world's manifest check",
    )
    unpack: str | None = opt(
        None,
        "a function (dotted path) given model.path's folder and this config that returns the folder to load, "
        "e.g. model=toy_xl's, which rebuilds the shipped packed toy once into cache_dir",
    )


@dataclass
class DataConfig:
    """The concept's images and captions."""

    path: str = opt(
        MISSING, "folder of concept images; bundled:NAME = an example set shipped with conceptlab"
    )
    templates: str = opt(
        "object",
        "object | style | filewords | bare | a template file ({} or [name]; pkg://package/file too)",
    )
    num_images: int | None = opt(None, "a seeded subset of this many images; null = all", valid="[1, inf)")
    subset_seed: int = opt(
        0, "the subset and the held-out images are nested: the first k and the last v of one fixed shuffle"
    )
    val_images: Any = opt(
        "auto",
        "images held out of training (validation loss, CLIP-I/DINO and the best step are measured on them): a "
        "number, 0 = none, or auto = a fifth of the folder when it holds 10 or more images, else none",
    )
    resolution: int | None = opt(
        None,
        "training size in pixels (a multiple of what the backbone needs); null = the backbone's native size",
        valid="[8, inf)",
    )
    center_crop: bool = opt(True, "crop the central square (false: squash the whole image to a square)")
    buckets: bool = opt(
        False,
        "aspect-ratio buckets: each image at the size of about resolution² pixels nearest its aspect ratio (sides "
        "from half to twice the resolution), batches drawn within a bucket; false = every image a square",
    )
    flip_p: float = opt(
        0.5, "probability of a horizontal flip (both flips' latents are cached)", valid="[0, 1]"
    )
    mask: str | None = opt(
        None,
        "alpha | folder: weight the loss per pixel by the image's alpha channel, or by a grayscale mask of the "
        "same name in data.mask_path (white counts, black does not); images without one train unmasked; null = off",
    )
    mask_path: str | None = opt(None, "the masks' folder for data.mask=folder; null = <data.path>/masks")
    caption_dropout: float | None = opt(
        None,
        "probability that a sample's caption is dropped to the bare template {} (the concept's words alone); null = never",
        valid="[0, 1]",
    )
    shuffle_tags: bool = opt(False, "shuffle the comma-separated tags of each [filewords] caption")
    keep_tokens: int = opt(0, "with shuffle_tags: the first N tags stay in place", valid="[0, inf)")
    shuffle_orders: int = opt(
        16,
        "with shuffle_tags: orders drawn per image (once, seeded; each sample takes one)",
        valid="[1, inf)",
    )
    repeats: int = opt(100, "an epoch shows every image this many times", valid="[1, inf)")
    batch_size: int = opt(4, "images per step and device", valid="[1, inf)")
    num_workers: int = opt(
        0, "data-loader workers (latents are cached in memory, so workers rarely help)", valid="[0, inf)"
    )
    sample_prompts: list[str] = opt(
        ["a photo of {}"], "prompts of the sample grids; {} = the concept", nonempty=True
    )
    class_word: str | None = opt(
        None,
        "the concept's class noun (dog, backpack): evaluation prompts say it after the concept and CLIP-T "
        "reads it instead of the concept; null = the DreamBooth data set's own class, else none",
    )
    kind: str | None = opt(
        None,
        "object | live | style: which evaluation prompts apply; null = style for style templates, live for "
        "DreamBooth's cats and dogs, else object",
    )


@dataclass
class EmaConfig:
    """An exponential moving average of the trained tensors: sampled, evaluated and exported when on."""

    decay: float | None = opt(
        None,
        "ema = decay x ema + (1 - decay) x weights after every step (0.99-0.9999 usual); null = off",
        valid="(0, 1)",
    )
    start_step: int = opt(
        0, "the average starts as the weights of this step, then follows them", valid="[0, inf)"
    )


OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")


@dataclass
class OptimConfig:
    """The optimizer, the learning-rate scheduler and the loss's recipe knobs."""

    name: str = opt(
        "adamw",
        "adamw (torch) | adamw8bit (bitsandbytes, CUDA only) | adafactor (transformers) | prodigy "
        "(prodigyopt: it finds the step size itself; give method.lr=1)",
    )
    weight_decay: float = opt(1.0e-2, "weight decay (decoupled, as AdamW's)", valid="[0, inf)")
    betas: list[float] = opt([0.9, 0.999], "betas (two; Adafactor takes none)", valid="[0, 1)")
    eps: float = opt(1.0e-8, "epsilon (AdamW, AdamW 8-bit, Prodigy)", valid="(0, inf)")
    scheduler: str = opt(
        "constant", "diffusers.optimization scheduler: constant, constant_with_warmup, linear, cosine, ..."
    )
    warmup_steps: int = opt(0, "warm-up steps of the scheduler", valid="[0, inf)")
    snr_gamma: float | None = opt(
        None,
        "min-SNR-γ loss weighting (5 in the paper): each sample's loss x min(SNR, γ)/SNR of its timestep "
        "(/ (SNR+1) for v-prediction); null = off",
        valid="(0, inf)",
    )
    noise_offset: float | None = opt(
        None,
        "noise offset: each sample's noise plus this x one normal draw per latent channel (0.05-0.1 usual); null = off",
        valid="[0, inf)",
    )


@dataclass
class TrainerConfig:
    """Keyword arguments of Lightning's Trainer (only these are accepted), `compile` and
    `gradient_checkpointing`."""

    accelerator: str = opt("auto", "cpu | gpu | auto")
    devices: Any = opt(1, "devices per node")
    num_nodes: int = opt(1, "nodes", valid="[1, inf)")
    strategy: str = opt("auto", "auto | ddp | ddp_spawn | ...")
    precision: Any = opt("32-true", "32-true | 16-mixed | bf16-mixed")
    max_steps: int = opt(200, "optimizer steps", valid="[1, inf)")
    accumulate_grad_batches: int = opt(1, "batches per optimizer step", valid="[1, inf)")
    gradient_clip_val: float | None = opt(
        None, "clip gradients to this norm; null = no clipping", valid="(0, inf)"
    )
    log_every_n_steps: int = opt(1, "a loss point every N steps (metrics.csv, W&B)", valid="[1, inf)")
    enable_progress_bar: bool = opt(True, "Lightning's progress bar")
    enable_model_summary: bool = opt(False, "Lightning's model summary table")
    deterministic: bool = opt(False, "deterministic algorithms only")
    use_distributed_sampler: bool = opt(
        False, "conceptlab shards the data itself (a resumed run sees the same batches)"
    )
    compile: Any = opt(
        False,
        "torch.compile the UNet (conceptlab's key, not Lightning's): true, or a mode: default, "
        "reduce-overhead (CUDA graphs), max-autotune",
    )
    gradient_checkpointing: bool = opt(
        False,
        "recompute the UNet's blocks in the backward instead of keeping their activations (conceptlab's key: "
        "less memory, ~30% more compute)",
    )


@dataclass
class LoggerConfig:
    """metrics.csv always; Weights & Biases optionally."""

    wandb: bool = opt(False, "also log to Weights & Biases")
    project: str = opt("conceptlab", "W&B project")
    entity: str | None = opt(None, "W&B entity (team or user)")
    mode: str = opt("auto", "auto (online with credentials, else offline) | online | offline | disabled")
    group: str | None = opt(None, "W&B group; null = the study's name and sweep id")
    tags: list[str] = opt([], "W&B tags (swept values are added)")
    name: str | None = opt(None, 'run name; null = "<method>-<concept>-seed<seed>" or the swept values')
    init_timeout: float = opt(
        30.0, "seconds to wait for the W&B server before logging offline", valid="(0, inf)"
    )


@dataclass
class SamplesConfig:
    """Sample grids during training."""

    every_n_steps: int = opt(
        100, "a grid every N steps, plus step 0 and the end; 0 = never", valid="[0, inf)"
    )
    seeds: list[int] = opt([0, 1], "one column per seed (rows: data.sample_prompts)", nonempty=True)
    num_inference_steps: int = opt(25, "DDIM steps", valid="[1, inf)")
    guidance_scale: float = opt(7.5, "classifier-free guidance", valid="[0, inf)")
    negative_prompt: str = opt("", "negative prompt")


@dataclass
class EvaluateConfig:
    """When and how the evaluators (the `evaluators` group, e.g. the toy world's judge) score samples."""

    enabled: bool = opt(
        True,
        "run the evaluators the config selects, and the validation loss where data.val_images holds images out",
    )
    cache: bool = opt(
        True,
        "reuse scores whose every input was scored before (the bare model at multiplier 0, step 0 from the "
        "same starting state), kept under <CONCEPTLAB_CACHE or model.cache_dir>/evaluations",
    )
    every_n_steps: int = opt(100, "also at step 0 and the end; 0 = only at the end", valid="[0, inf)")
    num_samples: int = opt(16, "samples per prompt, seeds 0..n-1 (the same every time)", valid="[1, inf)")
    num_inference_steps: int = opt(
        10,
        "DDIM steps (10: the judge's scores change less than sampling noise from 25, scripts/bench_judge_steps.py)",
        valid="[1, inf)",
    )
    guidance_scale: float = opt(4.0, "classifier-free guidance", valid="[0, inf)")
    multipliers: list[float] = opt(
        [1.0, 0.5, 0.0],
        "methods with a strength are scored at each: metrics at 1.0, <name>_m<m>/ at the others",
        valid="(-inf, inf)",
        nonempty=True,
    )
    metric_prompts: int = opt(
        4, "similarity metrics during training: the first N editing prompts (+ the first reconstruction one)",
        valid="[1, inf)",
    )  # fmt: skip
    metric_samples: int = opt(
        2,
        "similarity metrics during training: seeds per prompt (sampled as protocol.* says)",
        valid="[1, inf)",
    )
    best: str | None = opt(
        None,
        "the metric that picks the best step (kept in concepts/steps/, named in summary.json); null = the "
        "best evidence the run has: the judge's concept score where a judge scores, else metrics/clip_i",
    )


@dataclass
class EncodersConfig:
    """The encoders of the similarity metrics (conceptlab.metrics): a hub id or a local folder each."""

    clip: str | None = opt(
        "openai/clip-vit-base-patch32",
        "CLIP for CLIP-I, CLIP-T and CLIPScore (e.g. openai/clip-vit-large-patch14); null = none",
    )
    dino: str | None = opt(
        "facebook/dino-vits16", "self-supervised ViT for DINO (e.g. facebook/dinov2-small); null = none"
    )


@dataclass
class PromptSet:
    """Evaluation prompts of one kind of concept; {} = the concept (its words, then the class word)."""

    reconstruction: list[str] = opt(["a photo of {}"], "CLIP-I / DINO against the real images", nonempty=True)
    editing: list[str] = opt(["{} on the beach"], "CLIP-T: the concept in new contexts", nonempty=True)


@dataclass
class ProtocolConfig:
    """How concepts are evaluated with the similarity metrics (evaluate.py, and during training)."""

    name: str = opt("custom", "the protocol's name (the report compares published figures only on theirs)")
    object: PromptSet = opt(PromptSet, "prompts for objects")
    live: PromptSet = opt(PromptSet, "prompts for live subjects (pets)")
    style: PromptSet = opt(PromptSet, "prompts for styles")
    images_per_prompt: int = opt(4, "images per prompt, seeds seed..seed+n-1", valid="[1, inf)")
    seed: int = opt(0, "first seed")
    num_inference_steps: int = opt(50, "DDIM steps", valid="[1, inf)")
    guidance_scale: float = opt(7.5, "classifier-free guidance", valid="[0, inf)")
    multipliers: list[float] = opt(
        [1.0], "methods with a strength (hypernetworks, LoRA) are evaluated at each", nonempty=True
    )


@dataclass
class CheckpointConfig:
    """checkpoints/last.ckpt."""

    every_n_steps: int = opt(100, "write last.ckpt every N steps (and at the end)", valid="[0, inf)")


@dataclass
class StudyConfig:
    """What a sweep is about (set by experiments/ files)."""

    name: str | None = opt(None, "the experiment's name (W&B group: name + sweep id)")
    question: str = opt("", "what the study answers, in one sentence")
    metric: str | None = opt(
        None,
        "the metric the report and the sweep's table lead with and pick the best by; null = the best evidence "
        "the runs have (the judge's concept score, else CLIP-I from evaluate.py, then from training, else "
        "the training loss, which the page then says does not compare methods)",
    )
    goal: str | None = opt(None, "max | min for the metric; null = min for losses, max otherwise")
    columns: list[str] = opt([], "more metrics the report's answer table shows beside the metric (mean ± sd)")
    at_end: Any = opt(
        None,
        "a step over the whole sweep once its jobs have ended: a _target_ called with sweep_dir= and settings= "
        "(the evaluate keys) and its own arguments (composition: the pairs of concepts sampled together)",
    )


@dataclass
class TrainConfig:
    model: ModelConfig = opt(MISSING, "the frozen backbone (group: model)")
    method: Any = opt(MISSING, "the method that learns the concept (group: method)")
    data: DataConfig = opt(MISSING, "images and captions (group: data)")
    trainer: TrainerConfig = opt(TrainerConfig, "Lightning Trainer (group: trainer)")
    logger: LoggerConfig = opt(LoggerConfig, "loggers (group: logger)")
    evaluators: dict[str, Any] = opt(
        {}, "evaluation callbacks by name (group: evaluators): a _target_ and its arguments"
    )
    optim: OptimConfig = opt(OptimConfig, "optimizer and scheduler")
    ema: EmaConfig = opt(EmaConfig, "an exponential moving average of the trained tensors")
    samples: SamplesConfig = opt(SamplesConfig, "sample grids")
    evaluate: EvaluateConfig = opt(EvaluateConfig, "evaluation schedule")
    checkpoint: CheckpointConfig = opt(CheckpointConfig, "checkpoints")
    study: StudyConfig = opt(StudyConfig, "what a sweep is about")
    encoders: EncodersConfig = opt(EncodersConfig, "encoders of the similarity metrics (group: encoders)")
    protocol: ProtocolConfig = opt(ProtocolConfig, "evaluation prompts and sampling (group: protocol)")
    concept: str | None = opt(None, "the concept's name; null = the image folder's name")
    seed: int = opt(0, "seeds data order, noise, timesteps and the sample grids", valid="[0, 4294967295]")
    resume: bool = opt(False, "continue the newest earlier run of this same command from its last.ckpt")
    ckpt_path: str | None = opt(None, "continue from this checkpoint instead")
    output_root: str = opt("outputs", "run directories are created below this folder")


@dataclass
class GenerateConfig:
    model: ModelConfig = opt(MISSING, "the backbone (group: model)")
    prompt: str = opt(
        MISSING,
        "the prompt: placeholder words (<my-cat>, weighted: (<my-cat>:1.3)) and <tag:name:multiplier> allowed",
    )
    negative_prompt: str = opt("", "negative prompt")
    concepts: list[str] = opt([], "concept files (embeddings, hypernetworks, LoRAs) or run directories")
    seed: int = opt(0, "first seed")
    num_images: int = opt(
        1, "images (columns) with seeds seed, seed+1, ... unless seeds is given", valid="[1, inf)"
    )
    seeds: list[int] | None = opt(None, "an explicit list of seeds (columns)", nonempty=True)
    multipliers: list[float] | None = opt(
        None,
        "one row per value: every <tag:name> of the prompt at that strength",
        valid="(-inf, inf)",
        nonempty=True,
    )
    steps: int = opt(25, "sampling steps", valid="[1, inf)")
    guidance_scale: float = opt(7.5, "classifier-free guidance", valid="[0, inf)")
    scheduler: str = opt("ddim", "ddim pndm euler euler_a dpm++ lms heun unipc ddpm")
    resolution: int | None = opt(None, "image size; null = the model's native size", valid="[8, inf)")
    init_image: str | None = opt(
        None, "an image to start from (image-to-image), resized and centre-cropped to the output size"
    )
    mask: str | None = opt(
        None,
        "with init_image: white marks the area to redraw, black is kept (blended latent diffusion on a "
        "text-to-image model; an inpainting model uses its own)",
    )
    strength: float | None = opt(
        None, "how far init_image is noised before denoising; null = 0.75, or 1.0 with a mask", valid="(0, 1]"
    )
    device: str = opt("auto", "auto (cuda when available) | cpu | cuda")
    output_root: str = opt("outputs", "output folders are created below this folder")


@dataclass
class EvaluateRunConfig:
    """evaluate.py: the similarity metrics of a run, a sweep, or concept files, under a protocol."""

    model: ModelConfig = opt(MISSING, "the backbone for concepts= (a run uses its own) (group: model)")
    data: DataConfig = opt(
        MISSING, "the real images and class for concepts= (a run uses its own) (group: data)"
    )
    encoders: EncodersConfig = opt(EncodersConfig, "encoders (group: encoders; a run's own unless given)")
    protocol: ProtocolConfig = opt(
        ProtocolConfig, "prompts and sampling (group: protocol; a run's own unless given)"
    )
    run: str | None = opt(None, "a run directory: writes <run>/eval/")
    sweep: str | None = opt(None, "a multirun directory: evaluates every run in it")
    concepts: list[str] = opt([], "concept files or folders from anywhere (with model= and data=)")
    concept: str = opt("final", "which of a run's concepts: final | best | step=N")
    device: str = opt("auto", "auto (cuda when available) | cpu | cuda")
    output_root: str = opt("outputs", "concepts= results go below this folder")


def key_help(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every key of a structured config, nested configs flattened."""
    rows = []
    for f in dataclasses.fields(schema):
        if f.name == "_target_":
            continue
        key = f"{prefix}{f.name}"
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            rows += key_help(factory, f"{key}.")
            continue
        default = factory() if factory else f.default
        shown = "???" if default is MISSING else repr(default)
        text = f.metadata.get("help", "")
        if f.metadata.get("valid"):
            text += f" [valid: {f.metadata['valid']}]"
        rows.append((key, shown, text))
    return rows
