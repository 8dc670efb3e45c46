"""Custom Diffusion (method=custom_diffusion): the cross-attention's key/value projections and a modifier
word trained together with prior preservation; diffusers' own loaders read its files."""

from __future__ import annotations

import pytest
import torch
from conftest import check_resume, run_train
from safetensors.torch import load_file
from test_lora import check_tag_at_zero_and_one

from conceptlab.errors import ConfigError

# class_steps=3: class images of their own (the DreamBooth tests count the draws of theirs, at 2 steps)
FAST = ["method=custom_diffusion", "data.class_word=robot", "method.num_class_images=2", "method.class_steps=3",
        "method.lr=1e-3", "samples.every_n_steps=0", "evaluate.enabled=false", "trainer.max_steps=2"]  # fmt: skip


@pytest.fixture(scope="module")
def cd_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cd") / "run"
    return run_dir, run_train(run_dir, *FAST)


@pytest.mark.slow
def test_only_the_cross_attention_projections_and_the_word_train(cd_run, tiny_dir):
    from diffusers import UNet2DConditionModel

    run_dir, summary = cd_run
    assert summary["status"] == "completed" and summary["example_prompt"].startswith(
        "a photo of <new1> robot"
    )
    ours = load_file(run_dir / "concepts" / "robot.safetensors")
    base = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet").state_dict()
    projections = {k for k in base if ".attn2." in k and k.endswith(("to_k.weight", "to_v.weight"))}
    assert set(ours) == projections | {"word.<new1>"} and projections
    assert all(not torch.equal(ours[k], base[k]) for k in projections)  # every one moved
    assert ours["word.<new1>"].shape == (1, 32)
    assert summary["trainable_params"] == sum(base[k].numel() for k in projections) + 32
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {
        k.removeprefix("backbone.unet.") for k in checkpoint if k.startswith("backbone.unet.")
    } == projections


@pytest.mark.slow
def test_diffusers_loaders_read_the_files_as_trained(cd_run, tiny_dir):
    """diffusers' Custom Diffusion processors and textual-inversion loader give the UNet the prediction
    conceptlab's reader gives (its load_attn_procs sets the processors only when told the pipeline)."""
    from diffusers import StableDiffusionPipeline

    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig
    from conceptlab.inference import load_concepts

    run_dir, _ = cd_run
    folder = run_dir / "concepts" / "diffusers"
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.unet.load_attn_procs(
        folder, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe
    )
    pipe.load_textual_inversion(folder / "<new1>.safetensors")
    backbone = load_backbone(ModelConfig(path=str(tiny_dir)))
    [concept] = load_concepts([run_dir])
    concept.install(backbone)
    concept.activate(1.0)
    ids = pipe.tokenizer(
        ["a photo of <new1> robot"], padding="max_length", max_length=77, return_tensors="pt"
    )
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        theirs = pipe.unet(latents, torch.tensor([500]), pipe.text_encoder(ids.input_ids)[0]).sample
        ours = backbone.unet(
            latents, torch.tensor([500]), backbone.encode_text(backbone.tokenize(["a photo of <new1> robot"]))
        ).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert type(
        pipe.unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    ).__name__.startswith("CustomDiffusion")


@pytest.mark.slow
def test_generate_reads_the_word_and_zero_is_the_bare_projections(cd_run, tmp_path):
    run_dir, _ = cd_run
    record = check_tag_at_zero_and_one(
        tmp_path, "a photo of <new1> robot", "<custom_diffusion:robot", f"concepts=[{run_dir}]"
    )
    assert record["concepts"][0]["method"] == "custom_diffusion" and record["concepts"][0]["word"] == "<new1>"


def test_a_missing_class_word_or_a_bad_joint_entry_says_how_to_mend_it(tmp_path):
    with pytest.raises(
        ConfigError, match=r"method=custom_diffusion needs the subject's class noun .* data.class_word=dog"
    ):
        run_train(tmp_path / "run", "method=custom_diffusion")
    with pytest.raises(ConfigError, match=r"method.joint\[0\]: give path and placeholder"):
        run_train(tmp_path / "joint", *FAST, 'method.joint=[{path: "bundled:ink"}]')
    with pytest.raises(ConfigError, match=r"method.joint\[0\].placeholder=<new1>: already the word"):
        run_train(tmp_path / "twice", *FAST, 'method.joint=[{path: "bundled:ink", placeholder: "<new1>"}]')


JOINT = 'method.joint=[{path: "bundled:ink", placeholder: "<new2>", class_word: drawing}]'


@pytest.mark.slow
def test_two_concepts_train_jointly_each_with_its_word_and_class_images(tmp_path, tiny_dir, monkeypatch):
    """method.joint (the paper's multi-concept fine-tuning): the ink drawings with their own word and class
    images beside the robot's; both words train, the one file holds both, and generation reads both."""
    from test_dreambooth import counting_draws

    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig
    from conceptlab.formats import read_tensor_file
    from conceptlab.methods.custom_diffusion import CustomDiffusion

    drawn = counting_draws(monkeypatch)
    run_dir = tmp_path / "run"
    # class_steps=4: class images of this test's own (others draw at 2 and 3 steps)
    summary = run_train(run_dir, *FAST, JOINT, "method.class_steps=4")
    assert summary["status"] == "completed" and drawn == [2, 2]  # each class's images, drawn once
    [joint] = summary["joint"]
    assert joint["words"] == "<new2> drawing" and len(joint["images"]) == 5 and summary["num_images"] == 5
    file = run_dir / "concepts" / "robot.safetensors"
    tensors = load_file(file)
    backbone = load_backbone(ModelConfig(path=str(tiny_dir)))
    start = backbone.text_encoder.get_input_embeddings().weight[
        backbone.tokenizer.convert_tokens_to_ids("sks")
    ]
    for word in ("<new1>", "<new2>"):  # both words trained from sks's row
        assert not torch.allclose(tensors[f"word.{word}"][0], start)
    assert (run_dir / "concepts" / "diffusers" / "<new2>.safetensors").is_file()
    # generate.py's reader installs both words: each token reads its trained vector
    concept = CustomDiffusion.concept_from_file(read_tensor_file(file))
    concept.install(backbone)
    assert concept.describe()["joint_words"] == ["<new2>"]
    table = backbone.text_encoder.get_input_embeddings()
    for word in ("<new1>", "<new2>"):
        row = table(torch.tensor([backbone.tokenizer.convert_tokens_to_ids(word)]))
        torch.testing.assert_close(row[0], tensors[f"word.{word}"][0])
    # generate.py with the second concept's word: the run's folder gives both words
    from test_lora import generate

    record, out = generate(tmp_path, "prompt=a photo of <new2> drawing <custom_diffusion:robot:1>",
                           f"concepts=[{run_dir}]", "seeds=[0]")  # fmt: skip
    assert record["concepts"][0]["joint_words"] == ["<new2>"] and (out / record["images"][0]).is_file()


@pytest.mark.slow
def test_a_joint_custom_diffusion_run_resumes_bit_for_bit(tmp_path):
    """The projections (the backbone's own tensors) and both words come back from the checkpoint."""
    check_resume(tmp_path, *FAST, JOINT, "method.class_steps=5")  # class images of its own
