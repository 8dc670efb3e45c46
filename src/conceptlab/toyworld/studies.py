"""The applications as measured studies on the toy world (experiments/<study>.yaml), each answered by
the judge: style transfer, object variation, text-guided synthesis, localized editing, bias reduction
(callbacks that score a run before and after training: `study_before/*`, `study/*`) and composition
(two runs' concepts in one prompt, scored when the sweep ends, `study.at_end`:
`<sweep>/composition/composition.json`).

The scoring functions take the judge's readings, so they are tested on hand-made readings.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image

from ..atomic import atomic_path, write_json
from ..errors import BackboneError, ConfigError
from ..evalcache import EvaluationCache, backbone_identity, default_cache_dir, method_state
from ..inference import labelled_grid, prepare, to_pil
from ..prompts import fill_prompt
from ..records import publish
from ..report import collect
from ..runfolder import RunFolder
from .checkpoint import check_toy_folder, load_judge
from .concepts import TOY_CONCEPTS, toy_concept_of
from .evaluate import named_attributes, sample_images
from .world import ATTRIBUTES, RESOLUTION, SIZES, Scene, render

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------- scores of judge readings


def hits(read: dict[str, list[str]], index: int, wanted: dict[str, str]) -> bool:
    """Whether image `index` shows every wanted attribute value."""
    return all(read[a][index] == v for a, v in wanted.items())


def rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def image_scores(read: dict[str, list[str]], prompts: list[str], truth: dict[str, str]) -> dict[str, float]:
    """Per-image accuracies over images of `prompts` (prompt-major, equally many each): `concept` (every
    attribute of the truth), `prompt` (every attribute the prompt names and the truth does not fix) and
    `both` (the same image right on both: what a style transfer or a text-guided edit is for)."""
    n = len(next(iter(read.values())))
    per_prompt = n // len(prompts)
    concept, obeyed = [], []
    for i in range(n):
        asked = {a: v for a, v in named_attributes(prompts[i // per_prompt]).items() if a not in truth}
        concept.append(hits(read, i, truth))
        obeyed.append(hits(read, i, asked))
    return {
        "concept": rate(concept),
        "prompt": rate(obeyed),
        "both": rate([c and o for c, o in zip(concept, obeyed)]),
    }


def distribution(values: list[str], classes: list[str]) -> dict[str, float]:
    """Share of each class among the readings (readings outside `classes` count as `other`)."""
    counts = Counter(v if v in classes else "other" for v in values)
    out = {c: counts.get(c, 0) / len(values) for c in classes}
    if counts.get("other"):
        out["other"] = counts["other"] / len(values)
    return out


def normalized_entropy(values: list[str], classes: list[str]) -> float:
    """Entropy of the readings over `classes`, divided by its maximum (1 = all equally often)."""
    shares = [p for p in Counter(values).values()]
    total = sum(shares)
    entropy = -sum(c / total * math.log(c / total) for c in shares)
    return max(0.0, entropy) / math.log(len(classes)) if len(classes) > 1 else 0.0  # not -0.0


def distance_to_uniform(shares: dict[str, float], classes: list[str]) -> float:
    """Total variation distance between the readings' distribution and the uniform one over `classes`
    (0 = exactly uniform; readings of other classes count fully against it)."""
    inside = sum(abs(shares.get(c, 0.0) - 1 / len(classes)) for c in classes)
    return 0.5 * (inside + shares.get("other", 0.0))


def composition_scores(
    read: dict[str, list[str]], first: dict[str, str], second: dict[str, str]
) -> dict[str, float]:
    """How often both concepts show in the same image, only one, or neither."""
    n = len(next(iter(read.values())))
    a = [hits(read, i, first) for i in range(n)]
    b = [hits(read, i, second) for i in range(n)]
    return {
        "both": rate([x and y for x, y in zip(a, b)]),
        "first": rate(a),
        "second": rate(b),
        "first_only": rate([x and not y for x, y in zip(a, b)]),
        "second_only": rate([y and not x for x, y in zip(a, b)]),
        "neither": rate([not x and not y for x, y in zip(a, b)]),
    }


def conflicts(first: dict[str, str], second: dict[str, str]) -> list[str]:
    """Attributes two concepts fix to different values: no single object of the world shows both."""
    return sorted(a for a in first.keys() & second.keys() if first[a] != second[a])


# ------------------------------------------------------------------------------ per-run studies


class Study(pl.Callback):
    """Scores the run's concept for one application before training (step 0: `study_before/*`) and at
    the end (`study/*`), with the judge on the toy world's own concept sets; the samples are kept as a
    labelled grid in <run>/study/. Metrics go to every logger and to summary.json's `metrics`.

    Subclasses say what they sample (`samples`) and how they score it (`scores`).
    """

    name = "study"
    report_section = "conceptlab.toyworld.sections.study_section"  # its samples after training
    headline: tuple[str, ...] = ()

    def __init__(
        self, settings, data, record=None, cache_dir: str | None = None, prompts: list[str] | None = None,
        num_samples: int | None = None,
    ):  # fmt: skip
        found = toy_concept_of(data.path)
        if found is None:
            log.warning(
                "data.path=%s: the %s study is scored by the toy world's judge on its own concept sets (%s); "
                "this run trains without it (elsewhere the report takes the similarity metrics)",
                data.path, self.name, ", ".join(f"bundled:{n}" for n in TOY_CONCEPTS),
            )  # fmt: skip
        self.enabled = found is not None
        found = found or ("", TOY_CONCEPTS["toy_combo"])  # placeholders: nothing is scored
        self.concept_name, concept = found
        self.truth = dict(concept.truth)
        self.prompts = list(prompts) if prompts else list(concept.prompts)
        self.cfg, self.record = settings, record
        self.num_samples = num_samples or settings.num_samples
        self.cache = EvaluationCache(default_cache_dir(cache_dir)) if settings.cache else None
        self.judge = None

    # -- what a study samples and how it scores it
    def samples(self, backbone, method) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
        """Images in [-1, 1], a label per row of the grid, and anything the scores need besides."""
        texts = [fill_prompt(p, method.prompt_text) for p in self.prompts]
        images = sample_images(
            backbone, texts, self.seeds, self.cfg.num_inference_steps, self.cfg.guidance_scale
        )
        return images, [row_label(p) for p in self.prompts], {}

    def scores(self, read: dict[str, list[str]], extra: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    @property
    def seeds(self) -> list[int]:
        return list(range(self.num_samples))

    # -- the schedule
    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        if self.enabled and self.judge is None:
            try:
                check_toy_folder(Path(module.backbone.path))
            except BackboneError:
                log.warning(
                    "model=%s is not the toy world: the %s study needs its judge (model=toy); this run trains "
                    "without it (the report takes the similarity metrics instead)",
                    module.backbone.name, self.name,
                )  # fmt: skip
                self.enabled = False
                return
            self.judge = load_judge(Path(module.backbone.path))

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self.evaluate(trainer, module, "study_before/")

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.evaluate(trainer, module, "study/")

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule, prefix: str) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        step = trainer.global_step
        self.judge.to(module.device)
        with module.method.inference(1.0):
            found = None
            if self.cache is not None:
                key = self.cache.key(
                    kind=f"toy-study-{self.name}", backbone=backbone_identity(module.backbone),
                    judge=self.judge.digest, state=method_state(module.method, 1.0), study=self.describe(),
                    text=module.method.prompt_text, steps=self.cfg.num_inference_steps,
                    guidance=self.cfg.guidance_scale, grid="labelled",
                )  # fmt: skip
                found = self.cache.get(key)
            if found is None:
                images, rows, extra = self.samples(module.backbone, module.method)
                found = self.scores(self.judge.read(images), {**extra, "images": images})
                grid = self.grid(images, rows)
                if self.cache is not None:
                    self.cache.put(key, found, about={"study": self.name, "step": step})
                    self.cache.put_bytes(key, ".png", grid)
            else:  # the samples' grid was kept with the scores
                grid = self.cache.get_bytes(key, ".png")
        if self.record is not None and grid is not None:
            name = "before" if prefix.startswith("study_before") else "after"
            with atomic_path(RunFolder(self.record.run_dir).study / f"{self.name}_{name}.png") as tmp:
                tmp.write_bytes(grid)
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):  # W&B: the grid the study's scores were read from
                    caption = f"{self.name}, {name} training (rows: its prompts; columns: seeds)"
                    logger.log_image(
                        key=f"study/{name}",
                        images=[Image.open(io.BytesIO(grid))],
                        step=step,
                        caption=[caption],
                    )
        publish(trainer, self.record, step, {f"{prefix}{k}": v for k, v in found.items()})

    def describe(self) -> dict[str, Any]:
        """Everything that defines the study's samples (the cache key)."""
        return {"prompts": self.prompts, "seeds": self.seeds, "truth": self.truth}

    @staticmethod
    def grid(images: torch.Tensor, rows: list[str]) -> bytes:
        """The samples as a labelled PNG grid (rows: `rows`, columns: seeds)."""

        pictures = to_pil((images + 1) / 2)
        cols = len(pictures) // len(rows)
        buffer = io.BytesIO()
        labelled_grid(pictures, rows, [str(i) for i in range(cols)]).save(buffer, format="PNG")
        return buffer.getvalue()


def row_label(prompt: str) -> str:
    """A grid row's label: what the prompt names besides the concept ("large orange ring"), short."""
    named = named_attributes(prompt)
    words = [named[a] for a in ("size", "colour", "shape") if a in named]
    return " ".join(words) or "learned word"


class StyleTransfer(Study):
    """A learned style applied to prompts naming other shapes, colours and backgrounds: `transfer` =
    images in the style that also draw what the prompt asks (style accuracy x prompt obedience, per image)."""

    name = "style_transfer"
    headline = ("study/transfer",)

    def scores(self, read, extra):
        s = image_scores(read, self.prompts, self.truth)
        return {"transfer": s["both"], "style": s["concept"], "obedience": s["prompt"]}


class TextGuided(Study):
    """The learned word in new contexts, per prompt: `prompt/<prompt, {} as X>` = images right on the
    concept and on the prompt's own words; `text_guided` = the same over all prompts."""

    name = "text_guided"
    headline = ("study/text_guided",)

    def scores(self, read, extra):
        n = len(next(iter(read.values()))) // len(self.prompts)
        out = {}
        for i, prompt in enumerate(self.prompts):
            part = {a: v[i * n : (i + 1) * n] for a, v in read.items()}
            out[f"prompt/{prompt_key(prompt)}"] = image_scores(part, [prompt], self.truth)["both"]
        whole = image_scores(read, self.prompts, self.truth)
        return {"text_guided": whole["both"], "concept": whole["concept"], "prompt": whole["prompt"], **out}


def prompt_key(prompt: str) -> str:
    """A prompt as part of a metric's name: "a photo of a small {}" -> "a_photo_of_a_small_X"."""
    return "_".join(fill_prompt(prompt, "X").replace(",", " ").split())


class ObjectVariation(Study):
    """The learned object kept (`concept`) while what neither it nor the prompt fixes varies
    (`diversity`: mean normalized entropy of the judge's readings of those attributes, per attribute
    `diversity_<a>`); `variation` = concept x diversity."""

    name = "object_variation"
    headline = ("study/variation",)

    def __init__(self, *args, attributes: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        named = {a for p in self.prompts for a in named_attributes(p)}
        self.open = (
            list(attributes) if attributes else [a for a in ATTRIBUTES if a not in {*self.truth, *named}]
        )
        unknown = [a for a in self.open if a not in ATTRIBUTES]
        if unknown:
            raise ConfigError(f"attributes={unknown}: the judge reads {', '.join(ATTRIBUTES)}")

    def describe(self):
        return {**super().describe(), "open": self.open}

    def scores(self, read, extra):
        entropies = {f"diversity_{a}": normalized_entropy(read[a], list(ATTRIBUTES[a])) for a in self.open}
        concept = image_scores(read, self.prompts, self.truth)["concept"]
        diversity = sum(entropies.values()) / len(entropies)
        return {"variation": concept * diversity, "concept": concept, "diversity": diversity, **entropies}


class BiasReduction(Study):
    """The bare model's skew for a generic prompt (`baseline`, e.g. "a photo of a shape", with the
    method switched off) against the learned word's (`prompts`): per attribute the distribution of the
    judge's readings (`dist_<a>_<v>`, `base_dist_<a>_<v>`) and its total variation distance to uniform
    over `classes` (`tv_<a>`, `base_tv_<a>`); `tv` and `base_tv` are their means, `tv_reduction` the gain."""

    name = "bias_reduction"
    report_section = "conceptlab.toyworld.sections.bias_section"  # the distributions, then the samples
    headline = ("study/tv",)

    def __init__(self, *args, baseline: str = "a photo of a shape", classes: dict[str, list[str]] | None = None,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.baseline = baseline
        self.classes = {a: list(v) for a, v in (classes or {"size": list(ATTRIBUTES["size"])}).items()}
        bad = {a: v for a, v in self.classes.items() if a not in ATTRIBUTES or set(v) - set(ATTRIBUTES[a])}
        if bad:
            raise ConfigError(f"classes={bad}: not values the judge reads ({dict(ATTRIBUTES)})")

    def describe(self):
        return {**super().describe(), "baseline": self.baseline, "classes": self.classes}

    def samples(self, backbone, method):
        images, rows, _ = super().samples(backbone, method)
        with method.at_multiplier(0.0):  # the bare model (a placeholder word is simply not in its prompt)
            base = sample_images(backbone, [self.baseline], self.seeds, self.cfg.num_inference_steps,
                                 self.cfg.guidance_scale)  # fmt: skip
        return torch.cat([base, images]), ["bare prompt", *rows], {"baseline_count": len(base)}

    def scores(self, read, extra):
        n = extra["baseline_count"]
        out: dict[str, float] = {}
        for prefix, part in (("base_", slice(0, n)), ("", slice(n, None))):
            tvs = []
            for a, classes in self.classes.items():
                shares = distribution(read[a][part], classes)
                out.update({f"{prefix}dist_{a}_{v}": p for v, p in shares.items()})
                tvs.append(out.setdefault(f"{prefix}tv_{a}", distance_to_uniform(shares, classes)))
            out[f"{prefix}tv"] = sum(tvs) / len(tvs)
        out["tv_reduction"] = out["base_tv"] - out["tv"]
        return out


def scene_mask(scene: Scene, margin: float = 2.0) -> torch.Tensor:
    """[32, 32] float mask, 1 inside the square that holds the object (plus `margin` pixels)."""

    r = SIZES[scene.size] + margin
    rows = torch.arange(RESOLUTION, dtype=torch.float32)[:, None] + 0.5
    cols = torch.arange(RESOLUTION, dtype=torch.float32)[None, :] + 0.5
    return (((rows - scene.y).abs() <= r) & ((cols - scene.x).abs() <= r)).float()


class LocalizedEditing(Study):
    """A learned concept drawn inside a mask of a given picture (blended latent diffusion through
    diffusers' inpainting pipeline, the original pasted back outside, as generate.py mask= does):
    `inside` = edits where the judge reads the concept's `inside` attributes (the object's own: colour,
    shape), `outside_change` = mean |pixel change| outside the mask (0..1), `inside_change` inside it."""

    name = "localized_editing"
    headline = ("study/inside",)

    def __init__(self, *args, scenes: list[dict[str, Any]] | None = None, inside: list[str] | None = None,
                 strength: float = 1.0, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        default = [
            {"shape": "circle", "colour": "blue", "background": "white", "size": "large", "style": "plain",
             "x": 12.0, "y": 12.0},
            {"shape": "square", "colour": "green", "background": "white", "size": "large", "style": "plain",
             "x": 20.0, "y": 18.0},
        ]  # fmt: skip
        self.scenes = [Scene(**s) for s in (scenes or default)]
        self.inside = list(inside) if inside else [a for a in ("shape", "colour") if a in self.truth]
        if not self.inside:
            raise ConfigError(
                f"{self.concept_name} fixes none of the object's own attributes (shape, colour); localized "
                "editing needs an object concept (data=toy_gem, toy_combo) or inside=[...]"
            )
        self.strength = strength

    def describe(self):
        return {**super().describe(), "scenes": [s.__dict__ for s in self.scenes], "inside": self.inside,
                "strength": self.strength}  # fmt: skip

    def samples(self, backbone, method):
        text = fill_prompt(self.prompts[0], method.prompt_text)
        pipe = backbone.pipeline("DDIMScheduler", "inpaint")
        originals, masks, edited, raw = [], [], [], []
        for scene in self.scenes:
            picture = Image.fromarray(render(scene))
            mask = scene_mask(scene)
            mask_image = Image.fromarray((mask.numpy() * 255).astype("uint8"), "L")
            out = pipe(
                prompt=[text] * len(self.seeds), image=[picture] * len(self.seeds),
                mask_image=[mask_image] * len(self.seeds), strength=self.strength,
                num_inference_steps=self.cfg.num_inference_steps, guidance_scale=self.cfg.guidance_scale,
                height=picture.height, width=picture.width, output_type="pt",
                generator=[torch.Generator("cpu").manual_seed(s) for s in self.seeds],
            ).images.float().cpu()  # fmt: skip
            original = torch.from_numpy(render(scene)).permute(2, 0, 1).float() / 255
            keep = mask[None, None]
            raw.append(out)
            edited.append(out * keep + original * (1 - keep))  # the original pixels outside the mask
            originals.append(original.expand_as(out))
            masks.append(keep.expand(len(out), 1, *mask.shape))
        images = torch.cat(edited) * 2 - 1
        rows = [f"{s.colour} {s.shape}" for s in self.scenes]
        extra = {"original": torch.cat(originals), "mask": torch.cat(masks), "raw": torch.cat(raw)}
        return images, rows, extra

    def scores(self, read, extra):
        edited, original, mask = (extra["images"] + 1) / 2, extra["original"], extra["mask"]
        change = (edited - original).abs().mean(dim=1, keepdim=True)
        raw_change = (extra["raw"] - original).abs().mean(dim=1, keepdim=True)
        wanted = {a: self.truth[a] for a in self.inside}
        n = len(edited)
        return {
            "inside": rate([hits(read, i, wanted) for i in range(n)]),
            "inside_change": float((change * mask).sum() / mask.sum()),
            "outside_change": float((change * (1 - mask)).sum() / (1 - mask).sum()),
            "outside_change_decoded": float((raw_change * (1 - mask)).sum() / (1 - mask).sum()),
        }


# ----------------------------------------------------------------------- composition, at sweep end


def compose_sweep(sweep_dir: Path, pairs: list[dict[str, Any]], settings) -> Path | None:
    """Every pair of the sweep's completed runs whose concepts a `pairs` entry ({first, second, prompt})
    names, with the same seed (any methods), sampled together in the entry's prompt (seeds 0..
    settings.num_samples-1, its DDIM steps and guidance) and read by the judge; writes
    <sweep>/composition/composition.json (one row per pair of runs) and a grid per pair.
    The composition study's `study.at_end`."""
    sweep = collect(sweep_dir)
    runs = sweep.runs[sweep.runs["status"] == "completed"] if "status" in sweep.runs else sweep.runs
    if runs.empty:
        return None
    out = Path(sweep_dir) / "composition"
    steps, guidance = settings.num_inference_steps, settings.guidance_scale
    rows, judge, seeds = [], None, list(range(settings.num_samples))
    for entry in pairs:
        first, second, template = entry["first"], entry["second"], entry["prompt"]
        missing = [n for n in (first, second) if n not in TOY_CONCEPTS]
        if missing:
            raise ConfigError(
                f"composition pairs name {missing}: not toy-world concept sets ({', '.join(TOY_CONCEPTS)})"
            )
        truths = (dict(TOY_CONCEPTS[first].truth), dict(TOY_CONCEPTS[second].truth))
        for _, a in runs[runs["concept"] == first].iterrows():
            for _, b in runs[(runs["concept"] == second) & (runs["seed"] == a["seed"])].iterrows():
                run_a, run_b = (
                    RunFolder(Path(sweep_dir) / a["run_dir"]),
                    RunFolder(Path(sweep_dir) / b["run_dir"]),
                )
                # A fresh backbone per pair: each installs its own two concepts.
                inference = prepare([run_a.concepts, run_b.concepts], run_a.composed_config().model, "cpu")
                backbone, concepts = inference.backbone, inference.concepts
                judge = judge or load_judge(Path(backbone.path))
                # A placeholder word, or the name a tagged method trained with (and its tag).
                words = template.format(first=concepts[0].name, second=concepts[1].name)
                prompt = f"{words} {inference.tags()}".strip()
                text = inference.prompt(prompt)
                images = sample_images(backbone, [text], seeds, steps, guidance)
                scores = composition_scores(judge.read(images), *truths)
                name = f"{first}+{second}_{Path(a['run_dir']).name}+{Path(b['run_dir']).name}"
                grid = labelled_grid(to_pil((images + 1) / 2), [""], [str(s) for s in seeds])
                with atomic_path(out / f"{name}.png") as tmp:
                    grid.save(tmp, format="PNG")
                rows.append({
                    "pair": f"{first} + {second}", "prompt": prompt, "first_method": a["method"],
                    "second_method": b["method"], "seed": a["seed"], "first_run": a["run_dir"],
                    "second_run": b["run_dir"], "conflicting": conflicts(*truths), "grid": f"{name}.png",
                    **scores,
                })  # fmt: skip
    if not rows:
        log.warning("composition: no completed runs of the concepts %s in %s", pairs, sweep_dir)
        return None
    path = out / "composition.json"
    write_json(path, {"pairs": [dict(p) for p in pairs], "num_samples": len(seeds), "steps": steps,
                      "guidance": guidance, "rows": rows})  # fmt: skip
    return path


compose_sweep.report_section = "conceptlab.toyworld.sections.composition_section"  # type: ignore[attr-defined]
