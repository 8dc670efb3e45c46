"""Pivotal tuning (method=pivotal): an embedding and a LoRA trained together; the LoRA with its embedding
bundled (the webui's rule), the separate pair for ComfyUI and diffusers, and generation with both."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import check_resume, run_train
from safetensors.torch import load_file
from test_lora import first_image, generate

from conceptlab.errors import ConfigError

FAST = ["method=pivotal", "samples.every_n_steps=0", "method.lr=0.01", "method.embedding_lr=0.05"]


def webui_bundle(tensors: dict) -> dict[str, dict]:
    """The embeddings the webui's LoRA loader takes out of a file (extensions-builtin/Lora/networks.py):
    the part before the first '.' is "bundle_emb", then the embedding's name, then string_to_param.<key>."""
    bundles: dict[str, dict] = {}
    for key, weight in tensors.items():
        module, _, part = key.partition(".")
        if module != "bundle_emb":
            continue
        name, vector_name = part.split(".", 1)
        entry = bundles.setdefault(name, {})
        if vector_name.split(".")[0] == "string_to_param":
            entry["string_to_param"] = {vector_name.split(".", 1)[1]: weight}
        else:
            entry[vector_name] = weight
    return bundles


@pytest.fixture(scope="module")
def pivotal_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pivotal") / "run"
    summary = run_train(run_dir, *FAST)
    return run_dir, summary


def test_a_pivotal_run_writes_the_bundle_and_the_pair(pivotal_run):
    run_dir, summary = pivotal_run
    assert summary["status"] == "completed" and summary["method"] == "pivotal"
    concepts = run_dir / "concepts"
    assert sorted(summary["files"]["concepts"]) == sorted(
        ["concepts/robot.safetensors", "concepts/embedding/robot.safetensors", "concepts/embedding/robot.pt",
         "concepts/lora/robot.safetensors", "concepts/lora/diffusers/pytorch_lora_weights.safetensors"]
    )  # fmt: skip
    bundle = load_file(concepts / "robot.safetensors")
    [(name, data)] = webui_bundle(bundle).items()
    assert name == "<robot>" and list(data) == ["string_to_param"]
    [vectors] = data["string_to_param"].values()
    assert vectors.shape == (2, 32)  # method.num_vectors=2 on the tiny 32-wide text encoder
    assert torch.equal(load_file(concepts / "embedding" / "robot.safetensors")["<robot>"], vectors)
    lora = load_file(concepts / "lora" / "robot.safetensors")
    assert {k for k in bundle if not k.startswith("bundle_emb.")} == set(lora)
    assert all(torch.equal(bundle[k], lora[k]) for k in lora)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert "method.embedding.vectors" in checkpoint["state_dict"]
    assert summary["trainable_params"] == 2 * 32 + sum(
        v.numel() for k, v in lora.items() if not k.endswith("alpha")
    )


def test_generate_reads_the_word_and_scales_the_lora(tmp_path, pivotal_run):
    run_dir, _ = pivotal_run
    concepts = run_dir / "concepts"
    _, word_only = generate(
        tmp_path / "a",
        "prompt=a <robot> on a beach",
        f"concepts=[{concepts / 'embedding' / 'robot.safetensors'}]",
    )
    record, zero = generate(
        tmp_path / "b", "prompt=a <robot> on a beach <lora:robot:0>", f"concepts=[{run_dir}]"
    )
    _, full = generate(tmp_path / "c", "prompt=a <robot> on a beach <lora:robot:1>", f"concepts=[{run_dir}]")
    assert record["concepts"][0]["method"] == "pivotal" and record["concepts"][0]["word"] == "<robot>"

    assert np.array_equal(
        first_image(word_only), first_image(zero)
    )  # at 0 the LoRA is off and the word stays
    assert not np.array_equal(first_image(zero), first_image(full))


def test_evaluation_prompts_say_the_word_beside_the_tag():
    from conceptlab.methods.pivotal import PivotalTuning

    method = PivotalTuning(name="pivotal", lr=1e-3, scale_lr=False, concept="robot")
    assert method.prompt_words == "<robot> <robot>_1" and method.usage("a photo of {}").endswith(
        "<lora:robot:1>"
    )


def test_the_embedding_has_its_own_rate_and_stops_after_embedding_steps(tmp_path, backbone):
    from conceptlab.config import OptimConfig
    from conceptlab.methods.pivotal import PivotalTuning
    from conceptlab.module import ConceptModule

    method = PivotalTuning(
        name="pivotal", lr=1e-3, scale_lr=False, concept="robot", embedding_lr=5e-3, embedding_steps=2
    )
    method.attach(backbone)
    module = ConceptModule(
        backbone, method, OptimConfig(), lr_schedule=[(2e-3, None)], max_steps=4
    )  # scale_lr x2
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([2e-3, 1e-2])  # both scaled alike
    assert groups[1]["params"] == [method.embedding.vectors]
    method.before_step(1)
    assert method.embedding.vectors.requires_grad
    method.before_step(2)
    assert not method.embedding.vectors.requires_grad
    # through train.py: after 2 steps the embedding is where a 2-step run left it, the LoRA goes on
    short = run_train(tmp_path / "short", *FAST, "trainer.max_steps=2")
    long = run_train(tmp_path / "long", *FAST, "trainer.max_steps=4", "method.embedding_steps=2")
    assert short["status"] == long["status"] == "completed"
    a, b = (load_file(tmp_path / d / "concepts" / "robot.safetensors") for d in ("short", "long"))
    assert torch.equal(a["bundle_emb.<robot>.string_to_param.*"], b["bundle_emb.<robot>.string_to_param.*"])
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("lora_unet_"))


@pytest.mark.slow
def test_a_pivotal_run_resumes_bit_for_bit_across_the_embeddings_stop(tmp_path):
    check_resume(tmp_path, *FAST, "method.embedding_steps=4")


def test_a_pivotal_file_is_continued_and_bad_settings_are_refused(tmp_path, pivotal_run):
    run_dir, _ = pivotal_run
    bundle = run_dir / "concepts" / "robot.safetensors"
    again = run_train(tmp_path / "again", "method=pivotal", "samples.every_n_steps=0", f"method.init_from={bundle}",
                      "method.lr=1e-12", "method.embedding_lr=1e-12", "trainer.max_steps=1")  # fmt: skip
    assert again["status"] == "completed"
    before, after = load_file(bundle), load_file(tmp_path / "again" / "concepts" / "robot.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match=r"a bundled embedding's name has no '.'"):
        run_train(tmp_path / "dots", "method=pivotal", "method.placeholder='<my.robot>'")
    with pytest.raises(ConfigError, match=r"method.embedding_lr=0"):
        run_train(tmp_path / "zero", "method=pivotal", "method.embedding_lr=0")
