"""Single-file SD checkpoints (.safetensors/.ckpt in the original layout, what webui users have) as
model.path, through diffusers' from_single_file with local configs: never a hub."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from conftest import read_summary, run_train
from ldm_layout import write_single_file

from conceptlab.backbone import load_backbone, resolve_path
from conceptlab.config import ModelConfig
from conceptlab.errors import BackboneError


@pytest.fixture(scope="module")
def single_files(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    return {s: write_single_file(tiny_dir, folder / f"tiny-model{s}") for s in (".safetensors", ".ckpt")}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_single_file_checkpoint_loads_the_same_weights_as_its_folder(tiny_dir, single_files, suffix):
    file = single_files[suffix]
    ours = load_backbone(ModelConfig(path=str(file), single_file_config=str(tiny_dir)))
    folder = load_backbone(ModelConfig(path=str(tiny_dir)))
    for part in ("unet", "vae", "text_encoder"):
        theirs = getattr(folder, part).state_dict()
        mine = getattr(ours, part).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), part
    assert ours.tokenizer("a photo of a cat").input_ids == folder.tokenizer("a photo of a cat").input_ids
    assert ours.scheduler.config.prediction_type == "epsilon"
    # The webui names and hashes a checkpoint file so: file name without extension, sha256 of the file.
    assert ours.checkpoint_name == "tiny-model"
    assert ours.checkpoint_hash == hashlib.sha256(file.read_bytes()).hexdigest()[:10]


def test_training_and_generation_run_on_a_single_file_checkpoint(tmp_path, tiny_dir, single_files):
    from conftest import compose

    from conceptlab.generate import run

    file = single_files[".safetensors"]
    model = [f"model.path={file}", f"model.single_file_config={tiny_dir}"]
    summary = run_train(tmp_path / "run", "method=hypernet", "concept=mug", *model)
    assert read_summary(tmp_path / "run")["status"] == summary["status"] == "completed"
    exported = torch.load(tmp_path / "run" / "concepts" / "mug.pt", weights_only=True)
    assert exported["sd_checkpoint_name"] == "tiny-model"
    assert exported["sd_checkpoint"] == hashlib.sha256(file.read_bytes()).hexdigest()[:10]
    cfg = compose(["model=tiny", "steps=2", "seeds=[0]", "prompt=a mug", f"concepts=[{tmp_path / 'run'}]", *model],
                  config="generate")  # fmt: skip
    record = run(cfg, tmp_path / "gen")
    assert (tmp_path / "gen" / record["images"][0]).is_file()


def test_a_ckpt_with_a_training_callback_loads_and_one_with_code_is_refused(tmp_path, tiny_dir, single_files):
    from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint

    state = torch.load(single_files[".ckpt"], weights_only=True)
    # What the original training code saved: the Lightning callback's class as a key beside the weights.
    state["callbacks"] = {ModelCheckpoint: {"best_model_score": None, "monitor": None}}
    torch.save(state, tmp_path / "trained.ckpt")
    cfg = ModelConfig(path=str(tmp_path / "trained.ckpt"), single_file_config=str(tiny_dir))
    assert load_backbone(cfg).unet.config.cross_attention_dim == 32

    class Payload:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    state["callbacks"] = Payload()
    torch.save(state, tmp_path / "evil.ckpt")
    cfg = ModelConfig(path=str(tmp_path / "evil.ckpt"), single_file_config=str(tiny_dir))
    with pytest.raises(BackboneError, match=r"holds Python objects that are not weights \(shutil.rmtree\)"):
        load_backbone(cfg)
    assert (tmp_path / "victim").is_dir()


def test_a_single_file_needs_its_familys_configs_and_a_wrong_family_is_named(
    tmp_path, tiny_dir, single_files
):
    with pytest.raises(
        BackboneError,
        match=r"pick its family \(model=sd15 for SD 1.x, model=sd21 for SD 2.x, model=sdxl for SDXL\)",
    ):
        load_backbone(ModelConfig(path=str(single_files[".safetensors"])))
    sd21 = "pkg://conceptlab.single_file_configs/sd21"
    with pytest.raises(
        BackboneError, match=r"could not load the single-file checkpoint .* SD 2.x \(model=sd21\)"
    ):
        load_backbone(ModelConfig(path=str(single_files[".safetensors"]), single_file_config=sd21))
    (tmp_path / "model.bin").write_bytes(b"\0" * 8)
    with pytest.raises(
        BackboneError, match=r"is a .bin file: a single-file checkpoint is .safetensors or .ckpt"
    ):
        load_backbone(ModelConfig(path=str(tmp_path / "model.bin"), single_file_config=str(tiny_dir)))


@pytest.mark.parametrize(
    ("family", "sizes", "pads"),
    [  # parameters of SD 1.5's, SD 2.1's and SDXL base 1.0's UNet, VAE and text encoder(s), as published
        ("sd15", (859_520_964, 83_653_863, 123_060_480), ("<|endoftext|>",)),
        ("sd21", (865_910_724, 83_653_863, 340_387_840), ("!",)),
        ("sdxl", (2_567_463_684, 83_653_863, 123_060_480, 694_659_840), ("<|endoftext|>", "!")),
    ],
)
def test_the_shipped_configs_describe_the_real_models(family, sizes, pads, tmp_path, tiny_dir, single_files):
    """No hub: the configs a single-file SD 1.5/2.1/SDXL checkpoint loads with ship with conceptlab."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conceptlab.cli import register_configs

    register_configs()
    from conftest import compose

    config = compose([f"model={family}"]).model.single_file_config
    folder = resolve_path(config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae"))
        texts = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))]
        if family == "sdxl":  # OpenCLIP bigG with its projection, SDXL's pooled text embedding
            texts.append(
                CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
                )
            )
    assert tuple(sum(p.numel() for p in m.parameters()) for m in (unet, vae, *texts)) == sizes
    tokenizers = ("tokenizer", "tokenizer_2")[: len(pads)]
    assert (
        tuple(json.loads((folder / t / "tokenizer_config.json").read_text())["pad_token"] for t in tokenizers)
        == pads
    )
    if family == "sdxl":  # the webui's size conditioning: 6 size ids of 256 and the 1280-wide pooled text
        assert unet.config.projection_class_embeddings_input_dim == 6 * 256 + 1280
        return
    pad = pads[0]
    # A config folder without a vocabulary (like the shipped ones) gets CLIP's, with the folder's pad token.
    configs = tmp_path / "configs"
    shutil.copytree(tiny_dir, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    shutil.rmtree(configs / "tokenizer")
    shutil.copytree(folder / "tokenizer", configs / "tokenizer")
    ours = load_backbone(ModelConfig(path=str(single_files[".safetensors"]), single_file_config=str(configs)))
    assert ours.tokenizer.pad_token == pad
    assert ours.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
