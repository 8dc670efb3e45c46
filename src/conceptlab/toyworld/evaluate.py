"""Judge-based evaluation: sample fixed prompts at fixed seeds, read the images with the judge, and
score what was asked (the concept's own attributes, and whatever else the prompt names)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch

from ..console import bar_text
from ..errors import ConfigError
from ..evalcache import EvaluationCache, backbone_identity, default_cache_dir, method_state
from ..prompts import fill_prompt
from ..records import publish
from ..sampling import Draw, draw_images, sample_draw
from .checkpoint import load_judge
from .concepts import TOY_CONCEPTS, toy_concept_of
from .judge import Judge
from .world import ATTRIBUTES, BACKGROUNDS, COLOURS, NAMED_SHAPES, NAMED_STYLES, RESOLUTION, SIZES

log = logging.getLogger(__name__)


def named_attributes(prompt: str) -> dict[str, str]:
    """The attributes a world-grammar prompt names ("a large red circle on a gray background")."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    named = {}
    for attribute, values in (("shape", NAMED_SHAPES), ("colour", COLOURS), ("size", SIZES)):
        hits = [v for v in values if v in words]
        if len(hits) == 1:
            named[attribute] = hits[0]
    background = re.search(r"on an? (\w+) background", prompt)
    if background and background.group(1) in BACKGROUNDS:
        named["background"] = background.group(1)
    style = re.search(r"(\w+) style", prompt)
    if style and style.group(1) in NAMED_STYLES:
        named["style"] = style.group(1)
    return named


def sample_images(
    backbone, prompts: list[str], seeds: list[int], num_inference_steps: int = 25, guidance_scale: float = 4.0,
    progress: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """Every prompt at every seed (prompt-major), as [len(prompts) * len(seeds), 3, H, W] in [-1, 1]."""
    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    return sample_pairs(
        backbone, [p for p, _ in pairs], [s for _, s in pairs], num_inference_steps, guidance_scale, progress
    )


def sample_pairs(
    backbone, prompts: list[str], seeds: list[int], num_inference_steps: int = 25, guidance_scale: float = 4.0,
    progress: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """One sample of prompts[i] at seeds[i] each, in [-1, 1] (what the judge reads)."""
    images = backbone.sample(prompts, seeds, num_inference_steps, guidance_scale, progress=progress)
    return images * 2 - 1


@dataclass
class Scores:
    """Judge accuracies: the concept's attributes (jointly and one by one) and the prompt's own words."""

    concept: float | None
    concept_by_attribute: dict[str, float]
    prompt: float | None
    prompt_by_attribute: dict[str, float]

    def metrics(self, prefix: str = "judge/") -> dict[str, float]:
        out = {}
        if self.concept is not None:
            out[f"{prefix}concept"] = self.concept
        if self.prompt is not None:
            out[f"{prefix}prompt"] = self.prompt
        out.update({f"{prefix}concept_{a}": v for a, v in self.concept_by_attribute.items()})
        out.update({f"{prefix}prompt_{a}": v for a, v in self.prompt_by_attribute.items()})
        return out


def score(judge: Judge, images: torch.Tensor, prompts: list[str], truth: dict[str, str]) -> Scores:
    """Accuracies of `images` (prompt-major, equally many per prompt) against the concept's `truth`
    and the attributes each prompt names (the prompt's words lose where they contradict the concept's)."""
    unknown = {a: v for a, v in truth.items() if a not in ATTRIBUTES or v not in ATTRIBUTES[a]}
    if unknown:
        raise ValueError(
            f"the concept's truth {unknown} is not in the toy world's attributes {dict(ATTRIBUTES)}"
        )
    per_prompt = len(images) // len(prompts)
    read = judge.read(images)
    joint, concept, asked = [], {a: [] for a in truth}, {}
    for i in range(len(images)):
        prompt = prompts[i // per_prompt]
        seen = {a: read[a][i] for a in read}
        if truth:
            hits = [seen[a] == v for a, v in truth.items()]
            joint.append(all(hits))
            for (a, _), hit in zip(truth.items(), hits):
                concept[a].append(hit)
        for a, v in named_attributes(prompt).items():
            if a not in truth:
                asked.setdefault(a, []).append(seen[a] == v)

    def mean(xs: list[bool]) -> float:
        return sum(xs) / len(xs)

    prompt_hits = [h for hits in asked.values() for h in hits]
    return Scores(
        concept=mean(joint) if joint else None,
        concept_by_attribute={a: mean(h) for a, h in concept.items()},
        prompt=mean(prompt_hits) if prompt_hits else None,
        prompt_by_attribute={a: mean(h) for a, h in sorted(asked.items())},
    )


def judge_plan(
    backbone, method, prompts: list[str], judge_digest: str, truth: dict[str, str], cfg,
    all_multipliers: bool = True, cache: EvaluationCache | None = None,
) -> list[tuple[str, Draw, str | None, dict | None]]:  # fmt: skip
    """What judging the backbone with `method` installed takes, at each of cfg.multipliers for a method
    that has a strength (at 1.0 only with `all_multipliers=False`), else once: the metrics' prefix
    (judge/ at 1.0, judge_m<m>/ at the others), the images to sample, the scores' cache key and the
    scores themselves when the cache holds them (the bare model, a shared starting state)."""
    texts = [fill_prompt(p, method.prompt_text) for p in prompts]
    seeds = list(range(cfg.num_samples))
    multipliers = list(cfg.multipliers) if method.has_multiplier and all_multipliers else [1.0]
    plan = []
    for multiplier in multipliers:
        draw = Draw(
            tuple(t for t in texts for _ in seeds), tuple(s for _ in texts for s in seeds),
            cfg.num_inference_steps, cfg.guidance_scale, multiplier=float(multiplier),
        )  # fmt: skip
        key = found = None
        if cache is not None:
            # Everything the scores depend on; the bare model's texts are its words without the method.
            key = cache.key(
                kind="toy-judge", backbone=backbone_identity(backbone), judge=judge_digest,
                state=method_state(method, multiplier), prompts=prompts, truth=truth, texts=texts,
                seeds=seeds, steps=cfg.num_inference_steps, guidance=cfg.guidance_scale, sampler="DDIM",
            )  # fmt: skip
            found = cache.get(key)
        plan.append(("judge/" if multiplier == 1.0 else f"judge_m{multiplier:g}/", draw, key, found))
    return plan


def evaluate_concept(
    backbone,
    method,
    judge: Judge,
    prompts: list[str],
    truth: dict[str, str],
    cfg,
    all_multipliers: bool = True,
    progress: str | None = None,
    cache: EvaluationCache | None = None,
    draw: Callable[[Draw, str | None], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Judge metrics of the backbone with `method` installed (what `judge_plan` lists, scored).

    `prompts` keep their {} (the attributes a prompt names are read from its own words); `cfg` is an
    EvaluateConfig. With a `cache`, scores whose inputs were scored before are read. `draw` gives a
    Draw's images in [0, 1] (default: sampled here, the method at the Draw's multiplier).
    """
    metrics: dict[str, float] = {}
    plan = judge_plan(backbone, method, prompts, judge.digest, truth, cfg, all_multipliers, cache)
    for prefix, images_of, key, found in plan:
        if found is None:
            label = f"{progress} (x{images_of.multiplier:g})" if progress else None
            images = draw(images_of, label) if draw else sample_draw(backbone, method, images_of, label)
            found = score(judge, images * 2 - 1, prompts, truth).metrics("")
            if cache is not None:
                cache.put(
                    key,
                    found,
                    about={"texts": list(dict.fromkeys(images_of.texts)), "multiplier": images_of.multiplier},
                )
        metrics.update({f"{prefix}{k}": v for k, v in found.items()})
    return metrics


class JudgeEvaluation(pl.Callback):
    """The judge scores the run's concept: fixed prompts at fixed seeds, at step 0, every N steps and
    at the end (the `evaluators` group's toy.yaml, which model=toy selects).

    It scores only the toy world's own concept sets, whose truth it knows; on any other image folder
    the run trains without a concept score, and says so once. A method with a strength is scored at
    every multiplier at step 0 and at the end, at 1.0 in between. Metrics go to every logger
    (metrics.csv, W&B) and the last ones to the run record (summary.json's `metrics`).
    """

    headline = ("judge/concept", "judge/prompt")  # what the progress bar and the end summary show
    evidence = (
        "judge/concept"  # what the run learned, by the world's ground truth: the best evidence there is
    )
    report_section = "conceptlab.toyworld.sections.judge_section"  # the metrics against its ground truth

    def __init__(self, settings, data, record=None, cache_dir: str | None = None):
        if data.resolution not in (None, RESOLUTION):
            raise ConfigError(
                f"data.resolution={data.resolution}: the toy world is drawn at {RESOLUTION}x{RESOLUTION} and "
                f"its judge reads only that size; use data.resolution=null (or evaluators=none)"
            )
        self.cfg, self.record = settings, record
        found = toy_concept_of(data.path)
        if found is None:
            log.warning(
                "data.path=%s is not one of the toy world's concept sets (%s): the judge has no truth for it, "
                "so this run trains without a concept score",
                data.path, ", ".join(f"bundled:{n}" for n in TOY_CONCEPTS),
            )  # fmt: skip
        self.concept = found[1] if found else None
        self.cache = EvaluationCache(default_cache_dir(cache_dir)) if settings.cache else None
        self.judge = None
        self.done: tuple[int, bool] | None = None  # (step, all multipliers) of the last evaluation
        self.shared = None  # a conceptlab.sampling.SharedDraws draws this callback's images with others'

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        if self.concept is not None and self.judge is None:
            self.judge = load_judge(Path(module.backbone.path))

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.evaluate(trainer, module, "start")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.evaluate(trainer, module, "batch_end")

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.evaluate(trainer, module, "end")  # a run that ended before max_steps (done already otherwise)

    def due(self, trainer: pl.Trainer, event: str) -> bool | None:
        """Whether to judge at `event` of this step at every multiplier (True), at 1.0 only (False), or
        not at all (None)."""
        step, every = trainer.global_step, self.cfg.every_n_steps
        if self.judge is None or not trainer.is_global_zero:
            return None
        if event == "start":
            full = (step == 0) if every > 0 else None
        elif event == "batch_end":
            # The last step at its batch end (with the metrics and the grid: one batch of samples).
            full = True if step >= trainer.max_steps else (False if every > 0 and step % every == 0 else None)
        else:
            full = True
        return None if full is None or self.done in ((step, True), (step, full)) else full

    def draws(self, trainer: pl.Trainer, module: pl.LightningModule, event: str) -> list[Draw]:
        full = self.due(trainer, event)
        if full is None:
            return []
        plan = judge_plan(
            module.backbone, module.method, list(self.concept.prompts), self.judge.digest,
            dict(self.concept.truth), self.cfg, full, self.cache,
        )  # fmt: skip
        return [draw for _, draw, _, found in plan if found is None]

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule, event: str) -> None:
        full = self.due(trainer, event)
        if full is None:
            return
        step = trainer.global_step
        self.done = (step, full)
        self.judge.to(module.device)
        metrics = evaluate_concept(
            module.backbone, module.method, self.judge, list(self.concept.prompts), dict(self.concept.truth),
            self.cfg, all_multipliers=full, progress=bar_text(trainer, f"judging step {step}"), cache=self.cache,
            draw=lambda draw, label: draw_images(self, trainer, module, draw, label),
        )  # fmt: skip
        publish(trainer, self.record, step, metrics)
