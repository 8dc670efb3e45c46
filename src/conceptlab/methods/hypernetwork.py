"""Hypernetworks as NovelAI and AUTOMATIC1111 made them: for each enabled width, a pair of residual
MLPs that transform what feeds an attention layer's keys and values (`k = W_k(c + m * mlp_k(c))`,
same for v; queries untouched).

In every UNet attention layer, the pair whose width matches the key/value input acts on it: the
text-width pair on cross-attention's text context, the 320/640/1280 pairs on the hidden states that
self-attention reads. Several hypernetworks apply one after another, each with its own multiplier.
This is done by an attention processor that wraps the UNet's own (SDPA) processor; nothing is
patched. Module layout, initialisation and quirks follow AUTOMATIC1111's
modules/hypernetworks/hypernetwork.py, so files and numbers carry over both ways.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbone import Backbone
from ..config import opt
from ..errors import ConceptFileError, ConfigError
from ..formats import TensorFile, one_line, read_as, write_safetensors, write_torch_file
from .base import Concept, Method, MethodConfig, method_key


@dataclass
class HypernetworkConfig(MethodConfig):
    """A hypernetwork (NovelAI / AUTOMATIC1111): residual MLPs on the attention layers' key/value inputs."""

    _target_: str = "conceptlab.methods.hypernetwork.Hypernetwork"
    name: str = method_key("name", "hypernet")
    enable_sizes: list[int] | None = opt(
        None,
        "widths that get a (key, value) module pair; null = the widths the UNet's attention layers see (the text "
        "context's and the blocks' with attention)",
    )
    layer_structure: list[float] = opt(
        [1.0, 2.0, 1.0], "hidden widths as multiples of the width", valid="(0, inf)", nonempty=True
    )
    activation_func: str | None = opt(
        "linear", "linear relu leakyrelu elu swish(=Hardswish) tanh sigmoid, or any torch activation"
    )
    weight_initialization: str = opt(
        "Normal", "Normal XavierUniform XavierNormal KaimingUniform KaimingNormal"
    )
    add_layer_norm: bool = opt(False, "a LayerNorm after every linear layer")
    use_dropout: bool = opt(False, "dropout after hidden layers (A1111's 0.3 rule unless dropout_structure)")
    dropout_structure: list[float] | None = opt(
        None, "dropout per layer_structure entry, e.g. [0, 0.3, 0]", valid="[0, 1)"
    )
    activate_output: bool = opt(False, "the activation after the last layer too")
    last_layer_dropout: bool = opt(False, "dropout before the last layer as well")
    init_from: str | None = method_key(
        "init_from", None, "continue from a hypernetwork file (A1111 .pt or conceptlab .safetensors)"
    )
    lr: Any = method_key(
        "lr", 1.0e-5, 'learning rate (A1111\'s range), or a schedule "1e-5:1000, 5e-6:3000, 1e-6"'
    )


def _activations() -> dict[str, type[nn.Module]]:
    # A1111 accepts its seven names plus every torch activation class by its lower-cased name;
    # its "swish" is Hardswish.
    table = {
        name.lower(): cls
        for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
        if cls.__module__ == "torch.nn.modules.activation" and name != "MultiheadAttention"
    }
    table.update(
        linear=nn.Identity, relu=nn.ReLU, leakyrelu=nn.LeakyReLU, elu=nn.ELU, swish=nn.Hardswish,
        tanh=nn.Tanh, sigmoid=nn.Sigmoid,
    )  # fmt: skip
    return table


ACTIVATIONS = _activations()
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def default_dropout_structure(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """A1111's dropout per layer when a file or config gives none: 0.3 after hidden layers."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    return [0.0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0.0, 0.0]


class HypernetworkModule(nn.Module):
    """One residual MLP for one width: x + mlp(x) * multiplier (the multiplier is 1 while training)."""

    def __init__(self, dim: int, layer_structure: Sequence[float], activation_func: str | None,
                 weight_initialization: str, add_layer_norm: bool, activate_output: bool,
                 dropout_structure: Sequence[float]):  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            width = int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(int(dim * layer_structure[i]), width))
            if activation_func not in (None, "linear") and (i < last or activate_output):
                layers.append(ACTIVATIONS[activation_func]())
            if add_layer_norm:
                layers.append(nn.LayerNorm(width))
            if dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)
        self._initialize(weight_initialization, activation_func)

    @torch.no_grad()
    def _initialize(self, how: str, activation_func: str | None) -> None:
        nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, nn.Linear | nn.LayerNorm):
                continue
            if how == "Normal" or isinstance(layer, nn.LayerNorm):  # A1111 draws LayerNorm weights too
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            elif how == "XavierUniform":
                nn.init.xavier_uniform_(layer.weight)
            elif how == "XavierNormal":
                nn.init.xavier_normal_(layer.weight)
            elif how == "KaimingUniform":
                nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        return x + self.linear(x) * (1.0 if self.training else multiplier)


class HypernetworkLayers(nn.Module):
    """A (key, value) pair of HypernetworkModules per width, with AUTOMATIC1111's structure settings:
    exactly what a hypernetwork file holds, for training and for inference alike."""

    def __init__(
        self,
        concept: str,
        enable_sizes: Sequence[int] | None = None,
        layer_structure: Sequence[float] = (1, 2, 1),
        activation_func: str | None = "linear",
        weight_initialization: str = "Normal",
        add_layer_norm: bool = False,
        use_dropout: bool = False,
        dropout_structure: Sequence[float] | None = None,
        activate_output: bool = False,
        last_layer_dropout: bool = False,
    ):
        super().__init__()
        self.concept = concept
        self.layer_structure = [float(x) for x in layer_structure]  # A1111 stores floats
        if len(self.layer_structure) < 2 or self.layer_structure[0] != 1 or self.layer_structure[-1] != 1:
            raise ConfigError(
                f"layer_structure={list(layer_structure)} must start and end with 1, e.g. [1, 2, 1]"
            )
        if activation_func is not None and activation_func not in ACTIVATIONS:
            raise ConfigError(
                f"activation_func={activation_func!r} is not one of {', '.join(sorted(ACTIVATIONS))}"
            )
        if weight_initialization not in WEIGHT_INITS:
            raise ConfigError(
                f"weight_initialization={weight_initialization!r}: use one of {', '.join(WEIGHT_INITS)}"
            )
        if dropout_structure is None:
            dropout_structure = default_dropout_structure(
                self.layer_structure, use_dropout, last_layer_dropout
            )
        dropout_structure = [float(p) for p in dropout_structure]
        if (
            len(dropout_structure) != len(self.layer_structure)
            or dropout_structure[0]
            or dropout_structure[-1]
        ):
            raise ConfigError(
                f"dropout_structure={dropout_structure} needs one entry per layer_structure entry, 0 first and last"
            )
        if any(not 0 <= p < 1 for p in dropout_structure):
            raise ConfigError(f"dropout_structure={dropout_structure}: probabilities are in [0, 1)")
        self.activation_func = activation_func
        self.weight_initialization = weight_initialization
        self.add_layer_norm = add_layer_norm
        self.use_dropout = use_dropout or any(dropout_structure)
        self.dropout_structure = dropout_structure
        self.activate_output = activate_output
        self.last_layer_dropout = dropout_structure[-2] != 0
        self.layers = nn.ModuleDict()
        if enable_sizes:
            self.build(sorted({int(s) for s in enable_sizes}))

    def build(self, sizes: Sequence[int]) -> None:
        """Create the (key, value) module pair for each width."""
        for size in sizes:
            self.layers[str(size)] = nn.ModuleList([self._module(size), self._module(size)])

    def _module(self, size: int) -> HypernetworkModule:
        return HypernetworkModule(
            size, self.layer_structure, self.activation_func, self.weight_initialization,
            self.add_layer_norm, self.activate_output, self.dropout_structure,
        )  # fmt: skip

    @property
    def sizes(self) -> list[int]:
        return sorted(int(s) for s in self.layers)

    def pair(self, width: int) -> nn.ModuleList | None:
        return self.layers[str(width)] if str(width) in self.layers else None

    def load_pairs(self, pairs: dict[int, tuple[dict, dict]], source: str) -> None:
        for size, (k_state, v_state) in pairs.items():
            k_module, v_module = self.layers[str(size)]
            try:
                k_module.load_state_dict(k_state)
                v_module.load_state_dict(v_state)
            except RuntimeError as err:
                raise ConceptFileError(
                    f"{source}: the width-{size} modules do not match the structure it declares: {one_line(err)}"
                ) from err

    @classmethod
    def from_file(cls, source: HypernetworkFile, origin: str) -> HypernetworkLayers:
        """The layers a file describes, with its weights, frozen and in eval mode."""
        s = source.structure
        layers = cls(
            concept=source.name, enable_sizes=source.sizes, layer_structure=s["layer_structure"],
            activation_func=s["activation_func"], weight_initialization=s["weight_initialization"] or "Normal",
            add_layer_norm=s["is_layer_norm"], use_dropout=s["use_dropout"],
            dropout_structure=s["dropout_structure"], activate_output=s["activate_output"],
            last_layer_dropout=s["last_layer_dropout"],
        )  # fmt: skip
        layers.load_pairs(source.pairs, origin)
        return layers.eval().requires_grad_(False)


class Hypernetwork(Method):
    """Train a hypernetwork: its layers are the only trainable tensors."""

    Config = HypernetworkConfig
    prompt_tag = "hypernet"
    file_formats = "AUTOMATIC1111 hypernetwork (.pt), conceptlab hypernetwork (.safetensors)"

    def __init__(self, name: str, lr: float | str, scale_lr: bool, concept: str,
                 init_from: str | None = None, **structure: Any):  # fmt: skip
        super().__init__(name=name, lr=lr, scale_lr=scale_lr, concept=concept, init_from=init_from)
        self._source = read_hypernetwork(init_from) if init_from else None
        if self._source is not None:  # the file's structure, unless the config contradicts it
            structure = structure_from_file(self._source, structure, str(init_from))
        self.net = HypernetworkLayers(concept, **structure)

    @property
    def prompt_text(self) -> str:
        return self.concept  # AUTOMATIC1111 puts the hypernetwork's name where a template says [name]

    @property
    def changes_text_encoding(self) -> bool:
        return False

    @property
    def sizes(self) -> list[int]:
        return self.net.sizes

    def pair(self, width: int) -> nn.ModuleList | None:
        return self.net.pair(width)

    def attach(self, backbone: Backbone) -> None:
        if not self.net.layers:
            # A1111's default for SD: the text width and the UNet's block widths (768, 320, 640, 1280); the
            # widths its attention layers see, so SDXL's (2048, 640, 1280) leave out its attention-less 320.
            self.net.build(sorted(attention_widths(backbone)))
        if self._source is not None:
            source = self._source
            if source.sizes != self.sizes:
                raise ConfigError(
                    f"{self.init_from} has widths {source.sizes} but this hypernetwork has {self.sizes}; "
                    f"set method.enable_sizes={source.sizes}"
                )
            self.net.load_pairs(source.pairs, str(self.init_from))
        widths = attention_widths(backbone)
        unknown = [s for s in self.sizes if s not in widths]
        if unknown:
            raise ConfigError(
                f"hypernetwork widths {unknown} match no attention layer of this backbone "
                f"(its widths: {sorted(widths)}); fix method.enable_sizes"
            )
        self._stack = install_hypernetworks(backbone.unet)
        self._stack.entries = [(self.net, 1.0)]

    def enable_gradient_checkpointing(self, backbone: Backbone) -> None:
        """Each layer transforms the text context itself: a block recomputed in the backward would
        otherwise find the memo another block left and save other tensors than it did the first time."""
        self._stack.memoize = False
        super().enable_gradient_checkpointing(backbone)

    def packed_modules(self, backbone: Backbone) -> list[str]:
        """The stack of every attention layer whose key/value inputs a module pair of this hypernetwork
        transforms: in a packed sweep only the pairs run per job; the attention itself runs once."""
        return [
            f"unet.{name}.processor.stack"
            for name, module in backbone.unet.named_modules()
            if isinstance(getattr(module, "processor", None), HypernetworkProcessor)
            and module.processor.stack is self._stack
            and self.pair(module.to_k.in_features) is not None
        ]

    def prepare_pack_lead(self, backbone: Backbone) -> None:
        install_hypernetworks(backbone.unet)  # an empty stack: the bare model

    @contextmanager
    def at_multiplier(self, multiplier: float) -> Iterator[None]:
        entries = self._stack.entries
        self._stack.entries = [(h, multiplier if h is self.net else m) for h, m in entries]
        try:
            yield
        finally:
            self._stack.entries = entries

    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        return [
            write_a1111_hypernetwork(
                folder / f"{self.concept}.pt",
                self.net,
                step,
                backbone.checkpoint_hash,
                backbone.checkpoint_name,
            ),
            write_hypernetwork_safetensors(
                folder / f"{self.concept}.safetensors", self.net, step, backbone.checkpoint_name
            ),
        ]

    @classmethod
    def concept_from_file(cls, file: TensorFile) -> HypernetworkConcept | None:
        source = hypernetwork_file_from(file)
        if source is None:
            return None
        # A1111 calls a hypernetwork by its file name: <hypernet:file-name:0.7>.
        return HypernetworkConcept(
            file.path.stem, file.path, HypernetworkLayers.from_file(source, str(file.path))
        )


class HypernetworkConcept(Concept):
    """A hypernetwork read from a file; `<hypernet:name:m>` applies it (several stack in prompt order)."""

    method = Hypernetwork

    def __init__(self, name: str, path: Path, layers: HypernetworkLayers):
        super().__init__(name, path)
        self.layers = layers
        self.stack: HypernetworkStack | None = None

    def install(self, backbone: Backbone) -> None:
        widths = attention_widths(backbone)
        if any(size not in widths for size in self.layers.sizes):
            raise ConceptFileError(
                f"hypernetwork {self.name!r} has widths {self.layers.sizes}, but this model's attention "
                f"layers are {sorted(widths)} wide: it was trained for another model"
            )
        self.layers.to(backbone.unet.device)
        self.stack = install_hypernetworks(backbone.unet)

    def activate(self, multiplier: float) -> None:
        self.stack.entries.append((self.layers, multiplier))

    def deactivate(self) -> None:
        self.stack.entries = [(h, m) for h, m in self.stack.entries if h is not self.layers]


# Config key -> the key AUTOMATIC1111's files use for it.
FILE_KEYS = {"layer_structure": "layer_structure", "activation_func": "activation_func",
             "weight_initialization": "weight_initialization", "add_layer_norm": "is_layer_norm",
             "activate_output": "activate_output", "use_dropout": "use_dropout",
             "dropout_structure": "dropout_structure", "last_layer_dropout": "last_layer_dropout"}  # fmt: skip


def structure_from_file(source: HypernetworkFile, given: dict[str, Any], origin: str) -> dict[str, Any]:
    """The structure to continue a file with: the file's, where the config keeps its default; a config
    value that contradicts the file is an error naming both."""

    def same(key: str, a: Any, b: Any) -> bool:
        if key == "activation_func":
            return (a or "linear") == (b or "linear")
        if key in ("layer_structure", "dropout_structure") and a is not None and b is not None:
            return [float(x) for x in a] == [float(x) for x in b]
        return a == b

    defaults = HypernetworkConfig()
    structure = dict(given)
    for key, file_key in FILE_KEYS.items():
        in_file = source.structure.get(file_key)
        if in_file is None and key == "dropout_structure":
            continue
        value = given.get(key, getattr(defaults, key))
        if not same(key, value, getattr(defaults, key)) and not same(key, value, in_file):
            raise ConfigError(
                f"method.{key}={value} but {origin} was trained with {file_key}={in_file}; "
                f"continuing it keeps the file's structure: drop method.{key} (or set it to {in_file})"
            )
        structure[key] = in_file if key != "activation_func" else (in_file or "linear")
    structure["weight_initialization"] = structure.get("weight_initialization") or "Normal"
    if not given.get("enable_sizes"):
        structure["enable_sizes"] = source.sizes
    return structure


def hypernetwork_from_file(path: str | Path) -> HypernetworkLayers:
    """The layers of a hypernetwork file (AUTOMATIC1111 .pt or the safetensors twin), ready for inference."""
    return HypernetworkLayers.from_file(read_hypernetwork(path), str(path))


def attention_widths(backbone: Backbone) -> set[int]:
    """The widths of the key/value inputs of the UNet's attention layers."""
    widths = set()
    for module in backbone.unet.modules():
        if hasattr(module, "to_k") and hasattr(module, "processor"):
            widths.add(module.to_k.in_features)
    return widths


class HypernetworkStack:
    """The hypernetworks in effect, applied in order, each with its own multiplier."""

    def __init__(self):
        self.entries: list[tuple[HypernetworkLayers, float]] = []
        # Every cross-attention layer (and every denoising step) reads the same text-context tensor:
        # its transform is computed once and reused while that tensor and the stack are unchanged.
        self._memo: tuple | None = None
        self.memoize = True  # off under gradient checkpointing (Hypernetwork.enable_gradient_checkpointing)

    def __call__(self, context: torch.Tensor, shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value inputs for `context`; `shared` = a text context that other layers read too."""
        if not shared or not self.memoize:
            return self._apply(context)
        # Parameter versions change with every in-place optimizer update: a trained module never
        # reuses an output computed with its old weights.
        state = [(id(h), m, h.training, [p._version for p in h.parameters()]) for h, m in self.entries]
        if self._memo is not None and self._memo[0] is context and self._memo[1] == state:
            return self._memo[2]
        result = self._apply(context)
        self._memo = (context, state, result)
        return result

    def _apply(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_in = v_in = context
        for hypernetwork, multiplier in self.entries:
            pair = hypernetwork.pair(k_in.shape[-1])  # A1111 picks the modules by the key input's width
            if pair is None:
                continue
            dtype = next(pair.parameters()).dtype
            k_in = pair[0](k_in.to(dtype), multiplier).to(context.dtype)
            v_in = pair[1](v_in.to(dtype), multiplier).to(context.dtype)
        return k_in, v_in

    @staticmethod
    def packed_group(
        stacks: list[HypernetworkStack], calls: list[tuple[tuple, dict]], memo: dict
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Several jobs' stacks at one attention layer of a packed sweep's shared pass (conceptlab.packing),
        computed together: each layer of their key and value modules as one batched matrix product over
        the jobs' stacked weights, instead of a small MLP per job. `calls` are each stack's arguments (its
        rows of the context); `memo` lives for one pass (a text context read by every cross-attention
        layer is transformed once). None where they cannot be grouped: not one hypernetwork each, no
        pair for the width, pairs of different structure, dropout or layer norm, or rows of other shapes."""
        contexts = [args[0] for args, _ in calls]
        if len(calls) < 2 or any(len(args) != 1 or set(kwargs) - {"shared"} for args, kwargs in calls):
            return None
        first = contexts[0]
        if any(c.shape != first.shape or c.dtype != first.dtype for c in contexts):
            return None
        shared = all(kwargs.get("shared", False) for _, kwargs in calls)
        key = ("hypernetwork", tuple(map(id, stacks)), tuple(map(id, contexts))) if shared else None
        if key is not None and key in memo:
            return memo[key]
        # Whether (and which pairs) is the same at every layer of a width in a pass: checked once.
        alike = ("pairs", tuple(map(id, stacks)), first.shape[-1])
        if alike not in memo:
            memo[alike] = _groupable_pairs(stacks, first.shape[-1])
        pairs = memo[alike]
        if pairs is None:
            return None
        dtype = next(pairs[0][0].parameters()).dtype
        rows = torch.stack([c.to(dtype) for c in contexts]).reshape(len(contexts), -1, first.shape[-1])
        factors = [[1.0 if module.training else multiplier for module in pair] for pair, multiplier in pairs]
        outputs = [
            _grouped_module([pair[i] for pair, _ in pairs], rows, [f[i] for f in factors], memo)
            for i in (0, 1)
        ]
        found = [
            (k.reshape(first.shape).to(first.dtype), v.reshape(first.shape).to(first.dtype))
            for k, v in zip(*outputs)
        ]
        if key is not None:
            memo[key] = found
        return found


def _groupable_pairs(stacks: list[HypernetworkStack], width: int) -> list[tuple[nn.ModuleList, float]] | None:
    """Each stack's one (key, value) pair for `width` and its multiplier, when every stack holds exactly
    one hypernetwork with such a pair and all pairs are alike: the same layers (linear layers and
    activations without parameters; no dropout, no layer norm) of the same shapes, in the same mode."""
    found = []
    for stack in stacks:
        if len(stack.entries) != 1:
            return None
        hypernetwork, multiplier = stack.entries[0]
        pair = hypernetwork.pair(width)
        if pair is None:
            return None
        found.append((pair, multiplier))

    def signature(pair: nn.ModuleList) -> list:
        return [
            (
                module.training,
                [(type(layer), tuple(p.shape for p in layer.parameters())) for layer in module.linear],
            )
            for module in pair
        ]

    reference = signature(found[0][0])
    for module in found[0][0]:
        for layer in module.linear:
            if isinstance(layer, nn.Dropout) or (
                not isinstance(layer, nn.Linear) and any(True for _ in layer.parameters())
            ):
                return None
    if any(signature(pair) != reference for pair, _ in found[1:]):
        return None
    return found


def _grouped_module(
    modules: list[HypernetworkModule], rows: torch.Tensor, factors: list[float], memo: dict
) -> torch.Tensor:
    """x + mlp(x) * factor for each job's module on its rows (rows: jobs x positions x width), the linear
    layers as batched matrix products over the jobs' stacked weights: what each module computes alone.
    The stacked weights are made once per pass (`memo`): every layer of one width uses the same modules,
    so a pass holds one stacked copy of the grouped jobs' weights, kept for the backward."""
    hidden = rows
    for layers in zip(*(module.linear for module in modules)):
        if isinstance(layers[0], nn.Linear):
            key = ("stacked", tuple(map(id, layers)))
            if key not in memo:
                memo[key] = (
                    torch.stack([layer.weight for layer in layers]).transpose(1, 2),
                    torch.stack([layer.bias for layer in layers]).unsqueeze(1),
                )
            weight, bias = memo[key]
            hidden = torch.baddbmm(bias, hidden, weight)
        else:  # an activation without parameters: the same for every job
            hidden = layers[0](hidden)
    if all(f == 1.0 for f in factors):
        return rows + hidden
    return rows + hidden * torch.tensor(factors, dtype=rows.dtype, device=rows.device).view(-1, 1, 1)


class _KeyValueInputs:
    """Stands in for an Attention module: its to_k / to_v read the hypernetwork-transformed inputs."""

    def __init__(self, attn, k_in: torch.Tensor, v_in: torch.Tensor):
        self._attn, self._k_in, self._v_in = attn, k_in, v_in

    def to_k(self, _inputs: torch.Tensor) -> torch.Tensor:
        return self._attn.to_k(self._k_in)

    def to_v(self, _inputs: torch.Tensor) -> torch.Tensor:
        return self._attn.to_v(self._v_in)

    def __getattr__(self, name: str):
        return getattr(self._attn, name)


class HypernetworkProcessor:
    """Wraps the UNet's own attention processor; the key/value inputs go through the stack first."""

    def __init__(self, inner, stack: HypernetworkStack):
        self.inner, self.stack = inner, stack

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        k_in, v_in = self.stack(context, shared=encoder_hidden_states is not None)
        if k_in is not context or v_in is not context:
            attn = _KeyValueInputs(attn, k_in, v_in)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)


def install_hypernetworks(unet) -> HypernetworkStack:
    """Wrap every attention processor of the UNet (once) and return the stack they share."""
    processors = unet.attn_processors
    existing = {id(p.stack): p.stack for p in processors.values() if isinstance(p, HypernetworkProcessor)}
    if existing:
        return next(iter(existing.values()))
    stack = HypernetworkStack()
    unet.set_attn_processor({name: HypernetworkProcessor(p, stack) for name, p in processors.items()})
    return stack


# ------------------------------------------------------------------------------------------- files
# AUTOMATIC1111 (`.pt`, for its models/hypernetworks/ folder; modules/hypernetworks/hypernetwork.py):
# integer width keys holding a (key-module, value-module) pair of state dicts, plus the structure keys
# below, `step`, `name`, `sd_checkpoint`, `sd_checkpoint_name`, `optional_info`. Read with A1111's
# defaults for missing keys (a file without `activate_output` means True) and its legacy
# `linear1`/`linear2` key names. conceptlab's safetensors twin: tensors "<width>.k.<param>" /
# "<width>.v.<param>", the structure as JSON in the metadata (format=conceptlab-hypernetwork).

HYPERNETWORK_STRUCTURE_KEYS = (
    "layer_structure", "activation_func", "is_layer_norm", "weight_initialization", "activate_output",
    "use_dropout", "dropout_structure", "last_layer_dropout",
)  # fmt: skip
SAFETENSORS_FORMAT = "conceptlab-hypernetwork"
LEGACY_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
               "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}  # fmt: skip


@dataclass
class HypernetworkFile:
    """A hypernetwork read from disk: its name, structure and (key, value) state dicts per width."""

    name: str
    structure: dict[str, Any]
    pairs: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sizes(self) -> list[int]:
        return sorted(self.pairs)


def hypernetwork_structure(hypernetwork: HypernetworkLayers) -> dict[str, Any]:
    """The structure keys A1111 writes."""
    return {
        "layer_structure": list(hypernetwork.layer_structure),
        "activation_func": hypernetwork.activation_func,
        "is_layer_norm": hypernetwork.add_layer_norm,
        "weight_initialization": hypernetwork.weight_initialization,
        "activate_output": hypernetwork.activate_output,
        "use_dropout": hypernetwork.use_dropout,
        "dropout_structure": list(hypernetwork.dropout_structure),
        "last_layer_dropout": hypernetwork.last_layer_dropout,
    }


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in module.state_dict().items()}


def write_a1111_hypernetwork(path: str | Path, hypernetwork: HypernetworkLayers, step: int, sd_checkpoint: str | None,
                             sd_checkpoint_name: str | None) -> Path:  # fmt: skip
    """An AUTOMATIC1111 hypernetwork (.pt), written atomically."""
    data: dict[Any, Any] = {
        size: (_plain_state(hypernetwork.pair(size)[0]), _plain_state(hypernetwork.pair(size)[1]))
        for size in hypernetwork.sizes
    }
    data.update(
        step=int(step), name=hypernetwork.concept, sd_checkpoint=sd_checkpoint,
        sd_checkpoint_name=sd_checkpoint_name, optional_info=None, **hypernetwork_structure(hypernetwork),
    )  # fmt: skip
    return write_torch_file(path, data)


def write_hypernetwork_safetensors(
    path: str | Path, hypernetwork: HypernetworkLayers, step: int, sd_checkpoint_name: str | None
) -> Path:
    """The safetensors twin of a hypernetwork (structure in the metadata), written atomically."""
    tensors = {}
    for size in hypernetwork.sizes:
        for role, module in zip(("k", "v"), hypernetwork.pair(size)):
            tensors.update({f"{size}.{role}.{k}": v for k, v in module.state_dict().items()})
    metadata = {key: json.dumps(value) for key, value in hypernetwork_structure(hypernetwork).items()}
    metadata.update(format=SAFETENSORS_FORMAT, name=hypernetwork.concept, step=str(int(step)),
                    sd_checkpoint_name=json.dumps(sd_checkpoint_name))  # fmt: skip
    return write_safetensors(path, tensors, metadata)


def read_hypernetwork(path: str | Path) -> HypernetworkFile:
    """A hypernetwork in AUTOMATIC1111's format or conceptlab's safetensors twin."""
    return read_as(
        path, hypernetwork_file_from,
        f"a hypernetwork (an AUTOMATIC1111 .pt has integer width keys; a conceptlab .safetensors has "
        f"format={SAFETENSORS_FORMAT} in its metadata)",
    )  # fmt: skip


def hypernetwork_file_from(file: TensorFile) -> HypernetworkFile | None:
    """The hypernetwork a file holds, or None if it is not one."""
    if file.is_safetensors:
        return _from_safetensors(file) if file.metadata.get("format") == SAFETENSORS_FORMAT else None
    data, path = file.data, file.path
    if not isinstance(data, dict) or not any(isinstance(k, int) for k in data):
        return None
    pairs = {}
    for size, value in data.items():
        if isinstance(size, int):
            if not (
                isinstance(value, tuple | list)
                and len(value) == 2
                and all(isinstance(v, dict) for v in value)
            ):
                raise ConceptFileError(f"{path}: width {size} should hold a (key, value) pair of state dicts")
            pairs[size] = tuple({LEGACY_KEYS.get(k, k): t for k, t in part.items()} for part in value)
    # AUTOMATIC1111's defaults for keys older files lack.
    structure = {
        "layer_structure": data.get("layer_structure") or [1, 2, 1],
        "activation_func": data.get("activation_func"),
        "is_layer_norm": data.get("is_layer_norm", False),
        "weight_initialization": data.get("weight_initialization", "Normal"),
        "activate_output": data.get("activate_output", True),
        "use_dropout": data.get("use_dropout", False),
        "dropout_structure": data.get("dropout_structure"),
        "last_layer_dropout": data.get("last_layer_dropout", False),
    }
    extra = {k: data.get(k) for k in ("sd_checkpoint", "sd_checkpoint_name", "optional_info")}
    check_file_structure(path, structure)
    return HypernetworkFile(str(data.get("name") or path.stem), structure, pairs, data.get("step"), extra)


def check_file_structure(path: Path, structure: dict[str, Any]) -> None:
    """A file's layer_structure must build layers: positive multiples of the width, 1 first and last."""
    layers = structure.get("layer_structure")
    ok = isinstance(layers, list | tuple) and len(layers) >= 2
    ok = ok and all(isinstance(x, int | float) and math.isfinite(x) and x > 0 for x in layers)
    if not ok or float(layers[0]) != 1 or float(layers[-1]) != 1:
        raise ConceptFileError(
            f"{path}: its layer_structure {layers} cannot build a hypernetwork: give positive multiples of the "
            "width, starting and ending with 1 (AUTOMATIC1111 writes e.g. [1, 2, 1])"
        )


def _from_safetensors(file: TensorFile) -> HypernetworkFile:
    pairs: dict[int, tuple[dict, dict]] = {}
    for key, tensor in file.data.items():
        size, role, param = key.split(".", 2)
        pairs.setdefault(int(size), ({}, {}))[0 if role == "k" else 1][param] = tensor
    structure = {key: json.loads(file.metadata[key]) for key in HYPERNETWORK_STRUCTURE_KEYS}
    check_file_structure(file.path, structure)
    return HypernetworkFile(
        file.metadata.get("name", file.path.stem), structure, pairs, int(file.metadata.get("step", 0))
    )
