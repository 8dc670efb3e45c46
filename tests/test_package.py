"""conceptlab as people install it: a wheel in a fresh environment, run from an empty folder, with the
user's own configs beside the shipped ones."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image

pytestmark = pytest.mark.slow
SMALL = ["trainer.max_steps=2", "evaluate.num_samples=2", "evaluate.num_inference_steps=2",
         "samples.every_n_steps=0", "logger=csv", "trainer.enable_progress_bar=false"]  # fmt: skip


def run(args, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh environment with the wheel built from this checkout (dependencies: this environment's)."""
    tmp = tmp_path_factory.mktemp("package")
    # Built from a copy of the source: setuptools builds in the tree it is given (build/, *.egg-info), and
    # the checkout is left as it was.
    source = tmp / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "site", "build", "dist", ".whl", "*.egg-info", "__pycache__", ".pytest_cache"))  # fmt: skip
    before = sorted(p.name for p in ROOT.iterdir())
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
         str(source)], cwd=tmp)  # fmt: skip
    assert sorted(p.name for p in ROOT.iterdir()) == before, "building the wheel wrote into the checkout"
    [wheel] = (tmp / "dist").glob("conceptlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for packaged in ("conceptlab/conf/train.yaml", "conceptlab/conf/method/lora.yaml",
                     "conceptlab/conf/experiment/ti_vs_hypernet.yaml", "conceptlab/conf/hydra/launcher/slurm.yaml",
                     "conceptlab/conf/hydra/launcher/packed.yaml", "hydra_plugins/conceptlab_launcher/packed_launcher.py",
                     "conceptlab/toyworld/checkpoint/unet/diffusion_pytorch_model.safetensors",
                     "conceptlab/toyworld/checkpoint/judge/config.json", "conceptlab/examples/robot/00.png",
                     "conceptlab/single_file_configs/sd15/unet/config.json",
                     "conceptlab/single_file_configs/sd21/tokenizer/tokenizer_config.json",
                     "conceptlab/single_file_configs/sdxl/text_encoder_2/config.json",
                     "conceptlab/toyworld/checkpoint_xl/vocabulary.safetensors",
                     "conceptlab/toyworld/checkpoint_xl/unet/diffusion_pytorch_model.safetensors",
                     "conceptlab/conf/method/ti_start/toy_xl_objects.yaml",
                     "conceptlab/examples/toy_combo/00.png"):  # fmt: skip
        assert packaged in names, f"{packaged} is not in the wheel"
    # every file of the shipped toys (model=toy_xl's packed form takes the VAE and judge of model=toy's)
    toyworld = ROOT / "src" / "conceptlab" / "toyworld"
    for folder in ("checkpoint", "checkpoint_xl"):
        shipped = {
            f"conceptlab/toyworld/{p.relative_to(toyworld)}"
            for p in (toyworld / folder).rglob("*")
            if p.is_file()
        }
        assert shipped <= names, sorted(shipped - names)
    env = tmp / "env"
    run([sys.executable, "-m", "venv", "--without-pip", str(env)], cwd=tmp)
    python = env / "bin" / "python"
    site = Path(
        run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp
        ).stdout.strip()
    )
    # The dependencies come from this environment's site-packages (a plain path: its .pth files,
    # and so its editable conceptlab, stay out); conceptlab itself only from the wheel.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        tmp,
    )
    where = run([str(python), "-c", "import conceptlab; print(conceptlab.__file__)"], tmp).stdout
    assert str(site) in where, where
    return env


def test_the_main_job_runs_from_an_empty_folder(installed, tmp_path):
    proc = run([str(installed / "bin" / "conceptlab"), "--version"], tmp_path)
    assert proc.stdout.startswith("conceptlab 0.")
    run([str(installed / "bin" / "conceptlab-train"), *SMALL], tmp_path)
    [summary] = list(tmp_path.glob("outputs/runs/*/summary.json"))
    record = json.loads(summary.read_text())
    assert record["status"] == "completed" and record["model"] == "toy" and record["method"] == "ti"
    assert "judge/concept" in record["metrics"] and record["versions"]["conceptlab"].startswith("0.")
    assert (summary.parent / "concepts" / "toy_combo.safetensors").is_file()
    prompt = "prompt=a photo of a <toy_combo>"
    run([str(installed / "bin" / "python"), "-m", "conceptlab", "generate", prompt, "concepts=[" + str(summary.parent) + "]",
         "steps=2"], tmp_path)  # fmt: skip
    assert list(tmp_path.glob("outputs/generate/*/grid.png"))


def test_a_users_experiment_sweeps_their_own_data_set_with_their_own_configs(installed, tmp_path):
    images = tmp_path / "photos" / "my-mug"
    images.mkdir(parents=True)
    for i, colour in enumerate(["red", "teal", "navy"]):
        Image.new("RGB", (48, 48), colour).save(images / f"{i}.png")
    conf = tmp_path / "my_conf"
    (conf / "data").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "data" / "my_mug.yaml").write_text(
        "# My mug, from my own folder.\ndefaults:\n  - /schema/data@_here_: data\n  - _self_\n\n"
        f"path: {images}\nsample_prompts: ['a photo of {{}}']\n"
    )
    (conf / "experiment" / "mug_lr.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: my_mug\n\n"
        "study:\n  name: mug_lr\n  question: Which rate learns my mug?\n  metric: train/loss\n\n"
        "hydra:\n  sweeper:\n    params:\n      method.lr: 1e-3,5e-3\n"
    )
    # packed: the launcher plugin works from the installed wheel (Hydra finds it in hydra_plugins)
    run([str(installed / "bin" / "conceptlab-train"), "-m", "--config-dir", str(conf), "+experiment=mug_lr",
         "model=tiny", "hydra/launcher=packed", *SMALL], tmp_path)  # fmt: skip
    summaries = [
        json.loads(p.read_text()) for p in sorted(tmp_path.glob("outputs/multirun/*/*/summary.json"))
    ]
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    assert {s["concept"] for s in summaries} == {"my-mug"} and {s["study"] for s in summaries} == {"mug_lr"}
    assert sorted(float(s["swept"]["method.lr"]) for s in summaries) == [1e-3, 5e-3]
    [sweep] = list(tmp_path.glob("outputs/multirun/*"))
    report = run([str(installed / "bin" / "conceptlab-report"), str(sweep)], tmp_path)
    assert "best by final_loss: method.lr=" in report.stdout
