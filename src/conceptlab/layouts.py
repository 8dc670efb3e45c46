"""Names in the original Stable Diffusion layout (CompVis / Stability AI: the UNet's `input_blocks` /
`middle_block` / `output_blocks`, the VAE's `encoder.down.<i>.block.<j>`, SDXL's second text encoder in
OpenCLIP's `transformer.resblocks.<i>`), from diffusers' and transformers' names for the same modules, and
an SD 1.x or SDXL checkpoint in that layout.

kohya's sd-scripts names an SDXL LoRA's UNet modules this way (`lora_unet_input_blocks_4_1_...`), and
the webui and ComfyUI look them up in the original checkpoint's own module names; SD 1.x/2.x LoRAs keep
diffusers' names (`lora_unet_down_blocks_0_...`), which both tools translate themselves. A whole model
for the webui's `models/Stable-diffusion/` is one file of original names (`original_checkpoint`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

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


def original_checkpoint(unet: nn.Module, vae: nn.Module, *text_encoders: nn.Module,
                        dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:  # fmt: skip
    """An SD 1.x model (one text encoder) or an SDXL model (two) as one state dict of original names, in
    `dtype`: what a webui or ComfyUI checkpoint file holds. The UNet under `model.diffusion_model.`, the VAE
    under `first_stage_model.`; SD 1.x's CLIP under `cond_stage_model.transformer.text_model.`, SDXL's
    under `conditioner.embedders.0.transformer.text_model.` and its OpenCLIP under
    `conditioner.embedders.1.model.` (SD 2.x's OpenCLIP drops a layer diffusers does not keep: not here)."""
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
    if len(text_encoders) not in (1, 2):
        raise BackboneError(
            f"a checkpoint has one text encoder (SD 1.x) or two (SDXL), not {len(text_encoders)}"
        )
    clip = (
        "conditioner.embedders.0.transformer." if len(text_encoders) == 2 else "cond_stage_model.transformer."
    )
    # The original names CLIP's parts under text_model. (transformers 5 saves them without it).
    for key, value in text_encoders[0].state_dict().items():
        if not key.endswith("position_ids"):
            out[f"{clip}text_model.{key.removeprefix('text_model.')}"] = value
    if len(text_encoders) == 2:
        out.update(
            {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_text(text_encoders[1]).items()}
        )
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


# A CLIP text layer's parts: transformers' names -> OpenCLIP's (the attention's q, k, v join in in_proj).
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip


def open_clip_text(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection's weights under OpenCLIP's names (SDXL's second encoder
    in the original checkpoint): `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.<i>.`
    (`attn.in_proj_weight` = q, k, v stacked), `ln_final.` and `text_projection` as OpenCLIP multiplies by it
    (transposed)."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    state.pop("embeddings.position_ids", None)
    for key, value in state.items():
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            layer, part, leaf = m.groups()
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if part.startswith("self_attn.q"):  # written once, from all three
                    qkv = [state[f"encoder.layers.{layer}.self_attn.{x}_proj.{leaf}"] for x in "qkv"]
                    out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = torch.cat(qkv)
                continue
            if part in OPEN_CLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{OPEN_CLIP_LAYER[part]}.{leaf}"] = value
                continue
        elif key.startswith("final_layer_norm."):
            out[key.replace("final_layer_norm.", "ln_final.")] = value
            continue
        raise BackboneError(f"text encoder weight {key!r} has no name in OpenCLIP's layout")
    return out


def _layers_per_block(config: Any) -> int:
    layers = config.layers_per_block
    if isinstance(layers, int):
        return layers
    if len(set(layers)) == 1:
        return int(layers[0])
    raise BackboneError(f"a UNet with different layers per block ({list(layers)}) has no original layout")
