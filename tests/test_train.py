"""`python train.py` end to end on the tiny backbone: the run record, resume, and bad input."""

import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, check_resume, read_summary, run_train, start_long_run, train_subprocess
from safetensors.torch import load_file

from conceptlab.errors import ConceptFileError, ConceptLabError, ConfigError, TrainingError
from conceptlab.methods.textual_inversion import read_embedding, write_a1111_embedding

pytestmark = pytest.mark.slow


def test_train_py_leaves_a_complete_run_record(tmp_path):
    proc, [run_dir] = train_subprocess(tmp_path, "logger=wandb", "method.num_vectors=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["method"] == "ti" and summary["concept"] == "robot" and summary["steps"] == 4
    assert "method.num_vectors=2" in summary["overrides"] and summary["seed"] == 0
    assert summary["trainable_params"] == 2 * 32
    for key in ("final_loss", "mean_loss", "wall_time_s", "steps_per_s", "peak_memory_mb", "lr", "versions"):
        assert summary[key] is not None, key
    assert summary["lr"] == pytest.approx(
        5e-4 * 2
    )  # scale_lr: x batch 2 x 1 device x 1 node x 1 accumulation
    assert summary["versions"]["torch"].startswith("2.13")

    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    assert metrics[0].split(",")[-1] == "train/loss" and len(metrics) > 1
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [
        "step_000000.png", "step_000002.png", "step_000004.png",
    ]  # fmt: skip
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B ran offline, in the run directory"

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert list(checkpoint["state_dict"]) == ["method.vectors"]  # no backbone weights
    assert checkpoint["global_step"] == 4 and checkpoint["optimizer_states"]
    assert checkpoint["conceptlab"]["config"]["method"]["num_vectors"] == 2
    assert checkpoint["conceptlab"]["versions"]["torch"].startswith("2.13")
    assert (run_dir / "checkpoints" / "last.ckpt").stat().st_size < 64 * 1024

    vectors = checkpoint["state_dict"]["method.vectors"]
    assert torch.equal(load_file(run_dir / "concepts" / "robot.safetensors")["<robot>"], vectors)
    a1111 = read_embedding(run_dir / "concepts" / "robot.pt")
    assert a1111.name == "robot" and a1111.step == 4 and torch.equal(a1111.vectors, vectors)
    assert sorted(summary["files"]["concepts"]) == ["concepts/robot.pt", "concepts/robot.safetensors"]
    assert_loads_in_diffusers(run_dir / "concepts" / "robot.safetensors", vectors)
    assert not list(run_dir.rglob("*.tmp")), "no temporary files left behind"
    (run_dir / "plain").write_text("")  # files written atomically get the permissions of any other file
    for path in [
        run_dir / "summary.json",
        run_dir / "checkpoints" / "last.ckpt",
        *(run_dir / "concepts").iterdir(),
    ]:
        assert path.stat().st_mode == (run_dir / "plain").stat().st_mode, path


def assert_loads_in_diffusers(path, vectors):
    """The exported file loads with diffusers' own loader and gives the placeholder its learned meaning."""
    from diffusers import StableDiffusionPipeline

    from conceptlab.backbone import ensure_tiny_backbone
    from conceptlab.config import ModelConfig

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_backbone(ModelConfig()), safety_checker=None)
    pipe.load_textual_inversion(str(path))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<robot>", "<robot>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], vectors)

    def embed(prompt):
        prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    assert not torch.allclose(embed("a photo of <robot>"), embed("a photo of object"))


def test_train_py_hypernetwork_run_leaves_a1111_files(tmp_path):
    from conceptlab.methods.hypernetwork import read_hypernetwork

    proc, [run_dir] = train_subprocess(tmp_path, "method=hypernet", "data=styles", "method.lr='1e-5:2, 5e-6'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert (
        summary["status"] == "completed" and summary["method"] == "hypernet" and summary["concept"] == "ink"
    )
    assert summary["lr_schedule"] == "1e-05:2, 5e-06"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(
        k.startswith("method.net.layers.") for k in checkpoint["state_dict"]
    )
    a1111 = torch.load(run_dir / "concepts" / "ink.pt", weights_only=True)
    assert sorted(k for k in a1111 if isinstance(k, int)) == [32, 64] and a1111["step"] == 4
    twin = read_hypernetwork(run_dir / "concepts" / "ink.safetensors")
    for size in (32, 64):
        for ours, theirs in zip(twin.pairs[size], a1111[size]):
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        key = f"method.net.layers.{size}.0.linear.0.weight"
        assert torch.equal(checkpoint["state_dict"][key], a1111[size][0]["linear.0.weight"])


@pytest.mark.parametrize("method", ["ti", "hypernet", "hypernet-dropout"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, method):
    if method.startswith("hypernet"):
        # Dropout draws its masks from torch's generator: the checkpoint carries its state.
        dropout = (
            ["method.use_dropout=true", "method.layer_structure=[1,2,2,1]"] if "dropout" in method else []
        )
        return check_resume(
            tmp_path,
            "method=hypernet",
            "method.lr=1e-3",
            *dropout,
            file="ink.safetensors",
            data="data=styles",
        )
    return check_resume(tmp_path)


def test_resume_finds_the_earlier_run_and_records_it(tmp_path):
    straight = run_train(tmp_path / "a" / "straight", "trainer.max_steps=6")
    assert straight["steps"] == 6 and straight["resumed_from"] is None
    first = run_train(tmp_path / "b" / "first", "trainer.max_steps=3")
    assert first["steps"] == 3
    resumed = run_train(tmp_path / "b" / "resumed", "trainer.max_steps=6", "resume=true")
    assert resumed["resumed_from"].endswith("first/checkpoints/last.ckpt")
    assert resumed["steps"] == 6 and resumed["steps_this_process"] == 3
    ours = load_file(tmp_path / "b" / "resumed" / "concepts" / "robot.safetensors")["<robot>"]
    reference = load_file(tmp_path / "a" / "straight" / "concepts" / "robot.safetensors")["<robot>"]
    assert torch.equal(ours, reference)
    assert not torch.equal(
        ours, load_file(tmp_path / "b" / "first" / "concepts" / "robot.safetensors")["<robot>"]
    )


def test_ckpt_path_continues_from_a_given_checkpoint(tmp_path):
    run_train(tmp_path / "one", "trainer.max_steps=2")
    summary = run_train(
        tmp_path / "two", "trainer.max_steps=4", f"ckpt_path={tmp_path / 'one/checkpoints/last.ckpt'}"
    )
    assert summary["steps"] == 4 and summary["steps_this_process"] == 2


def test_min_snr_and_noise_offset_train_through_train_py_and_are_recorded(tmp_path):
    plain = run_train(tmp_path / "plain", "trainer.max_steps=2")
    tuned = run_train(
        tmp_path / "tuned", "trainer.max_steps=2", "optim.snr_gamma=5", "optim.noise_offset=0.1"
    )
    assert plain["snr_gamma"] is None and plain["noise_offset"] is None
    assert tuned["snr_gamma"] == 5 and tuned["noise_offset"] == 0.1 and tuned["status"] == "completed"
    assert tuned["final_loss"] != plain["final_loss"]
    for bad, said in (("optim.snr_gamma=0", r"^optim\.snr_gamma=0\.0: .*\(0, inf\)"),
                      ("optim.noise_offset=-0.1", r"^optim\.noise_offset=-0\.1: .*\[0, inf\)")):  # fmt: skip
        with pytest.raises(ConfigError, match=said):
            run_train(tmp_path / "bad", bad)
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("name", "lr", "mark"),
    [("adamw", "1e-3", "amsgrad"), ("adafactor", "1e-3", "relative_step"), ("prodigy", "1.0", "d0")],
)
def test_optim_name_trains_with_that_optimizer_and_checkpoints_its_state(tmp_path, name, lr, mark):
    run = tmp_path / name
    summary = run_train(run, f"optim.name={name}", f"method.lr={lr}", "trainer.max_steps=2")
    assert summary["status"] == "completed" and summary["steps"] == 2
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    [state] = checkpoint["optimizer_states"]
    assert mark in state["param_groups"][0] and state["state"]  # that optimizer's, stepped and saved
    assert math.isfinite(summary["final_loss"])


@pytest.mark.slow
def test_prodigy_resumes_bit_for_bit(tmp_path):
    check_resume(tmp_path, "optim.name=prodigy", "method.lr=1.0")


def test_an_unknown_or_unusable_optimizer_is_refused_in_one_line(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^optim\.name='sgd': use one of adamw, adamw8bit, adafactor, prodigy$"
    ):
        run_train(tmp_path / "sgd", "optim.name=sgd")
    if not torch.cuda.is_available():
        with pytest.raises(
            ConfigError, match=r"^optim\.name=adamw8bit: .* CUDA GPU .* use optim\.name=adamw"
        ):
            run_train(tmp_path / "8bit", "optim.name=adamw8bit")
    assert not any(tmp_path.glob("*/checkpoints"))


def test_gradient_checkpointing_recomputes_the_unet_and_trains_the_same(tmp_path, monkeypatch):
    import torch.utils.checkpoint

    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    args = ("method=hypernet", "trainer.max_steps=2", "samples.every_n_steps=0")
    plain = run_train(tmp_path / "plain", *args)
    assert not calls
    saving = run_train(tmp_path / "saving", *args, "trainer.gradient_checkpointing=true")
    assert calls  # the UNet's blocks went through torch's checkpoint
    assert saving["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)
    a, b = (load_file(next((tmp_path / d / "concepts").glob("*.safetensors"))) for d in ("plain", "saving"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_the_text_encoder_where_the_gradient_passes_it(
    tmp_path, monkeypatch
):
    """Textual inversion's gradient goes through the text encoder: with checkpointing each of its layers
    runs again in the backward (its MLP twice a step), and the run trains the same."""
    from transformers.models.clip import modeling_clip

    calls = []
    forward = modeling_clip.CLIPMLP.forward
    monkeypatch.setattr(
        modeling_clip.CLIPMLP,
        "forward",
        lambda self, x: calls.append(torch.is_grad_enabled()) or forward(self, x),
    )
    args = ("method=ti", "trainer.max_steps=2", "samples.every_n_steps=0")
    plain = run_train(tmp_path / "plain", *args)
    plain_calls, calls[:] = len(calls), []
    saving = run_train(tmp_path / "saving", *args, "trainer.gradient_checkpointing=true")
    assert (
        plain_calls > 0 and len(calls) == 2 * plain_calls
    )  # each layer's forward, then its recomputation in the backward
    assert saving["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)
    a, b = (load_file(next((tmp_path / d / "concepts").glob("*.safetensors"))) for d in ("plain", "saving"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_a_masked_run_through_train_py_says_how_many_images_had_a_mask(tmp_path):
    from test_data import masked_set

    folder = masked_set(tmp_path / "set")
    summary = run_train(tmp_path / "run", f"data.path={folder}", "data.mask=alpha", "trainer.max_steps=2")
    assert summary["status"] == "completed" and summary["masked_images"] == 2 and summary["num_images"] == 3
    assert (
        run_train(tmp_path / "plain", f"data.path={folder}", "trainer.max_steps=2")["masked_images"] is None
    )


def test_the_weight_average_follows_its_recurrence():
    from conceptlab.module import WeightAverage

    weights = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([weights], decay=0.5, start_step=2)
    expected = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0, 8.0], start=1):
        weights.data.fill_(value)
        average.update()
        expected = torch.full((3,), value) if step <= 2 else 0.5 * expected + 0.5 * value
        torch.testing.assert_close(average.average_0, expected)
    assert float(average.average_0[0]) == 6.75  # 1 and 2 copied, then 3, 5.5, 6.75
    assert int(average.updates) == 5
    average.use()
    assert torch.equal(weights.data, average.average_0) and average.raw is not None
    average.restore()
    assert torch.all(weights.data == 8.0) and average.raw is None


def test_ema_runs_export_the_average_keep_the_weights_and_train_the_same(tmp_path):
    """ema.decay: the concept files hold the average; the checkpoint holds the weights (the same as a run
    without EMA: the average never feeds back into training) and the average beside them."""
    args = ("trainer.max_steps=4", "samples.every_n_steps=0")
    plain = run_train(tmp_path / "plain", *args)
    averaged = run_train(tmp_path / "ema", *args, "ema.decay=0.5")
    assert averaged["ema_decay"] == 0.5 and plain["ema_decay"] is None
    assert averaged["final_loss"] == plain["final_loss"]  # the same training
    ckpt_plain, ckpt_ema = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)
                            for d in ("plain", "ema"))  # fmt: skip
    key = next(
        k for k in ckpt_plain["state_dict"] if "placeholder" in k or "vectors" in k or "embedding" in k
    )
    assert torch.equal(ckpt_ema["state_dict"][key], ckpt_plain["state_dict"][key])  # the weights, kept
    average = ckpt_ema["state_dict"]["ema.average_0"]
    assert int(ckpt_ema["state_dict"]["ema.updates"]) == 4 and not torch.equal(
        average, ckpt_plain["state_dict"][key]
    )
    exported = load_file(tmp_path / "ema" / "concepts" / "robot.safetensors")["<robot>"]
    weights = load_file(tmp_path / "plain" / "concepts" / "robot.safetensors")["<robot>"]
    torch.testing.assert_close(exported, average.reshape(exported.shape))
    assert not torch.equal(exported, weights)


@pytest.mark.slow
def test_an_ema_run_resumes_bit_for_bit(tmp_path):
    check_resume(tmp_path, "ema.decay=0.7", "ema.start_step=1")


def test_caption_knobs_train_through_train_py(tmp_path):
    summary = run_train(tmp_path / "run", "data.templates=filewords", "data.shuffle_tags=true", "data.keep_tokens=1",
                        "data.caption_dropout=0.2", "trainer.max_steps=2", "samples.every_n_steps=0")  # fmt: skip
    assert summary["status"] == "completed"
    with pytest.raises(ConfigError, match=r"^data\.caption_dropout=1\.5: .*\[0, 1\]"):
        run_train(tmp_path / "bad", "data.caption_dropout=1.5")


def test_resume_without_an_earlier_run_says_what_to_do(tmp_path):
    with pytest.raises(ConceptLabError, match="no earlier run of this command"):
        run_train(tmp_path / "run", "resume=true")


def test_half_precision_backbone_keeps_float32_vectors(tmp_path):
    """The GPU recipe (frozen parts in half precision, autocast) exercised on CPU with bfloat16."""
    summary = run_train(tmp_path / "run", "model.dtype=bfloat16", "trainer.precision=bf16-mixed")
    assert summary["status"] == "completed" and summary["final_loss"] > 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["method.vectors"].dtype == torch.float32
    assert read_embedding(tmp_path / "run" / "concepts" / "robot.pt").vectors.dtype == torch.float32


def test_v_prediction_backbone_trains(tmp_path):
    summary = run_train(tmp_path / "run", "model.prediction_type=v_prediction", "samples.every_n_steps=0")
    assert summary["status"] == "completed" and summary["final_loss"] > 0


def test_nan_loss_stops_the_run_with_advice_and_keeps_earlier_files(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became nan or inf at step \d+; lower method.lr"):
        run_train(
            run_dir,
            "method.lr=1e30",
            "method.scale_lr=false",
            "trainer.max_steps=50",
            "samples.every_n_steps=0",
        )
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "TrainingError" in summary["error"]
    assert not (run_dir / "concepts").exists(), "a diverged embedding is not exported"


def broken_model(tmp_path, tiny_dir):
    shutil.copytree(tiny_dir, tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "vae")
    return f"model.path={tmp_path / 'model'}"


BAD_INPUT = {
    "missing image folder": (lambda t, m: "data.path=" + str(t / "nope"), "does not exist"),
    "too few images": (lambda t, m: "data.num_images=9", "num_images=9 but the folder holds only 5"),
    "placeholder in vocabulary": (
        lambda t, m: "method.placeholder=cat",
        "already in the tokenizer's vocabulary",
    ),
    "initializer of two tokens": (
        lambda t, m: "method.initializer_token=teddy bear",
        "exactly one existing token",
    ),
    "no vectors": (
        lambda t, m: "method.num_vectors=0",
        r"method.num_vectors=0: must be a finite number in \[1, 75\]",
    ),
    "model folder missing a part": (broken_model, "has no vae/"),
    "embedding of the wrong width": (
        lambda t, m: (
            f"method.init_from={write_a1111_embedding(t / 'e.pt', 'e', torch.zeros(1, 768), 1, None, 'x')}"
        ),
        "768-wide vectors but this model.s text encoder is 32 wide",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_before_training_and_writes_nothing_half_done(tmp_path, tiny_dir, case):
    make_override, message = BAD_INPUT[case]
    run_dir = tmp_path / "run"
    with pytest.raises(ConceptLabError, match=message):
        run_train(run_dir, make_override(tmp_path, tiny_dir))
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and message.split(" ")[0] in summary["error"]
    assert summary["steps"] is None  # it never trained
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "concepts").exists()


def test_cli_reports_a_user_error_in_one_line_and_exits_non_zero(tmp_path):
    proc, [run_dir] = train_subprocess(tmp_path, f"data.path={tmp_path / 'missing'}")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: image folder {tmp_path / 'missing'} does not exist; set data.path to a folder of images"
    )
    assert "Traceback" not in proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def test_cli_rejects_a_misspelt_key(tmp_path):
    proc, _ = train_subprocess(tmp_path, "method.num_vectorz=2")
    assert proc.returncode != 0 and "num_vectorz" in proc.stderr


def test_broken_concept_file_is_reported_not_unpickled(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ConceptFileError, match="could not be read"):
        run_train(tmp_path / "run", f"method.init_from={tmp_path / 'bad.pt'}")


@pytest.fixture
def silent_server():
    """A local port that accepts connections and never answers (a hung server); `.connections` counts
    the connections made to it."""
    import socket
    import threading

    class Silent(str):
        """The server's URL, with the connections made to it."""

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        url = Silent(f"http://127.0.0.1:{server.getsockname()[1]}")
        url.connections = []

        def accept():
            while True:
                try:
                    url.connections.append(server.accept()[0])  # kept open, never answered
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        yield url
        for connection in url.connections:
            connection.close()


@pytest.mark.parametrize("server", ["refused", pytest.param("silent", marks=pytest.mark.slow)])
def test_unreachable_wandb_server_falls_back_to_offline(tmp_path, server, silent_server):
    """Logged in (credentials set), W&B not in offline mode, and the server refuses or never answers: the
    server is asked first, within logger.init_timeout, so W&B never starts against it (a hung server
    once kept W&B's start and its service at exit waiting ~50 s) and the process ends with the run."""
    url = "http://127.0.0.1:9" if server == "refused" else silent_server
    env = {"WANDB_MODE": None, "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": url}
    args = ["logger=wandb", "logger.mode=auto", "logger.init_timeout=3", "samples.every_n_steps=0"]
    proc, [run_dir] = train_subprocess(tmp_path, *args, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert f"could not reach the server at {url} within 3 s" in output and "Traceback" not in output
    if server == "silent":  # the offline run sends the server nothing after the probe (W&B's analytics off)
        assert len(silent_server.connections) == 1
    assert read_summary(run_dir)["status"] == "completed"
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    # The offline run's id is recorded: a requeue continues it and `wandb sync` uploads it.
    assert offline.name.endswith((run_dir / "wandb_run_id").read_text().strip())


def test_ddp_on_cpu_gives_one_run_record_and_the_single_process_result(tmp_path):
    """Two gloo processes with batch 2 each train what one process with batch 4 trains, on SDXL's shape
    (both encoders' vectors, each image with its size ids; SD-1's is the same step with one encoder, and
    trainer=ddp on it runs in test_sweeps)."""
    model = "tiny_xl"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    quick = [f"model={model}", "trainer.max_steps=3", "samples.every_n_steps=0", "evaluate.enabled=false"]
    proc, [run_dir] = train_subprocess(tmp_path / "ddp", *ddp, *quick)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 3
    assert summary["lr"] == pytest.approx(5e-4 * 2 * 2)  # scale_lr counts both devices
    assert summary["global_batch_size"] == 2 * 2
    assert (run_dir / "metrics.csv").is_file()
    single = run_train(tmp_path / "single" / "run", "data.batch_size=4", *quick)
    assert single["lr"] == pytest.approx(summary["lr"])
    ours = load_file(run_dir / "concepts" / "robot.safetensors")
    reference = load_file(tmp_path / "single" / "run" / "concepts" / "robot.safetensors")
    assert ours.keys() == reference.keys() == ({"clip_l", "clip_g"} if model == "tiny_xl" else {"<robot>"})
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-6)


def test_a_rerun_in_the_same_folder_continues_its_checkpoint_and_wandb_run(tmp_path):
    """What a requeued SLURM job does: same job folder, so the same last.ckpt and the same W&B run."""
    run_dir = tmp_path / "job"
    first = run_train(run_dir, "logger=wandb", "trainer.max_steps=2", "samples.every_n_steps=0")
    run_id = (run_dir / "wandb_run_id").read_text()
    again = run_train(run_dir, "logger=wandb", "trainer.max_steps=4", "samples.every_n_steps=0")
    assert first["steps"] == 2 and again["steps"] == 4 and again["steps_this_process"] == 2
    assert again["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert (run_dir / "wandb_run_id").read_text() == run_id
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)


def test_sigusr2_saves_last_ckpt_then_stops_the_run(tmp_path):
    """SLURM's warning signal without submitit: checkpoint at the next step, record 'interrupted'."""
    proc = start_long_run(tmp_path, rows=20)
    try:
        proc.send_signal(signal.SIGUSR2)
        assert proc.wait(timeout=120) == 128 + signal.SIGUSR2
    finally:
        proc.kill()
    [run_dir] = list(tmp_path.glob("runs/*"))
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] > 0  # saved although periodic checkpoints were off
    summary = read_summary(run_dir)
    assert summary["status"] == "interrupted" and "SystemExit" in summary["error"]


def test_a_model_folder_given_as_model_path_trains(tmp_path):
    """The path a user's SD folder takes: scripts/make_tiny_backbone.py writes one, train.py loads it."""
    folder = tmp_path / "tiny-sd"
    made = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_backbone.py"), str(folder)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    proc, [run_dir] = train_subprocess(tmp_path / "work", f"model.path={folder}", "model.name=my-sd")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["model"] == "my-sd"
    assert read_embedding(run_dir / "concepts" / "robot.pt").step == 4
    # As the webui describes a checkpoint: the folder's name and a short hash of its UNet's weights.
    a1111 = torch.load(run_dir / "concepts" / "robot.pt", weights_only=True)
    assert a1111["sd_checkpoint_name"] == "tiny-sd"
    unet = (folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a1111["sd_checkpoint"] == hashlib.sha256(unet).hexdigest()[:10]


def test_the_training_step_never_waits_for_the_device(backbone, monkeypatch):
    """No host sync per step: reading a tensor's value (item, bool, float, int) in training_step would
    stall a GPU every step; the non-finite check is a device flag read at logging points."""
    from conftest import fit_a_few_steps

    from conceptlab.methods.textual_inversion import TextualInversion

    method = TextualInversion(name="ti", lr=5e-4, scale_lr=False, concept="robot")
    method.attach(backbone)
    module, data = fit_a_few_steps(backbone, method, "bundled:robot", lr=5e-4, steps=1)
    batch = next(iter(data.train_dataloader()))
    module.log = lambda *args, **kwargs: None  # Lightning's logging is its own (and reads at log points)

    def sync(self, *args):
        raise AssertionError("training_step read a tensor's value on the host")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    loss = module.training_step(batch, 0)
    monkeypatch.undo()
    assert torch.isfinite(loss) and int(module._first_bad_step) == -1


def test_trainer_compile_compiles_the_unet_in_place(tmp_path, monkeypatch):
    """trainer.compile is conceptlab's key: the UNet (with what a method installed) compiled in place, so
    checkpoints and exports keep their names. (Compiling itself is torch's; a compiled tiny UNet's output
    equals the eager one's to 1.5e-6, measured by hand: CPU inductor takes ~80 s, too long for a test.)"""
    compiled = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw))
    )
    summary = run_train(tmp_path / "run", "trainer.compile=reduce-overhead", "samples.every_n_steps=0")
    assert summary["status"] == "completed"
    assert compiled == [("UNet2DConditionModel", {"mode": "reduce-overhead"})]
    with pytest.raises(
        ConfigError, match="trainer.compile=fast: use true, false or one of default, reduce-overhead"
    ):
        run_train(tmp_path / "bad", "trainer.compile=fast")
