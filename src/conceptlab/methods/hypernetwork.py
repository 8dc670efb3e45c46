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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..backbone import Backbone
from ..errors import ConceptFileError, ConfigError
from .base import Method


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


class Hypernetwork(Method):
    """A (key, value) pair of HypernetworkModules per enabled width."""

    def __init__(
        self,
        name: str,
        lr: float | str,
        scale_lr: bool,
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
        init_from: str | None = None,
    ):
        super().__init__(name=name, lr=lr, scale_lr=scale_lr)
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
        self.init_from = init_from
        self.enable_sizes = sorted({int(s) for s in enable_sizes}) if enable_sizes else None
        self.layers = nn.ModuleDict()
        if self.enable_sizes:
            self.build(self.enable_sizes)

    @property
    def prompt_text(self) -> str:
        return self.concept  # AUTOMATIC1111 puts the hypernetwork's name where a template says [name]

    @property
    def changes_text_encoding(self) -> bool:
        return False

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

    def attach(self, backbone: Backbone) -> None:
        if not self.layers:
            # A1111's default for SD: the text width and the UNet's block widths (768, 320, 640, 1280).
            self.build(sorted({backbone.context_dim, *backbone.unet.config.block_out_channels}))
        if self.init_from:
            from ..formats import read_hypernetwork

            source = read_hypernetwork(self.init_from)
            if source.sizes != self.sizes:
                raise ConfigError(
                    f"{self.init_from} has widths {source.sizes} but this hypernetwork has {self.sizes}; "
                    f"set method.enable_sizes={source.sizes}"
                )
            self.load_pairs(source.pairs, str(self.init_from))
        widths = attention_widths(backbone)
        unknown = [s for s in self.sizes if s not in widths]
        if unknown:
            raise ConfigError(
                f"hypernetwork widths {unknown} match no attention layer of this backbone "
                f"(its widths: {sorted(widths)}); fix method.enable_sizes"
            )
        self._stack = install_hypernetworks(backbone.unet)
        self._stack.entries = [(self, 1.0)]

    @property
    def has_multiplier(self) -> bool:
        return True

    @contextmanager
    def at_multiplier(self, multiplier: float) -> Iterator[None]:
        entries = self._stack.entries
        self._stack.entries = [(h, multiplier if h is self else m) for h, m in entries]
        try:
            yield
        finally:
            self._stack.entries = entries

    def load_pairs(self, pairs: dict[int, tuple[dict, dict]], source: str) -> None:
        for size, (k_state, v_state) in pairs.items():
            k_module, v_module = self.layers[str(size)]
            try:
                k_module.load_state_dict(k_state)
                v_module.load_state_dict(v_state)
            except RuntimeError as err:
                raise ConceptFileError(
                    f"{source}: the width-{size} modules do not match the structure it declares: {err}"
                ) from err

    def export(self, folder: Path, step: int, backbone: Backbone) -> list[Path]:
        from ..formats import write_a1111_hypernetwork, write_hypernetwork_safetensors

        return [
            write_a1111_hypernetwork(folder / f"{self.concept}.pt", self, step, None, backbone.name),
            write_hypernetwork_safetensors(folder / f"{self.concept}.safetensors", self, step, backbone.name),
        ]


def hypernetwork_from_file(path: str | Path) -> Hypernetwork:
    """A Hypernetwork with the structure and weights of a file (AUTOMATIC1111 .pt or the safetensors twin)."""
    from ..formats import read_hypernetwork

    return hypernetwork_from_source(read_hypernetwork(path), str(path))


def hypernetwork_from_source(source, origin: str) -> Hypernetwork:
    """A Hypernetwork built from a formats.HypernetworkFile already read from `origin`."""
    s = source.structure
    hypernetwork = Hypernetwork(
        name="hypernet", lr=1e-5, scale_lr=False, concept=source.name, enable_sizes=source.sizes,
        layer_structure=s["layer_structure"], activation_func=s["activation_func"],
        weight_initialization=s["weight_initialization"] or "Normal", add_layer_norm=s["is_layer_norm"],
        use_dropout=s["use_dropout"], dropout_structure=s["dropout_structure"],
        activate_output=s["activate_output"], last_layer_dropout=s["last_layer_dropout"],
    )  # fmt: skip
    hypernetwork.load_pairs(source.pairs, origin)
    return hypernetwork.eval().requires_grad_(False)


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
        self.entries: list[tuple[Hypernetwork, float]] = []
        # Every cross-attention layer (and every denoising step) reads the same text-context tensor:
        # its transform is computed once and reused while that tensor and the stack are unchanged.
        self._memo: tuple | None = None

    def __call__(self, context: torch.Tensor, shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value inputs for `context`; `shared` = a text context that other layers read too."""
        if not shared:
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
