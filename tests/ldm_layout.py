"""Write a diffusers SD 1.x folder as one original-layout (CompVis/LDM) checkpoint file, the kind webui
users have: the test's stand-in for v1-5-pruned-emaonly.safetensors, made from the tiny backbone.

Written with conceptlab's original-layout names (`conceptlab.layouts`); diffusers' own converters read
it back in the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from conceptlab.layouts import original_sd1_checkpoint


def write_single_file(folder: Path, target: Path) -> Path:
    """The SD 1.x folder's UNet, VAE and text encoder in one original-layout file (.safetensors/.ckpt)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    state = original_sd1_checkpoint(
        UNet2DConditionModel.from_pretrained(folder / "unet"), AutoencoderKL.from_pretrained(folder / "vae"),
        CLIPTextModel.from_pretrained(folder / "text_encoder"), dtype=torch.float32,
    )  # fmt: skip
    if target.suffix == ".safetensors":
        save_file(state, target)
    else:  # a .ckpt as the original training code saved it: the weights under "state_dict"
        torch.save({"state_dict": state, "global_step": 0}, target)
    return target
