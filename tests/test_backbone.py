"""The embedded tiny backbone and the folder loader every real SD model goes through."""

import shutil

import pytest
import torch

from conceptlab.backbone import COMPONENTS, load_backbone, resolve_dtype, save_tiny_backbone
from conceptlab.config import ModelConfig
from conceptlab.errors import BackboneError, ConfigError


def test_tiny_backbone_is_a_diffusers_folder_loaded_like_any_other(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    for component in COMPONENTS:
        assert (tiny_dir / component).is_dir()
    # The folder is a complete pipeline that diffusers itself loads...
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    # ...and our loader gives the same weights back as were saved.
    ours = load_backbone(ModelConfig(path=str(tiny_dir)))
    for name, tensor in pipe.unet.state_dict().items():
        assert torch.equal(tensor, ours.unet.state_dict()[name])
    # Building it again with the same seed is deterministic.
    again = load_backbone(ModelConfig(path=str(save_tiny_backbone(tmp_path / "again", seed=0))))
    assert torch.equal(
        again.text_encoder.get_input_embeddings().weight, ours.text_encoder.get_input_embeddings().weight
    )


def test_tiny_backbone_is_sd_shaped(backbone):
    assert backbone.vae_scale_factor == 8  # SD's factor
    assert backbone.native_resolution == 64
    assert backbone.prediction_type == "epsilon"
    assert backbone.unet.config.cross_attention_dim == backbone.context_dim
    assert len(backbone.tokenizer) == 49408


def test_tokenizer_has_the_real_clip_vocabulary(backbone):
    # Ids of OpenAI CLIP's tokenizer (as in every SD 1.x folder's vocab.json).
    assert backbone.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_backbone_is_frozen_and_stays_in_eval_mode(backbone):
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not any(m.training for m in backbone.modules())


def test_missing_component_is_named(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(BackboneError, match="no unet/"):
        load_backbone(ModelConfig(path=str(broken)))


def test_nonexistent_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(
        BackboneError, match="neither a diffusers model folder, a single-file checkpoint nor a hub id"
    ):
        load_backbone(ModelConfig(path=str(tmp_path / "nowhere")))


def test_context_width_is_checked(tiny_dir):
    with pytest.raises(BackboneError, match="32-wide text context.*expects 768"):
        load_backbone(ModelConfig(name="sd15", path=str(tiny_dir), context_dim=768))


def test_prediction_type_override(tiny_dir):
    assert (
        load_backbone(ModelConfig(path=str(tiny_dir), prediction_type="v_prediction")).prediction_type
        == "v_prediction"
    )
    with pytest.raises(ConfigError, match="prediction_type"):
        load_backbone(ModelConfig(path=str(tiny_dir), prediction_type="x0"))


def test_dtype_auto_is_half_on_cuda_only():
    assert resolve_dtype("auto", torch.device("cpu"), "16-mixed") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda"), "16-mixed") == torch.float16
    assert resolve_dtype("auto", torch.device("cuda"), "bf16-mixed") == torch.bfloat16
    with pytest.raises(ConfigError):
        resolve_dtype("float8", torch.device("cpu"), "32-true")
