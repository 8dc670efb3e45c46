"""Similarity metrics of generated images, with the field's encoders (transformers' CLIP and ViT/DINO
models, each with its own processor, loaded from a hub id or a local folder):

* CLIP-I: mean cosine similarity of a generated image's CLIP embedding to the real images' ones;
* DINO: the same with a self-supervised ViT's [CLS] feature (DINO ViT-S/16 as in DreamBooth; DINOv2);
* CLIP-T: cosine similarity of the image's and the prompt's CLIP embeddings (the concept's words
  replaced by its class word); CLIPScore = 2.5 * max(CLIP-T, 0) (Hessel et al. 2021).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backbone import resolve_path
from .errors import ConfigError
from .evalcache import tensors_digest

# transformers load inside the functions that use them, not here: importing them costs transformers ~1 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

log = logging.getLogger(__name__)
CLIPSCORE_WEIGHT = 2.5


def load_pretrained(cls, name: str, key: str, **kwargs):
    """`cls.from_pretrained(name)`: a local folder (or pkg:// path) never touches the network; a hub id
    is read from the Hugging Face cache or downloaded. A failure names the key and the fix."""

    path = resolve_path(name)
    local = path.exists() or name.startswith(("pkg://", "/", ".", "~"))
    try:
        return cls.from_pretrained(str(path) if local else name, local_files_only=local, **kwargs)
    except (OSError, ValueError) as err:
        where = f"the folder {path}" if local else f"the hub id {name!r} (network or the Hugging Face cache)"
        raise ConfigError(
            f"{key}={name}: could not load {cls.__name__} from {where} ({str(err).splitlines()[0]}); give a "
            "local folder saved with save_pretrained, or a hub id this machine can reach"
        ) from err


def encoder_identity(clip: str | None, dino: str | None) -> dict[str, Any]:
    """Check that each named encoder can be found (its config loads: a clear error before anything
    else loads) and identify it without loading its weights: a local folder by its weight files'
    names, sizes and times, a hub id by the cached snapshot's revision."""
    from transformers import AutoConfig

    out: dict[str, Any] = {"clip": clip, "dino": dino}
    for key, name in (("clip", clip), ("dino", dino)):
        if not name:
            continue
        load_pretrained(AutoConfig, name, f"encoders.{key}")
        folder = resolve_path(name)
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
            out[f"{key}_files"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
            out[f"{key}_revision"] = Path(cached).parent.name if isinstance(cached, str) else None
    return out


class Encoders:
    """The evaluation encoders: CLIP (image and text) and, optionally, a DINO-style ViT."""

    def __init__(self, clip: str | None, dino: str | None, device: str | torch.device = "cpu"):
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

        self.names = {"clip": clip, "dino": dino}
        self.device = torch.device(device)
        self.clip = self.clip_processor = self.dino = self.dino_processor = None
        if clip:
            # float32 whatever the files hold (the toy CLIP ships fp16): scores comparable across machines
            self.clip = (
                load_pretrained(CLIPModel, clip, "encoders.clip", dtype=torch.float32).eval().to(self.device)
            )
            self.clip_processor = load_pretrained(AutoProcessor, clip, "encoders.clip")
        if dino:
            from transformers import AutoConfig

            # A ViT's pooler is not part of DINO (its [CLS] feature is the embedding): not built.
            extra = (
                {"add_pooling_layer": False}
                if load_pretrained(AutoConfig, dino, "encoders.dino").model_type == "vit"
                else {}
            )
            self.dino = load_pretrained(AutoModel, dino, "encoders.dino", dtype=torch.float32, **extra)
            self.dino = self.dino.eval().to(self.device)
            self.dino_processor = load_pretrained(AutoImageProcessor, dino, "encoders.dino")

    def to(self, device: str | torch.device) -> Encoders:
        self.device = torch.device(device)
        for model in (self.clip, self.dino):
            if model is not None:
                model.to(self.device)
        return self

    def describe(self) -> dict[str, Any]:
        """What eval.json records (and what cached scores are keyed by)."""

        out: dict[str, Any] = dict(self.names)
        for name in ("clip", "dino"):
            model = getattr(self, name)
            if model is not None:
                if getattr(model, "_digest", None) is None:
                    model._digest = tensors_digest(sorted(model.state_dict().items()))[:16]
                out[f"{name}_weights"] = model._digest
        return out

    @torch.no_grad()
    def image_features(self, images: list, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """Unit-length embeddings of PIL images: {"clip": [N, d], "dino": [N, d']} (those configured)."""
        out: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            if self.clip is not None:
                pixels = self.clip_processor(images=chunk, return_tensors="pt").pixel_values
                features = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.clip.dtype))
                out.setdefault("clip", []).append(_unit(_tensor(features)))
            if self.dino is not None:
                pixels = self.dino_processor(images=chunk, return_tensors="pt").pixel_values
                hidden = self.dino(pixel_values=pixels.to(self.device, self.dino.dtype)).last_hidden_state
                out.setdefault("dino", []).append(_unit(hidden[:, 0]))  # the [CLS] token, as DreamBooth
        return {name: torch.cat(parts) for name, parts in out.items()}

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Unit-length CLIP text embeddings [N, d]."""
        if self.clip is None:
            raise ConfigError("CLIP-T needs a CLIP model: set encoders.clip")
        tokens = self.clip_processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        features = self.clip.get_text_features(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        )
        return _unit(_tensor(features))


def _tensor(features) -> torch.Tensor:
    """get_*_features returns a tensor (or, in some transformers versions, an output with pooler_output)."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass
class ImageScores:
    """Per generated image: CLIP-I and DINO (mean similarity to the real images), CLIP-T, CLIPScore."""

    values: dict[str, list[float]]  # metric -> one value per generated image

    def summary(self, groups: list[str] | None = None) -> dict[str, Any]:
        """Mean and std of each metric over all images, and per group (e.g. per prompt)."""
        out: dict[str, Any] = {name: mean_std(v) for name, v in self.values.items()}
        if groups is not None:
            per: dict[str, dict[str, Any]] = {}
            for name, values in self.values.items():
                for group in dict.fromkeys(groups):
                    chosen = [v for v, g in zip(values, groups) if g == group]
                    per.setdefault(group, {})[name] = mean_std(chosen)
            out["per_prompt"] = per
        return out


def mean_std(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(t) > 1 else 0.0, "n": len(t)}


def image_similarity(generated: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each generated embedding's mean cosine similarity to the real ones ([N], inputs unit-length)."""
    return (generated @ real.T).mean(dim=1)


def score_images(
    encoders: Encoders, images: list, real_features: dict[str, torch.Tensor] | None = None,
    texts: list[str] | None = None, seen_features: dict[str, torch.Tensor] | None = None,
) -> ImageScores:  # fmt: skip
    """CLIP-I / DINO against `real_features` (Encoders.image_features of the real images), also against
    `seen_features` (the training images, when others are held out: seen_clip_i, seen_dino), and CLIP-T
    and CLIPScore of images[i] against texts[i]."""
    features = encoders.image_features(images)
    values: dict[str, list[float]] = {}
    for prefix, references in (("", real_features), ("seen_", seen_features)):
        for name, real in (references or {}).items():
            metric = "clip_i" if name == "clip" else name
            values[prefix + metric] = image_similarity(features[name], real).tolist()
    if texts is not None and "clip" in features:
        cos = (features["clip"] * encoders.text_features(texts)).sum(dim=1)
        values["clip_t"] = cos.tolist()
        values["clipscore"] = (CLIPSCORE_WEIGHT * cos.clamp_min(0)).tolist()
    return ImageScores(values)
