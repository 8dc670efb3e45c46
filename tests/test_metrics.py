"""Similarity metrics (CLIP-I, DINO, CLIP-T, CLIPScore), the evaluation protocol, evaluation during
training (best step, kept concepts) and evaluate.py; encoders are tiny models saved and loaded through
the real path, or the toy world's trained CLIP. No network."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from conftest import DREAMBOOTH, ROOT, compose, run_train

TOY_CLIP = "pkg://conceptlab.toyworld/checkpoint/clip"


def toy_image(**fixed):
    from conceptlab.toyworld.world import random_scene, render_image

    return render_image(random_scene(random.Random(str(sorted(fixed.items()))), **fixed))


@pytest.fixture(scope="module")
def toy_clip():
    from conceptlab.metrics import Encoders

    return Encoders(TOY_CLIP, None)


def test_identical_images_score_one(tiny_encoders):
    from conceptlab.metrics import Encoders, score_images

    encoders = Encoders(tiny_encoders["clip"], tiny_encoders["dino"])
    images = [toy_image(shape="circle", colour="red"), toy_image(shape="square", colour="blue")]
    for image in images:
        scores = score_images(encoders, [image], encoders.image_features([image]))
        assert scores.values["clip_i"] == pytest.approx([1.0], abs=1e-5)
        assert scores.values["dino"] == pytest.approx([1.0], abs=1e-5)
    described = encoders.describe()
    assert described["clip"] == tiny_encoders["clip"] and len(described["dino_weights"]) == 16


def test_dinov2_is_selectable(tmp_path):
    """DINOv2 (transformers' Dinov2Model, its [CLS] token) loads from a folder like facebook/dinov2-small."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from conceptlab.metrics import Encoders, score_images

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "dinov2"
    )
    encoders = Encoders(None, str(tmp_path / "dinov2"))
    assert type(encoders.dino).__name__ == "Dinov2Model"
    image, other = toy_image(shape="ring", colour="blue"), toy_image(shape="cross", colour="orange")
    scores = score_images(encoders, [image, other], encoders.image_features([image]))
    assert scores.values["dino"][0] == pytest.approx(1.0, abs=1e-5) and scores.values["dino"][1] < 1 - 1e-4
    assert "clip_t" not in score_images(encoders, [image], texts=["a ring"]).values  # no CLIP, no CLIP-T


def test_related_images_score_higher_than_unrelated(toy_clip):
    """The same object placed elsewhere is nearer its first picture than an object that differs in every
    attribute (the toy CLIP has seen the whole world)."""
    from dataclasses import replace

    from conceptlab.metrics import score_images
    from conceptlab.toyworld.world import place, random_scene, render_image

    rng = random.Random(0)
    for _ in range(4):
        scene = random_scene(rng)
        other = replace(
            scene, shape="moon" if scene.shape != "moon" else "circle",
            colour="green" if scene.colour != "green" else "red",
            background="black" if scene.background != "black" else "white",
            style="pastel" if scene.style != "pastel" else "plain",
        )  # fmt: skip
        real = toy_clip.image_features([render_image(scene)])
        related, unrelated = render_image(place(scene, rng)), render_image(place(other, rng))
        near, far = score_images(toy_clip, [related, unrelated], real).values["clip_i"]
        assert near > far + 0.1


def test_clip_t_prefers_the_matching_prompt(toy_clip):
    from conceptlab.metrics import score_images

    image = toy_image(shape="circle", colour="red", background="white", size="large", style="plain")
    match = "a large red circle on a white background"
    other = "a small blue square on a black background"
    scores = score_images(toy_clip, [image, image], texts=[match, other]).values
    assert scores["clip_t"][0] > scores["clip_t"][1]
    assert scores["clipscore"][0] == pytest.approx(2.5 * max(scores["clip_t"][0], 0))


def test_clipscore_agrees_with_torchmetrics(toy_clip):
    """CLIPScore = 2.5 max(cos, 0); torchmetrics' CLIPScore (100 max(cos, 0)) on the same model agrees."""
    import numpy as np
    from torchmetrics.multimodal.clip_score import CLIPScore

    from conceptlab.metrics import score_images

    image = toy_image(shape="triangle", colour="yellow", background="gray", size="large", style="plain")
    text = "a large yellow triangle on a gray background"
    ours = score_images(toy_clip, [image], texts=[text]).values["clipscore"][0]

    class Features(torch.nn.Module):
        """transformers 5's get_*_features return model outputs; torchmetrics 1.9 expects the tensors."""

        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def get_image_features(self, *args, **kwargs):
            return self.model.get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return self.model.get_text_features(*args, **kwargs).pooler_output

    # torchmetrics builds its own model only from hub ids it knows; it takes the same folder's model this way
    reference = CLIPScore(model_name_or_path=lambda: (Features(toy_clip.clip), toy_clip.clip_processor))
    value = reference(torch.from_numpy(np.asarray(image)).permute(2, 0, 1), text).item()
    assert ours > 0 and ours == pytest.approx(value / 100 * 2.5, abs=2e-3)


def test_an_encoder_that_cannot_load_is_named(tmp_path):
    from conceptlab.errors import ConfigError
    from conceptlab.metrics import Encoders

    with pytest.raises(ConfigError, match=r"encoders\.dino=.*nowhere.*save_pretrained"):
        Encoders(None, str(tmp_path / "nowhere"))


def test_prompts_name_the_class_and_leave_the_concept_out_for_clip_t():
    from conceptlab.evaluate import build_prompts

    protocol = compose(["model=sd15"]).protocol
    assert protocol.name == "dreambooth" and len(protocol.live.editing) == 25
    ti = build_prompts(protocol.live, "<my-dog>", "dog")
    assert ti[0].text == "a photo of <my-dog> dog" and ti[0].set == "reconstruction"
    assert ti[1].text == "a <my-dog> dog in the jungle" and ti[1].plain == "a dog in the jungle"
    hypernet = build_prompts(protocol.live, "", "dog", tags="<hypernet:x:0.5>", limit=2)
    assert [p.text for p in hypernet] == [
        "a photo of dog <hypernet:x:0.5>", "a dog in the jungle <hypernet:x:0.5>", "a dog in the snow <hypernet:x:0.5>",
    ]  # fmt: skip
    style = build_prompts(compose(["data=toy_pastel"]).protocol.style, "<toy_pastel>", "pastel")
    assert style[1].text.endswith(", <toy_pastel> pastel style") and style[1].plain.endswith(", pastel style")


@pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason="../shared/datasets/dreambooth is absent")
def test_class_and_kind_come_from_the_dreambooth_folder(tiny_encoders):
    from conceptlab.data import concept_class
    from conceptlab.evaluate import Scorer, real_images
    from conceptlab.metrics import Encoders

    data = compose([f"data.path={DREAMBOOTH / 'dog'}"]).data
    assert concept_class(data) == ("dog", "live")
    # real JPEGs, far larger than the encoders' input, go through the encoders' own processors
    photos = real_images(data)
    assert min(p.size[0] for p in photos) > 32
    scorer = Scorer(Encoders(tiny_encoders["clip"], tiny_encoders["dino"]), photos)
    assert scorer.real["clip"].shape[0] == scorer.real["dino"].shape[0] == len(photos)
    data = compose([f"data.path={DREAMBOOTH / 'backpack_dog'}"]).data
    assert concept_class(data) == ("backpack", "object")
    data = compose([f"data.path={DREAMBOOTH / 'dog'}", "data.class_word=puppy", "data.kind=object"]).data
    assert concept_class(data) == ("puppy", "object")
    assert concept_class(compose(["model=tiny", "data=styles"]).data) == ("", "style")
    assert concept_class(compose(["data=styles"]).data) == ("pastel", "style")  # the toy world's set


def test_a_run_whose_encoder_cannot_load_fails_before_the_backbone_loads(tmp_path, monkeypatch):
    from conceptlab import train
    from conceptlab.errors import ConfigError

    monkeypatch.setattr(train, "load_backbone", lambda *a, **k: pytest.fail("the backbone was loaded"))
    with pytest.raises(ConfigError, match=r"encoders\.clip=.*missing-clip"):
        run_train(tmp_path / "run", "evaluators=metrics", f"encoders.clip={tmp_path / 'missing-clip'}")


def test_an_unknown_kind_is_named():
    from conceptlab.data import concept_class
    from conceptlab.errors import ConceptDataError

    with pytest.raises(ConceptDataError, match="data.kind='animal': use object, live or style"):
        concept_class(compose(["data.kind=animal"]).data)
    assert concept_class(compose(["data.class_word=robot"]).data) == ("robot", "object")


def metric_overrides(encoders: dict[str, str]) -> list[str]:
    return [
        "evaluators=metrics", f"encoders.clip={encoders['clip']}", f"encoders.dino={encoders['dino']}",
        "evaluate.every_n_steps=2", "evaluate.best=metrics/dino",
    ]  # fmt: skip


def test_training_keeps_the_concept_at_each_evaluation_and_names_the_best(tmp_path, tiny_encoders):
    from conceptlab.errors import ConfigError
    from conceptlab.inference import load_concepts

    run_dir = tmp_path / "run"
    summary = run_train(run_dir, *metric_overrides(tiny_encoders))
    assert summary["status"] == "completed"
    for key in (
        "metrics/clip_i",
        "metrics/dino",
        "metrics/clip_t",
        "metrics/recon_clip_i",
        "metrics/recon_dino",
    ):
        assert -1 <= summary["metrics"][key] <= 1 and key in summary["metrics_at_start"]
    kept = sorted(p.name for p in (run_dir / "concepts" / "steps").iterdir())
    assert kept == ["step_000000", "step_000002", "step_000004"]
    best = summary["best"]
    assert best["metric"] == "metrics/dino" and best["step"] in (0, 2, 4)
    assert (run_dir / best["concepts"] / "robot.safetensors").is_file()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "metrics/clip_t" in header and "metrics/dino" in header
    # generate.py's concept syntax: <run>@best and <run>@step=N
    [concept] = load_concepts([f"{run_dir}@best"])
    assert concept.path.parent == run_dir / best["concepts"]
    [concept] = load_concepts([f"{run_dir}@step=2"])
    assert concept.path.parent.name == "step_000002"
    with pytest.raises(ConfigError, match="kept no concept at step 3 .*kept: 0, 2, 4"):
        load_concepts([f"{run_dir}@step=3"])
    # the best step travels in the checkpoint: a resumed run keeps comparing with it
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    [state] = [v for k, v in checkpoint["callbacks"].items() if k.startswith("MetricEvaluation")]
    assert state["best"] == best
    # the final files are what concepts=[run] loads, not the kept steps
    assert all("steps" not in f for f in summary["files"]["concepts"])


def test_evaluate_resumes_with_the_images_it_made(tmp_path, tiny_encoders, monkeypatch):
    from conceptlab.backbone import Backbone
    from conceptlab.evaluate import evaluate_concepts

    run_dir = tmp_path / "run"
    run_train(run_dir, "method=hypernet", "evaluate.enabled=false")
    cfg = compose(["model=tiny", "data.class_word=toy", f"encoders.clip={tiny_encoders['clip']}", f"encoders.dino={tiny_encoders['dino']}",
                   "protocol.images_per_prompt=2", "protocol.num_inference_steps=2",
                   "protocol.object.editing=['a {} on the beach','a red {}']", "protocol.multipliers=[1.0,0.0]"])  # fmt: skip
    calls = []
    sample = Backbone.sample
    monkeypatch.setattr(Backbone, "sample", lambda self, *a, **k: calls.append(a[0]) or sample(self, *a, **k))
    out = tmp_path / "eval"
    record = evaluate_concepts([str(run_dir)], cfg.model, cfg.data, cfg.encoders, cfg.protocol, out)
    assert len(calls) == 2 * 3  # two multipliers x three prompts
    assert calls[1] == ["a toy on the beach"] * 2  # the class word; the tag is applied, not read
    assert record["results"]["m0"]["prompts"][1] == "a toy on the beach <hypernet:robot:0>"
    assert record["results"]["m0"]["editing"]["per_prompt"]["a {} on the beach"]["clip_t"]["n"] == 2
    assert set(record["results"]) == {"m1", "m0"} and record["encoders"]["dino"] == tiny_encoders["dino"]
    editing = record["results"]["m1"]["editing"]
    assert editing["clip_t"]["n"] == 4 and set(editing["per_prompt"]) == {"a {} on the beach", "a red {}"}
    assert set(record["metrics"]) == {
        f"eval/{k}" for k in ("clip_i", "dino", "clip_t", "clipscore", "recon_clip_i", "recon_dino")
    }
    # interrupted after one prompt's images: only the missing ones are made again
    images = sorted((out / "images" / "m0").glob("*.png"))
    assert len(images) == 6
    images[-1].unlink()
    calls.clear()
    again = evaluate_concepts([str(run_dir)], cfg.model, cfg.data, cfg.encoders, cfg.protocol, out)
    assert len(calls) == 1 and len(calls[0]) == 1
    assert again["metrics"] == pytest.approx(record["metrics"])
    assert json.loads((out / "eval.json").read_text())["metrics"] == pytest.approx(record["metrics"])


@pytest.mark.slow
def test_evaluate_py_scores_a_sweep_and_the_report_reads_it(tmp_path, tiny_encoders):
    """train.py -m, then evaluate.py sweep=..., then report.py: runs.csv holds the eval/ columns."""
    from conftest import FAST

    sweep = tmp_path / "sweep"
    args = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, "seed=0,1", "trainer.max_steps=2",
            "samples.every_n_steps=0", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    evaluate = [sys.executable, str(ROOT / "evaluate.py"), f"sweep={sweep}", f"encoders.clip={tiny_encoders['clip']}",
                "encoders.dino=null", "protocol.images_per_prompt=1", "protocol.num_inference_steps=2",
                "protocol.object.editing=['a {} on the beach']"]  # fmt: skip
    done = subprocess.run(
        evaluate, cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("eval.json") == 2 and "clip_t=" in done.stdout
    report = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert report.returncode == 0, report.stderr
    import pandas as pd

    runs = pd.read_csv(next(sweep.glob("**/runs.csv")))
    assert len(runs) == 2 and runs["eval/clip_t"].between(-1, 1).all() and runs["eval/clip_i"].notna().all()
    # a mistake is one line
    bad = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"run={tmp_path / 'nothing'}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    assert bad.returncode == 2 and "run=" in bad.stderr and "no such directory" in bad.stderr


def test_evaluation_images_go_to_wandb_as_a_table():
    from types import SimpleNamespace

    from conceptlab.evaluate import log_image_table

    logged = []

    class Table:  # what Lightning's WandbLogger offers
        def log_table(self, **kwargs):
            logged.append(kwargs)

    trainer = SimpleNamespace(loggers=[Table(), SimpleNamespace()])  # the CSV logger has no tables
    images = [toy_image(shape="circle"), toy_image(shape="ring")]
    log_image_table(trainer, 7, [("a photo of <x>", 0), ("a photo of <x>", 1)], images)
    [call] = logged
    assert call["key"] == "metrics/images" and call["columns"] == ["step", "prompt", "seed", "image"]
    assert [row[:3] for row in call["data"]] == [[7, "a photo of <x>", 0], [7, "a photo of <x>", 1]]
    # each image at a size a person can see (the toy world's 32 px scaled up), captioned with its prompt
    assert call["data"][1][3].image.size == (128, 128) and call["step"] == 7
    assert call["data"][1][3]._caption == "a photo of <x> (seed 1)"


def test_the_toy_clips_vocabulary_cut_keeps_its_outputs_on_the_worlds_captions():
    from conceptlab.toyworld.clip import build_toy_clip, full_caption, reduce_vocabulary, world_words
    from conceptlab.toyworld.world import random_scene

    model, processor = build_toy_clip(seed=3)
    with torch.no_grad():  # every row different, so a wrong row copied would show
        model.text_model.embeddings.token_embedding.weight.normal_()
    rng = random.Random(0)
    texts = [full_caption(random_scene(rng), rng) for _ in range(32)] + [
        "a photo of an orange moon, pastel style"
    ]

    def features(model, processor):
        with torch.no_grad():
            return model.get_text_features(
                **processor(text=texts, return_tensors="pt", padding=True)
            ).pooler_output

    before = features(model.eval(), processor)
    pieces = [processor.tokenizer.tokenize(t) for t in texts]
    small, small_processor = reduce_vocabulary(model, processor, world_words())
    assert len(small_processor.tokenizer) < 1000 and small.config.text_config.vocab_size == len(
        small_processor.tokenizer
    )
    assert [small_processor.tokenizer.tokenize(t) for t in texts] == pieces
    assert torch.allclose(features(small, small_processor), before, atol=1e-5)
    assert small_processor.tokenizer.tokenize("a dog")[-1] == "g</w>"  # other words still tokenize
