"""generate.py: any mix of embeddings and hypernetworks in one prompt, comparison grids, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, compose, run_train
from PIL import Image

from conceptlab.cli import quote_text_overrides
from conceptlab.errors import ConceptFileError, ConfigError
from conceptlab.generate import run
from conceptlab.methods.hypernetwork import (
    HypernetworkLayers,
    write_a1111_hypernetwork,
    write_hypernetwork_safetensors,
)
from conceptlab.methods.textual_inversion import write_a1111_embedding, write_diffusers_embedding
from conceptlab.prompts import parse_prompt

FAST = ["model=tiny", "steps=3", "seeds=[0,1]"]


def hypernetwork_file(path, concept, writer=write_a1111_hypernetwork, sizes=(32, 64)):
    hn = HypernetworkLayers(concept=concept, enable_sizes=list(sizes))
    with torch.no_grad():
        for p in hn.parameters():
            p.normal_(0, 0.5)
    if writer is write_a1111_hypernetwork:
        return writer(path, hn, 1, None, "tiny")
    return writer(path, hn, 1, "tiny")


@pytest.fixture
def concepts(tmp_path):
    torch.manual_seed(0)
    return {
        "cat": write_diffusers_embedding(tmp_path / "cat.safetensors", "<cat-a>", torch.randn(2, 32)),
        "style": write_a1111_embedding(
            tmp_path / "style-b.pt", "style-b", torch.randn(1, 32), 10, None, "tiny"
        ),
        "ink": hypernetwork_file(tmp_path / "ink.pt", "ink"),
        "oil": hypernetwork_file(tmp_path / "oil.safetensors", "oil", writer=write_hypernetwork_safetensors),
    }


def generate(tmp_path, *overrides):
    out = tmp_path / "gen"
    # As generate.py does: prompts are quoted for Hydra's override grammar.
    return run(compose(quote_text_overrides([*FAST, *overrides]), config="generate"), out), out


def pixels(path):
    return np.asarray(Image.open(path))


def test_generate_py_with_two_embeddings_and_two_hypernetworks(tmp_path, tiny_dir, concepts):
    prompt = "prompt=a photo of <cat-a> in the style of style-b <hypernet:ink:0.5> <hypernet:oil:0.8>"
    files = ",".join(str(p) for p in concepts.values())
    proc = subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), prompt, f"concepts=[{files}]", "multipliers=[0,1]", *FAST,
         f"output_root={tmp_path}"],  # fmt: skip
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [out] = list((tmp_path / "generate").iterdir())
    record = json.loads((out / "generation.json").read_text())
    assert record["text"] == "a photo of <cat-a> in the style of style-b"
    assert record["tags"] == [
        {"tag": "hypernet", "name": "ink", "multiplier": 0.5}, {"tag": "hypernet", "name": "oil", "multiplier": 0.8}
    ]  # fmt: skip
    assert [c["method"] for c in record["concepts"]] == ["ti", "ti", "hypernet", "hypernet"]
    assert record["multipliers"] == [0.0, 1.0] and record["seeds"] == [0, 1]
    assert sorted(record["images"]) == [f"images/0{r}_seed{s}.png" for r in (0, 1) for s in (0, 1)]
    grid = Image.open(out / "grid.png")
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # 2 x 2 images plus labels
    # Row 0 (every hypernetwork at 0) differs from row 1 (at 1): the multipliers were applied.
    assert not np.array_equal(pixels(out / "images/00_seed0.png"), pixels(out / "images/01_seed0.png"))


def test_multiplier_zero_is_exactly_the_bare_model(tmp_path, concepts):
    files = f"concepts=[{concepts['ink']},{concepts['oil']}]"
    _, bare = generate(tmp_path / "a", "prompt=a red square", files)
    _, zero = generate(tmp_path / "b", "prompt=a red square <hypernet:ink:0> <hypernet:oil:0>", files)
    _, full = generate(tmp_path / "c", "prompt=a red square <hypernet:ink:1>", files)
    for seed in (0, 1):
        name = f"images/00_seed{seed}.png"
        assert np.array_equal(pixels(bare / name), pixels(zero / name))
        assert not np.array_equal(pixels(bare / name), pixels(full / name))


def test_embeddings_change_the_image(tmp_path, concepts):
    _, with_cat = generate(tmp_path / "a", "prompt=a photo of <cat-a>", f"concepts=[{concepts['cat']}]")
    _, plain = generate(tmp_path / "b", "prompt=a photo of cat", f"concepts=[{concepts['cat']}]")
    assert not np.array_equal(pixels(with_cat / "images/00_seed0.png"), pixels(plain / "images/00_seed0.png"))


@pytest.mark.slow
def test_a_training_run_directory_is_a_concept(tmp_path):
    run_train(tmp_path / "runs" / "ink", "method=hypernet", "data=styles", "samples.every_n_steps=0")
    record, _ = generate(
        tmp_path, "prompt=a house <hypernet:ink:0.7>", f"concepts=[{tmp_path / 'runs' / 'ink'}]"
    )
    assert [c["file"] for c in record["concepts"]] == [
        str(tmp_path / "runs" / "ink" / "concepts" / "ink.safetensors")
    ]


@pytest.mark.parametrize(
    "prompt,concept,error,match",
    [
        (
            "a <hypernet:nope:1>",
            "ink",
            ConfigError,
            r"<hypernet:nope> is not loaded \(loaded hypernet files: ink\)",
        ),
        (
            "a photo of <dog>",
            "cat",
            ConfigError,
            r"<dog> is used in the prompt but no loaded embedding defines it",
        ),
        ("a <hypernet:ink:strong>", "ink", ConfigError, "malformed multiplier 'strong'"),
    ],
)
def test_bad_prompts_name_the_problem(tmp_path, concepts, prompt, concept, error, match):
    with pytest.raises(error, match=match):
        generate(tmp_path, f"prompt={prompt}", f"concepts=[{concepts[concept]}]")


def test_concept_files_for_another_model_are_refused(tmp_path):
    wide = write_diffusers_embedding(tmp_path / "sd15.safetensors", "<sd15>", torch.zeros(1, 768))
    with pytest.raises(
        ConceptFileError, match="holds 768-wide vectors but this model.s text encoder is 32 wide"
    ):
        generate(tmp_path, "prompt=a <sd15>", f"concepts=[{wide}]")
    hn = hypernetwork_file(tmp_path / "h.pt", "h", sizes=(768, 320))
    with pytest.raises(ConceptFileError, match="trained for another model"):
        generate(tmp_path, "prompt=a <hypernet:h>", f"concepts=[{hn}]")


def test_multipliers_need_a_hypernetwork_in_the_prompt(tmp_path, concepts):
    with pytest.raises(ConfigError, match=r"put one in the prompt \(<hypernet:name>\)"):
        generate(tmp_path, "prompt=a house", "multipliers=[0,1]", f"concepts=[{concepts['ink']}]")


def test_prompt_syntax():
    text, uses = parse_prompt(
        "a castle <hypernet:ink:0.7>, <lora:oil> at <other:x> dusk", ["hypernet", "lora"]
    )
    assert text == "a castle, at <other:x> dusk"
    assert [(u.tag, u.name, u.multiplier) for u in uses] == [("hypernet", "ink", 0.7), ("lora", "oil", 1.0)]
    with pytest.raises(ConfigError, match="not a finite number"):
        parse_prompt("<hypernet:ink:nan>", ["hypernet"])


def test_prompts_with_angle_brackets_reach_hydra_quoted():
    argv = ["prompt=a <x> <hypernet:y:0.5>", "negative_prompt=blurry", "steps=3", "prompt='already quoted'"]
    assert quote_text_overrides(argv) == [
        "prompt='a <x> <hypernet:y:0.5>'", "negative_prompt='blurry'", "steps=3", "prompt='already quoted'"
    ]  # fmt: skip


def toy_scene_files(tmp_path):
    """A toy-world picture (a large blue square on gray, right half) and a mask of its left half."""
    from conceptlab.toyworld.world import Scene, render_image

    init = render_image(Scene("square", "blue", "gray", "large", "plain", x=22.0, y=16.0))
    init.save(tmp_path / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :14] = 255  # white: redraw
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return init, tmp_path / "init.png", tmp_path / "mask.png"


def test_a_masked_edit_redraws_inside_the_mask_and_keeps_the_rest(tmp_path):
    """Blended latent diffusion on the toy world's text-to-image model: inside the mask the prompt's
    object is drawn, outside the picture is the original's, whatever the prompt."""
    init, init_path, mask_path = toy_scene_files(tmp_path)
    edits = {}
    for name, prompt in (("yellow", "a photo of a large yellow circle on a white background"),
                         ("green", "a photo of a small green ring on a black background")):  # fmt: skip
        record, out = generate(tmp_path / name, "model=toy", f"prompt={prompt}", f"init_image={init_path}",
                               f"mask={mask_path}", "steps=10")  # fmt: skip
        edits[name] = pixels(out / "images/00_seed0.png").astype(np.float32)
    assert record["strength"] == 1.0 and record["mask"] == str(mask_path)
    original = np.asarray(init, np.float32)
    for edited in edits.values():
        assert np.array_equal(edited[:, 14:], original[:, 14:])  # black in the mask: kept
        assert np.abs(edited[:, :14] - original[:, :14]).mean() > 20  # white: redrawn
    assert np.abs(edits["yellow"][:, :14] - edits["green"][:, :14]).mean() > 20  # as each prompt says


def test_image_to_image_and_its_bad_input(tmp_path):
    _, init_path, mask_path = toy_scene_files(tmp_path)
    record, out = generate(
        tmp_path, "model=toy", "prompt=a photo of a red circle", f"init_image={init_path}", "strength=0.5"
    )
    assert record["strength"] == 0.5 and record["mask"] is None
    assert Image.open(out / "images/00_seed0.png").size == (32, 32)
    with pytest.raises(ConfigError, match=r"mask= marks what to redraw .*init_image="):
        generate(tmp_path / "a", "model=toy", "prompt=a circle", f"mask={mask_path}")
    with pytest.raises(ConfigError, match=r"init_image=.*nothing.png: no such file"):
        generate(tmp_path / "b", "model=toy", "prompt=a circle", f"init_image={tmp_path / 'nothing.png'}")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="not a readable image"):
        generate(
            tmp_path / "c",
            "model=toy",
            "prompt=a circle",
            f"init_image={init_path}",
            f"mask={tmp_path / 'broken.png'}",
        )


def test_weighted_spans_parse_as_automatic1111_writes_them():
    from conceptlab.prompts import weighted_spans

    assert weighted_spans("a photo of (<cat-a>:1.3) in (soft light:.5), (sic)") == [
        ("a photo of ", 1.0), ("<cat-a>", 1.3), (" in ", 1.0), ("soft light", 0.5), (", (sic)", 1.0)
    ]  # fmt: skip
    assert weighted_spans("no weights (here)") == [("no weights (here)", 1.0)]


def test_a_placeholders_weight_scales_its_own_tokens_context(backbone, concepts):
    from conceptlab.inference import load_concepts

    for concept in load_concepts([str(concepts["cat"])]):
        concept.install(backbone)
    text = concepts_text = "a photo of <cat-a> <cat-a>_1 on a hill"  # the two-vector word as rewritten
    plain = backbone.encode_prompts([text])
    # Weight 1 reads exactly as the plain prompt: the spans are tokenized on word boundaries.
    assert torch.equal(backbone.encode_prompts(["a photo of (<cat-a> <cat-a>_1:1) on a hill"]), plain)
    heavy = backbone.encode_prompts(["a photo of (<cat-a> <cat-a>_1:2) on a hill"])
    ids, weights = backbone.tokenize_weighted("a photo of (<cat-a> <cat-a>_1:2) on a hill")
    assert torch.equal(ids, backbone.tokenize([concepts_text])[0])
    assert weights.tolist().count(2.0) == 2  # the word's two vectors, nothing else
    ratio = heavy[0] / plain[0]
    at_word, elsewhere = ratio[weights == 2.0], ratio[weights == 1.0]
    # AUTOMATIC1111's emphasis: the word's context twice the rest, the whole rescaled by one factor (to
    # its mean, where the context has one: the tiny text encoder's is ~0, so the factor is 1 here).
    assert torch.allclose(at_word, 2 * elsewhere[0], rtol=1e-4) and torch.allclose(elsewhere, elsewhere[0])
    assert heavy.isfinite().all()


def test_generate_py_weighs_a_learned_word(tmp_path, concepts):
    files = f"concepts=[{concepts['cat']}]"
    _, plain = generate(tmp_path / "a", "prompt=a photo of <cat-a>", files)
    _, same = generate(tmp_path / "b", "prompt=a photo of (<cat-a>:1)", files)
    weighted_record, weighted = generate(tmp_path / "c", "prompt=a photo of (<cat-a>:1.6)", files)
    assert weighted_record["text"] == "a photo of (<cat-a>:1.6)"
    name = "images/00_seed0.png"
    assert np.array_equal(pixels(plain / name), pixels(same / name))
    assert not np.array_equal(pixels(plain / name), pixels(weighted / name))
