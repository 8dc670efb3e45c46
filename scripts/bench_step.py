"""Time conceptlab's textual-inversion training step against the diffusers example script's step.

Both run in this one process, on the same backbone weights and batch size:
* conceptlab: cached VAE latents, AdamW over the placeholder's vectors only (ConceptModule.training_step).
* baseline, as diffusers' examples/textual_inversion/textual_inversion.py does it: each step opens and
  preprocesses the images, VAE-encodes them, runs AdamW over the whole token-embedding table, then
  copies every row but the placeholder's back from a saved copy.

    python scripts/bench_step.py                                   # tiny backbone, CPU
    python scripts/bench_step.py --shape sd15 --device cuda        # SD-1.5 shapes (random weights), GPU
    python scripts/bench_step.py --shape sd15 --device cuda --dtype bfloat16 --batch-size 1,4,16 \
        --compile reduce-overhead --folder /tmp/sd15                 # every batch size, compiled too
    python scripts/bench_step.py --shape sdxl --device cuda --dtype bfloat16 --batch-size 1 \
        --gradient-checkpointing --folder /tmp/sdxl                  # SDXL at 1024 px: TI and LoRA

It also times conceptlab's hypernetwork step (A1111's default structure, cached text contexts) on
the same backbone and batch, the TI step inside Lightning's Trainer loop as train.py runs it (data
loader, automatic optimization, schedule, logging, hooks; its cost over the bare step), and with --compile conceptlab's TI step with the UNet compiled as
`trainer.compile=<mode>` compiles it. Prints one JSON object: steps/s and images/s of each, the ratios
(conceptlab TI / baseline; hypernetwork step time / TI step time), memory figures, and each step's
FLOPs (counted by torch.utils.flop_counter over one step) with the rate achieved and, on a GPU whose
bf16 peak is known (or given with --peak-tflops), the fraction of that peak. With several batch sizes,
one such object per size under "batches".

With an SDXL shape (`--shape sdxl`: SDXL base's architecture with random weights, 1024 px; `tiny_xl`:
the tests' SDXL) it times conceptlab's TI and LoRA steps (`--methods`), each with its FLOPs and, on a
GPU, its peak memory; the diffusers examples' SDXL steps are not re-written here.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image

from conceptlab.backbone import Backbone, ensure_tiny_backbone, load_backbone
from conceptlab.config import DataConfig, ModelConfig, OptimConfig
from conceptlab.console import quiet_third_party
from conceptlab.data import ConceptDataModule, read_concept_images, resolve_data_path, to_square
from conceptlab.methods.hypernetwork import Hypernetwork
from conceptlab.methods.lora import LoRA
from conceptlab.methods.textual_inversion import TextualInversion
from conceptlab.module import ConceptModule
from conceptlab.train import COMPILE_MODES, compile_unet

# Dense bf16 tensor-core peaks (TFLOP/s, the vendors' figures without sparsity; fp16's are the same on
# these parts), by a part of the name torch.cuda.get_device_name gives; --peak-tflops for any other
# device or precision.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def sd15_shaped_folder(folder: Path) -> Path:
    """A diffusers folder with SD-1.5's architecture and random weights (nothing is downloaded)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptlab.backbone import save_sd_folder

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))  # fmt: skip
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
    )  # fmt: skip
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    return save_sd_folder(folder, text_encoder, vae, unet)


def sdxl_shaped_folder(folder: Path) -> Path:
    """A diffusers folder with SDXL base 1.0's architecture and random weights (nothing is downloaded),
    saved in bfloat16 (the benchmark casts to its own dtype)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from conceptlab.backbone import save_sd_folder

    torch.manual_seed(0)
    common = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", projection_dim=768, pad_token_id=49407, **common,
    )).to(torch.bfloat16)  # fmt: skip
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280, pad_token_id=1, **common,
    )).to(torch.bfloat16)  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ).to(torch.bfloat16)  # fmt: skip
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
        scaling_factor=0.13025,
    ).to(torch.bfloat16)  # fmt: skip
    return save_sd_folder(folder, text_encoder, vae, unet, text_encoder_2)


SHAPED = {"sd15": sd15_shaped_folder, "sdxl": sdxl_shaped_folder}


def shaped_folder(shape: str, kept: Path | None, tmp: Path) -> Path:
    """The folder of `shape`'s architecture: the one kept at `kept` by an earlier run, else made there
    (or in tmp)."""
    if kept is not None and (kept / "model_index.json").exists():
        return kept
    return SHAPED[shape](kept or tmp / shape)


def conceptlab_parts(folder, images, args, device, dtype, method_name="ti", compile_mode=None):
    """conceptlab's module and data for one method, as train.py builds them (the backbone in `dtype`)."""
    backbone = load_backbone(ModelConfig(path=str(folder))).to(device, dtype)
    if method_name == "ti":
        method = TextualInversion(
            name="ti", lr=5e-3, scale_lr=False, concept="bench", num_vectors=args.num_vectors
        )
    elif method_name == "lora":  # the defaults: rank 4 on the UNet's attention projections
        method = LoRA(name="lora", lr=1e-4, scale_lr=False, concept="bench")
    else:  # A1111's default: [1, 2, 1] on the text width and every block width
        method = Hypernetwork(name="hypernet", lr=1e-5, scale_lr=False, concept="bench")
    method.attach(backbone)
    method.to(device)
    if args.gradient_checkpointing:  # as trainer.gradient_checkpointing=true does it
        method.enable_gradient_checkpointing(backbone)
    for parameter in method.trainable_parameters():  # what trains stays float32 (train.make_module)
        parameter.data = parameter.data.float()
    compile_unet(backbone, compile_mode or False)  # as trainer.compile=<mode> does it (train.make_module)
    cfg = DataConfig(path=args.images, batch_size=args.batch_size)
    data = ConceptDataModule(
        cfg, images, backbone, method.prompt_text, seed=0, resolution=args.resolution,
        cache_context=not method.changes_text_encoding,
    )  # fmt: skip
    module = ConceptModule(backbone, method, OptimConfig(), lr_schedule=[(5e-3, None)], max_steps=10**6)
    return module, data


def conceptlab_step(folder, images, args, device, dtype, method_name="ti", compile_mode=None):
    """conceptlab's training step, called directly: the module's step, backward, AdamW."""
    module, data = conceptlab_parts(folder, images, args, device, dtype, method_name, compile_mode)
    data.setup("fit")
    loader = data.train_dataloader()
    module.log = lambda *a, **k: None  # no Trainer here to log to
    optimizer = module.configure_optimizers()["optimizer"]
    batches = iter(loader)

    def step():
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer, module.method.trainable_parameters()


class StepClock(pl.Callback):
    """The time between one training batch's end and the next's: a whole step of Lightning's loop."""

    def __init__(self, device):
        self.device, self.ends = device, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def lightning_steps(folder, images, args, device, dtype) -> dict | None:
    """conceptlab's TI step as a run takes it: Lightning's Trainer loop (the data loader, automatic
    optimization, the learning-rate schedule, logging, every hook), timed per step over args.steps
    steps after args.warmup; the median. None for float16 weights on the CPU, which no run has
    (model.dtype=auto keeps float32 there; Lightning's 16-mixed autocasts to bfloat16 on the CPU)."""
    if device.type == "cpu" and dtype == torch.float16:
        return None
    module, data = conceptlab_parts(folder, images, args, device, dtype)
    precision = {torch.float32: "32-true", torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed"}[dtype]
    clock = StepClock(device)
    trainer = pl.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=args.warmup + args.steps + 1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[clock], log_every_n_steps=50,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:])][args.warmup :]
    rate = 1 / statistics.median(steps)
    return {"steps_per_s": round(rate, 3), "images_per_s": round(rate * args.batch_size, 2)}


def baseline_step(folder, image_paths, args, device, dtype):
    """The diffusers example's step, re-written here to measure it (not imported: it is a script)."""
    backbone: Backbone = load_backbone(ModelConfig(path=str(folder)))
    backbone.vae.to(device, dtype)
    backbone.unet.to(device, dtype)
    text_encoder = backbone.text_encoder.to(device)  # the example keeps the trained text encoder in fp32
    tokenizer, scheduler = backbone.tokenizer, backbone.scheduler
    placeholder = ["<bench>"] + [f"<bench>_{i}" for i in range(1, args.num_vectors)]
    tokenizer.add_tokens(placeholder)
    ids = tokenizer.convert_tokens_to_ids(placeholder)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings()
    table.weight.requires_grad_(True)
    optimizer = torch.optim.AdamW(table.parameters(), lr=5e-3, weight_decay=1e-2)
    original = table.weight.data.clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[min(ids) : max(ids) + 1] = False
    captions = ["a photo of a " + " ".join(placeholder)]

    def item():
        image = Image.open(random.choice(image_paths)).convert("RGB")
        image = to_square(image, args.resolution, center_crop=True)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        input_ids = tokenizer(
            captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        ).input_ids[0]
        return pixels, input_ids

    def step():
        pixels, input_ids = map(torch.stack, zip(*[item() for _ in range(args.batch_size)]))
        pixels, input_ids = pixels.to(device, dtype), input_ids.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = (
                backbone.vae.encode(pixels).latent_dist.sample().detach() * backbone.vae.config.scaling_factor
            )
            noise = torch.randn_like(latents)
            timesteps = torch.randint(
                0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
            )
            noisy = scheduler.add_noise(latents, noise, timesteps)
            context = text_encoder(input_ids)[0].to(dtype)
            prediction = backbone.unet(noisy, timesteps, context).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            table.weight[keep] = original[keep]

    return step, optimizer, [table.weight]


def step_flops(step) -> int:
    """The floating-point operations of one step (matrix products, convolutions, attention; forward
    and backward), as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(makers: dict, args, device) -> dict[str, dict]:
    """Steps/s of each variant, timed in interleaved blocks (median), so drift hits all alike; and the
    FLOPs of one step of each eager variant (a compiled one, `<name>_compiled`: those of `<name>`, the
    same arithmetic; counting would run the compiled code under the counter)."""
    built, results, flops = {}, {}, {}
    for name, make in makers.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        step, optimizer, params = built[name] = make()
        for _ in range(args.warmup):
            step()
        if name.endswith("_compiled"):
            flops[name] = flops[name.removesuffix("_compiled")]
        else:
            flops[name] = step_flops(step)
        state_bytes = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        results[name] = {
            "trainable_params": sum(p.numel() for p in params),
            "optimizer_state_mb": round(state_bytes / 2**20, 3),
        }
        if device.type == "cuda":  # this variant's own footprint: its model copy and its step's peak
            results[name]["peak_cuda_mb"] = round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)
    rates: dict[str, list[float]] = {name: [] for name in built}
    block = max(1, args.steps // args.rounds)
    for _ in range(args.rounds):
        for name, (step, _, _) in built.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(block):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(block / (time.perf_counter() - start))
    for name, values in rates.items():
        rate = statistics.median(values)
        results[name]["steps_per_s"] = round(rate, 3)
        results[name]["images_per_s"] = round(rate * args.batch_size, 2)
        results[name]["gflops_per_step"] = float(f"{flops[name] / 1e9:.4g}")
        results[name]["achieved_tflops"] = float(f"{flops[name] * rate / 1e12:.4g}")
        if args.peak_tflops:
            results[name]["peak_fraction"] = float(f"{flops[name] * rate / 1e12 / args.peak_tflops:.3g}")
    rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return {name: {**result, "process_peak_rss_mb": rss} for name, result in results.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["tiny", "sd15", "tiny_xl", "sdxl"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None,
                        help="training size (default: the shape's own: 64 tiny, 512 sd15, 1024 sdxl)")  # fmt: skip
    parser.add_argument("--methods", default="ti,lora", help="SDXL shapes: the methods to time (ti, lora)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the UNet's blocks (and TI's text encoders') in the backward")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="frozen parts' dtype (default: float16 on CUDA, float32 on CPU)")  # fmt: skip
    parser.add_argument("--batch-size", default="4", help="one size, or several: 1,4,16")
    parser.add_argument("--num-vectors", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timing blocks per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--images", default="bundled:robot")
    parser.add_argument("--compile", choices=COMPILE_MODES, default=None,
                        help="also time the TI step with the UNet compiled in this torch.compile mode")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak for the peak fraction (default: known bf16 peaks of GPUs)")  # fmt: skip
    parser.add_argument("--folder", type=Path, default=None,
                        help="--shape sd15/sdxl: keep the shaped folder here (made once, then reused)")  # fmt: skip
    parser.add_argument("--min-speedup", type=float, default=None,
                        help="exit non-zero if conceptlab is not at least this many times faster (target: 1.5)")  # fmt: skip
    parser.add_argument("--max-hypernet-cost", type=float, default=None,
                        help="exit non-zero if a hypernetwork step costs more than this many TI steps (target: 1.15)")  # fmt: skip
    args = parser.parse_args(argv)
    quiet_third_party()  # as a run does: no loading bars or Lightning tips between the figures
    try:
        sizes = [int(size) for size in args.batch_size.split(",")]
    except ValueError:
        parser.error(f"--batch-size {args.batch_size}: give whole numbers, e.g. 4 or 1,4,16")
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    if args.peak_tflops is None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        args.peak_tflops = next((tf for part, tf in BF16_PEAK_TFLOPS.items() if part in name), None)
    xl = args.shape in ("tiny_xl", "sdxl")
    args.resolution = args.resolution or {"tiny": 64, "tiny_xl": 64, "sd15": 512, "sdxl": 1024}[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        if args.shape in ("tiny", "tiny_xl"):
            folder = ensure_tiny_backbone(ModelConfig(family="sdxl" if xl else None))
        else:
            folder = shaped_folder(args.shape, args.folder, Path(tmp))
        cfg = DataConfig(path=args.images, resolution=args.resolution)
        images = read_concept_images(cfg)
        paths = sorted(p for p in resolve_data_path(args.images).iterdir() if p.suffix == ".png")
        batches = {}
        for size in sizes:
            args.batch_size = size
            batches[size] = (time_xl if xl else time_batch)(folder, images, paths, args, device, dtype)
    report = {
        "shape": args.shape, "device": name, "dtype": str(dtype).removeprefix("torch."),
        "num_vectors": args.num_vectors, "steps": args.steps, "compile": args.compile,
        "peak_tflops": args.peak_tflops, "resolution": args.resolution,
        "gradient_checkpointing": args.gradient_checkpointing,
    }  # fmt: skip
    if len(sizes) == 1:
        report.update(batches[sizes[0]])
    else:
        report["batches"] = {str(size): found for size, found in batches.items()}
    print(json.dumps(report, indent=2))
    for size, found in batches.items():
        if xl:
            continue  # no baseline to hold the SDXL steps against
        if args.min_speedup is not None and found["speedup"] < args.min_speedup:
            print(
                f"batch {size}: speedup {found['speedup']} is below the target {args.min_speedup}",
                file=sys.stderr,
            )
            report["failed"] = True
        if args.max_hypernet_cost is not None and found["hypernet_step_cost_vs_ti"] > args.max_hypernet_cost:
            print(
                f"batch {size}: hypernetwork step cost {found['hypernet_step_cost_vs_ti']} is above "
                f"{args.max_hypernet_cost}",
                file=sys.stderr,
            )
            report["failed"] = True
    return report


def time_xl(folder, images, paths, args, device, dtype) -> dict:
    """SDXL: conceptlab's steps of each of args.methods at args.batch_size (each built, timed and freed
    in turn, so the CPU holds one SDXL at a time)."""
    found = {"batch_size": args.batch_size}
    for method in args.methods.split(","):
        if method not in ("ti", "lora"):
            raise SystemExit(f"--methods {args.methods}: ti and lora are timed on SDXL shapes")
        found.update(measure({method: lambda m=method: conceptlab_step(folder, images, args, device, dtype, m)},
                             args, device))  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return found


def time_batch(folder, images, paths, args, device, dtype) -> dict:
    """Every variant at args.batch_size: its figures, and the ratios between them."""
    makers = {
        "conceptlab": lambda: conceptlab_step(folder, images, args, device, dtype),
        "diffusers_example": lambda: baseline_step(folder, paths, args, device, dtype),
        "hypernet": lambda: conceptlab_step(folder, images, args, device, dtype, "hypernet"),
    }
    if args.compile:
        makers["conceptlab_compiled"] = lambda: conceptlab_step(
            folder, images, args, device, dtype, compile_mode=args.compile
        )
    timed = measure(makers, args, device)
    # The same TI step inside Lightning's loop, as `train.py` runs it (not interleaved: a fit runs through).
    timed["conceptlab_lightning"] = lightning = lightning_steps(folder, images, args, device, dtype)
    ours, theirs, hypernet = timed["conceptlab"], timed["diffusers_example"], timed["hypernet"]
    found = {
        "batch_size": args.batch_size,
        **timed,
        "speedup": round(ours["steps_per_s"] / theirs["steps_per_s"], 3),
        # Lightning's loop: its step against the example's, and what the loop adds to the bare step.
        "lightning_speedup": round(lightning["steps_per_s"] / theirs["steps_per_s"], 3)
        if lightning
        else None,
        "lightning_loop_cost": round(ours["steps_per_s"] / lightning["steps_per_s"], 3)
        if lightning
        else None,
        # Time of a hypernetwork step over a TI step (target: at most 1.15).
        "hypernet_step_cost_vs_ti": round(ours["steps_per_s"] / hypernet["steps_per_s"], 3),
    }
    if args.compile:
        found["compiled_speedup"] = round(
            timed["conceptlab_compiled"]["steps_per_s"] / theirs["steps_per_s"], 3
        )
    return found


if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)
