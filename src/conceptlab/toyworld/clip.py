"""The toy world's CLIP: a small image-text model trained contrastively on the world's own captions,
so that CLIP-I and CLIP-T (conceptlab.metrics) run with trained weights on model=toy and in CI.

It is a transformers `CLIPModel` with its `CLIPProcessor`, saved in `<toy checkpoint>/clip/`: the
metrics load it exactly as they load `openai/clip-vit-base-patch32`. Unlike the backbone, it has seen
the whole world and its captions name everything (the star, the moon, the checkered and pastel
styles): it plays the part of a real CLIP, which knows more than the generator it judges.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_json
from ..backbone import clip_tokenizer
from .world import ATTRIBUTES, PREFIXES, RESOLUTION, Scene, drop_words

# transformers load inside the functions that use them, not here: importing them costs transformers ~1 s on the
# 2-core CI machine (measured), which a run, the command lines' --help and the tests need not pay
# where they go unused.

log = logging.getLogger(__name__)
FOLDER = "clip"  # inside a toy checkpoint


def full_caption(scene: Scene, rng: random.Random, p_drop: float = 0.3) -> str:
    """A caption naming every attribute (each but the shape dropped with p_drop), in the world's grammar."""
    return drop_words(scene, rng, p_drop, scene.shape, scene.style != "plain")


def build_toy_clip(seed: int):
    """A CLIPModel for 32x32 images (4x4 patches) and the world's captions, and its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = CLIPConfig(
        text_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "vocab_size": 49408},
        vision_config={"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 3,
                       "num_attention_heads": 4, "image_size": RESOLUTION, "patch_size": 4},
        projection_dim=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config)
    # Rows of words the world never uses stay exactly zero (AdamW's decay keeps zero at zero); after
    # training the vocabulary is cut down to the world's words (reduce_vocabulary).
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight.zero_()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": RESOLUTION}, crop_size={"height": RESOLUTION, "width": RESOLUTION},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())


def world_words() -> list[str]:
    """Every word and mark the world's captions use."""

    text = " ".join(
        [*PREFIXES, "a shape on background style ,", *(v for vs in ATTRIBUTES.values() for v in vs)]
    )
    words = sorted(set(re.findall(r"[a-z]+|[^\sa-z]", text.lower())))
    assert all(w.isascii() and w.isprintable() for w in words)
    return words


def reduce_vocabulary(model, processor, words: list[str]):
    """The same CLIP with a vocabulary of the byte symbols, the BPE merges `words` need, and the special
    tokens (a few hundred entries instead of 49,408): the world's captions tokenize to the same pieces,
    whose embedding rows are copied, so the model's outputs on them are unchanged. Returns (model, processor)."""

    from transformers import CLIPProcessor, CLIPTokenizer

    old = processor.tokenizer
    bpe = json.loads(old.backend_tokenizer.to_str())["model"]
    vocab, ranks = bpe["vocab"], {tuple(m): i for i, m in enumerate(bpe["merges"])}
    used: set[tuple[str, str]] = set()
    for word in words:
        symbols = list(word)  # printable ASCII: its own byte symbols in CLIP's byte-level alphabet
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = [
                (ranks.get(pair, len(ranks)), i, pair) for i, pair in enumerate(zip(symbols, symbols[1:]))
            ]
            rank, i, pair = min(pairs)
            if rank == len(ranks):
                break
            used.add(pair)
            symbols[i : i + 2] = ["".join(pair)]
    merges = sorted(used, key=ranks.get)  # applied in CLIP's own order
    base = sorted(vocab, key=vocab.get)[:512]  # the 256 byte symbols, then each with </w>
    tokens = base + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    new_vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=new_vocab, merges=merges, model_max_length=old.model_max_length,
                              pad_token=old.pad_token)  # fmt: skip
    text = model.text_model
    old_rows = text.embeddings.token_embedding.weight.data
    rows = old_rows.new_zeros(len(new_vocab), old_rows.shape[1])
    for token, i in new_vocab.items():
        rows[i] = old_rows[vocab[token]]
    text.embeddings.token_embedding = torch.nn.Embedding.from_pretrained(rows, freeze=False)
    config = model.config.text_config
    config.vocab_size = len(new_vocab)
    config.bos_token_id, config.eos_token_id = new_vocab["<|startoftext|>"], new_vocab["<|endoftext|>"]
    config.pad_token_id = new_vocab[old.pad_token]
    text.eos_token_id = config.eos_token_id
    return model, CLIPProcessor(image_processor=processor.image_processor, tokenizer=tokenizer)


def stage_clip(cfg, work: Path, pool: dict) -> Path:
    """Train the toy CLIP on rendered scenes (images [N, 32, 32, 3] uint8 and their scenes) with the
    symmetric contrastive loss; resumable (work/clip_state.pt); the result in work/clip/."""
    folder = work / FOLDER
    if (folder / "config.json").is_file():
        return folder
    model, processor = build_toy_clip(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.clip_lr, total_steps=cfg.clip_steps)
    state_path = work / "clip_state.pt"
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
    images, scenes = pool["images"], pool["scenes"]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # the processor's normalisation
    model.train()
    bar = tqdm(range(step, cfg.clip_steps), initial=step, total=cfg.clip_steps, desc="clip")
    for step in bar:
        rng = random.Random(cfg.seed * 1_000_003 + step)  # each step's draws depend on (seed, step) only
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(scenes), (cfg.clip_batch,), generator=gen)
        texts = [full_caption(scenes[i], rng) for i in idx.tolist()]
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        out = model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels[idx]
        )
        # Captions of scenes alike are alike: targets are the exact-caption matches, shared evenly.
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(dim=1, keepdim=True)
        loss = (
            F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)
        ) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.clip_steps:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "step": done}  # fmt: skip
            with atomic_path(state_path) as tmp:
                torch.save(state, tmp)
    model, processor = reduce_vocabulary(model.eval(), processor, world_words())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.half().save_pretrained(tmp)
    processor.save_pretrained(tmp)
    write_json(tmp / "retrieval.json", retrieval_accuracy(model.float(), processor, pool, cfg.seed))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


@torch.no_grad()
def retrieval_accuracy(model, processor, pool: dict, seed: int, count: int = 512) -> dict[str, float]:
    """How often each image's own full caption is the nearest of `count` captions, and how often the
    nearest caption names the right value of each attribute (the model's reading of the world)."""

    rng = np.random.default_rng(seed + 99)
    idx = rng.choice(len(pool["scenes"]), min(count, len(pool["scenes"])), replace=False)
    scenes = [pool["scenes"][i] for i in idx]
    texts = [full_caption(s, random.Random(0), p_drop=0.0) for s in scenes]
    inputs = processor(text=texts, images=list(pool["images"][idx]), return_tensors="pt", padding=True)
    nearest = model(**inputs).logits_per_image.argmax(dim=1).tolist()
    out = {"caption": float(np.mean([texts[j] == texts[i] for i, j in enumerate(nearest)]))}
    for attribute in ATTRIBUTES:
        out[attribute] = float(
            np.mean(
                [
                    getattr(scenes[j], attribute) == getattr(scenes[i], attribute)
                    for i, j in enumerate(nearest)
                ]
            )
        )
    return {k: round(v, 4) for k, v in out.items()}


def install_clip(work_clip: Path, out: Path) -> Path:
    """Copy the trained CLIP into a toy checkpoint folder (complete or absent)."""
    target = out / FOLDER
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work_clip, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
