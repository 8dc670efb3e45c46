"""Packed sweeps (hydra/launcher=packed): jobs that share a backbone train in one process, one batched
pass per step, and each leaves exactly the records it leaves when it runs alone."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, ROOT, compose, sweep
from hydra.core.utils import JobStatus
from omegaconf import open_dict

from conceptlab.errors import ConfigError, TrainingError
from conceptlab.formats import read_tensor_file
from conceptlab.packing import Pack, pack_key, plan_packs
from conceptlab.runfolder import find_run_dirs


def job_config(num: int, *overrides: str):
    config = compose([*FAST, *overrides], with_hydra=True)
    with open_dict(config):
        config.hydra.job.num = num
    return config


def test_jobs_pack_when_they_share_backbone_resolution_and_device():
    jobs = [
        job_config(0, "method=ti"),
        job_config(1, "method=hypernet", "method.lr=1e-3"),
        job_config(2, "method=lora", "seed=3"),
        job_config(3, "method=ti", "data.resolution=32"),  # another latent shape
        job_config(4, "method=ti", "trainer.compile=true"),  # compiled: alone
        job_config(5, "method=ti", "trainer.devices=2"),  # several devices: alone
        job_config(6, "method=ti", "model.dtype=bfloat16"),  # another backbone setting
        job_config(7, "method=ti", "seed=9"),
        job_config(8, "method=ti", "hydra.job.chdir=true"),  # a working directory per job: alone
        job_config(9, "method=ti", "data.buckets=true"),  # its batches' sizes change from step to step: alone
    ]
    assert pack_key(jobs[0]) == pack_key(jobs[1]) == pack_key(jobs[2]) == pack_key(jobs[7])
    assert pack_key(jobs[4]) is None and pack_key(jobs[5]) is None and pack_key(jobs[8]) is None
    assert pack_key(jobs[9]) is None
    assert len({pack_key(jobs[0]), pack_key(jobs[3]), pack_key(jobs[6])}) == 3
    packs = [[int(j.hydra.job.num) for j in pack] for pack in plan_packs(jobs, pack_size=3)]
    assert packs == [
        [0, 1, 2],
        [3],
        [4],
        [5],
        [6],
        [7],
        [8],
        [9],
    ]  # job order; pack_size cuts the first group
    assert [[int(j.hydra.job.num) for j in p] for p in plan_packs(jobs, pack_size=16)][0] == [0, 1, 2, 7]


def test_a_method_that_does_not_say_where_it_acts_runs_alone(monkeypatch):
    from conceptlab.methods.base import Method
    from conceptlab.methods.lora import LoRA

    config = job_config(0, "method=lora")
    assert pack_key(config) is not None
    monkeypatch.setattr(LoRA, "packed_modules", Method.packed_modules)
    assert pack_key(config) is None


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_pack_size_must_be_a_positive_whole_number(size):
    from hydra_plugins.conceptlab_launcher.packed_launcher import PackedLauncher

    with pytest.raises(ConfigError, match=rf"hydra.launcher.pack_size={size}: give a whole number of jobs"):
        PackedLauncher(pack_size=size)
    assert PackedLauncher(pack_size=4).pack_size == 4


def fake_jobs(n: int):
    from omegaconf import OmegaConf

    return [OmegaConf.create({"hydra": {"job": {"num": i}}}) for i in range(n)]


def test_a_packs_jobs_take_turns_meet_each_step_and_leave_alone():
    """The pack's machinery without Lightning: every job hands in its part, the shared op runs once for
    the jobs still there, each job keeps its own random stream, and one that ends or fails leaves."""
    rounds = []

    def op(requests):
        rounds.append(sorted(requests))
        return {index: value * 10 for index, value in requests.items()}

    def job(config, member):
        torch.manual_seed(100 + member.index)
        drawn, got = [], []
        for step in range({0: 3, 1: 1, 2: 3}[member.index]):
            drawn.append(torch.rand(1).item())  # between turns other jobs draw from the same process RNG
            got.append(member.pack.meet("forward", member, member.index + step, op))
        if member.index == 2:
            raise ValueError("job 2 fails after its steps")
        return drawn, got

    results = Pack(fake_jobs(3), job).run()
    assert rounds == [[0, 1, 2], [0, 2], [0, 2]]  # job 1 left after its one step
    for index in (0, 1):
        drawn, got = results[index]
        alone = torch.Generator().manual_seed(100 + index)
        assert drawn == [torch.rand(1, generator=alone).item() for _ in drawn]
        assert got == [(index + step) * 10 for step in range(len(got))]
    assert results[2].status == JobStatus.FAILED and isinstance(results[2]._return_value, ValueError)


def test_a_failing_shared_pass_fails_its_jobs_with_the_reason():
    def op(requests):
        raise RuntimeError("out of memory")

    def job(config, member):
        return member.pack.meet("forward", member, 1, op)

    results = Pack(fake_jobs(2), job).run()
    for result in results:
        assert result.status == JobStatus.FAILED
        error = result._return_value
        assert isinstance(error, TrainingError) and "shared forward pass failed: out of memory" in str(error)


def test_the_shared_pass_runs_with_the_jobs_grad_and_autocast_modes():
    seen = []

    def op(requests):
        seen.append(
            (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
        )
        return dict.fromkeys(requests)

    def job(config, member):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            member.pack.meet("forward", member, None, op)
        with torch.no_grad():
            member.pack.meet("forward", member, None, op)

    Pack(fake_jobs(1), job).run()
    assert seen[0] == (True, True, torch.bfloat16)
    assert seen[1][:2] == (False, False)


def concept_tensors(run_dir):
    found = {}
    for path in sorted((run_dir / "concepts").glob("*.safetensors")):
        found[path.name] = read_tensor_file(path).data
    return found


@pytest.mark.slow
def test_packed_and_one_by_one_sweeps_leave_the_same_records(tmp_path):
    args = ["method=ti,hypernet,lora", "seed=0,1", "trainer.max_steps=4"]
    one_by_one, alone = sweep(tmp_path / "local", *args)
    packed, together = sweep(tmp_path / "packed", *args, "hydra/launcher=packed", "logger=wandb")
    assert one_by_one.returncode == 0, one_by_one.stderr[-3000:]
    assert packed.returncode == 0, packed.stderr[-3000:]
    assert "Launching 6 jobs in 1 pack(s)" in packed.stdout + packed.stderr
    assert "sweep: 6 jobs in" in packed.stdout and f"report: conceptlab-report {together}" in packed.stdout
    jobs = sorted(p.name for p in find_run_dirs(alone))  # the job folders (the sweep's own W&B run beside)
    assert jobs == sorted(p.name for p in find_run_dirs(together)) and len(jobs) == 6
    for job in jobs:
        a, b = alone / job, together / job
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
        assert sa["status"] == sb["status"] == "completed"
        for key in ("run_name", "steps", "swept", "num_images", "trainable_params", "lr", "files"):
            assert sa[key] == sb[key], (job, key)
        assert sb["final_loss"] == pytest.approx(sa["final_loss"], rel=1e-5)
        # every step's loss, from each job's own metrics.csv
        losses = [[float(r["train/loss"]) for r in csv.DictReader((d / "metrics.csv").open()) if r.get("train/loss")]
                  for d in (a, b)]  # fmt: skip
        assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-5)
        ta, tb = concept_tensors(a), concept_tensors(b)
        assert ta.keys() == tb.keys() and ta
        for name in ta:
            for key, value in ta[name].items():
                # float rounding of the batched pass, through Adam (which divides by the gradient's size)
                torch.testing.assert_close(tb[name][key], value, rtol=1e-3, atol=1e-5)
        checkpoint = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 4 and checkpoint["state_dict"]
        assert sorted(p.name for p in (b / "samples").glob("*.png")) == sorted(
            p.name for p in (a / "samples").glob("*.png")
        )
        # its own W&B run, started in the same process as the others
        [run] = list(b.glob("wandb/offline-run-*"))
        assert run.name.endswith((b / "wandb_run_id").read_text())
        assert (b / "train.log").is_file()
    runs = {next(together.glob(f"{job}/wandb/offline-run-*")).name for job in jobs}
    assert len(runs) == 6


@pytest.mark.slow
def test_a_job_that_fails_in_a_pack_fails_alone(tmp_path):
    # lr 1e30 turns the loss into NaN after a step; a two-token initializer fails as the method attaches
    proc, folder = sweep(
        tmp_path, "hydra/launcher=packed", "method.lr=5e-4,1e30", "method.scale_lr=false",
        "method.initializer_token=object,two words", "trainer.max_steps=12", "samples.every_n_steps=0",
    )  # fmt: skip
    assert proc.returncode == 1 and "sweep: 3 of 4 jobs did not complete" in proc.stderr
    summaries = {
        (float(s["swept"]["method.lr"]), s["swept"]["method.initializer_token"] == "object"): s
        for s in (json.loads(p.read_text()) for p in folder.glob("*/summary.json"))
    }
    assert len(summaries) == 4
    good = summaries[(5e-4, True)]
    assert good["status"] == "completed" and good["steps"] == 12 and good["final_loss"] > 0
    diverged = summaries[(1e30, True)]
    assert diverged["status"] == "failed" and "loss became nan or inf" in diverged["error"]
    for lr in (5e-4, 1e30):
        refused = summaries[(lr, False)]
        assert refused["status"] == "failed" and "initializer_token='two words'" in refused["error"]
    assert good["files"]["concepts"] and good["files"]["checkpoint"]
    assert "sweep: 4 jobs in" in proc.stdout  # the table of the sweep, failures included


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_ends_every_job_of_a_pack_as_interrupted_with_its_record(tmp_path, stop):
    command = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, "method=ti,hypernet", "hydra/launcher=packed",
               "trainer.max_steps=100000", "samples.every_n_steps=0", f"output_root={tmp_path}"]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    try:
        for _ in range(
            600
        ):  # until both jobs have logged training steps (the run itself has no end in sight)
            time.sleep(0.5)
            logs = list(tmp_path.glob("multirun/*/*/metrics.csv"))
            if len(logs) == 2 and all(len(p.read_text().splitlines()) > 3 for p in logs):
                break
        proc.send_signal(stop)
        assert proc.wait(timeout=300) != 0
    finally:
        proc.kill()
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("multirun/*/*/summary.json")]
    assert len(summaries) == 2
    for summary in summaries:
        assert summary["status"] == "interrupted", summary.get("error")


def test_the_shared_pass_groups_the_hypernetwork_jobs_and_each_loss_stays_its_own(tiny_dir, monkeypatch):
    """In the shared pass the hypernetwork jobs' modules at a layer compute together (packed_group), and
    every job's loss is still the one it gets alone (bench_pack compares them)."""
    import importlib.util

    from conceptlab.methods.hypernetwork import HypernetworkStack

    spec = importlib.util.spec_from_file_location("bench_pack", ROOT / "scripts" / "bench_pack.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    grouped = []
    original = HypernetworkStack.packed_group

    def counting(stacks, calls, memo):
        found = original(stacks, calls, memo)
        grouped.append((len(stacks), found is not None))
        return found

    monkeypatch.setattr(HypernetworkStack, "packed_group", staticmethod(counting))
    report = bench.main("--jobs 4 --methods hypernet,ti --batch 1 --rounds 1 --warmup 0".split())
    assert report["same_losses"] is True and not report["failed"]
    assert grouped and all(found and jobs == 2 for jobs, found in grouped)  # the two hypernetwork jobs


def test_a_pack_shares_its_tokenizer_until_a_method_adds_words(tiny_dir):
    """A job whose method leaves the text encoding alone uses the pack's tokenizer; one that adds words
    (textual inversion) gets a copy of its own, and the pack's vocabulary stays as it was."""
    from hydra.utils import instantiate

    from conceptlab.config import ModelConfig

    configs = [job_config(0, "method=hypernet"), job_config(1, "method=ti")]
    pack = Pack(configs, lambda config, member: None)
    hypernet, ti = (instantiate(config.method, concept="robot") for config in configs)
    model = ModelConfig(path=str(tiny_dir))
    shared = pack.members[0].backbone(model, hypernet)
    own = pack.members[1].backbone(model, ti)
    words = len(pack.lead.tokenizer)
    assert shared.tokenizer is pack.lead.tokenizer and own.tokenizer is not pack.lead.tokenizer
    ti.attach(own)
    assert len(own.tokenizer) == words + 1 and len(pack.lead.tokenizer) == words
    assert ti.placeholder in own.tokenizer.get_vocab()
    assert ti.placeholder not in pack.lead.tokenizer.get_vocab()


def test_jobs_of_a_pack_encode_the_same_images_and_captions_once(backbone, monkeypatch):
    """Data modules given one memo (a pack's) share what they computed for the same images and captions;
    other images, or no memo, are encoded anew."""
    from conceptlab import data as data_module
    from conceptlab.config import DataConfig
    from conceptlab.data import ConceptDataModule, read_concept_images

    encoded = []
    original = data_module.encode_latents
    monkeypatch.setattr(data_module, "encode_latents", lambda *a: encoded.append(1) or original(*a))
    memo: dict = {}

    def setup(path: str, prompt: str, memo) -> ConceptDataModule:
        cfg = DataConfig(path=path)
        dm = ConceptDataModule(cfg, read_concept_images(cfg), backbone, prompt, 0, 64, True, memo=memo)
        dm.setup()
        return dm

    a, b = setup("bundled:robot", "robot", memo), setup("bundled:robot", "robot", memo)
    assert len(encoded) == 1 and a.dataset.mean is b.dataset.mean
    assert a.dataset.captions.data_ptr() == b.dataset.captions.data_ptr()  # the same contexts, computed once
    other_words = setup("bundled:robot", "a robot", memo)
    assert len(encoded) == 1 and not torch.equal(other_words.dataset.captions, a.dataset.captions)
    setup("bundled:ink", "robot", memo)
    alone = setup("bundled:robot", "robot", None)
    assert len(encoded) == 3 and torch.equal(alone.dataset.mean, a.dataset.mean)
    assert torch.equal(alone.dataset.captions, a.dataset.captions)


def test_the_packed_launcher_composes_each_job_once():
    """The sweeper's check composes every job through the loader it shares with the launcher; the
    launcher's load of the same job gets that configuration, not a second composition."""
    from types import SimpleNamespace

    from hydra.plugins.sweeper import Sweeper

    from hydra_plugins.conceptlab_launcher.packed_launcher import ComposedOnce, PackedLauncher

    class Loader:
        calls: list = []

        def load_sweep_config(self, master_config, sweep_overrides):
            self.calls.append(tuple(sweep_overrides))
            return {"job": list(sweep_overrides)}

        def list_groups(self, parent):
            return ["method"]

    context = SimpleNamespace(config_loader=Loader(), callbacks=None)
    master = object()
    launcher = PackedLauncher()
    launcher.setup(hydra_context=context, task_function=None, config=master)
    launcher.setup(hydra_context=context, task_function=None, config=master)  # wrapped once
    assert isinstance(context.config_loader, ComposedOnce)
    assert isinstance(context.config_loader.loader, Loader)
    checker = SimpleNamespace(hydra_context=context, config=master)
    batch = [["method=ti", "seed=0"], ["method=hypernet", "seed=0"]]
    Sweeper.validate_batch_is_legal(checker, batch)  # Hydra's own check, as the sweeper runs it
    jobs = [context.config_loader.load_sweep_config(master, job) for job in batch]
    assert Loader.calls == [tuple(job) for job in batch] and jobs == [{"job": job} for job in batch]
    context.config_loader.load_sweep_config(master, batch[0])  # a third load composes again
    assert len(Loader.calls) == 3 and context.config_loader.list_groups("") == ["method"]


@pytest.mark.slow
def test_the_recipe_knobs_give_packed_jobs_the_files_they_give_alone(tmp_path):
    """EMA, min-SNR and the noise offset act per job in a pack: each job's exported files (the average)
    are those it exports alone."""
    args = ["method=ti,hypernet", "trainer.max_steps=3", "ema.decay=0.5", "optim.snr_gamma=5", "optim.noise_offset=0.1",
            "samples.every_n_steps=0", "evaluate.enabled=false"]  # fmt: skip
    alone_proc, alone = sweep(tmp_path / "local", *args)
    packed_proc, together = sweep(tmp_path / "packed", *args, "hydra/launcher=packed")
    assert alone_proc.returncode == 0 and packed_proc.returncode == 0, packed_proc.stderr[-2000:]
    assert "Launching 2 jobs in 1 pack(s)" in packed_proc.stdout + packed_proc.stderr
    for job in sorted(p.name for p in find_run_dirs(alone)):
        a, b = concept_tensors(alone / job), concept_tensors(together / job)
        assert a.keys() == b.keys() and a
        for name in a:
            for key, value in a[name].items():
                torch.testing.assert_close(b[name][key], value, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("methods", "jobs"),
    [
        (["method=loha,lokr,dora"], 3),
        # pivotal tuning beside TI; each job's own table: transformers resizes a table in place, and a pack's
        # jobs share parameter objects (3 vectors, then 1: the order that broke)
        (["method=pivotal,ti", "method.num_vectors=3,1"], 4),
        # SDXL's jobs pack with their own kind: both text encoders' words and contexts per job
        (["model=tiny_xl", "method=ti,lora,hypernet"], 3),
    ],
)
def test_the_newer_methods_give_packed_jobs_the_files_they_give_alone(tmp_path, methods, jobs):
    """LoHa, LoKr, DoRA and pivotal tuning act per job in a pack (peft's own layers and the embedding, each
    job's on its own rows)."""
    args = [*methods, "trainer.max_steps=2", "samples.every_n_steps=0", "evaluate.enabled=false"]
    alone_proc, alone = sweep(tmp_path / "local", *args)
    packed_proc, together = sweep(tmp_path / "packed", *args, "hydra/launcher=packed")
    assert alone_proc.returncode == 0 and packed_proc.returncode == 0, packed_proc.stderr[-2000:]
    assert f"Launching {jobs} jobs in 1 pack(s)" in packed_proc.stdout + packed_proc.stderr
    for job in sorted(p.name for p in find_run_dirs(alone)):
        a, b = concept_tensors(alone / job), concept_tensors(together / job)
        assert a.keys() == b.keys() and a
        for name in a:
            for key, value in a[name].items():
                torch.testing.assert_close(
                    b[name][key],
                    value,
                    rtol=1e-3,
                    atol=1e-5,
                    msg=lambda m, job=job, key=key: f"{job} {key}: {m}",
                )
