"""The LoRA family's files in the layout of kohya / LyCORIS, which the webui's built-in LoRA extension and
ComfyUI read: per module `<lora_unet_...>.` + `lora_down.weight`/`lora_up.weight` (LoRA), `hada_w1_a`,
`hada_w1_b`, `hada_w2_a`, `hada_w2_b` (LoHa), `lokr_w1` or `lokr_w1_a`/`lokr_w1_b` and `lokr_w2` or
`lokr_w2_a`/`lokr_w2_b` (LoKr), each with `alpha`, and `dora_scale` beside a LoRA's (DoRA).

peft trains them (its LoHa, LoKr and DoRA keep the same tensors under the same names); this module maps a
peft layer's tensors to the file's and back, and computes a module's weight change from a file as those
readers do, for files diffusers cannot load (LoHa, LoKr) and for DoRA at any multiplier:

* scale: alpha / rank, rank = the second factor's rows (`*_b`); a LoKr with no rank-decomposed factor has
  no rank, so its scale is 1 and the file carries it in `lokr_w1` instead;
* LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) × scale; LoKr: ΔW = kron(w1, w2) × scale, reshaped to W's shape;
* DoRA: W' = (W + ΔW) × dora_scale / ‖W + ΔW‖ (the norm of each output row when `dora_scale` is [out, 1]),
  the change W' − W; a multiplier m applies m × (W' − W), so `<lora:name:0>` is the bare model.
"""

from __future__ import annotations

import torch
from torch import nn

VARIANTS = ("lora", "loha", "lokr", "dora")
NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}
# A file's tensors that say which variant it is (LoRA: none of these).
MARKERS = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".dora_scale"}


def file_variant(keys) -> str:
    """lora | loha | lokr | dora: what a kohya-layout file holds, by its tensors' names."""
    keys = list(keys)
    for variant, marker in MARKERS.items():
        if any(marker in key for key in keys):
            return variant
    return "lora"


def layer_tensors(layer: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """A peft layer's trained tensors of `adapter` under the file's names (views, not copies): LoRA's
    lora_down/lora_up (+ dora_scale as [out, 1]), LoHa's hada_*, LoKr's lokr_*."""
    from peft.tuners.lora import LoraLayer

    if isinstance(layer, LoraLayer):
        out = {
            "lora_down.weight": layer.lora_A[adapter].weight,
            "lora_up.weight": layer.lora_B[adapter].weight,
        }
        if adapter in layer.lora_magnitude_vector:
            out["dora_scale"] = layer.lora_magnitude_vector[adapter].weight.unsqueeze(1)
        return out
    return {
        name: getattr(layer, name)[adapter]
        for name in layer.adapter_layer_names
        if adapter in getattr(layer, name)
    }


def has_rank(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether a module's tensors have a rank-decomposed factor (a LoKr may have none)."""
    return any(name in tensors for name in ("lora_up.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"))


def file_rank(tensors: dict[str, torch.Tensor]) -> int | None:
    """A module's rank as the readers take it: the rows of its rank-decomposed factor (None: it has none)."""
    names = ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b")
    return next((tensors[k].shape[0] for k in names if k in tensors), None)


def file_scale(tensors: dict[str, torch.Tensor]) -> float:
    """alpha / rank as the readers take it (1 without alpha, or without a rank-decomposed factor)."""
    rank = file_rank(tensors)
    if "alpha" not in tensors or rank is None:
        return 1.0
    return float(tensors["alpha"]) / rank


def weight_change(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """A module's change of weight (W's shape, float32) from its file tensors, at multiplier 1."""
    t = {k: v.float() for k, v in tensors.items()}
    if "hada_w1_a" in t:
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    elif "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    else:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        delta = up.flatten(1) @ down.flatten(1)
    delta = delta.reshape(weight.shape) * file_scale(tensors)
    if "dora_scale" in t:
        merged = weight.float() + delta
        rows = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
        delta = (
            merged * (t["dora_scale"].reshape(rows.shape) / (rows + torch.finfo(rows.dtype).eps))
            - weight.float()
        )
    return delta


class WeightChange:
    """A file's changes applied to a backbone's modules as forward hooks, output + m × f(input, ΔW) (f:
    the module's own linear or convolution), removed at multiplier 0: exactly the bare model there."""

    def __init__(self, modules: dict[str, tuple[nn.Module, torch.Tensor]]):
        self.modules = modules  # name -> (module, ΔW)
        self.hooks: list = []

    def apply(self, multiplier: float) -> None:
        self.remove()
        if multiplier == 0:
            return
        for module, delta in self.modules.values():
            self.hooks.append(module.register_forward_hook(self._hook(delta, multiplier)))

    @staticmethod
    def _hook(delta: torch.Tensor, multiplier: float):
        def add(module: nn.Module, args, output):
            change = (delta * multiplier).to(output.device, output.dtype)
            if isinstance(module, nn.Conv2d):
                extra = nn.functional.conv2d(
                    args[0], change, None, module.stride, module.padding, module.dilation, module.groups
                )
            else:
                extra = nn.functional.linear(args[0], change)
            return output + extra

        return add

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
