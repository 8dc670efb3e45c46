"""Structured configs: the schema every yaml in conf/ is checked against.

A key that is not declared here is an error at composition time (a typo in `method.num_vectorz=4`
fails before anything loads), and `python train.py --cfg job` prints every knob. The yaml files in
conf/ hold the defaults a user sees and sweeps; the dataclasses hold the types and the help text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    name: str = "tiny"  # label used in run names and in exported files' sd_checkpoint_name
    # A local diffusers Stable Diffusion folder or a hub id; null = the embedded tiny backbone.
    path: str | None = None
    revision: str | None = None  # hub revision (ignored for local folders)
    variant: str | None = None  # weight variant to load, e.g. fp16
    # dtype of the frozen parts: auto = float16 on CUDA (bfloat16 with bf16 precision), float32 on CPU.
    dtype: str = "auto"
    # epsilon | v_prediction | null (= what the folder's scheduler config says)
    prediction_type: str | None = None
    # Width of the text context the folder must have (768 for SD 1.x, 1024 for SD 2.x); null = any.
    context_dim: int | None = None
    # Where the embedded tiny backbone is built once and cached (env CONCEPTLAB_CACHE overrides).
    cache_dir: str = "~/.cache/conceptlab"
    tiny_seed: int = 0  # seed of the tiny backbone's random weights
    # A toy-world checkpoint (a pipeline folder plus judge/ and toyworld.json; path bundled:toyworld =
    # the one shipped with conceptlab): its parts and version are checked, and the judge scores samples.
    toyworld: bool = False


@dataclass
class TextualInversionConfig:
    _target_: str = "conceptlab.methods.textual_inversion.TextualInversion"
    name: str = "ti"
    # Placeholder word; null = "<concept>". Extra vectors are named "<concept>_1", "<concept>_2", ...
    placeholder: str | None = None
    num_vectors: int = 1  # vectors per placeholder (1..N)
    initializer_token: str = "object"  # one existing token whose embedding starts every vector
    init_from: str | None = None  # start from an existing embedding file (diffusers or AUTOMATIC1111)
    lr: Any = 5.0e-4  # base learning rate, or an AUTOMATIC1111 schedule "5e-3:100, 1e-3:1000, 5e-4"
    scale_lr: bool = True  # lr x batch size x devices x nodes x grad accumulation (the TI paper's rule)


@dataclass
class HypernetworkConfig:
    _target_: str = "conceptlab.methods.hypernetwork.Hypernetwork"
    name: str = "hypernet"
    # Widths that get a (key, value) module pair; null = AUTOMATIC1111's default for the backbone:
    # the text width and the UNet's block widths (768, 320, 640, 1280 for SD 1.x).
    enable_sizes: list[int] | None = None
    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])  # multiples of the width
    activation_func: str | None = "linear"  # linear relu leakyrelu elu swish(=Hardswish) tanh sigmoid ...
    weight_initialization: str = "Normal"  # Normal XavierUniform XavierNormal KaimingUniform KaimingNormal
    add_layer_norm: bool = False
    use_dropout: bool = False
    dropout_structure: list[float] | None = None  # per layer_structure entry; null = A1111's 0.3 rule
    activate_output: bool = False  # activation after the last layer too
    last_layer_dropout: bool = False
    init_from: str | None = None  # continue from a hypernetwork file (A1111 .pt or conceptlab .safetensors)
    lr: Any = 1.0e-5  # A1111's range; or a schedule "1e-5:1000, 5e-6:3000, 1e-6"
    scale_lr: bool = False


@dataclass
class DataConfig:
    # Folder of concept images; "bundled:NAME" = an example set shipped with conceptlab.
    path: str = MISSING
    # object | style | filewords (caption .txt beside each image) | bare ("{}") | a template file
    templates: str = "object"
    num_images: int | None = None  # use a seeded subset of this many images; null = all
    subset_seed: int = 0  # the subset is nested: the first k of one fixed shuffle
    resolution: int | None = None  # training size in pixels; null = the backbone's native size
    center_crop: bool = True  # crop the central square (else squash the whole image to a square)
    flip_p: float = 0.5  # probability of a horizontal flip (both flips' latents are cached)
    repeats: int = 100  # an epoch shows every image this many times
    batch_size: int = 4
    num_workers: int = 0  # latents are cached in memory, so workers rarely help
    # Prompts for the sample grids; {} is replaced by the concept's placeholder text.
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of {}"])
    # The existing word textual inversion starts the concept's vectors from (method.initializer_token).
    initializer_token: str = "object"
    judge: JudgeSetConfig = field(default_factory=lambda: JudgeSetConfig())


@dataclass
class JudgeSetConfig:
    """What the toy world's judge checks in samples of this concept (unused without a judge)."""

    # The attributes every sample of the concept should show, e.g. {colour: purple, style: striped}.
    truth: dict[str, str] = field(default_factory=dict)
    # Fixed evaluation prompts ({} = the concept); any attribute a prompt names is checked as well.
    prompts: list[str] = field(default_factory=lambda: ["a photo of a {}"])


@dataclass
class OptimConfig:
    weight_decay: float = 1.0e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    # diffusers.optimization.get_scheduler name: constant | constant_with_warmup | linear | cosine | ...
    scheduler: str = "constant"
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    """Keyword arguments of lightning's Trainer (only these are accepted)."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Any = "32-true"
    max_steps: int = 200
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    enable_model_summary: bool = False
    deterministic: bool = False
    # conceptlab shards the data itself (so a resumed run sees the same batches)
    use_distributed_sampler: bool = False


@dataclass
class LoggerConfig:
    wandb: bool = False  # also log to Weights & Biases (metrics.csv is always written)
    project: str = "conceptlab"
    entity: str | None = None
    # auto = online when W&B credentials exist, otherwise offline; online | offline | disabled
    mode: str = "auto"
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # run name; null = "<method>-<concept>-seed<seed>"
    init_timeout: float = 30.0  # seconds to wait for the W&B server before going offline


@dataclass
class SamplesConfig:
    every_n_steps: int = 100  # sample grid every N steps (and at step 0 and the end); 0 = never
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    negative_prompt: str = ""


@dataclass
class EvaluateConfig:
    """Judge-based evaluation during training and at the end (model=toy: a backbone with a judge)."""

    enabled: bool = True  # score samples whenever the backbone has a judge
    every_n_steps: int = 100  # also at step 0 and at the end; 0 = only at the end
    num_samples: int = 16  # samples per prompt, seeds 0..n-1 (the same every time)
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    # Hypernetworks are scored at each multiplier: judge/* at 1.0, judge_m<m>/* at the others.
    multipliers: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.0])


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100  # write checkpoints/last.ckpt every N steps (and at the end)


@dataclass
class StudyConfig:
    """Set by experiments/ files: what a sweep is about."""

    name: str | None = None  # the experiment's name (W&B group: name + sweep id)
    question: str = ""  # what the study answers, in one sentence
    metric: str = "train/loss"  # the metric the study is about (reports and dashboards lead with it)


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    method: Any = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    concept: str | None = None  # the concept's name; null = the image folder's name
    seed: int = 0
    resume: bool = False  # continue the newest earlier run of the same command from its last.ckpt
    ckpt_path: str | None = None  # continue from this checkpoint instead
    output_root: str = "outputs"  # run directories are created below this folder


@dataclass
class GenerateConfig:
    model: ModelConfig = MISSING
    prompt: str = MISSING  # placeholders (<my-cat>) and <hypernet:name:multiplier> tags allowed
    negative_prompt: str = ""
    # Concept files (.safetensors / .pt / .bin: embeddings or hypernetworks) or run directories.
    concepts: list[str] = field(default_factory=list)
    seed: int = 0
    num_images: int = 1  # images (columns) with seeds seed, seed+1, ... unless `seeds` is given
    seeds: list[int] | None = None
    multipliers: list[float] | None = None  # one row per value: every <hypernet:...> at that strength
    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"  # ddim pndm euler euler_a dpm++ lms heun unipc ddpm
    resolution: int | None = None  # null = the model's native size
    device: str = "auto"  # auto = cuda when available
    output_root: str = "outputs"


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (call before composing)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    cs.store(group="schema/method", name="ti", node=TextualInversionConfig)
    cs.store(group="schema/method", name="hypernet", node=HypernetworkConfig)
    cs.store(group="schema/data", name="data", node=DataConfig)
    cs.store(group="schema/trainer", name="trainer", node=TrainerConfig)
    cs.store(group="schema/logger", name="logger", node=LoggerConfig)
