"""The Method interface: the whole of a method behind one class, and the whole contract written here.

A method is one module in this package (or in a user's package, advertised under the
`conceptlab.methods` entry-point group) and one yaml in conf/method/. Its class declares:

* `Config`: its structured config, a `MethodConfig` extended with the method's own keys (each with
  its default and one-line help). `Config.name` is the method's name: the conf/method/ option, the
  label of runs and the W&B job type (the class's `name` is taken from it). Registered by
  `cli.register_configs`, so `--help` and typo checks cover every key.
* construction: `__init__(name, lr, scale_lr, concept, init_from, **its own keys)`, Hydra passing the
  Config's keys and train.py the concept's name; check every value there (a one-line ConfigError
  naming `method.<key>`), before any model loads. The learning rate is parsed once, here
  (`lr_schedule`).
* training: `attach` (install into the backbone, unfreezing whatever part it trains),
  `trainable_parameters` (and `parameter_groups` where parts train at rates of their own), `before_step`
  (a change by step), `prompt_text`, `changes_text_encoding`, `export` (its concept files),
  `enable_gradient_checkpointing` (`trainer.gradient_checkpointing`),
  `at_multiplier` / `inference` (sampling during training), `usage` (the generate prompt), `prior`
  (class images trained beside the concept's) and `joint_sets` (other image sets trained in the same
  run, each with its own words and class images: Custom Diffusion's multi-concept training).
* packed sweeps (optional): `packed_modules` (where it acts), `prepare_pack_lead`, and on the modules
  it installs there a static `packed_group` (`PackedGroup`: several jobs' modules computed together).
* inference: `prompt_tag` and `concept_from_file` (recognise and read its files) returning a
  `Concept`, which installs itself into a backbone and, for methods with a prompt tag
  (`<hypernet:name:0.7>`), takes a multiplier.

The LightningModule, generation, the file registry, the report and the sweeps use only this.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from omegaconf import MISSING
from torch import nn

from ..backbone import Backbone
from ..config import opt
from ..formats import TensorFile
from ..prompts import fill_prompt
from ..schedules import parse_lr_schedule


@dataclass
class MethodConfig:
    """The keys every method has. A method's Config extends it: `_target_` (its class), its own keys,
    and its defaults of these (`method_key`)."""

    _target_: str = MISSING
    name: str = opt(MISSING, "the method's name (run labels, W&B job type)")
    lr: Any = opt(1.0e-4, 'learning rate, or an AUTOMATIC1111 schedule "1e-5:1000, 5e-6:3000, 1e-6"')
    scale_lr: bool = opt(False, "lr x batch size x devices x nodes x grad accumulation")
    init_from: str | None = opt(None, "start from a concept file of this method")


def method_key(key: str, default: Any, help: str | None = None, of: type = MethodConfig) -> Any:  # noqa: A002
    """One of MethodConfig's keys (or of another method's Config, `of`: a method built from others)
    with this method's own default (and its own help, where it says more)."""
    shared = of.__dataclass_fields__[key]
    return opt(
        default, help or shared.metadata["help"], shared.metadata["valid"], shared.metadata["nonempty"]
    )


@dataclass(frozen=True)
class PriorSpec:
    """Prior preservation (DreamBooth): `count` images of `prompt` (the concept's class) drawn once by the
    frozen backbone, trained beside the concept's images, their loss weighted by `weight`."""

    prompt: str
    count: int
    weight: float
    steps: int
    guidance: float


@dataclass(frozen=True)
class JointSet:
    """Another concept trained in the same run (`Method.joint_sets`): the images of the data folder
    `path` (read with the run's data settings, none held out), captioned with `prompt_text` in the run's
    templates, and its own class images (`prior`, or None), pooled with the run's."""

    path: str
    prompt_text: str
    prior: PriorSpec | None


class PackedGroup(Protocol):
    """The optional hook of a module a method installs where `Method.packed_modules` points.

    `packed_group(modules, calls, memo)` (a static method of the module's type) computes several packed
    jobs' modules of that type at one place of the shared pass together (one batched product over their
    stacked weights, say): `calls` are each module's (args, kwargs), its own rows of the batch; `memo`
    lives for one pass. It returns each module's output, exactly what the module would return for its
    call alone, or None where these modules cannot be grouped (they then run one by one)."""

    @staticmethod
    def packed_group(modules: list[Any], calls: list[tuple[tuple, dict]], memo: dict) -> list[Any] | None: ...


class Method(nn.Module, ABC):
    """A trainable add-on to a frozen backbone."""

    name: ClassVar[str]  # the conf/method/ option and the label of runs: Config.name's default
    Config: ClassVar[type[MethodConfig]]  # its structured config (_target_ = this class)
    # `<tag:name:multiplier>` applies a concept of this method at inference; None = the concept is a
    # word of the prompt (textual inversion's placeholder).
    prompt_tag: ClassVar[str | None] = None
    file_formats: ClassVar[str] = ""  # the formats concept_from_file reads, for error messages

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config = cls.__dict__.get("Config")
        if config is not None and dataclasses.is_dataclass(config):
            cls.name = config.name  # the name is written once: the Config's default

    def __init__(
        self, name: str, lr: float | str, scale_lr: bool, concept: str, init_from: str | None = None
    ):
        super().__init__()
        self.name = name
        self.concept = concept  # the concept's name: it names the method's files
        self.lr = lr  # a rate, or an AUTOMATIC1111 schedule "1e-5:1000, 5e-6:3000, 1e-6"
        # (rate, until step) pairs: parsed once, here, so a malformed schedule fails before anything loads.
        self.lr_schedule = parse_lr_schedule(lr)
        self.scale_lr = scale_lr
        self.init_from = init_from  # a concept file of this method to start from

    # ------------------------------------------------------------------------------------ training

    @abstractmethod
    def attach(self, backbone: Backbone) -> None:
        """Install into the backbone (add tokens, wrap attention processors, add adapters) and
        unfreeze what this method trains; raise on a misfit."""

    @property
    @abstractmethod
    def prompt_text(self) -> str:
        """What stands for the concept in a caption or prompt ({} / [name] in templates)."""

    @abstractmethod
    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        """Write the learned concept files into `folder` (atomically); return their paths."""

    @property
    def prompt_words(self) -> str:
        """The words an evaluation prompt says for the concept, before the class word: textual inversion's
        placeholder; nothing for a method applied by its tag alone (`<lora:name:1>`)."""
        return "" if self.prompt_tag else self.prompt_text

    @property
    def changes_text_encoding(self) -> bool:
        """Whether training changes what the text encoder outputs (new words included); if not, contexts
        are cached once, and in a packed sweep the job shares the pack's tokenizer instead of a copy."""
        return True

    @property
    def has_multiplier(self) -> bool:
        """Whether the method is applied with a strength at inference (`<tag:name:m>`)."""
        return self.prompt_tag is not None

    @contextmanager
    def at_multiplier(self, multiplier: float) -> Iterator[None]:
        """Apply the method at this inference strength for the duration (a no-op without one)."""
        yield

    @contextmanager
    def inference(self, multiplier: float | None = None) -> Iterator[None]:
        """Sample with the method as generation would (eval mode: no dropout; at `multiplier`, or its own
        inference strength when None), then back as it was: what every sampling during training does."""
        was_training = self.training
        self.eval()
        try:
            if multiplier is None:
                yield
            else:
                with self.at_multiplier(multiplier):
                    yield
        finally:
            self.train(was_training)

    def enable_gradient_checkpointing(self, backbone: Backbone) -> None:
        """`trainer.gradient_checkpointing`: the UNet's blocks are recomputed in the backward (diffusers'
        own), and the text encoder's layers where the gradient passes through them (transformers' own). A
        method whose installed modules keep results across layers (a memo) turns that off here: a
        recomputed block must do exactly what it did the first time."""
        backbone.unet.enable_gradient_checkpointing()
        if self.changes_text_encoding:
            backbone.checkpoint_text_encoder()

    def packed_modules(self, backbone: Backbone) -> list[str] | None:
        """Where this method acts, for packed sweeps (`hydra/launcher=packed`): the paths in `backbone`
        ("unet.<module>", "text_encoder.<module>") of the modules it installed or changed, each taking
        batch-first tensors and treating samples independently. A pack of jobs shares one pass through
        every other layer and runs each job's own module on that job's samples here. None (the
        default): the method cannot share a pass, and its jobs run one by one. A path may also name an
        attribute of a plain object (a processor's `stack`); a module or callable there may return a
        tuple of batch-first tensors. Its type may define `packed_group` (`PackedGroup`)."""
        return None

    def prepare_pack_lead(self, backbone: Backbone) -> None:
        """Give a packed sweep's lead backbone (the one its shared pass runs on; nothing trains or samples
        there) whatever structure `packed_modules`' paths need, acting as the bare model: e.g. the
        hypernetwork's processors with an empty stack. Nothing by default."""

    def usage(self, prompt: str) -> str:
        """`prompt` ({} = the concept) as generation writes it with this method's concept file."""
        text = fill_prompt(prompt, self.prompt_text)
        return f"{text} <{self.prompt_tag}:{self.concept}:1>" if self.prompt_tag else text

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every tensor that trains: the method's own, and any backbone part it unfroze."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The trainable tensors in optimizer groups, each with its learning rate as a multiple of the
        method's (scale_lr and the schedule act on every group alike). One group by default; pivotal
        tuning gives the embedding a rate of its own."""
        return [(self.trainable_parameters(), 1.0)]

    @property
    def prior(self) -> PriorSpec | None:
        """Prior preservation: class images the frozen backbone draws, trained beside the concept's
        (DreamBooth's); None (the default) for none."""
        return None

    @property
    def joint_sets(self) -> list[JointSet]:
        """Other concepts trained in the same run, beside the run's own (`JointSet`); none by default.
        Evaluation, samples and the run's name follow the run's own concept."""
        return []

    def before_step(self, step: int) -> None:
        """Called before each training step with the global step; what it does must follow from the step
        alone (a resumed run calls it from the step it resumes at). Nothing by default; pivotal tuning
        stops training its embedding here."""

    # ----------------------------------------------------------------------------------- inference

    @classmethod
    @abstractmethod
    def concept_from_file(cls, file: TensorFile) -> Concept | None:
        """The concept in `file` if it is in one of this method's formats, else None."""


class Concept(ABC):
    """A learned concept read from a file, to be installed into a backbone for generation."""

    method: ClassVar[type[Method]]

    def __init__(self, name: str, path: Path):
        self.name = name  # what a prompt calls it: a placeholder word, or the name in <tag:name:m>
        self.path = Path(path)

    @property
    def tag(self) -> str | None:
        return self.method.prompt_tag

    @property
    def words(self) -> str:
        """The words a prompt says for this concept (a textual inversion's placeholder; none for a
        concept applied by its tag alone)."""
        return "" if self.tag else self.name

    @abstractmethod
    def install(self, backbone: Backbone) -> None:
        """Make the concept available to generation with this backbone; raise if it does not fit.

        A concept with a tag is installed inactive: `activate` switches it on with a multiplier."""

    def activate(self, multiplier: float) -> None:
        """Apply a tagged concept at this strength (multiplier 0 is exactly the bare model)."""
        if self.tag:
            raise NotImplementedError(f"{type(self).__name__} has a prompt tag but no activate()")

    def deactivate(self) -> None:
        """Stop applying a tagged concept."""
        if self.tag:
            raise NotImplementedError(f"{type(self).__name__} has a prompt tag but no deactivate()")

    def rewrite_prompt(self, text: str) -> str:
        """The prompt as the backbone must read it for this concept (a word bound to a new token)."""
        return text

    def describe(self) -> dict[str, Any]:
        return {"method": self.method.name, "name": self.name, "file": str(self.path)}
