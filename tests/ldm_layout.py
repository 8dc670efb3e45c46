"""Write a diffusers SD 1.x folder as one original-layout (CompVis/LDM) checkpoint file, the kind webui
users have: the test's stand-in for v1-5-pruned-emaonly.safetensors, made from the tiny backbone.

Written from the original layout's key names; diffusers' own converters read it back in the tests.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    step = layers_per_block + 1
    out = {}
    for key, value in state.items():
        part, _, leaf = key.rpartition(".")
        new = None
        fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                 "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
        if part in fixed:
            new = fixed[part]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", part):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = f"input_blocks.{1 + i * step + j}"
            new = f"{block}.0.{RESNET[rest]}" if kind == "resnets" else f"{block}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", part):
            new = f"input_blocks.{(int(m[1]) + 1) * step}.0.op"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", part):
            new = f"middle_block.{2 * int(m[1])}.{RESNET[m[2]]}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", part):
            new = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", part):
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = f"output_blocks.{i * step + j}"
            new = f"{block}.0.{RESNET[rest]}" if kind == "resnets" else f"{block}.1.{rest}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", part):
            i = int(m[1])
            has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
            new = f"output_blocks.{i * step + layers_per_block}.{2 if has_attention else 1}.conv"
        if new is None:
            raise KeyError(f"no original-layout name for UNet key {key}")
        out[f"model.diffusion_model.{new}.{leaf}"] = value
    return out


def vae_to_ldm(state: dict, num_blocks: int) -> dict:
    out = {}
    for key, value in state.items():
        part, _, leaf = key.rpartition(".")
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out$", r"\1.norm_out", part)
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", part):
            side, way, i, j, rest = m[1], m[2], int(m[3]), m[4], m[5]
            i = i if way == "down" else num_blocks - 1 - i  # the original counts decoder levels upwards
            new = f"{side}.{way}.{i}.block.{j}.{'nin_shortcut' if rest == 'conv_shortcut' else rest}"
        elif m := re.fullmatch(
            r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv", part
        ):
            i = int(m[3]) if m[2] == "down" else num_blocks - 1 - int(m[3])
            new = f"{m[1]}.{m[2]}.{i}.{m[4]}sample.conv"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", part):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{'nin_shortcut' if m[3] == 'conv_shortcut' else m[3]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", part):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}"
            if value.ndim == 2:  # the original's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[f"first_stage_model.{new}.{leaf}"] = value
    return out


def write_single_file(folder: Path, target: Path) -> Path:
    """The SD 1.x folder's UNet, VAE and text encoder in one original-layout file (.safetensors/.ckpt)."""
    folder = Path(folder)
    unet_config = json.loads((folder / "unet/config.json").read_text())
    vae_config = json.loads((folder / "vae/config.json").read_text())
    state = unet_to_ldm(load_file(folder / "unet/diffusion_pytorch_model.safetensors"),
                        unet_config["layers_per_block"])  # fmt: skip
    state |= vae_to_ldm(load_file(folder / "vae/diffusion_pytorch_model.safetensors"),
                        len(vae_config["block_out_channels"]))  # fmt: skip
    text = load_file(folder / "text_encoder/model.safetensors")
    # The original layout names CLIP's parts under text_model. (transformers 5 saves them without it).
    state |= {
        f"cond_stage_model.transformer.text_model.{k.removeprefix('text_model.')}": v for k, v in text.items()
    }
    state = {k: v.contiguous() for k, v in state.items()}
    if target.suffix == ".safetensors":
        save_file(state, target)
    else:  # a .ckpt as the original training code saved it: the weights under "state_dict"
        torch.save({"state_dict": state, "global_step": 0}, target)
    return target
