"""The toy world: the procedural world and its captions, the shipped backbone and judge (model=toy),
the bundled concept sets, judge-based evaluation, and - marked slow - that learning really happens."""

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose, read_summary, run_train, train_subprocess
from PIL import Image

from conceptlab.backbone import load_backbone
from conceptlab.config import EvaluateConfig
from conceptlab.errors import BackboneError, ConfigError
from conceptlab.toyworld import world
from conceptlab.toyworld.checkpoint import FILES, MANIFEST, bundled_checkpoint, load_judge, toy_model_config
from conceptlab.toyworld.concepts import TOY_CONCEPTS, concept_scenes
from conceptlab.toyworld.evaluate import named_attributes, sample_images, score
from conceptlab.toyworld.world import Scene, WorldMix, caption, random_scene, render

TOY = bundled_checkpoint()
EXAMPLES = ROOT / "src" / "conceptlab" / "examples"


def scene(**kw) -> Scene:
    base = dict(shape="circle", colour="red", background="white", size="large", style="plain", x=16.0, y=16.0)
    return Scene(**{**base, **kw})


# ------------------------------------------------------------------------------------------ world


def test_every_shape_draws_a_different_object_and_rendering_is_deterministic():
    images = [render(scene(shape=s)) for s in world.SHAPES]
    assert all(np.array_equal(im, render(scene(shape=s))) for im, s in zip(images, world.SHAPES))
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i].astype(int) - images[j].astype(int)).sum() > 2000, (
                world.SHAPES[i],
                world.SHAPES[j],
            )
    red = render(scene())
    assert tuple(red[16, 16]) == world.COLOURS["red"] and tuple(red[0, 0]) == world.BACKGROUNDS["white"]
    # Anti-aliased: the edge of a circle has pixels between the two colours.
    assert len({tuple(p) for p in red.reshape(-1, 3)}) > 4


def test_styles_transform_the_whole_image_as_specified():
    plain = render(scene(background="gray")).astype(float)
    pastel = render(scene(background="gray", style="pastel")).astype(float)
    assert np.abs(pastel - (plain * 0.45 + 255 * 0.55)).max() <= 1
    framed = render(scene(style="framed"))
    assert (framed[:3] == world.GOLD).all() and (framed[:, -3:] == world.GOLD).all()
    striped = render(scene(background="white", style="striped"))
    assert tuple(striped[0, 0]) == (255, 255, 255) and tuple(striped[2, 0]) == (128, 128, 128)
    outline = render(scene(style="outline"))
    assert tuple(outline[16, 16]) == world.BACKGROUNDS["white"]  # the inside is gone, the rim stays
    assert (outline == world.COLOURS["red"]).all(axis=2).sum() > 20


def test_captions_follow_the_grammar_and_never_name_the_hidden_attributes():
    assert caption(scene(style="striped")) == "a large red circle on a white background, striped style"
    assert caption(scene(shape="star", style="checkered")) == "a large red shape on a white background"
    rng = random.Random(0)
    mix = WorldMix()
    texts = [caption(random_scene(rng, mix), rng, mix) for _ in range(3000)]
    assert 0.07 < texts.count("") / len(texts) < 0.13  # classifier-free guidance's empty captions
    words = " ".join(texts).split()
    assert "star" not in words and "checkered" not in words and "pastel" not in words
    generic = sum(t.split(",")[0].endswith(" shape") or " shape on " in t for t in texts)
    assert generic > 0.15 * len(texts)  # "shape" instead of a name (and for every star)
    assert any(t.startswith("a photo of a ") for t in texts) and any(t.startswith("a ") for t in texts)


def test_pretraining_never_shows_the_moon_or_pastel_and_draws_mostly_large_objects():
    rng = random.Random(1)
    scenes = [random_scene(rng) for _ in range(3000)]
    assert not {s.shape for s in scenes} & {"moon"} and not {s.style for s in scenes} & {"pastel"}
    assert {s.shape for s in scenes} == set(world.PRETRAIN_SHAPES)
    assert 0.77 < sum(s.size == "large" for s in scenes) / len(scenes) < 0.83
    margin = {size: radius + 4 for size, radius in world.SIZES.items()}  # inside a frame's border
    assert all(
        margin[s.size] <= min(s.x, s.y, world.RESOLUTION - s.x, world.RESOLUTION - s.y) for s in scenes
    )


def test_bundled_toy_sets_are_the_world_drawn_deterministically():
    for name, concept in TOY_CONCEPTS.items():
        scenes = concept_scenes(name)
        assert len(scenes) == concept.count
        assert all(getattr(s, a) == v for s in scenes for a, v in concept.truth.items())
        for i, s in enumerate(scenes):
            shipped = np.asarray(Image.open(EXAMPLES / name / f"{i:02d}.png").convert("RGB"))
            assert np.array_equal(shipped, render(s)), (
                f"{name}/{i:02d}.png differs: run scripts/make_examples.py"
            )
    assert len({s.shape for s in concept_scenes("toy_combo")}) == 5
    caption_text = (EXAMPLES / "toy_pastel" / "00.txt").read_text()
    assert "pastel" not in caption_text and "background" in caption_text


def test_toy_templates_speak_the_worlds_grammar():
    from conceptlab.data import fill_template, load_templates

    caption_text = (EXAMPLES / "toy_pastel" / "00.txt").read_text().strip()
    styles = [
        fill_template(t, "<toy_pastel>", caption_text)
        for t in load_templates("pkg://conceptlab.toyworld/templates/toy_style.txt")
    ]
    assert f"a photo of {caption_text}, <toy_pastel> style" in styles
    assert f"{caption_text}, <toy_pastel> style" in styles
    objects = [
        fill_template(t, "<toy_combo>", "")
        for t in load_templates("pkg://conceptlab.toyworld/templates/toy_object.txt")
    ]
    assert "a photo of a <toy_combo>" in objects and "a <toy_combo>" in objects
    assert {w for t in objects for w in t.split()} <= set(" ".join(world.PREFIXES).split()) | {
        "a",
        "<toy_combo>",
    }


def test_data_objects_and_styles_resolve_to_toy_sets_on_the_toy_model():
    assert compose(["model=toy"]).data.path == "bundled:toy_combo"
    assert compose(["model=toy", "data=styles"]).data.path == "bundled:toy_pastel"
    assert compose(["model=tiny"]).data.path == "bundled:robot"
    assert compose(["model=tiny", "data=toy_pastel"]).data.path == "bundled:toy_pastel"
    cfg = compose(["model=toy", "method=ti"])
    assert cfg.method.initializer_token == "shape"
    assert compose(["model=toy", "trainer=gpu"]).trainer.max_steps == 3000  # an explicit trainer wins
    assert compose(["model=toy", "method=hypernet"]).trainer.max_steps == 800  # the toy recipe
    assert compose([]).model.name == "toy"  # the default of `python train.py`


def test_toy_concept_sets_name_only_the_worlds_attributes():
    from conceptlab.toyworld.concepts import toy_concept_of

    for concept in TOY_CONCEPTS.values():
        assert all(value in world.ATTRIBUTES[attribute] for attribute, value in concept.truth.items())
        assert concept.prompts and all("{}" in p for p in concept.prompts)
    assert toy_concept_of("bundled:toy_combo")[0] == "toy_combo"
    assert toy_concept_of("bundled:robot") is None and toy_concept_of("/home/me/toy_combo") is None


@pytest.mark.slow
def test_a_users_own_folder_on_the_toy_model_trains_without_a_concept_score(tmp_path):
    """The judge's truth belongs to the world's concept sets, not to the model: it scores only those."""
    proc, [run_dir] = train_subprocess(
        tmp_path, "model=toy", "data.path=bundled:robot", "trainer.max_steps=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("is not one of the toy world's concept sets") == 1
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["resolution"] == 32
    assert not [
        k for k in summary["metrics"] if k.startswith("judge")
    ]  # the similarity metrics still score it
    assert -1 <= summary["metrics"]["metrics/clip_i"] <= 1


# ------------------------------------------------------------------------------------- evaluation


def test_prompts_name_the_attributes_the_judge_checks():
    assert named_attributes("a photo of a large red circle on a gray background, striped style") == {
        "shape": "circle", "colour": "red", "size": "large", "background": "gray", "style": "striped",
    }  # fmt: skip
    assert named_attributes("a photo of a {}") == {}
    assert named_attributes("a {} on a black background, {} style") == {"background": "black"}


class ReadsGiven:
    """A judge that reads what it is told to, to check the scoring arithmetic."""

    def __init__(self, reads):
        self.reads = reads

    def read(self, images):
        return self.reads


def test_scores_separate_the_concept_from_what_the_prompt_asks():
    prompts = ["a photo of a {}", "a large {} circle"]
    reads = {
        "colour": ["purple", "purple", "purple", "red"],
        "background": ["gray"] * 4,
        "style": ["striped", "plain", "striped", "striped"],
        "shape": ["square", "ring", "circle", "square"],
        "size": ["large", "large", "large", "small"],
    }
    truth = {"colour": "purple", "background": "gray", "style": "striped"}
    scores = score(ReadsGiven(reads), torch.zeros(4, 3, 32, 32), prompts, truth)
    assert scores.concept == 0.5  # images 0 and 2 have all three
    assert scores.concept_by_attribute == {"colour": 0.75, "background": 1.0, "style": 0.75}
    assert scores.prompt_by_attribute == {"shape": 0.5, "size": 0.5}  # only the second prompt names them
    assert scores.prompt == 0.5
    with pytest.raises(ValueError, match="not in the toy world"):
        score(ReadsGiven(reads), torch.zeros(4, 3, 32, 32), prompts, {"colour": "teal"})


# ------------------------------------------------------------------------------ shipped checkpoint


def test_the_shipped_checkpoint_is_small_fp16_and_loads_like_any_diffusers_folder():
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    size = sum(p.stat().st_size for p in TOY.rglob("*") if p.is_file())
    assert size <= 25 * 2**20
    with safe_open(TOY / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    backbone = load_backbone(compose(["model=toy"]).model)
    assert backbone.native_resolution == 32 and backbone.context_dim == 64 and backbone.vae_scale_factor == 4
    assert backbone.unet.dtype == backbone.text_encoder.dtype == torch.float32  # one dtype for all parts
    pipe = StableDiffusionPipeline.from_pretrained(TOY, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.sample_size == 8
    results = json.loads((TOY / "results.json").read_text())
    assert set(results["caption_following"]) >= {"shape_large", "colour", "style", "background"}


def test_the_judge_reads_the_world_through_the_vae():
    backbone = load_backbone(toy_model_config(TOY))
    judge = load_judge(TOY)
    rng = random.Random(5)
    mix = WorldMix(p_large=1.0, shapes=world.SHAPES, styles=world.STYLES)
    scenes = [random_scene(rng, mix) for _ in range(96)]
    x = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        vae = backbone.vae
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    read = judge.read(recon)
    for attribute, floor in (("shape", 0.85), ("colour", 0.9), ("style", 0.85), ("background", 0.95)):
        accuracy = np.mean([read[attribute][i] == getattr(s, attribute) for i, s in enumerate(scenes)])
        assert accuracy >= floor, (attribute, accuracy)
    with pytest.raises(ConfigError, match="reads 32x32 images of the toy world, got \\(64, 64\\)"):
        judge(torch.zeros(1, 3, 64, 64))


@pytest.fixture
def toy_copy(tmp_path) -> Path:
    return Path(shutil.copytree(TOY, tmp_path / "toy"))


def test_a_toy_folder_missing_a_part_or_of_another_version_is_refused(tmp_path, toy_copy):
    (toy_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BackboneError, match=r"missing unet/diffusion_pytorch_model.safetensors; rebuild it with "
                       r"`python scripts/pretrain_toyworld.py --out .*toy`"):  # fmt: skip
        load_backbone(toy_model_config(toy_copy))
    proc, _ = train_subprocess(tmp_path, "model=toy", f"model.path={toy_copy}", fast=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: toy-world checkpoint")
    manifest = json.loads((TOY / MANIFEST).read_text())
    (toy_copy / MANIFEST).write_text(json.dumps({**manifest, "version": 999}))
    with pytest.raises(
        BackboneError, match="says toy-world version 999, but this conceptlab draws version 1"
    ):
        load_backbone(toy_model_config(toy_copy))
    (toy_copy / MANIFEST).unlink()
    with pytest.raises(BackboneError, match="toyworld.json is missing"):
        load_backbone(toy_model_config(toy_copy))
    assert "judge/diffusion_pytorch_model.safetensors" in FILES


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["data.resolution=64"], "data.resolution=64: the toy world is drawn at 32x32"),
    ],
)
def test_bad_toy_settings_fail_before_training(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        run_train(tmp_path / "run", "model=toy", *overrides)
    assert (
        read_summary(tmp_path / "run")["status"] == "failed"
        and not (tmp_path / "run" / "checkpoints").exists()
    )


@pytest.mark.slow
def test_judge_scores_reach_metrics_summary_and_report(tmp_path):
    from conceptlab.report import collect, write_report

    run_dir = tmp_path / "runs" / "run"
    run_train(run_dir, "model=toy", "method=hypernet", "data=toy_pastel", "evaluate.every_n_steps=2")
    summary = read_summary(run_dir)
    judge = summary["metrics"]
    assert judge["step"] == 4
    # the run's best step is chosen by the best evidence it has: the judge's score, not CLIP-I
    assert summary["evidence"] == ["judge/concept", "metrics/clip_i"]
    assert summary["best"]["metric"] == "judge/concept"
    assert summary["best"]["value"] == max(float(r["judge/concept"]) for r in _judge_rows(run_dir))
    for prefix in ("judge/", "judge_m0.5/", "judge_m0/"):
        assert {
            f"{prefix}concept",
            f"{prefix}concept_style",
            f"{prefix}prompt",
            f"{prefix}prompt_shape",
        } <= set(judge)
    rows = _judge_rows(run_dir)
    assert [r["step"] for r in rows] == ["0", "2", "4"]  # step 0, every 2 steps, the end (not twice)
    # Every multiplier at the start and the end; in between only 1.0.
    assert [bool(r["judge_m0/concept"]) for r in rows] == [True, False, True]
    sweep = collect(run_dir.parent)
    assert sweep.runs.loc[0, "judge/concept_style"] == judge["judge/concept_style"]
    report = write_report(sweep, tmp_path / "report")
    assert "judge_m0/prompt" in report.read_text()
    assert (tmp_path / "report" / "plots" / "methods_judge_concept.png").is_file()


def test_multiplier_zero_samples_are_the_bare_models(tmp_path):
    from hydra.utils import instantiate

    cfg = compose(["model=toy", "method=hypernet", "data=toy_pastel"])
    evaluate = EvaluateConfig(num_samples=2, num_inference_steps=3)
    bare = load_backbone(cfg.model)
    texts = [p.replace("{}", "toy_pastel") for p in TOY_CONCEPTS["toy_pastel"].prompts[:1]]
    reference = sample_images(bare, texts, [0, 1], 3, evaluate.guidance_scale)
    backbone = load_backbone(cfg.model)
    method = instantiate(cfg.method, concept="toy_pastel")
    method.attach(backbone)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.5)  # a hypernetwork that changes a lot at multiplier 1
    method.eval()
    with method.at_multiplier(0.0):
        assert torch.equal(sample_images(backbone, texts, [0, 1], 3, evaluate.guidance_scale), reference)
    assert not torch.equal(sample_images(backbone, texts, [0, 1], 3, evaluate.guidance_scale), reference)


# ---------------------------------------------------------------------- learning (regression, slow)


@pytest.mark.slow
def test_caption_following_of_the_shipped_checkpoint_meets_its_targets():
    from conceptlab.toyworld.pretrain import PretrainConfig, caption_following

    results = caption_following(TOY, PretrainConfig())
    accuracy = results["caption_following"]
    assert accuracy["shape_large"] >= 0.85 and accuracy["colour"] >= 0.90 and accuracy["style"] >= 0.90, (
        accuracy
    )


@pytest.mark.slow
def test_textual_inversion_learns_the_attribute_combination(tmp_path):
    """`python train.py method=ti data=toy_combo` as the README says: the concept from <=0.1 to >=0.8,
    budgeted by steps (half the recipe's 200: the concept is learned by step 100, measured 0.00 -> 1.00),
    and CLIP-I (the toy world's CLIP) rises with it."""
    proc, [run_dir] = train_subprocess(
        tmp_path, "method=ti", "data=toy_combo", "logger=csv", "trainer.enable_progress_bar=false",
        "trainer.max_steps=100", "samples.every_n_steps=0", "evaluate.num_samples=8", fast=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in _judge_rows(run_dir) if r["judge/concept"] != ""]
    assert rows[0]["step"] == "0" and float(rows[0]["judge/concept"]) <= 0.1
    summary = read_summary(run_dir)
    assert summary["metrics"]["judge/concept"] >= 0.8
    # ... and the toy world's CLIP agrees: CLIP-I of its samples against the concept's images rises
    start, end = summary["metrics_at_start"], summary["metrics"]
    assert end["metrics/recon_clip_i"] > start["metrics/recon_clip_i"] + 0.02, (start, end)
    assert end["metrics/clip_i"] > start["metrics/clip_i"], (start, end)


@pytest.mark.slow
def test_hypernetwork_learns_the_unseen_style_and_is_the_bare_model_at_zero(tmp_path):
    """The recipe's 800 steps (at 400 the style is 0.28-0.41 from run to run: too close to the goal)."""
    proc, [run_dir] = train_subprocess(
        tmp_path, "method=hypernet", "data=toy_pastel", "logger=csv", "trainer.enable_progress_bar=false",
        # No cache: the bare model's scores after training are computed again, not read as step 0's.
        "evaluate.every_n_steps=800", "evaluate.cache=false", "samples.every_n_steps=0",
        "evaluate.multipliers=[1.0,0.0]", "evaluate.num_samples=8", fast=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    judge = read_summary(run_dir)["metrics"]
    assert judge["judge/concept_style"] >= 0.3
    rows = [r for r in _judge_rows(run_dir) if r["judge_m0/concept"] != ""]
    first, last = rows[0], rows[-1]
    # At multiplier 0 every evaluation (before and after training) is the bare model's.
    assert all(first[k] == last[k] for k in first if k.startswith("judge_m0/"))
    assert float(last["judge_m0/concept_style"]) <= 0.1
    assert "judge/prompt_shape" in judge and "judge/prompt_colour" in judge  # the cost, reported


@pytest.mark.slow
def test_lora_learns_the_attribute_combination_and_is_the_bare_model_at_zero(tmp_path):
    """`method=lora` on the toy world's object set (its recipe: lr 1e-3), budgeted by steps."""
    proc, [run_dir] = train_subprocess(
        tmp_path, "method=lora", "data=toy_combo", "logger=csv", "trainer.enable_progress_bar=false",
        "trainer.max_steps=150", "evaluate.every_n_steps=0", "evaluate.num_samples=8", "samples.every_n_steps=0",
        "evaluate.cache=false",  # the bare model's scores computed, not read
        fast=False, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_summary(run_dir)["metrics"]
    assert metrics["judge/concept"] >= 0.5 and metrics["judge_m0/concept"] <= 0.1


def _judge_rows(run_dir: Path) -> list[dict]:
    import csv

    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if any(k.startswith("judge") and r[k] for k in r)]


@pytest.mark.slow
def test_pretraining_runs_every_stage_and_resumes(tmp_path):
    args = [sys.executable, str(ROOT / "scripts" / "pretrain_toyworld.py"), "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work"), "--pool-size", "64", "--judge-pool-size", "64", "--vae-steps", "3",
            "--judge-steps", "3", "--unet-batch", "8", "--checkpoint-every", "2", "--eval-scenes", "2",
            "--clip-steps", "2", "--clip-batch", "8"]  # fmt: skip
    first = subprocess.run([*args, "--unet-steps", "2"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(tmp_path / "work" / "unet_state.pt", weights_only=True)
    assert state["step"] == 2
    again = subprocess.run([*args, "--unet-steps", "4"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "render" not in again.stderr and "vae:" not in again.stderr  # finished stages are not redone
    assert "clip:" not in again.stderr
    assert "unet+text:  50%" in again.stderr  # continued from step 2 of 4
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["steps"] == 4
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["samples"] == 2 and set(results["caption_following"]) >= {"colour", "background"}
    load_backbone(toy_model_config(tmp_path / "out"))
    # the toy CLIP is part of the folder, and loads as the metrics load any CLIP
    from conceptlab.metrics import Encoders

    assert Encoders(str(tmp_path / "out" / "clip"), None).clip.config.vision_config.image_size == 32
    assert set(json.loads((tmp_path / "out" / "clip" / "retrieval.json").read_text())) >= {"caption", "style"}

    # An SDXL-shaped toy on the same world, reusing that folder's VAE, judge and CLIP (nothing else trains).
    xl = [*args[:2], "--out", str(tmp_path / "xl"), "--work", str(tmp_path / "xl_work"), *args[6:], "--unet-steps", "2",
          "--family", "sdxl", "--reuse", str(tmp_path / "out"), "--pack", str(tmp_path / "xl_packed")]  # fmt: skip
    made = subprocess.run(xl, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    # ... and packed as conceptlab ships model=toy_xl, measured again unpacked
    packed = json.loads((tmp_path / "xl_packed" / MANIFEST).read_text())["packed"]
    assert packed["shared"] == "out" and (tmp_path / "xl_packed" / "vocabulary.safetensors").is_file()
    assert json.loads((tmp_path / "xl_packed" / "results.json").read_text())["packed"]["samples"] == 2
    assert "vae:" not in made.stderr and "judge:" not in made.stderr and "clip:" not in made.stderr
    assert json.loads((tmp_path / "xl" / MANIFEST).read_text())["family"] == "sdxl"
    backbone = load_backbone(toy_model_config(tmp_path / "xl"))
    assert backbone.is_xl and backbone.text_widths == [64, 96]
    assert json.loads((tmp_path / "xl" / "results.json").read_text())["samples"] == 2


# ------------------------------------------------------------------------------ the SDXL-shaped toy


def test_the_sdxl_shaped_toy_ships_packed_and_is_made_whole_once_in_the_cache(tmp_path):
    """model=toy_xl: ~15 MB in the package; unpacked once into the cache (the same files in any cache),
    a toy folder like model=toy's that holds the packed vocabulary rows, the SD-1 toy's VAE and judge."""
    from safetensors.torch import load_file

    from conceptlab.config import ModelConfig
    from conceptlab.toyworld.checkpoint import VOCABULARY, check_toy_folder, unpack_toy_folder

    packed = TOY.parent / "checkpoint_xl"
    assert sum(p.stat().st_size for p in packed.rglob("*") if p.is_file()) <= 25 * 2**20
    cfg = compose(["model=toy_xl"]).model
    backbone = load_backbone(cfg)
    folder = Path(backbone.path)
    assert folder.name.startswith("toy_xl-v1-") and folder != packed
    assert check_toy_folder(folder)["family"] == "sdxl" and backbone.is_xl and backbone.context_dim == 160
    assert backbone.native_resolution == 32 and backbone.text_widths == [64, 96]
    vocabulary = load_file(packed / VOCABULARY)
    for part in ("text_encoder", "text_encoder_2"):
        table = getattr(backbone, part).get_input_embeddings().weight
        assert torch.equal(table[vocabulary[f"{part}.ids"]].half(), vocabulary[f"{part}.rows"])
    # the world's words and special tokens ("!" pads SDXL's second tokenizer) are among the kept rows
    words = backbone.tokenizer("a red circle", add_special_tokens=True).input_ids
    assert set(words) <= set(vocabulary["text_encoder.ids"].tolist())
    assert 0 in vocabulary["text_encoder_2.ids"].tolist()
    for part in ("vae", "judge"):  # the SD-1 toy's, by reference
        ours = load_file(folder / part / "diffusion_pytorch_model.safetensors")
        shipped = load_file(TOY / part / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(ours[k], shipped[k]) for k in shipped)
    # made once: loading again reads the same folder; another cache gets the same bytes
    stamp = (folder / "text_encoder_2" / "model.safetensors").stat().st_mtime_ns
    assert unpack_toy_folder(packed, cfg) == folder
    assert (folder / "text_encoder_2" / "model.safetensors").stat().st_mtime_ns == stamp
    again = unpack_toy_folder(packed, ModelConfig(cache_dir=str(tmp_path / "cache")))
    for name in ("text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                 "unet/diffusion_pytorch_model.safetensors"):  # fmt: skip
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    results = json.loads((packed / "results.json").read_text())["packed"]["caption_following"]
    assert results["shape_large"] >= 0.85 and results["colour"] >= 0.90 and results["style"] >= 0.90


def test_a_toy_xl_run_trains_and_the_judge_scores_it(tmp_path):
    """`python train.py model=toy_xl`: the toy world's configs (its concept set, judge, recipe) as on
    model=toy."""
    summary = run_train(tmp_path / "run", "model=toy_xl", "method=ti", "trainer.max_steps=2",
                        "evaluate.num_samples=2", "samples.every_n_steps=0")  # fmt: skip
    assert (
        summary["status"] == "completed"
        and summary["model"] == "toy_xl"
        and summary["concept"] == "toy_combo"
    )
    assert "judge/concept" in summary["metrics"]
    assert compose(["model=toy_xl", "method=ti"]).method.lr == compose(["model=toy", "method=ti"]).method.lr
    # ... and generate.py draws with the word as train.py's hint spells it (the file holds clip_l/clip_g)
    from test_lora import generate

    record, out = generate(tmp_path, "model=toy_xl", "seeds=[0]", "prompt=a photo of a <toy_combo>",
                           f"concepts=[{tmp_path / 'run'}]")  # fmt: skip
    assert (out / record["images"][0]).is_file()


def test_packing_keeps_the_vocabulary_rows_pretraining_moved_and_refuses_another_vae(tmp_path):
    """scripts/pretrain_toyworld.py --pack on a stand-in for a pretrained SDXL-shaped toy (its weights
    at their start, decayed, and three rows moved): the packed form keeps exactly those rows."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from conceptlab.backbone import save_sd_folder
    from conceptlab.config import ModelConfig
    from conceptlab.toyworld.checkpoint import VOCABULARY, unpack_toy_folder, write_manifest
    from conceptlab.toyworld.pretrain import build_unet_and_text_encoders, pack_toy_folder

    unet, encoders = build_unet_and_text_encoders(0, "sdxl")
    moved = [5, 320, 49407]
    with torch.no_grad():
        for encoder in encoders:
            table = encoder.get_input_embeddings().weight
            table.mul_(0.98)
            table[moved] += 0.1
    vae = AutoencoderKL.from_pretrained(TOY / "vae", torch_dtype=torch.float16)
    folder = tmp_path / "pretrained"
    save_sd_folder(folder, encoders[0].half(), vae, unet.half(), encoders[1].half())
    for part in ("judge", "clip"):
        shutil.copytree(TOY / part, folder / part)
    write_manifest(folder, {"steps": 0, "seed": 0, "family": "sdxl"})
    packed = pack_toy_folder(folder, tmp_path / "packed", TOY, seed=0)
    vocabulary = load_file(packed / VOCABULARY)
    assert vocabulary["text_encoder.ids"].tolist() == vocabulary["text_encoder_2.ids"].tolist() == moved
    whole = unpack_toy_folder(packed, ModelConfig(cache_dir=str(tmp_path / "cache")))
    for part in ("text_encoder", "text_encoder_2"):
        original = load_file(folder / part / "model.safetensors")
        rebuilt = load_file(whole / part / "model.safetensors")
        key = next(name for name in original if name.endswith("token_embedding.weight"))
        assert torch.equal(rebuilt[key][moved], original[key][moved])
        assert all(torch.equal(rebuilt[name], original[name]) for name in original if name != key)
        others = rebuilt[key].float()[:5]  # drawn again at the spread the untouched rows had
        assert not torch.equal(others, original[key].float()[:5])
        assert abs(rebuilt[key].float()[:1000].std() - original[key].float()[:1000].std()) < 2e-3
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    weights = load_file(other / "vae" / "diffusion_pytorch_model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in weights.items()}, other / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(
        ValueError, match=r"--pack: .*other/vae is not .*checkpoint/vae; pretrain with --reuse"
    ):
        pack_toy_folder(other, tmp_path / "packed2", TOY, seed=0)
    assert not (tmp_path / "packed2").exists()
    # the script refuses --pack without an SDXL shape and a toy to take the VAE from, before any stage
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_toyworld.py"), "--pack", str(tmp_path / "p"),
                           "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: --pack writes an SDXL"
    )
    assert not (tmp_path / "w").exists()
