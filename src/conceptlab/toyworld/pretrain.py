"""Pretraining the toy world's backbone and judge: VAE -> judge -> UNet + text encoder (jointly, EMA).

Every stage leaves its result in the work folder and is skipped when it is there, and the long UNet
stage checkpoints itself, so an interrupted pretraining resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_json
from ..backbone import TEXT_PARTS, clip_text_encoder, clip_tokenizer, load_backbone, save_sd_folder
from ..config import ModelConfig
from .checkpoint import (
    MANIFEST,
    TOY_VERSION,
    VOCABULARY,
    load_judge,
    toy_model_config,
    unpack_toy_folder,
    write_manifest,
)
from .clip import install_clip, stage_clip
from .evaluate import named_attributes, sample_pairs
from .judge import Judge
from .world import ATTRIBUTES, RESOLUTION, SHAPES, STYLES, Scene, WorldMix, caption, random_scene, render

# diffusers load inside the functions that use them, not here: importing them costs diffusers ~5 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Every knob of the recipe (the study's figures are the defaults)."""

    out: str = "src/conceptlab/toyworld/checkpoint"  # the pipeline folder (+ judge/, results.json)
    work: str = "outputs/toyworld_pretrain"  # resumable state of each stage
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default
    pool_size: int = 48000  # pretraining images (rendered once, encoded once)
    judge_pool_size: int = 16000  # images of the whole world (moon, pastel too) for the judge and the VAE
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    judge_steps: int = 1000
    judge_batch: int = 64
    judge_lr: float = 2e-3
    unet_steps: int = 6500
    unet_batch: int = 64
    unet_lr: float = 4e-4
    text_lr: float = 4e-4
    warmup_steps: int = 300
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    clip_steps: int = 2500  # the toy CLIP (CLIP-I / CLIP-T on model=toy), trained on both pools
    clip_batch: int = 192
    clip_lr: float = 1e-3
    only_clip: bool = False  # train the CLIP and add it to an existing checkpoint folder (`out`)
    family: str = "sd"  # sd, or sdxl: SDXL's shape (two text encoders, pooled text and size conditioning)
    reuse: str = (
        ""  # a toy checkpoint folder whose VAE, judge and CLIP this run takes instead of training its own
    )
    eval_scenes: int = 192  # caption following: this many fully named scenes, one sample each
    pack: str = (
        ""  # SDXL's shape with --reuse: also write the packed form conceptlab ships (model=toy_xl) here
    )
    mix: WorldMix = field(default_factory=WorldMix)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run every stage that has not run yet; return the caption-following results."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.family not in ("sd", "sdxl"):
        raise ValueError(f"--family {cfg.family}: sd or sdxl")
    if cfg.pack and (cfg.family != "sdxl" or not cfg.reuse):
        raise ValueError(
            "--pack writes an SDXL-shaped toy that takes its VAE, judge and CLIP from another: give --family sdxl "
            "and --reuse <that toy's folder> (src/conceptlab/toyworld/checkpoint)"
        )
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    if cfg.reuse:  # the world's VAE, judge and CLIP are the backbone's neighbours, not its shape
        for part in ("vae", "judge", "clip"):
            if not (work / part / "config.json").is_file():
                shutil.copytree(Path(cfg.reuse) / part, work / part, dirs_exist_ok=True)
    pool = stage_pool(cfg, work / "pool.npz", cfg.pool_size, cfg.mix, cfg.seed)
    whole = stage_pool(cfg, work / "judge_pool.npz", cfg.judge_pool_size, whole_world(), cfg.seed + 1)
    both = {
        "images": np.concatenate([pool["images"], whole["images"]]),
        "scenes": pool["scenes"] + whole["scenes"],
    }
    if cfg.only_clip:
        install_clip(stage_clip(cfg, work, both), Path(cfg.out))
        return json.loads((Path(cfg.out) / "clip" / "retrieval.json").read_text())
    vae = stage_vae(cfg, work / "vae", np.concatenate([pool["images"], whole["images"]]))
    stage_judge(cfg, work / "judge", whole, vae)
    stage_unet(cfg, work, pool, vae)
    clip = stage_clip(cfg, work, both)
    out = export(cfg, work, Path(cfg.out))
    install_clip(clip, out)
    results = caption_following(out, cfg)
    write_json(out / "results.json", results)
    if cfg.pack:
        packed = pack_toy_folder(out, Path(cfg.pack), Path(cfg.reuse), cfg.seed)
        # what a user gets: the packed form unpacked, its other vocabulary rows drawn again
        with tempfile.TemporaryDirectory() as cache:
            unpacked = unpack_toy_folder(packed, ModelConfig(cache_dir=cache))
            results["packed"] = caption_following(unpacked, cfg)
        write_json(out / "results.json", results)
        write_json(packed / "results.json", results)
    return results


def pack_toy_folder(folder: Path, out: Path, shared: Path, seed: int) -> Path:
    """An SDXL-shaped toy in the form conceptlab ships (toyworld/checkpoint.py says what it keeps): its
    vocabulary rows that moved in pretraining (the others only decayed with the weights: a multiple of
    their initial values, rebuilt here from the seed), and the VAE, judge and CLIP of `shared`, the toy
    it was pretrained beside, by reference."""
    from safetensors.torch import load_file, save_file

    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("family") != "sdxl":
        raise ValueError(f"--pack: {folder} is not an SDXL-shaped toy (--family sdxl)")
    for part in ("vae", "judge"):
        ours, theirs = (load_file(f / part / "diffusion_pytorch_model.safetensors") for f in (folder, shared))
        if ours.keys() != theirs.keys() or any(not torch.equal(ours[k], theirs[k]) for k in ours):
            raise ValueError(
                f"--pack: {folder}/{part} is not {shared}/{part}; pretrain with --reuse {shared}"
            )
    _, initial = build_unet_and_text_encoders(seed, "sdxl")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder / "unet", tmp / "unet")
    vocabulary, spreads = {}, []
    for part, encoder in zip(TEXT_PARTS, initial):
        state = load_file(folder / part / "model.safetensors")
        key = next(name for name in state if name.endswith("token_embedding.weight"))
        table, start = state.pop(key).float(), encoder.state_dict()[key].float()
        scale = (table * start).sum() / (start * start).sum()
        moved = (table - start * scale).abs().amax(1) > 1e-3
        if moved.sum() > 1000:
            raise ValueError(
                f"--pack: {moved.sum()} rows of {folder}/{part} moved; was it pretrained from --seed {seed}?"
            )
        ids = moved.nonzero().flatten()
        vocabulary[f"{part}.ids"], vocabulary[f"{part}.rows"] = ids, table[ids].half()
        spreads.append(float(table[~moved].std()))
        (tmp / part).mkdir()
        shutil.copy(folder / part / "config.json", tmp / part / "config.json")
        save_file(state, tmp / part / "model.safetensors")
    save_file(vocabulary, tmp / VOCABULARY)
    packed = {"shared": os.path.relpath(shared.resolve(), out.resolve().parent), "seed": seed,
              "std": round(sum(spreads) / len(spreads), 6)}  # fmt: skip
    write_json(tmp / MANIFEST, {**manifest, "packed": packed})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def whole_world() -> WorldMix:
    """Every shape and style, half of them small: what the judge must read (and the VAE must keep)."""
    return WorldMix(p_large=0.5, p_plain=1 / len(STYLES), shapes=SHAPES, styles=STYLES)


# ---------------------------------------------------------------------------------------------- pool


def _render_chunk(args: tuple[int, int, WorldMix]) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    seed, count, mix = args
    rng = random.Random(seed)
    scenes = [random_scene(rng, mix) for _ in range(count)]
    images = np.stack([render(s) for s in scenes])
    labels = np.array([[s.label(a) for a in ATTRIBUTES] for s in scenes], np.int64)
    return images, labels, scenes


def stage_pool(cfg: PretrainConfig, path: Path, size: int, mix: WorldMix, seed: int) -> dict:
    """Rendered scenes: images [N, 32, 32, 3] uint8, labels [N, attributes], and the scenes themselves."""
    if not path.is_file():
        chunks = [
            (seed * 1_000_003 + i, min(1000, size - i * 1000), mix) for i in range((size + 999) // 1000)
        ]
        with ExitStack() as stack:
            if len(chunks) == 1:  # one chunk: rendered here (a spawned worker would first import torch again)
                rendered = map(_render_chunk, chunks)
            else:
                workers = stack.enter_context(
                    multiprocessing.get_context("spawn").Pool(max(1, min(4, multiprocessing.cpu_count())))
                )
                rendered = workers.imap(_render_chunk, chunks)
            parts = list(tqdm(rendered, total=len(chunks), desc=f"render {path.stem}"))
        scenes = [asdict(s) for part in parts for s in part[2]]
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    images=np.concatenate([p[0] for p in parts]),
                    labels=np.concatenate([p[1] for p in parts]),
                    scenes=np.array(json.dumps(scenes)),
                )
    data = np.load(path)
    scenes = [Scene(**s) for s in json.loads(str(data["scenes"]))]
    return {"images": data["images"], "labels": data["labels"], "scenes": scenes}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------- VAE


def stage_vae(cfg: PretrainConfig, folder: Path, images: np.ndarray):
    """A factor-4 AutoencoderKL (32 px -> 8x8x4), its scaling factor set from the latents' spread."""
    from diffusers import AutoencoderKL

    if (folder / "config.json").is_file():
        return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=RESOLUTION,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = np.random.default_rng(cfg.seed)
    bar = tqdm(range(cfg.vae_steps), desc="vae")
    for step in bar:
        x = to_tensor(images[gen.integers(0, len(images), cfg.vae_batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(psnr=f"{10 * np.log10(4 / max(mse.item(), 1e-12)):.1f}dB")
    vae.eval()
    with torch.no_grad():
        x = to_tensor(images[gen.integers(0, len(images), 512)])
        std = vae.encode(x).latent_dist.sample().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    _save(vae, folder)
    return vae


def _save(model, folder: Path) -> None:
    """save_pretrained into a temp folder, then rename: a stage's folder is complete or absent."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# --------------------------------------------------------------------------------------------- judge


def stage_judge(cfg: PretrainConfig, folder: Path, pool: dict, vae) -> Judge:
    """The judge, trained on clean images and on their VAE reconstructions (what samples look like)."""
    if (folder / "config.json").is_file():
        return Judge.from_pretrained(folder, torch_dtype=torch.float32).eval()
    torch.manual_seed(cfg.seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.judge_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.judge_lr, total_steps=cfg.judge_steps)
    images, labels = pool["images"], torch.from_numpy(pool["labels"])
    held_out = len(images) // 10
    gen = np.random.default_rng(cfg.seed + 2)
    bar = tqdm(range(cfg.judge_steps), desc="judge")
    for step in bar:
        idx = gen.integers(held_out, len(images), cfg.judge_batch)
        x = _maybe_reconstruct(vae, to_tensor(images[idx]), half=True)
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[a], labels[idx, i]) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    judge.eval()
    accuracy = judge_accuracy(judge, vae, images[:held_out], labels[:held_out])
    log.info("judge on held-out reconstructions: %s", accuracy)
    _save(judge, folder)
    write_json(folder.parent / "judge_accuracy.json", accuracy)
    return judge


@torch.no_grad()
def _maybe_reconstruct(vae, x: torch.Tensor, half: bool) -> torch.Tensor:
    """Half of the batch (or all of it) replaced by its VAE reconstruction."""
    n = len(x) // 2 if half else len(x)
    recon = vae.decode(vae.encode(x[:n]).latent_dist.mode()).sample.clamp(-1, 1)
    return torch.cat([recon, x[n:]])


@torch.no_grad()
def judge_accuracy(judge: Judge, vae, images: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
    hits = {a: 0 for a in ATTRIBUTES}
    for start in range(0, len(images), 256):
        x = _maybe_reconstruct(vae, to_tensor(images[start : start + 256]), half=False)
        logits = judge(x)
        for i, a in enumerate(ATTRIBUTES):
            hits[a] += (logits[a].argmax(1) == labels[start : start + 256, i]).sum().item()
    return {a: round(h / len(images), 4) for a, h in hits.items()}


# ------------------------------------------------------------------------------ UNet + text encoder


def build_unet_and_text_encoders(seed: int, family: str = "sd") -> tuple:
    """The UNet and its text encoders (one; SDXL's shape: two, the second with a projection)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    text_encoder = clip_text_encoder(width=64, intermediate=256, layers=3, heads=4)
    if family == "sdxl":
        # SDXL's pattern at the toy's size: a wider second encoder whose pooled projection joins the time
        # embedding with the six size ids; attention from the second level down, two layers at the last.
        text_encoder_2 = clip_text_encoder(width=96, intermediate=384, layers=3, heads=4, projection=True)
        unet = UNet2DConditionModel(
            sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=8, use_linear_projection=True,
            cross_attention_dim=64 + 96, addition_embed_type="text_time", addition_time_embed_dim=16,
            projection_class_embeddings_input_dim=96 + 6 * 16, mid_block_type=None,
        )  # fmt: skip
        return unet, [text_encoder, text_encoder_2]
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        # No middle block: at 2x2 it adds a million parameters (2 MB of the checkpoint) and little else.
        mid_block_type=None,
    )
    return unet, [text_encoder]


def unet_inputs(encoders: list, tokenizers: list, texts: list[str]) -> dict:
    """The UNet's text inputs for captions: SD, the text encoder's last hidden state; SDXL's shape, both
    encoders' penultimate states side by side, the second's pooled projection and the size ids of an
    uncropped picture at the world's resolution (as conceptlab's Backbone gives them)."""
    ids = [tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for tok in tokenizers]  # fmt: skip
    if len(encoders) == 1:
        return {"encoder_hidden_states": encoders[0](ids[0])[0]}
    first = encoders[0](ids[0], output_hidden_states=True)
    second = encoders[1](ids[1], output_hidden_states=True)
    size = torch.tensor([RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION], dtype=torch.float32)
    return {
        "encoder_hidden_states": torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1),
        "added_cond_kwargs": {"text_embeds": second.text_embeds, "time_ids": size.repeat(len(texts), 1)},
    }


@torch.no_grad()
def encode_pool(vae, images: np.ndarray) -> torch.Tensor:
    """The VAE posterior's moments (mean and log-variance) of every pool image, scaled later."""
    moments = []
    for start in tqdm(range(0, len(images), 512), desc="encode pool"):
        dist = vae.encode(to_tensor(images[start : start + 512])).latent_dist
        moments.append(torch.cat([dist.mean, dist.logvar], dim=1))
    return torch.cat(moments)


# Each model's EMA in the stage's state (the SD recipe's names, which its resumable states carry).
EMA_KEYS = {"unet": "ema_unet", "text_encoder": "ema_text", "text_encoder_2": "ema_text_2"}


def stage_unet(cfg: PretrainConfig, work: Path, pool: dict, vae) -> None:
    """UNet and text encoder trained jointly on the epsilon loss, with an EMA of both."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    state_path = work / "unet_state.pt"
    moments_path = work / "latent_moments.pt"
    if not moments_path.is_file():
        with atomic_path(moments_path) as tmp:
            torch.save(encode_pool(vae, pool["images"]), tmp)
    moments = torch.load(moments_path, weights_only=True)
    scaling = vae.config.scaling_factor
    unet, encoders = build_unet_and_text_encoders(cfg.seed, cfg.family)
    tokenizers = [clip_tokenizer(), clip_tokenizer(pad_token="!")][: len(encoders)]
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000)  # fmt: skip
    params = [
        {"params": list(unet.parameters()), "lr": cfg.unet_lr},
        *({"params": list(encoder.parameters()), "lr": cfg.text_lr} for encoder in encoders),
    ]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    models = {"unet": unet, **{TEXT_PARTS[k]: encoder for k, encoder in enumerate(encoders)}}
    emas = {key: EMAModel(model.parameters(), decay=cfg.ema_decay) for key, model in models.items()}
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        for key, model in models.items():
            model.load_state_dict(state[key])
            emas[key].load_state_dict(state[EMA_KEYS[key]])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
    if step >= cfg.unet_steps:
        return
    scenes = pool["scenes"]
    for model in models.values():
        model.train()
    bar = tqdm(range(step, cfg.unet_steps), initial=step, total=cfg.unet_steps, desc="unet+text")
    for step in bar:
        # Every step's draws are a function of (seed, step): resuming replays the same stream.
        rng = random.Random(cfg.seed * 1_000_003 + step)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(scenes), (cfg.unet_batch,), generator=gen)
        mean, logvar = moments[idx].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * scaling
        texts = [caption(scenes[i], rng, cfg.mix) for i in idx.tolist()]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, **unet_inputs(encoders, tokenizers, texts)).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        for key, model in models.items():
            emas[key].step(model.parameters())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            state = {
                **{key: model.state_dict() for key, model in models.items()},
                **{EMA_KEYS[key]: ema.state_dict() for key, ema in emas.items()},
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": done,
            }
            with atomic_path(state_path) as tmp:
                torch.save(state, tmp)


# ------------------------------------------------------------------------------------------- export


def export(cfg: PretrainConfig, work: Path, out: Path) -> Path:
    """The EMA weights in fp16, saved as a diffusers pipeline folder with judge/ and toyworld.json."""
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel

    unet, encoders = build_unet_and_text_encoders(cfg.seed, cfg.family)
    state = torch.load(work / "unet_state.pt", weights_only=True)
    models = {"unet": unet, **{TEXT_PARTS[k]: encoder for k, encoder in enumerate(encoders)}}
    for key, model in models.items():
        ema = EMAModel(model.parameters())
        ema.load_state_dict(state[EMA_KEYS[key]])
        ema.copy_to(model.parameters())
    vae = AutoencoderKL.from_pretrained(work / "vae", torch_dtype=torch.float32)
    judge = Judge.from_pretrained(work / "judge", torch_dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_sd_folder(tmp, encoders[0].half(), vae.half(), unet.half(), *(e.half() for e in encoders[1:]))
    judge.half().save_pretrained(tmp / "judge")
    write_manifest(
        tmp, {"steps": state["step"], "seed": cfg.seed, "family": cfg.family, "recipe": _recipe(cfg)}
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _recipe(cfg: PretrainConfig) -> dict:
    recipe = asdict(cfg)
    recipe.pop("out")
    recipe.pop("work")
    recipe.pop("only_clip")
    recipe.pop("reuse")
    return recipe


# ------------------------------------------------------------------------------- caption following


def caption_following(folder: Path, cfg: PretrainConfig) -> dict:
    """How well the exported model draws what fully named captions ask for, read by its judge."""

    start = time.time()
    backbone = load_backbone(toy_model_config(folder)).to(torch.float32)
    judge = load_judge(folder)
    rng = random.Random(cfg.seed + 7)
    named = WorldMix(p_large=0.5, shapes=SHAPES[:6], styles=STYLES[:4])
    scenes = [random_scene(rng, named) for _ in range(cfg.eval_scenes)]
    prompts = [caption(s) for s in scenes]
    images = sample_pairs(backbone, prompts, list(range(len(prompts))))
    read = judge.read(images)
    hits: dict[str, list[bool]] = {}
    for i, (scene, prompt) in enumerate(zip(scenes, prompts)):
        for attribute, value in named_attributes(prompt).items():
            key = f"{attribute}_large" if attribute == "shape" and scene.size == "large" else attribute
            hits.setdefault(key, []).append(read[attribute][i] == value)
    accuracy = {k: round(sum(v) / len(v), 4) for k, v in sorted(hits.items())}
    return {
        "version": TOY_VERSION,
        "caption_following": accuracy,
        "samples": len(prompts),
        "seconds": round(time.time() - start, 1),
    }
