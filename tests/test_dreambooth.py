"""DreamBooth (method=dreambooth): the UNet fine-tuned with a rare identifier and the class word, with prior
preservation from class images drawn once by the frozen backbone and cached for every run."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import check_resume, run_train
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora import check_tag_at_zero_and_one

from conceptlab.backbone import Backbone
from conceptlab.errors import ConfigError

FAST = ["method=dreambooth", "data.class_word=robot", "method.num_class_images=3", "method.class_steps=2",
        "method.lr=1e-3", "samples.every_n_steps=0"]  # fmt: skip


def counting_draws(monkeypatch) -> list[int]:
    """How many class images the backbone draws, call by call."""
    drawn: list[int] = []
    sample = Backbone.sample

    def counted(self, prompts, *args, **kwargs):
        if kwargs.get("progress") == "class images":
            drawn.append(len(prompts))
        return sample(self, prompts, *args, **kwargs)

    monkeypatch.setattr(Backbone, "sample", counted)
    return drawn


def test_without_a_class_word_the_run_says_how_to_give_one(tmp_path):
    with pytest.raises(
        ConfigError, match=r"method=dreambooth needs the subject's class noun .* set data.class_word=dog"
    ):
        run_train(tmp_path / "run", "method=dreambooth")
    with pytest.raises(
        ConfigError, match=r"data.buckets=true with prior preservation: .* use data.buckets=false"
    ):
        run_train(tmp_path / "buckets", *FAST, "data.buckets=true")
    with pytest.raises(ConfigError, match=r"method.init_from: DreamBooth starts from the backbone itself"):
        run_train(tmp_path / "init", *FAST, f"method.init_from={tmp_path / 'x.safetensors'}")


def test_a_dreambooth_run_fine_tunes_the_unet_with_cached_class_images(tmp_path, tiny_dir, monkeypatch):
    from diffusers import UNet2DConditionModel

    drawn = counting_draws(monkeypatch)
    run_dir = tmp_path / "run"
    summary = run_train(run_dir, *FAST)
    assert summary["status"] == "completed" and drawn == [3]
    assert summary["example_prompt"] == "a photo of sks robot <dreambooth:robot:1>"
    weights = load_file(run_dir / "concepts" / "robot.safetensors")
    with safe_open(str(run_dir / "concepts" / "robot.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "conceptlab-dreambooth" and f.metadata()["class_word"] == "robot"
    base = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").state_dict()
    assert weights.keys() == base.keys() and any(not torch.equal(weights[k], base[k]) for k in base)
    # diffusers' own folder of what changed: the same UNet
    saved = UNet2DConditionModel.from_pretrained(run_dir / "concepts" / "diffusers" / "unet").state_dict()
    assert all(torch.equal(saved[k], weights[k]) for k in weights)
    assert summary["trainable_params"] == sum(v.numel() for v in base.values())
    # a second run reads the class images the first drew; another backbone (another folder) draws its own
    again = run_train(
        tmp_path / "again", *FAST, "seed=1", "trainer.max_steps=1", "method.checkpoint_file=true"
    )
    assert drawn == [3]
    # ... and writes the whole model as one original-layout file, which diffusers' single-file loader (the
    # webui's and ComfyUI's layout) reads back as the fine-tuned UNet with the frozen VAE and text encoder
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    file = tmp_path / "again" / "concepts" / "checkpoint" / "robot.safetensors"
    assert "concepts/checkpoint/robot.safetensors" in again["files"]["concepts"]
    with safe_open(str(file), framework="pt") as f:
        assert (
            "format" not in f.metadata()
            and f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        )
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(tiny_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)  # fmt: skip
    tuned = UNet2DConditionModel.from_pretrained(
        tmp_path / "again" / "concepts" / "diffusers" / "unet"
    ).state_dict()
    loaded = pipe.unet.state_dict()
    assert loaded.keys() == tuned.keys() and all(
        torch.equal(loaded[k].half(), tuned[k].half()) for k in tuned
    )
    bare_vae = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae")
    assert all(
        torch.equal(v.half(), bare_vae.state_dict()[k].half()) for k, v in pipe.vae.state_dict().items()
    )
    other = tmp_path / "other-backbone"
    shutil.copytree(tiny_dir, other)
    run_train(tmp_path / "other", *FAST, f"model.path={other}", "trainer.max_steps=1")
    assert drawn == [3, 3]


def test_the_loss_adds_the_class_images_at_their_weight(backbone):
    from conceptlab.config import DataConfig, OptimConfig
    from conceptlab.data import ConceptDataModule, read_concept_images
    from conceptlab.methods.dreambooth import DreamBooth
    from conceptlab.module import ConceptModule, diffusion_losses

    method = DreamBooth(name="dreambooth", lr=1e-4, scale_lr=False, concept="robot", class_word="robot",
                        num_class_images=2, prior_loss_weight=0.25, class_steps=2)  # fmt: skip
    method.attach(backbone)
    cfg = DataConfig(path="bundled:robot", batch_size=2)
    draw = lambda prompts, seeds: backbone.sample(prompts, seeds, 2, 7.5)  # noqa: E731
    args = (cfg, read_concept_images(cfg), backbone, method.prompt_text, 0, 64)
    with_prior = ConceptDataModule(*args, cache_context=True, prior=method.prior, prior_draw=draw)
    plain = ConceptDataModule(*args, cache_context=True)
    with_prior.setup()
    plain.setup()
    a, b = with_prior.dataset[(1, 7)], plain.dataset[(1, 7)]
    assert all(torch.equal(a[k], b[k]) for k in b)  # the concept's samples are those of a run without a prior
    assert {k for k in a if k.startswith("prior_")} == {
        "prior_latents",
        "prior_noise",
        "prior_timesteps",
        "prior_context",
    }
    batch = {k: torch.stack([with_prior.dataset[(i, i)][k] for i in range(2)]) for k in a}
    module = ConceptModule(backbone, method, OptimConfig(), lr_schedule=[(1e-4, None)], max_steps=1)
    own = {k: v for k, v in batch.items() if not k.startswith("prior_")}
    prior = {k.removeprefix("prior_"): v for k, v in batch.items() if k.startswith("prior_")}
    with torch.no_grad():
        expected = diffusion_losses(backbone, [own])[0] + 0.25 * diffusion_losses(backbone, [prior])[0]
        assert module.step_loss(batch) == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_generate_applies_the_unet_at_a_multiplier_and_zero_is_the_bare_model(tmp_path, tiny_encoders):
    from conftest import compose

    from conceptlab.evaluate import evaluate_concepts

    run_dir = tmp_path / "run"
    run_train(run_dir, *FAST, "trainer.max_steps=2")
    # evaluate.py's prompts: the identifier, then the class word, and the UNet switched on by its tag
    cfg = compose(["model=tiny", "data.class_word=robot", f"encoders.clip={tiny_encoders['clip']}",
                   f"encoders.dino={tiny_encoders['dino']}", "protocol.images_per_prompt=1", "protocol.num_inference_steps=2",
                   "protocol.object.editing=['a {} on the beach']", "protocol.multipliers=[1.0]"])  # fmt: skip
    record = evaluate_concepts(
        [str(run_dir)], cfg.model, cfg.data, cfg.encoders, cfg.protocol, tmp_path / "eval"
    )
    assert record["results"]["m1"]["prompts"][1] == "a sks robot on the beach <dreambooth:robot:1>"
    files = f"concepts=[{run_dir}]"
    record = check_tag_at_zero_and_one(tmp_path, "a photo of sks robot", "<dreambooth:robot", files)
    assert record["concepts"][0]["method"] == "dreambooth"


@pytest.mark.slow
def test_a_dreambooth_run_resumes_bit_for_bit(tmp_path):
    """With the text encoder training too: both parts come back from the checkpoint."""
    check_resume(tmp_path, *FAST, "method.train_text_encoder=true")


@pytest.mark.slow
def test_with_train_text_encoder_the_text_encoder_trains_and_every_reader_gets_it(tmp_path, tiny_dir):
    """method.train_text_encoder=true: the UNet and the text encoder train; the concept file holds both,
    diffusers' folders hold each, and the tag at 0 is the bare model and at 1 the trained one."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig
    from conceptlab.formats import read_tensor_file
    from conceptlab.methods.dreambooth import DreamBooth

    run_dir = tmp_path / "run"
    summary = run_train(
        run_dir, *FAST, "method.train_text_encoder=true", "trainer.max_steps=2", "method.checkpoint_file=true"
    )
    bare_text = CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder").state_dict()
    bare_unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").state_dict()
    assert summary["trainable_params"] == sum(v.numel() for v in [*bare_text.values(), *bare_unet.values()])
    weights = load_file(run_dir / "concepts" / "robot.safetensors")
    text = {k.removeprefix("text_encoder."): v for k, v in weights.items() if k.startswith("text_encoder.")}
    assert text.keys() == bare_text.keys() and any(not torch.equal(text[k], bare_text[k]) for k in text)
    saved = CLIPTextModel.from_pretrained(run_dir / "concepts" / "diffusers" / "text_encoder").state_dict()
    assert all(torch.equal(saved[k], text[k]) for k in text)
    # the whole-model file (the webui's, ComfyUI's) holds the trained text encoder, as diffusers reads it
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(run_dir / "concepts" / "checkpoint" / "robot.safetensors"), config=str(tiny_dir), local_files_only=True,
        safety_checker=None, requires_safety_checker=False,
    )  # fmt: skip
    loaded = pipe.text_encoder.state_dict()
    assert all(torch.equal(loaded[k].half(), text[k].half()) for k in text if k in loaded)
    assert any(not torch.equal(loaded[k].half(), bare_text[k].half()) for k in text if k in loaded)
    # ... and generate.py takes it as the model
    from test_lora import generate

    checkpoint = run_dir / "concepts" / "checkpoint" / "robot.safetensors"
    record, out = generate(tmp_path, "prompt=a photo of sks robot", f"model.path={checkpoint}",
                           f"model.single_file_config={tiny_dir}", "seeds=[0]")  # fmt: skip
    assert (out / record["images"][0]).is_file()
    # generate.py's reader: at 0 both parts are the bare model's, at 1 the trained ones
    backbone = load_backbone(ModelConfig(path=str(tiny_dir)))
    concept = DreamBooth.concept_from_file(read_tensor_file(run_dir / "concepts" / "robot.safetensors"))
    concept.install(backbone)
    concept.activate(1.0)
    assert all(torch.equal(backbone.text_encoder.state_dict()[k], text[k]) for k in text)
    concept.activate(0.0)
    assert all(torch.equal(backbone.text_encoder.state_dict()[k], bare_text[k]) for k in text)
    assert all(torch.equal(backbone.unet.state_dict()[k], bare_unet[k]) for k in bare_unet)
