"""The LoRA family through peft (method=lora method.variant=loha|lokr|dora): what trains, the files in the
kohya/LyCORIS layout by the rules the webui's LoRA extension and ComfyUI read them with, and generation."""

from __future__ import annotations

import pytest
import torch
from conftest import run_train, unet_output
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora import check_tag_at_zero_and_one, make_lora

from conceptlab.errors import ConceptFileError, ConfigError
from conceptlab.methods import read_concept
from conceptlab.methods.lora import ADAPTER, LycorisConcept, kohya_key, lora_layers, write_kohya_lora
from conceptlab.methods.lycoris import file_variant

VARIANTS = ["loha", "lokr", "dora"]
# What each reader's module type needs to recognise a module (the webui's network_hada/network_lokr/
# network_lora create_module, and ComfyUI's weight adapters by the same names).
NEEDS = {
    "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}],
    "lokr": [{"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}],  # and a second factor, checked below
    "dora": [{"lora_down.weight", "lora_up.weight", "dora_scale"}],
}


def attached(backbone, variant: str, rank: int = 2):
    method = make_lora(variant=variant, rank=rank)
    method.attach(backbone)
    with torch.no_grad():  # away from the starting point (LoRA's up and LoKr's w1 start at zero)
        for p in method.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return method.eval()


def true_change(layer) -> torch.Tensor:
    """The layer's change of weight as it computes: its output on the identity minus its base layer's."""
    base = layer.get_base_layer()
    eye = torch.eye(base.in_features)
    with torch.no_grad():
        return (layer(eye) - base(eye)).T


# rank 64 on the tiny UNet: no LoKr factor is rank-decomposed, so the file has no alpha and w1 holds the scale
@pytest.mark.parametrize(("variant", "rank"), [("loha", 2), ("lokr", 2), ("lokr", 64), ("dora", 2)])
def test_the_file_holds_what_peft_trained_by_the_readers_rules(tmp_path, backbone, variant, rank):
    from conceptlab.methods.lycoris import weight_change

    method = attached(backbone, variant, rank)
    # peft's own tensors of the variant train (a LoKr's second factor is rank-decomposed where it is large)
    names = {
        n.split(f".{ADAPTER}")[0].rsplit(".", 1)[-1]
        for n, p in backbone.named_parameters()
        if p.requires_grad
    }
    assert (
        names
        in {
            "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}],
            "lokr": [{"lokr_w1", "lokr_w2"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}],
            "dora": [{"lora_A", "lora_B", "lora_magnitude_vector"}],
        }[variant]
    )
    path = write_kohya_lora(tmp_path / "ink.safetensors", backbone, ADAPTER, "ink", 7)
    tensors = load_file(path)
    assert file_variant(tensors) == variant
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == ("networks.lora" if variant == "dora" else "lycoris.kohya")
    modules = {}
    for key, tensor in tensors.items():
        module, _, suffix = key.partition(".")
        modules.setdefault(module, {})[suffix] = tensor
    layers = {kohya_key(backbone, part, name): layer for part, name, layer in lora_layers(backbone, ADAPTER)}
    assert set(modules) == set(layers)
    for key, parts in modules.items():
        assert any(need <= set(parts) for need in NEEDS[variant]), (key, sorted(parts))
        layer = layers[key]
        weight = layer.get_base_layer().weight
        if variant == "lokr":
            assert ("alpha" in parts) == ("lokr_w2_b" in parts)  # no rank to divide alpha by: no alpha
            assert "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)
            second = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"]
            assert torch.kron(parts["lokr_w1"], second).shape == weight.shape
        if variant == "dora":  # the per-output-row form both readers take: [out, 1]
            assert parts["dora_scale"].shape == (weight.shape[0], 1)
        torch.testing.assert_close(weight_change(parts, weight), true_change(layer), rtol=1e-4, atol=1e-5)
    # the same module at another multiplier, as training's evaluation applies it and generation reads it
    with method.at_multiplier(0.5):
        half = unet_output(backbone)
    with method.at_multiplier(0.0):
        bare = unet_output(backbone)
    full = unet_output(backbone)
    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig

    fresh = load_backbone(ModelConfig(path=str(backbone.path)))
    concept = read_concept(path)
    assert isinstance(concept, LycorisConcept)
    concept.install(fresh)
    assert torch.equal(unet_output(fresh), bare)  # installed inactive: the bare model, exactly
    for multiplier, expected in ((1.0, full), (0.5, half)):
        concept.activate(multiplier)
        torch.testing.assert_close(unet_output(fresh), expected, rtol=1e-4, atol=1e-5)
    concept.activate(0.0)
    assert torch.equal(unet_output(fresh), bare)


@pytest.mark.parametrize(
    "variant",
    ["lokr", pytest.param("loha", marks=pytest.mark.slow), pytest.param("dora", marks=pytest.mark.slow)],
)
def test_a_variant_run_through_train_py_and_generate_py(tmp_path, variant):
    run_dir = tmp_path / "run"
    # the method group's preset (method=loha: LoRA's variant under a name of its own) names the run
    summary = run_train(run_dir, f"method={variant}", "method.lr=0.01", "samples.every_n_steps=0")
    assert summary["status"] == "completed" and summary["method"] == "lora"
    assert summary["run_name"] == f"{variant}-robot-seed0"
    expected = ["concepts/robot.safetensors"] + (
        ["concepts/diffusers/pytorch_lora_weights.safetensors"] if variant == "dora" else []
    )
    assert sorted(summary["files"]["concepts"]) == sorted(expected)
    files = f"concepts=[{run_dir}]"
    record = check_tag_at_zero_and_one(tmp_path, "a red square", "<lora:robot", files)
    assert record["concepts"][0]["method"] == "lora"


@pytest.mark.slow
def test_a_dora_run_writes_a_diffusers_file_its_loader_applies_as_ours(tmp_path, tiny_dir):
    from diffusers import StableDiffusionPipeline

    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig

    run_dir = tmp_path / "run"
    run_train(run_dir, "method=lora", "method.variant=dora", "method.lr=0.05", "samples.every_n_steps=0")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    pipe.load_lora_weights(str(run_dir / "concepts" / "diffusers"), adapter_name="x")
    assert any("lora_magnitude_vector" in k for k in pipe.unet.state_dict())
    ours = load_backbone(ModelConfig(path=str(tiny_dir)))
    concept = read_concept(run_dir / "concepts" / "robot.safetensors")
    concept.install(ours)
    concept.activate(1.0)
    torch.testing.assert_close(
        unet_output(ours),
        unet_output(type("B", (), {"unet": pipe.unet, "context_dim": ours.context_dim})()),
        rtol=1e-4,
        atol=1e-5,
    )


def test_a_file_of_another_variant_is_named(tmp_path, backbone):
    attached(backbone, "loha")
    path = write_kohya_lora(tmp_path / "hada.safetensors", backbone, ADAPTER, "hada", 1)
    with pytest.raises(
        ConceptFileError,
        match=r"hada.safetensors is a LoHa file and this run trains a LoRA: set method.variant=loha",
    ):
        run_train(tmp_path / "run", "method=lora", f"method.init_from={path}")
    with pytest.raises(ConfigError, match=r"method.variant='lycoris': use one of lora, loha, lokr, dora"):
        run_train(tmp_path / "run2", "method=lora", "method.variant=lycoris")
    with pytest.raises(
        ConfigError, match=r"method.dropout=0.1: .* use method.dropout=0 with method.variant=lokr"
    ):
        run_train(tmp_path / "run3", "method=lora", "method.variant=lokr", "method.dropout=0.1")


@pytest.mark.slow
def test_a_variant_continues_its_own_file(tmp_path):
    first = tmp_path / "first"
    run_train(first, "method=lora", "method.variant=lokr", "method.lr=0.01", "samples.every_n_steps=0")
    file = first / "concepts" / "robot.safetensors"
    summary = run_train(tmp_path / "second", "method=lora", "method.variant=lokr", f"method.init_from={file}",
                        "trainer.max_steps=1", "method.lr=1e-12", "samples.every_n_steps=0")  # fmt: skip
    assert summary["status"] == "completed"
    again = load_file(tmp_path / "second" / "concepts" / "robot.safetensors")
    before = load_file(file)
    assert again.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(again[key], before[key], rtol=1e-4, atol=1e-6)
