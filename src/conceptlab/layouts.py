"""Module names in the original Stable Diffusion layout (Stability AI's `input_blocks` / `middle_block` /
`output_blocks`), from diffusers' names for the same UNet.

kohya's sd-scripts names an SDXL LoRA's UNet modules this way (`lora_unet_input_blocks_4_1_...`), and
the webui and ComfyUI look them up in the original checkpoint's own module names; SD 1.x/2.x LoRAs keep
diffusers' names (`lora_unet_down_blocks_0_...`), which both tools translate themselves.
"""

from __future__ import annotations

from typing import Any

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


def _layers_per_block(config: Any) -> int:
    layers = config.layers_per_block
    if isinstance(layers, int):
        return layers
    if len(set(layers)) == 1:
        return int(layers[0])
    raise BackboneError(f"a UNet with different layers per block ({list(layers)}) has no original layout")
