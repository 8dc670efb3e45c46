"""LoRA (method=lora): peft adapters on the UNet's attention projections; kohya/A1111 and diffusers files."""

import re

import numpy as np
import pytest
import torch
from conftest import (
    check_resume,
    compose,
    fit_a_few_steps,
    read_summary,
    run_train,
    train_subprocess,
    unet_output,
)
from PIL import Image
from safetensors import safe_open

from conceptlab.cli import quote_text_overrides
from conceptlab.errors import ConfigError
from conceptlab.generate import run as generate_run
from conceptlab.methods.lora import ADAPTER, LoRA, lora_layers

# The kohya / AUTOMATIC1111 layout for SD-1.x UNet attention: module path with '_', then the part.
KOHYA_KEY = re.compile(
    r"^lora_unet_(down_blocks_\d+|mid_block|up_blocks_\d+)_attentions_\d+_transformer_blocks_\d+_"
    r"attn[12]_(to_q|to_k|to_v|to_out_0)\.(lora_down\.weight|lora_up\.weight|alpha)$"
)


def make_lora(**kwargs) -> LoRA:
    return LoRA(**({"name": "lora", "lr": 1e-3, "scale_lr": False, "concept": "robot"} | kwargs))


def randomize(lora: LoRA) -> LoRA:
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.normal_(0, 0.5)
    return lora


def test_only_the_adapters_train(backbone):
    frozen = [(p, p.detach().clone()) for p in backbone.parameters()]  # peft keeps them as base layers
    lora = make_lora(rank=2)
    lora.attach(backbone)
    trainable = lora.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable)
    assert sum(p.numel() for p in trainable) == sum(
        p.numel() for p in backbone.parameters() if p.requires_grad
    )
    start = [p.detach().clone() for p in trainable]
    module, _ = fit_a_few_steps(backbone, lora, "bundled:robot", lr=1e-2)
    assert any(not torch.equal(a, b) for a, b in zip(start, trainable))
    assert all(torch.equal(p, before) and p.grad is None for p, before in frozen)
    # The checkpoint holds the adapters alone.
    keys = module.trained_state_keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)


def test_multiplier_zero_is_exactly_the_bare_unet_and_dropout_follows_the_method(backbone):
    bare = unet_output(backbone)
    lora = randomize_after_attach(backbone, dropout=0.5)
    lora.eval()
    with lora.at_multiplier(0.0):
        assert torch.equal(unet_output(backbone), bare)
    assert not torch.allclose(unet_output(backbone), bare)
    dropouts = [layer.lora_dropout[ADAPTER] for _, _, layer in lora_layers(backbone, ADAPTER)]
    assert not any(d.training for d in dropouts)
    lora.train()
    backbone.train()  # what Lightning does to the module holding both: the backbone first
    lora.train()
    assert all(d.training for d in dropouts) and not backbone.unet.training


def randomize_after_attach(backbone, **kwargs) -> LoRA:
    lora = make_lora(**kwargs)
    lora.attach(backbone)
    return randomize(lora)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank 1 or more"),
        ({"dropout": 1.5}, "a probability"),
        ({"target_modules": ["nope"]}, "nope"),
    ],
)
def test_bad_settings_are_refused(backbone, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_lora(**kwargs).attach(backbone)


def kohya_modules(path) -> dict[str, dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        modules.setdefault(module, {})[part] = tensor
    return modules


@pytest.mark.slow
def test_train_py_lora_run_leaves_kohya_and_diffusers_files_that_their_loaders_read(tmp_path, tiny_dir):
    from diffusers import StableDiffusionPipeline

    proc, [run_dir] = train_subprocess(tmp_path, "method=lora", "method.rank=2", "method.alpha=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["method"] == "lora"
    assert summary["files"]["concepts"] == [
        "concepts/diffusers/pytorch_lora_weights.safetensors",
        "concepts/robot.safetensors",
    ]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(
        ".lora_A." in k or ".lora_B." in k for k in checkpoint["state_dict"]
    )

    # kohya / A1111 / ComfyUI layout: every adapted module of the UNet, by its diffusers name with '_'.
    kohya = run_dir / "concepts" / "robot.safetensors"
    modules = kohya_modules(kohya)
    backbone_unet = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None).unet
    expected = {
        "lora_unet_" + name.replace(".", "_"): module
        for name, module in backbone_unet.named_modules()
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                          "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))
    }  # fmt: skip
    assert set(modules) == set(expected)
    for key, parts in modules.items():
        assert all(KOHYA_KEY.match(f"{key}.{part}") for part in parts), key
        linear = expected[key]
        assert parts["lora_down.weight"].shape == (2, linear.in_features)
        assert parts["lora_up.weight"].shape == (linear.out_features, 2)
        assert parts["alpha"].shape == () and float(parts["alpha"]) == 1.0
    with safe_open(str(kohya), framework="pt") as f:
        assert f.metadata()["ss_network_dim"] == "2" and f.metadata()["ss_output_name"] == "robot"

    # Both files load with diffusers' own loader and give the UNet the adapters we trained.
    state = checkpoint["state_dict"]
    ours = {k.removeprefix("backbone.unet.").replace(f".{ADAPTER}.", "."): v for k, v in state.items()}
    outputs = []
    for source in (run_dir / "concepts" / "diffusers", kohya):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
        pipe.load_lora_weights(str(source), adapter_name="x")
        loaded = {k.replace(".x.", "."): v for k, v in pipe.unet.state_dict().items() if ".lora_" in k}
        assert loaded.keys() == ours.keys()
        for key in ours:
            torch.testing.assert_close(loaded[key], ours[key])
        gen = torch.Generator().manual_seed(0)
        latents, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
        with torch.no_grad():
            outputs.append(pipe.unet(latents, torch.tensor([500]), context).sample)
    torch.testing.assert_close(outputs[0], outputs[1])

    # conceptlab's own reader (generate.py, evaluate.py) applies either file at multiplier x alpha / rank
    # (0.8 x 1/2 here): the diffusers file's alpha is in its metadata, the kohya file's in its tensors.
    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig
    from conceptlab.inference import load_concepts

    for source in (run_dir / "concepts" / "diffusers" / "pytorch_lora_weights.safetensors", kohya):
        backbone = load_backbone(ModelConfig(path=str(tiny_dir)))
        [concept] = load_concepts([source])
        concept.install(backbone)
        concept.activate(0.8)
        scales = [layer.scaling[concept.adapter] for _, _, layer in lora_layers(backbone, concept.adapter)]
        assert scales and all(scale == pytest.approx(0.4) for scale in scales), (source.name, set(scales))


@pytest.mark.slow
def test_lora_resume_with_dropout_reproduces_an_uninterrupted_run(tmp_path):
    check_resume(tmp_path, "method=lora", "method.dropout=0.2", "samples.every_n_steps=0")


@pytest.mark.slow
def test_text_encoder_adapters_are_trained_and_exported(tmp_path):
    summary = run_train(
        tmp_path / "run", "method=lora", "method.text_encoder=true", "samples.every_n_steps=0"
    )
    assert summary["status"] == "completed"
    modules = kohya_modules(tmp_path / "run" / "concepts" / "robot.safetensors")
    te = [m for m in modules if m.startswith("lora_te_")]
    assert te and all(
        re.match(r"lora_te_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj$", m) for m in te
    )


def generate(tmp_path, *overrides):
    out = tmp_path / "gen"
    cfg = compose(
        quote_text_overrides(["model=tiny", "steps=3", "seeds=[0,1]", *overrides]), config="generate"
    )
    return generate_run(cfg, out), out


def first_image(folder):
    """The first image generate.py wrote into `folder` (seed 0 of the first prompt), as an array."""
    return np.asarray(Image.open(folder / "images" / "00_seed0.png"))


def check_tag_at_zero_and_one(tmp_path, prompt: str, tag: str, files: str, *overrides: str) -> dict:
    """generate.py with `prompt`, then with `<tag>:0>` and `<tag>:1>` after it: at 0 exactly the bare
    prompt's image, at 1 another. The record of the last."""
    _, bare = generate(tmp_path / "a", f"prompt={prompt}", files, *overrides)
    _, zero = generate(tmp_path / "b", f"prompt={prompt} {tag}:0>", files, *overrides)
    record, full = generate(tmp_path / "c", f"prompt={prompt} {tag}:1>", files, *overrides)
    assert np.array_equal(first_image(bare), first_image(zero))
    assert not np.array_equal(first_image(bare), first_image(full))
    return record


def write_lora_file(tmp_path, backbone, name="ink"):
    from conceptlab.methods.lora import write_kohya_lora

    randomize_after_attach(backbone)
    return write_kohya_lora(tmp_path / f"{name}.safetensors", backbone, ADAPTER, name, 1)


def test_generate_applies_lora_tags_and_zero_is_the_bare_model(tmp_path, backbone):
    path = write_lora_file(tmp_path, backbone)
    files = f"concepts=[{path}]"
    record = check_tag_at_zero_and_one(tmp_path, "a red square", "<lora:ink", files)
    assert record["tags"] == [{"tag": "lora", "name": "ink", "multiplier": 1.0}]
    assert record["concepts"][0]["method"] == "lora"


def test_a_lora_for_another_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    from conceptlab.errors import ConceptFileError

    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 320), f"{key}.lora_up.weight": torch.zeros(320, 4),
               f"{key}.alpha": torch.tensor(4.0)}, tmp_path / "sd15.safetensors")  # fmt: skip
    with pytest.raises(ConceptFileError, match="'sd15'"):
        generate(tmp_path, "prompt=a <lora:sd15:1>", f"concepts=[{tmp_path / 'sd15.safetensors'}]")


@pytest.mark.slow
def test_init_from_continues_a_kohya_file_through_train_py(tmp_path):
    from safetensors.torch import load_file

    from conceptlab.errors import ConceptFileError

    run_train(tmp_path / "first", "method=lora", "samples.every_n_steps=0")
    source = tmp_path / "first" / "concepts" / "robot.safetensors"
    # A learning rate too small to move anything: after one step the adapters are the file's.
    run_train(tmp_path / "again", "method=lora", f"method.init_from={source}", "method.lr=1e-30",
              "trainer.max_steps=1", "samples.every_n_steps=0")  # fmt: skip
    before, after = load_file(source), load_file(tmp_path / "again" / "concepts" / "robot.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-12)
    with pytest.raises(ConceptFileError, match="has rank 4 .* set method.rank=4"):
        run_train(tmp_path / "wrong", "method=lora", f"method.init_from={source}", "method.rank=2")
