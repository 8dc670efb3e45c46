"""Sweeps on SLURM (hydra/launcher=slurm): jobs, requeue after a signal, and resume.

Needs a reachable cluster: `bash scripts/slurm/start.sh` starts a one-machine one (CI does).
"""

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_train
from safetensors.torch import load_file


def cluster_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        states = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
        ).stdout
    except (subprocess.TimeoutExpired, OSError):
        return False
    return any(s.strip().rstrip("*") in ("idle", "mix", "alloc") for s in states.split())


needs_slurm = pytest.mark.skipif(not cluster_up(), reason="no SLURM cluster (bash scripts/slurm/start.sh)")
# CPU-only jobs on the one-machine cluster: no GPUs, one core each, the random tiny backbone.
ON_TEST_CLUSTER = [
    "model=tiny",
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "trainer.accelerator=cpu",
    "logger=csv",
    "trainer.enable_progress_bar=false",
]


def launch(tmp_path, *overrides, wait=True):
    cluster = ON_TEST_CLUSTER
    if any(o.startswith("model=") for o in overrides):  # another backbone in place of the tiny one
        cluster = [o for o in cluster if not o.startswith("model=")]
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *cluster,
        *overrides,
        f"output_root={tmp_path}",
    ]
    if wait:
        return subprocess.run(args, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL
    )


@pytest.mark.slurm
@needs_slurm
def test_two_job_sweep_runs_on_slurm(tmp_path):
    """On SDXL's shape (the tiny one): each job trains its method and writes SDXL's files."""
    proc = launch(tmp_path, "model=tiny_xl", "method=ti,hypernet", "trainer.max_steps=3", "samples.every_n_steps=0",
                  "evaluate.enabled=false")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [sweep] = list((tmp_path / "multirun").iterdir())
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}
    assert sorted(summaries) == ["0_ti", "1_hypernet"]
    assert all(
        s["status"] == "completed" and s["steps"] == 3 and s["model"] == "tiny_xl" for s in summaries.values()
    )
    assert load_file(sweep / "0_ti" / "concepts" / "robot.safetensors").keys() == {"clip_l", "clip_g"}
    assert list(sweep.glob(".submitit/*/*_log.out")), "submitit kept the jobs' logs in the sweep folder"


def slurm_job_ids() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %r"], capture_output=True, text=True).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


@pytest.mark.slurm
@needs_slurm
def test_signalled_job_checkpoints_requeues_and_ends_with_the_uninterrupted_embedding(tmp_path):
    steps = [
        "model=tiny",
        "trainer.max_steps=300",
        "checkpoint.every_n_steps=1000",
        "samples.every_n_steps=0",
        "seed=3",
    ]
    sweep = launch(tmp_path / "slurm", "method=ti", *steps, wait=False)
    try:
        metrics = None
        for _ in range(240):  # wait until the job is training
            time.sleep(0.5)
            metrics = next((tmp_path / "slurm").glob("multirun/*/0_ti/metrics.csv"), None)
            if metrics and len(metrics.read_text().splitlines()) > 30:
                break
        assert metrics is not None, "the job never started training"
        [[job_id, *_]] = slurm_job_ids()
        subprocess.run(["scancel", "-s", "USR2", job_id], check=True)  # SLURM's warning before a limit
        for _ in range(120):  # SLURM holds a requeued job ~2 minutes: let it start now
            time.sleep(0.5)
            jobs = slurm_job_ids()
            if jobs and jobs[0][1] == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
                break
        out, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, out[-3000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
            subprocess.run(["scancel", "--user", "root"], check=False)
    run_dir = next((tmp_path / "slurm").glob("multirun/*/0_ti"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 300
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")  # its own, same folder
    assert 0 < summary["steps_this_process"] < 300

    run_train(tmp_path / "local" / "run", "method=ti", *steps, "logger=csv", fast=False)
    ours = load_file(run_dir / "concepts" / "robot.safetensors")["<robot>"]
    reference = load_file(tmp_path / "local" / "run" / "concepts" / "robot.safetensors")["<robot>"]
    assert torch.equal(ours, reference)


def test_slurm_launcher_without_sbatch_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", f"output_root={tmp_path}"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env={"PATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: hydra/launcher=slurm needs SLURM's sbatch on PATH")
    )


def test_a_request_no_node_can_meet_is_named_before_submitting():
    """The check against what sinfo reports (here a two-core, 4 GB, GPU-less node like the test cluster)."""
    from omegaconf import OmegaConf

    from conceptlab.hydra_callbacks import Node, slurm_minutes, slurm_request_problem

    nodes = [
        Node("debug", 2, 4096, 0, slurm_minutes("infinite"), default=True),
        Node("gpu", 16, 65536, 4, 240),
    ]
    defaults = OmegaConf.load(ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml")

    def problem(**launcher):
        base = {"cpus_per_task": 8, "mem_gb": 64, "gpus_per_node": 1, "tasks_per_node": 1, "timeout_min": 240}
        return slurm_request_problem(OmegaConf.create(base | launcher), nodes)

    assert defaults.cpus_per_task == 8 and defaults.mem_gb == 64  # the launcher's defaults, as tested below
    assert problem(gpus_per_node=0) == (
        "hydra.launcher.cpus_per_task=8 asks for more CPUs than any node of partition debug has (2): no job "
        "could ever start; set hydra.launcher.cpus_per_task=2"
    )
    assert "hydra.launcher.mem_gb=64 asks for more GB of memory" in problem(gpus_per_node=0, cpus_per_task=1)
    assert problem(cpus_per_task=1, mem_gb=2).endswith(
        "set hydra.launcher.gpus_per_node=0 (and trainer.accelerator=cpu)"
    )
    assert problem(cpus_per_task=1, mem_gb=2, gpus_per_node=0) is None  # the README's one-machine recipe
    assert problem(partition="gpu", timeout_min=600).startswith(
        "hydra.launcher.timeout_min=600 asks for more minutes"
    )
    assert problem(partition="gpu", tasks_per_node=4, cpus_per_task=8).startswith(
        "hydra.launcher.cpus_per_task=8 x 4 tasks a node"
    )
    assert "no such partition (it has: debug, gpu)" in problem(partition="a100")
    assert problem(partition="gpu") is None
    assert (
        slurm_request_problem(OmegaConf.create({"cpus_per_task": 999}), None) is None
    )  # sinfo silent: no guess


@pytest.mark.slurm
@needs_slurm
def test_the_launchers_defaults_on_the_one_machine_cluster_stop_at_once_with_the_key(tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "-m", "model=tiny", "hydra/launcher=slurm",
            "hydra.launcher.gpus_per_node=0", "trainer.accelerator=cpu", f"output_root={tmp_path}"]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert (
        "hydra.launcher.cpus_per_task=8 asks for more CPUs than any node"
        in proc.stderr.strip().splitlines()[-1]
    )
    assert not list(tmp_path.glob("multirun/*/.submitit/*")), "nothing was submitted"
