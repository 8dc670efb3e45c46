"""Names in the original Stable Diffusion layout (CompVis / Stability AI: the UNet's `input_blocks` /
`middle_block` / `output_blocks`, the VAE's `encoder.down.<i>.block.<j>`), from diffusers' names for the
same modules, and an SD 1.x checkpoint in that layout.

kohya's sd-scripts names an SDXL LoRA's UNet modules this way (`lora_unet_input_blocks_4_1_...`), and
the webui and ComfyUI look them up in the original checkpoint's own module names; SD 1.x/2.x LoRAs keep
diffusers' names (`lora_unet_down_blocks_0_...`), which both tools translate themselves. A whole model
for the webui's `models/Stable-diffusion/` is one file of original names (`original_sd1_checkpoint`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .errors import BackboneError

# A ResBlock's layers: diffusers' name -> the original's.
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# The UNet's own layers outside the blocks.
OUTER = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def original_unet_name(name: str, config: Any) -> str:
    """The original layout's name of the UNet module diffusers calls `name` (a UNet2DConditionModel's
    `config`: its layers per block and which up blocks have attention decide the block numbers)."""
    for ours, theirs in OUTER.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours) :]
    per_level = _layers_per_block(config) + 1  # a level's blocks: its layers, then its down/upsampler
    parts = name.split(".")
    try:
        if parts[0] == "down_blocks":
            level, kind, k, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv: input_blocks.n.0.op
                return ".".join([f"input_blocks.{(level + 1) * per_level}.0.op", *rest[1:]])
            return _in_block(f"input_blocks.{1 + level * per_level + k}", kind, rest)
        if parts[0] == "mid_block":
            kind, k, rest = parts[1], int(parts[2]), parts[3:]
            index = 1 if kind == "attentions" else 2 * k
            return _in_block(f"middle_block.{index}", kind, rest, numbered=False)
        if parts[0] == "up_blocks":
            level, kind, k, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "upsamplers":  # after the block's ResBlock (and its attention, where it has one)
                attention = "Attn" in config.up_block_types[level]
                return ".".join(
                    [f"output_blocks.{level * per_level + per_level - 1}.{2 if attention else 1}", *rest]
                )
            return _in_block(f"output_blocks.{level * per_level + k}", kind, rest)
    except (IndexError, ValueError):
        pass
    raise BackboneError(f"UNet module {name!r} has no name in the original layout")


def _in_block(block: str, kind: str, rest: list[str], numbered: bool = True) -> str:
    if kind == "attentions":  # a transformer keeps its inner names (transformer_blocks.0.attn1.to_q, ...)
        return ".".join([block + (".1" if numbered else ""), *rest])
    if kind == "resnets" and rest and rest[0] in RESNET:
        return ".".join([block + (".0" if numbered else ""), RESNET[rest[0]], *rest[1:]])
    raise BackboneError(f"UNet module {block}.{kind}.{'.'.join(rest)} has no name in the original layout")


# The VAE's middle attention: diffusers' names -> the original's (1x1 convolutions there).
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def original_vae_name(name: str, levels: int) -> str:
    """The original layout's name of the VAE module diffusers calls `name` (`levels`: the VAE's number of
    blocks; the original counts the decoder's levels upwards)."""
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        side, way, i, j, rest = m[1], m[2], int(m[3]), m[4], m[5]
        i = i if way == "down" else levels - 1 - i
        return f"{side}.{way}.{i}.block.{j}.{'nin_shortcut' if rest == 'conv_shortcut' else rest}"
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv", name):
        i = int(m[3]) if m[2] == "down" else levels - 1 - int(m[3])
        return f"{m[1]}.{m[2]}.{i}.{m[4]}sample.conv"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{'nin_shortcut' if m[3] == 'conv_shortcut' else m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}"
    return re.sub(r"^(encoder|decoder)\.conv_norm_out$", r"\1.norm_out", name)


def original_sd1_checkpoint(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                            dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:  # fmt: skip
    """An SD 1.x model as one state dict of original names (`model.diffusion_model.`, `first_stage_model.`,
    `cond_stage_model.transformer.text_model.`), in `dtype`: what a webui checkpoint file holds."""
    out = {}
    for prefix, module, rename in (
        ("model.diffusion_model.", unet, lambda name: original_unet_name(name, unet.config)),
        ("first_stage_model.", vae, lambda name: original_vae_name(name, len(vae.config.block_out_channels))),
    ):
        for key, value in module.state_dict().items():
            name, _, leaf = key.rpartition(".")
            if prefix == "first_stage_model." and ".mid_block.attentions." in name and value.ndim == 2:
                value = value[:, :, None, None]  # the original's attention projections are 1x1 convolutions
            out[f"{prefix}{rename(name)}.{leaf}"] = value
    # The original names CLIP's parts under text_model. (transformers 5 saves them without it).
    for key, value in text_encoder.state_dict().items():
        out[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = value
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


def _layers_per_block(config: Any) -> int:
    layers = config.layers_per_block
    if isinstance(layers, int):
        return layers
    if len(set(layers)) == 1:
        return int(layers[0])
    raise BackboneError(f"a UNet with different layers per block ({list(layers)}) has no original layout")
