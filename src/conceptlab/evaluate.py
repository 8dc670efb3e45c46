"""What a concept learned, measured on any backbone: CLIP-I, DINO, CLIP-T and CLIPScore under a fixed
protocol (DreamBooth's 25 prompts x 4 seeds, or the toy world's), during training and afterwards.

* `MetricEvaluation`, a callback: a small fixed prompt/seed set at step 0, every N steps and at the
  end; metrics to every logger and summary.json; the concept kept at each evaluation step
  (concepts/steps/step_NNNNNN) and the best step named in summary.json (`generate.py concepts=[run@best]`).
* `python evaluate.py run=<run dir> | sweep=<multirun dir> | concepts=[files] ...`: the full protocol,
  written to eval/ in each run (eval.json, images, a labelled grid); an interrupted evaluation resumes.

Prompts: {} stands for the concept's words then its class word ("a <my-dog> dog in the snow"). A
method applied by a tag (hypernetworks, LoRA) has no words: "a dog in the snow <hypernet:name:m>".
CLIP-T reads the prompt with the concept's words left out ("a dog in the snow").
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_path, write_json
from .backbone import resolve_path
from .callbacks import evaluation_due
from .config import EvaluateRunConfig, check_config
from .console import bar_text, is_verbose, quiet_third_party, say
from .data import concept_class, read_concept_split
from .errors import ConceptLabError, ConfigError, error_line
from .evalcache import EvaluationCache, backbone_identity, default_cache_dir, method_state
from .inference import labelled_grid, prepare, readable, to_pil
from .metrics import Encoders, encoder_identity, score_images
from .prompts import fill_prompt
from .runfolder import RunFolder, find_run_dirs
from .sampling import Draw, draw_images
from .sweeps import evidence_order, metric_goal

# wandb load inside the functions that use them, not here: importing them costs wandb ~1 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

log = logging.getLogger(__name__)
PREFIX = "metrics/"  # during training (a few prompts); evaluate.py's full protocol: EVAL_PREFIX
EVAL_PREFIX = "eval/"
SETS = ("reconstruction", "editing")
SHORT = {"reconstruction": "recon", "editing": "edit"}  # image file names


def fill(prompt: str, words: str, class_word: str) -> str:
    """The prompt with {} replaced by the concept's words and class word, spaces tidied."""
    text = fill_prompt(prompt, f"{words} {class_word}")
    return re.sub(r"\s+", " ", text).strip().replace(" ,", ",")


@dataclass
class Prompted:
    """The prompts of one evaluation: what the backbone reads, and what CLIP-T compares with."""

    set: str  # reconstruction | editing
    template: str
    text: str  # with the concept's words (and tags)
    plain: str  # for CLIP-T: the concept's words left out


def build_prompts(
    prompt_set, words: str, class_word: str, tags: str = "", limit: int | None = None
) -> list[Prompted]:
    """Every prompt of a protocol's PromptSet (the first `limit` editing ones), filled in."""
    out = []
    for name in SETS:
        templates = list(getattr(prompt_set, name))
        if limit is not None:
            templates = templates[: limit if name == "editing" else 1]
        for template in templates:
            text = fill(template, words, class_word) + (f" {tags}" if tags else "")
            out.append(Prompted(name, template, text, fill(template, "", class_word)))
    return out


class Scorer:
    """The encoders and the real images' features, computed once; scores generated images."""

    def __init__(self, encoders, real_images: list, seen_images: list | None = None):
        """real_images: what CLIP-I / DINO compare with (the held-out images when data.val_images holds
        some out); seen_images: the training images then, scored as seen_clip_i / seen_dino too."""
        self.encoders = encoders
        self.real = encoders.image_features(real_images)
        self.seen = encoders.image_features(seen_images) if seen_images else None

    def score(
        self, prompts: list[Prompted], images: list, per_prompt: int, prefix: str = PREFIX
    ) -> dict[str, Any]:
        """Per set: each metric's mean/std over prompts x seeds and per prompt; `flat` metrics too."""

        out: dict[str, Any] = {}
        flat: dict[str, float] = {}
        for name in SETS:
            # images are prompt-major, per_prompt of each: the positions (and prompts) of this set
            pairs = [
                (i * per_prompt + k, p)
                for i, p in enumerate(prompts)
                if p.set == name
                for k in range(per_prompt)
            ]
            if not pairs:
                continue
            texts = [p.plain for _, p in pairs] if name == "editing" else None
            scores = score_images(self.encoders, [images[j] for j, _ in pairs], self.real, texts, self.seen)
            out[name] = scores.summary([p.template for _, p in pairs])
            for metric, values in scores.values.items():
                key = metric if name == "editing" else f"recon_{metric}"
                flat[f"{prefix}{key}"] = sum(values) / len(values)
        out["flat"] = flat
        return out


def multiplier_key(multiplier: float) -> str:
    return f"m{multiplier:g}"


# ------------------------------------------------------------------------------- during training


class MetricEvaluation(pl.Callback):
    """CLIP-I / DINO / CLIP-T of the run's concept during training (the `evaluators` group: on with the
    judge on model=toy, `evaluators=metrics` on any model). Keeps the concept at each evaluation step."""

    def __init__(
        self, settings, data, record=None, encoders=None, protocol=None, cache_dir: str | None = None
    ):

        self.cfg, self.record = settings, record
        self.cache = EvaluationCache(default_cache_dir(cache_dir)) if settings.cache else None
        self.protocol = protocol
        self.class_word, self.kind = concept_class(data)
        self.real_images, self.seen_images = real_images(data), seen_images(data)
        self.real_digest = images_digest(self.real_images + (self.seen_images or []))

        # Checked here, before the backbone loads: an encoder that cannot be found fails the run at once.
        # The models load at the first evaluation the cache does not hold.
        self.encoder_names = (encoders.clip, encoders.dino)
        self.encoder_identity = encoder_identity(*self.encoder_names)
        self.scorer: Scorer | None = None
        self.best: dict[str, Any] = {}  # summary.json's `best`; kept in checkpoints (a resumed run knows it)
        self.done_step = -1
        self.shared = None  # a conceptlab.sampling.SharedDraws draws this callback's images with others'

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state.get("best") or {})

    @property
    def headline(self) -> tuple[str, ...]:
        return (f"{PREFIX}clip_i", f"{PREFIX}clip_t")

    evidence = f"{PREFIX}clip_i"  # what the run learned, as the papers measure it (sweeps.evidence_order)

    def on_train_start(self, trainer, module) -> None:
        if self.best and self.record is not None:
            self.record.report(trainer, best=self.best)  # the best step before a resume
        self.evaluate(trainer, module, "start")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.evaluate(trainer, module, "batch_end")

    def on_train_end(self, trainer, module) -> None:
        self.evaluate(trainer, module, "end")  # a run that ended before max_steps (done already otherwise)

    def due(self, trainer: pl.Trainer, event: str) -> bool:
        return evaluation_due(trainer, self.cfg.every_n_steps, self.done_step, event)

    def plan(self, module: pl.LightningModule) -> tuple[list[Prompted], Draw, str | None]:
        """The prompts, what to sample for them, and the cache key of their scores (None: no cache)."""
        method, backbone = module.method, module.backbone
        words = method.prompt_words
        prompts = build_prompts(
            getattr(self.protocol, self.kind), words, self.class_word, limit=self.cfg.metric_prompts
        )
        seeds = [self.protocol.seed + k for k in range(self.cfg.metric_samples)]
        draw = Draw(
            tuple(p.text for p in prompts for _ in seeds), tuple(s for _ in prompts for s in seeds),
            self.protocol.num_inference_steps, self.protocol.guidance_scale,
        )  # fmt: skip
        key = None
        if self.cache is not None:  # step 0 from a shared starting state was scored before
            key = self.cache.key(
                kind="metrics", backbone=backbone_identity(backbone), state=method_state(method, 1.0),
                prompts=[(p.set, p.text, p.plain) for p in prompts], seeds=list(seeds), sampler="DDIM",
                steps=self.protocol.num_inference_steps, guidance=self.protocol.guidance_scale,
                encoders=self.encoder_identity, real=self.real_digest,
            )  # fmt: skip
        return prompts, draw, key

    def draws(self, trainer: pl.Trainer, module: pl.LightningModule, event: str) -> list[Draw]:
        if not self.due(trainer, event):
            return []
        _, draw, key = self.plan(module)
        return [] if key is not None and self.cache.get(key) is not None else [draw]

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule, event: str) -> None:
        if not self.due(trainer, event):
            return
        step = self.done_step = trainer.global_step
        module.check_finite()
        prompts, draw, key = self.plan(module)
        metrics = self.cache.get(key) if key is not None else None
        if metrics is None:
            if self.scorer is None:
                encoders = Encoders(*self.encoder_names, device=module.device)
                self.scorer = Scorer(encoders, self.real_images, self.seen_images)
            images = to_pil(
                draw_images(
                    self, trainer, module, draw, progress=bar_text(trainer, f"metrics at step {step}")
                )
            )
            scores = self.scorer.score(prompts, images, self.cfg.metric_samples)
            metrics = scores["flat"]
            log_image_table(trainer, step, list(zip(draw.texts, draw.seeds)), images)
            log_prompt_table(trainer, step, scores)
            if key is not None:
                self.cache.put(key, metrics, about={"prompts": [p.text for p in prompts]})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.keep(trainer, module, step, metrics)

    def best_metric(self, step: int, metrics: dict[str, float]) -> tuple[str, float]:
        """The metric that picks the best step and its value now: evaluate.best, else the best evidence of
        this step (the judge's scores of the same step, which it reports first, else this callback's)."""
        summary = self.record.summary
        same_step = summary.metrics if summary.metrics.get("step") == step else {}
        available = {**same_step, **metrics}
        if self.cfg.best is not None:
            if self.cfg.best not in available:
                raise ConfigError(
                    f"evaluate.best={self.cfg.best}: not a metric of this run ({', '.join(available)})"
                )
            return self.cfg.best, available[self.cfg.best]
        chosen = self.best.get("metric") or next(
            m for m in evidence_order(summary.evidence) if m in available
        )  # a resumed run keeps the metric it started choosing by
        return chosen, available.get(chosen, float("-inf"))

    def keep(self, trainer, module, step: int, metrics: dict[str, float]) -> None:
        """The concept at this step in concepts/steps/, and the best step so far in the record."""
        if self.record is None:
            return
        folder = RunFolder(self.record.run_dir).step(step)
        module.method.export(folder, step, module.backbone)
        fields: dict[str, Any] = {"metrics": {"step": step, **metrics}}
        metric, value = self.best_metric(step, metrics)
        if not self.best or (metric == self.best["metric"] and improves(metric, value, self.best["value"])):
            self.best = {
                "metric": metric,
                "value": value,
                "step": step,
                "concepts": self.record.relative(folder),
            }
            fields["best"] = self.best
        self.record.report(trainer, **fields)


def improves(metric: str, value: float, previous: float) -> bool:
    """Whether `value` of `metric` is better than `previous` (lower for a loss, higher otherwise)."""
    return value < previous if metric_goal(metric) == "min" else value > previous


def log_image_table(trainer: pl.Trainer, step: int, rows: list[tuple[str, int]], images: list) -> None:
    """The evaluation's images as a W&B table (step, prompt, seed, image): dashboards compare by eye."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_table"):  # Lightning's WandbLogger
            import wandb

            data = [[step, text, seed, wandb.Image(readable(image), caption=f"{text} (seed {seed})")]
                    for (text, seed), image in zip(rows, images)]  # fmt: skip
            logger.log_table(
                key="metrics/images", columns=["step", "prompt", "seed", "image"], data=data, step=step
            )


def log_prompt_table(trainer: pl.Trainer, step: int, scores: dict[str, Any]) -> None:
    """Each prompt's scores at this step as a W&B table (step, set, prompt, one column per metric):
    which prompts a concept holds up in."""
    rows = [
        (name, prompt, {metric: value["mean"] for metric, value in values.items()})
        for name in SETS
        for prompt, values in (scores.get(name) or {}).get("per_prompt", {}).items()
    ]
    if not rows:
        return
    metrics = list(dict.fromkeys(m for _, _, values in rows for m in values))
    data = [[step, name, prompt, *(values.get(m) for m in metrics)] for name, prompt, values in rows]
    for logger in trainer.loggers:
        if hasattr(logger, "log_table"):  # Lightning's WandbLogger
            logger.log_table(
                key="metrics/per_prompt", columns=["step", "set", "prompt", *metrics], data=data, step=step
            )


def real_images(data) -> list:
    """The real images CLIP-I / DINO compare with: the held-out ones where data.val_images holds some out
    (a concept is not rewarded for reproducing its training images), else every image of the folder,
    whatever subset trained."""

    # The pictures alone: no masks (data.mask weights training's loss, not the references).
    seen, held = read_concept_split(OmegaConf.merge(data, {"num_images": None, "mask": None}))
    return [im.image for im in (held or seen)]


def seen_images(data) -> list | None:
    """The training images where others are held out (scored as seen_clip_i / seen_dino), else None."""
    seen, held = read_concept_split(OmegaConf.merge(data, {"mask": None}))
    return [im.image for im in seen] if held else None


def images_digest(images: list) -> str:
    """Identifies a list of images by their pixels (evaluation cache keys)."""

    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.size}{image.mode}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- evaluate.py


def evaluate_concepts(
    paths: list[str], model_cfg, data_cfg, encoders, protocol, out_dir: Path, device: str = "auto",
    about: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The protocol on these concept files: images (kept, so a rerun resumes), scores, grids, eval.json."""
    class_word, kind = concept_class(data_cfg)
    scorer = _scorer(encoders, data_cfg)
    inference = prepare(paths, model_cfg, device)
    backbone, concepts = inference.backbone, inference.concepts
    words, tagged = inference.words, inference.tagged
    multipliers = [float(m) for m in protocol.multipliers] if tagged else [1.0]
    seeds = [protocol.seed + k for k in range(protocol.images_per_prompt)]
    results: dict[str, Any] = {}
    for multiplier in multipliers:
        tags = inference.tags(multiplier)
        prompts = build_prompts(getattr(protocol, kind), words, class_word, tags)
        folder = out_dir / "images" / multiplier_key(multiplier)
        images = []
        # One transient bar per multiplier, over the prompts (each prompt's seeds in one batch).
        for i, prompt in enumerate(
            tqdm(prompts, desc=f"evaluating x{multiplier:g}", unit="prompt", leave=False)
        ):
            files = [folder / f"{SHORT[prompt.set]}_{i:02d}_seed{s}.png" for s in seeds]
            missing = [s for s, f in zip(seeds, files) if not f.is_file()]
            if missing:  # images made before (an interrupted evaluation) are kept
                text = inference.prompt(prompt.text)
                pixels = backbone.sample(
                    [text] * len(missing), missing, protocol.num_inference_steps, protocol.guidance_scale
                )
                for seed, image in zip(missing, to_pil(pixels)):
                    with atomic_path(files[seeds.index(seed)]) as tmp:
                        image.save(tmp, format="PNG")
            images += [Image.open(f).convert("RGB") for f in files]
        results[multiplier_key(multiplier)] = {
            "multiplier": multiplier, "prompts": [p.text for p in prompts], **scorer.score(prompts, images, len(seeds), EVAL_PREFIX),
        }  # fmt: skip
        grid = labelled_grid(images, [f"{i:02d}" for i in range(len(prompts))], [f"seed {s}" for s in seeds])
        with atomic_path(out_dir / f"grid_{multiplier_key(multiplier)}.png") as tmp:
            grid.save(tmp, format="PNG")
    main = results[multiplier_key(1.0)] if multiplier_key(1.0) in results else next(iter(results.values()))
    record = {
        **(about or {}),
        "protocol": OmegaConf.to_container(protocol, resolve=True),
        "encoders": scorer.encoders.describe(),
        "concepts": [c.describe() for c in concepts],
        "class_word": class_word,
        "kind": kind,
        "seeds": seeds,
        "sampler": "DDIM",
        "model": model_cfg.name,
        "metrics": main["flat"],
        "results": results,
    }
    write_json(out_dir / "eval.json", record)
    return record


_ENCODERS: dict[tuple[str | None, str | None], Any] = {}
_SCORERS: dict[tuple, Scorer] = {}


def _scorer(encoders, data_cfg) -> Scorer:
    """One Scorer per (encoders, image folder), the encoders loaded once: a sweep pays for them once."""
    names = (encoders.clip, encoders.dino)
    if names not in _ENCODERS:
        _ENCODERS[names] = Encoders(*names)
    split = ("path", "val_images", "num_images", "subset_seed")  # what chooses the reference images
    key = (names, *(str(data_cfg[k]) for k in split))
    if key not in _SCORERS:
        _SCORERS[key] = Scorer(_ENCODERS[names], real_images(data_cfg), seen_images(data_cfg))
    return _SCORERS[key]


def explicit(prefix: str) -> bool:
    """Whether the command line set `prefix` (a group or any key below it)."""
    overrides = HydraConfig.get().overrides.task
    return any(re.match(rf"^\+*{re.escape(prefix)}[.=]", o) for o in overrides)


def evaluate_run(run_dir: Path, cfg) -> dict[str, Any]:
    """The protocol on one training run: its model, images and class from its config; encoders and
    protocol from its config too unless the command line names them."""
    folder = RunFolder(run_dir)
    saved = folder.composed_config()
    pick = {
        name: (cfg[name] if explicit(name) or name not in saved else saved[name])
        for name in ("encoders", "protocol")
    }
    concepts, label = folder.concepts_at(cfg.concept)
    return evaluate_concepts(
        [concepts], saved.model, saved.data, pick["encoders"], pick["protocol"], folder.eval, cfg.device,
        about={"run_dir": str(run_dir), "concept": label, "method": saved.method.name},
    )  # fmt: skip


def run(cfg, out_dir: Path) -> list[dict[str, Any]]:
    check_config(cfg, [("", EvaluateRunConfig)])
    chosen = [k for k in ("run", "sweep") if cfg[k]] + (["concepts"] if cfg.concepts else [])
    if len(chosen) != 1:
        raise ConfigError("give one of run=<run dir>, sweep=<multirun dir> or concepts=[files]")
    if cfg.run:
        return [evaluate_run(_existing(cfg.run, "run"), cfg)]
    if cfg.sweep:
        runs = find_run_dirs(_existing(cfg.sweep, "sweep"))
        if not runs:
            raise ConfigError(f"sweep={cfg.sweep}: no run directories (with summary.json) below it")
        records = []
        for run_dir in runs:
            try:
                records.append(evaluate_run(run_dir, cfg))
            except ConceptLabError as err:  # one unusable run (failed, no concept) leaves the others
                log.warning("%s: not evaluated (%s)", run_dir, err)
        return records
    return [
        evaluate_concepts(
            list(cfg.concepts), cfg.model, cfg.data, cfg.encoders, cfg.protocol, out_dir, cfg.device
        )
    ]


def _existing(path: str, key: str) -> Path:
    folder = resolve_path(path)
    if not folder.is_dir():
        raise ConfigError(f"{key}={path}: no such directory")
    return folder


def main(cfg) -> list[dict[str, Any]]:
    """The Hydra task of evaluate.py: a user's mistake is one line on stderr and exit status 2."""
    quiet_third_party(verbose=is_verbose())
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        records = run(cfg, out_dir)
    except ConceptLabError as err:
        print(error_line(err), file=sys.stderr)
        sys.exit(2)
    for record in records:
        where = RunFolder(Path(record["run_dir"])).eval if "run_dir" in record else out_dir
        shown = " ".join(f"{k.removeprefix(EVAL_PREFIX)}={v:.3f}" for k, v in record["metrics"].items())
        say(f"conceptlab: {where / 'eval.json'}  {shown}")
    return records
