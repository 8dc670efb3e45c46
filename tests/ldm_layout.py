"""Write a diffusers SD 1.x or SDXL folder as one original-layout (CompVis/LDM, Stability AI's sgm)
checkpoint file, the kind webui and ComfyUI users have: the test's stand-in for
v1-5-pruned-emaonly.safetensors or sd_xl_base_1.0.safetensors, made from a tiny backbone.

Written with conceptlab's original-layout names (`conceptlab.layouts`); diffusers' own converters read
it back in the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from conceptlab.backbone import load_backbone
from conceptlab.config import ModelConfig
from conceptlab.layouts import original_checkpoint


def write_single_file(folder: Path, target: Path) -> Path:
    """The folder's UNet, VAE and text encoder(s) in one original-layout file (.safetensors/.ckpt)."""
    backbone = load_backbone(ModelConfig(path=str(folder)))
    encoders = [getattr(backbone, part) for part in backbone.text_parts]
    state = original_checkpoint(backbone.unet, backbone.vae, *encoders, dtype=torch.float32)
    if target.suffix == ".safetensors":
        save_file(state, target)
    else:  # a .ckpt as the original training code saved it: the weights under "state_dict"
        torch.save({"state_dict": state, "global_step": 0}, target)
    return target
