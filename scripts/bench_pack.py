"""Time a packed sweep's shared training step against the same jobs' steps one after another.

In one process, on one backbone: R jobs (textual inversion, hypernetworks or both), each with its own
trainable tensors, batch and AdamW, take one step each. Packed, as `hydra/launcher=packed` steps them
(conceptlab.packing: one text-encoder and one UNet pass over every job's batch, each job's rows through
its own modules where its method acts, one backward); alone, each job's own step (module.diffusion_losses
on its batch, its backward), one after another. Lightning's per-job loop is not in either.

    python scripts/bench_pack.py                                          # 16 TI jobs, batch 4, tiny, CPU
    python scripts/bench_pack.py --methods ti,hypernet --jobs 16 --batch 1
    python scripts/bench_pack.py --shape sd15 --device cuda --dtype bfloat16 --jobs 16 --batch 1

Prints JSON: ms per step of the pack and of the jobs alone (all R of them), the speed-up, and whether
every job's loss is the same both ways. With --min-speedup it exits 1 below the target (GPU: 8).
With --profile, where the time goes (torch.profiler, after the timed steps): per kind of operator
(attention, convolution, matmul, normalization, the rest), ms per step packed and alone and the gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from conceptlab.backbone import ensure_tiny_backbone, load_backbone
from conceptlab.config import ModelConfig
from conceptlab.methods.hypernetwork import Hypernetwork
from conceptlab.methods.textual_inversion import TextualInversion
from conceptlab.module import diffusion_losses
from conceptlab.packing import Pack, shared_copy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import shaped_folder  # noqa: E402 - the SD-1.5-shaped folder bench_step builds


def make_method(kind: str, index: int):
    if kind == "ti":
        return TextualInversion(name="ti", lr=5e-3, scale_lr=False, concept=f"c{index}")
    return Hypernetwork(name="hypernet", lr=5e-6, scale_lr=False, concept=f"c{index}")


def jobs_on(lead, kinds: list[str], batch: int, device, dtype) -> list[SimpleNamespace]:
    """Each job: its backbone copy with its method attached, its optimizer, its batch."""
    jobs = []
    generator = torch.Generator().manual_seed(0)
    size = lead.native_resolution // lead.vae_scale_factor
    for index, kind in enumerate(kinds):
        backbone = shared_copy(lead)
        method = make_method(kind, index)
        method.attach(backbone)
        method.to(device)
        params = method.trainable_parameters()
        # Jobs start apart, so a row sent through another job's vectors or modules would show in its loss.
        with torch.no_grad():
            for p in params:
                p.add_((0.1 if kind == "ti" else 0.05) * torch.randn(p.shape, generator=generator).to(p))
        for p in params:
            p.data = p.data.float()
        jobs.append(SimpleNamespace(
            backbone=backbone, method=method, device=device, optimizer=torch.optim.AdamW(params, lr=1e-4),
            kind=kind,
        ))  # fmt: skip
    for job in jobs:
        latents = torch.randn(batch, 4, size, size, generator=generator).to(device, dtype)
        job.batch = {
            "latents": latents, "noise": torch.randn(latents.shape, generator=generator).to(device, dtype),
            "timesteps": torch.randint(0, 1000, (batch,), generator=generator).to(device),
        }  # fmt: skip
        ids = job.backbone.tokenizer(
            [f"a photo of {job.method.prompt_text}"] * batch,
            padding="max_length",
            max_length=77,
            return_tensors="pt",
        ).input_ids.to(device)
        if job.kind == "ti":
            job.batch["input_ids"] = ids
        else:
            with torch.no_grad():
                job.batch["context"] = job.backbone.encode_text(ids)
    return jobs


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, rounds: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# Operator names (aten::..., as torch.profiler reports them) by kind, first match wins.
KINDS = {
    "attention": ("scaled_dot_product", "attention"),
    "convolution": ("conv",),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    "normalization": ("norm",),
}


def ms_by_kind(step, rounds: int, device) -> dict[str, float]:
    """Self time per step of each kind of operator (on a GPU, the kernels' time), over `rounds` steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(rounds):
            step()
        synchronize(device)
    totals = dict.fromkeys([*KINDS, "other"], 0.0)
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        name = event.key.lower()
        kind = next((k for k, marks in KINDS.items() if any(m in name for m in marks)), "other")
        totals[kind] += us
    return {kind: round(us / 1000 / rounds, 1) for kind, us in totals.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--methods", default="ti", help="comma-separated, taken in turn: ti | hypernet | ti,hypernet"
    )
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-speedup", type=float, default=None)
    parser.add_argument("--profile", action="store_true", help="ms per step by kind of operator, both ways")
    parser.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="--shape sd15: keep the SD-1.5-shaped folder here (made once)",
    )
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    kinds = [args.methods.split(",")[i % len(args.methods.split(","))] for i in range(args.jobs)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = (
            ensure_tiny_backbone(ModelConfig())
            if args.shape == "tiny"
            else shaped_folder("sd15", args.folder, Path(tmp))
        )
        lead = load_backbone(ModelConfig(path=str(folder)))
    lead.to(device=device, dtype=dtype)
    jobs = jobs_on(lead, kinds, args.batch, device, dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    pack = Pack(
        [SimpleNamespace(hydra=SimpleNamespace(job=SimpleNamespace(num=i))) for i in range(len(jobs))], None
    )
    pack.lead = lead
    for member, job in zip(pack.members, jobs):
        member.module = job
    losses: dict[str, list[float]] = {"packed": [], "alone": []}

    def packed_step() -> None:
        for job in jobs:
            job.optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = pack.forward({i: job.batch for i, job in enumerate(jobs)})
        pack.backward(out)
        for job in jobs:
            job.optimizer.step()
        losses["packed"] = [float(loss.detach()) for loss in out.values()]

    def alone_step() -> None:
        found = []
        for job in jobs:
            job.optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = diffusion_losses(job.backbone, [job.batch])[0]
            loss.backward()
            job.optimizer.step()
            found.append(float(loss.detach()))
        losses["alone"] = found

    # The same starting state both ways: the first step's losses are compared (no optimizer step yet differs).
    state = [{k: v.clone() for k, v in job.method.state_dict().items()} for job in jobs]
    with torch.no_grad():
        with autocast:
            first_packed = [
                float(v) for v in pack.forward({i: job.batch for i, job in enumerate(jobs)}).values()
            ]
            first_alone = [float(diffusion_losses(job.backbone, [job.batch])[0]) for job in jobs]
    alone = time_steps(alone_step, args.rounds, args.warmup, device)
    for job, saved in zip(jobs, state):
        job.method.load_state_dict(saved)
    packed = time_steps(packed_step, args.rounds, args.warmup, device)
    by_kind = None
    if args.profile:
        by_kind = {"packed": ms_by_kind(packed_step, args.rounds, device)}
        for job, saved in zip(jobs, state):
            job.method.load_state_dict(saved)
        by_kind["alone"] = ms_by_kind(alone_step, args.rounds, device)
        by_kind["gain"] = {
            kind: round(by_kind["alone"][kind] / ms, 2) if ms else None
            for kind, ms in by_kind["packed"].items()
        }
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    report = {
        "shape": args.shape, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "jobs": args.jobs, "methods": args.methods, "batch_per_job": args.batch,
        "packed_step_ms": round(1000 * statistics.median(packed), 1),
        "alone_steps_ms": round(1000 * statistics.median(alone), 1),
        "speedup": round(statistics.median(alone) / statistics.median(packed), 2),
        "same_losses": all(abs(a - b) <= tolerance * max(abs(b), 1e-6) for a, b in zip(first_packed, first_alone)),
        "peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
    }  # fmt: skip
    if by_kind is not None:
        report["ms_per_step_by_kind"] = by_kind
    print(json.dumps(report, indent=2))
    report["failed"] = not report["same_losses"] or (
        args.min_speedup is not None and report["speedup"] < args.min_speedup
    )
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
