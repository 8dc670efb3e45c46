"""SDXL: the tiny SDXL-shaped backbone loads as a user's SDXL folder does, the training step conditions
the UNet as diffusers' SDXL pipeline and scripts do, and each method's files load in diffusers' SDXL
pipeline (compared exactly), in generate.py, and under the readers' key rules."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import check_resume, compose, read_summary, run_train
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_interop import comfyui_embedding
from test_lora import check_tag_at_zero_and_one, first_image, generate, kohya_modules
from test_pivotal import webui_bundle

from conceptlab.errors import BackboneError, ConceptFileError
from conceptlab.inference import prepare

XL = ["model=tiny_xl", "samples.every_n_steps=0", "evaluate.enabled=false"]


@pytest.fixture(scope="session")
def tiny_xl_dir(isolated_env):
    from conceptlab.backbone import ensure_tiny_backbone
    from conceptlab.config import ModelConfig

    return ensure_tiny_backbone(ModelConfig(name="tiny_xl", family="sdxl"))


@pytest.fixture
def xl(tiny_xl_dir):
    """A fresh tiny SDXL backbone, loaded from its folder as model=sdxl model.path=<folder> loads one."""
    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig

    return load_backbone(ModelConfig(name="sdxl", path=str(tiny_xl_dir)))


def xl_pipeline(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_xl_dir):
    """One short train.py run of each method on tiny_xl (LoRA with both text encoders), shared by the
    tests that read their files."""
    root = tmp_path_factory.mktemp("xl_runs")
    out = {}
    for method, extra in (("ti", ["method.num_vectors=2"]), ("lora", ["method.text_encoder=true"]),
                          ("hypernet", []), ("pivotal", [])):  # fmt: skip
        summary = run_train(root / method, f"method={method}", *XL, "trainer.max_steps=2", *extra)
        assert summary["status"] == "completed", summary
        out[method] = root / method
    return out


@pytest.mark.slow
def test_the_tiny_xl_folder_is_sdxl_and_our_conditioning_is_the_pipelines(xl, tiny_xl_dir):
    """Both encoders' penultimate layers side by side, the pooled projection of the second, and the
    same picture as diffusers' SDXL pipeline draws from the prompt itself."""
    assert xl.is_xl and xl.text_widths == [32, 48] and xl.context_dim == 80 and xl.pooled_dim == 48
    assert xl.tokenizer.pad_token == "<|endoftext|>" and xl.tokenizer_2.pad_token == "!"
    pipe = xl_pipeline(tiny_xl_dir)
    prompts = ["a photo of a robot", "a red square"]
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    conditioning = xl.encode_text(xl.tokenize(prompts))
    assert conditioning.shape == (2, 78, 80)
    torch.testing.assert_close(conditioning[:, :77], embeds)
    torch.testing.assert_close(conditioning[:, 77, :48], pooled)
    assert torch.count_nonzero(conditioning[:, 77, 48:]) == 0

    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, clip_sample=False
    )  # the samples' sampler
    ours = xl.sample(prompts[:1], [0], num_inference_steps=2, guidance_scale=5.0)
    theirs = pipe(prompts[:1], num_inference_steps=2, guidance_scale=5.0, output_type="pt", height=64,
                  width=64, generator=[torch.Generator().manual_seed(0)]).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_the_training_loss_is_the_diffusers_sdxl_scripts(xl, tiny_xl_dir):
    """The module's loss for a batch is the SDXL scripts': the UNet given both encoders' context, the
    pooled embedding and each image's size ids (original size, crop, target)."""
    from conceptlab.module import diffusion_losses

    pipe = xl_pipeline(tiny_xl_dir)
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([10, 700])
    time_ids = torch.tensor([[100, 80, 10, 0, 64, 64], [64, 64, 0, 0, 64, 64]])
    prompts = ["a photo of a robot", "a robot"]
    batch = {"latents": latents, "noise": noise, "timesteps": timesteps, "input_ids": xl.tokenize(prompts),
             "time_ids": time_ids}  # fmt: skip
    [loss] = diffusion_losses(xl, [batch])

    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        prediction = pipe.unet(noisy, timesteps, embeds,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.float()}).sample  # fmt: skip
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prediction, noise))


@pytest.mark.parametrize(
    ("size", "target", "expected"),
    [
        # a landscape 200x100 to 64x64: scaled to 128x64, the central 64 columns from x=32
        ((200, 100), (64, 64), [100, 200, 0, 32, 64, 64]),
        ((100, 300), (64, 64), [300, 100, 64, 0, 64, 64]),
        ((64, 64), (64, 64), [64, 64, 0, 0, 64, 64]),
        ((300, 200), (96, 64), [200, 300, 0, 0, 64, 96]),
    ],
)
def test_size_ids_are_the_sdxl_scripts(size, target, expected):
    from conceptlab.data import size_ids

    assert size_ids(size, target, center_crop=True) == expected
    assert size_ids(size, target, center_crop=False)[2:4] == [0, 0]


def test_an_sd_folder_named_sdxl_and_the_reverse_are_refused_in_one_line(tiny_dir, tiny_xl_dir):
    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig

    with pytest.raises(BackboneError, match=r"is an SD 1.x/2.x model, but model=sdxl says family=sdxl"):
        load_backbone(ModelConfig(name="sdxl", family="sdxl", path=str(tiny_dir)))
    with pytest.raises(BackboneError, match=r"is an SDXL model, but model=sd15 says family=sd"):
        load_backbone(ModelConfig(name="sd15", family="sd", path=str(tiny_xl_dir)))


def test_original_layout_names_are_the_ones_diffusers_converts_back(xl):
    """Every UNet weight, renamed into the original layout, comes back to its own name through diffusers'
    converter of original checkpoints (the webui and ComfyUI know the model by those names)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from conceptlab.layouts import original_unet_name

    state = xl.unet.state_dict()
    ldm = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        ldm[f"model.diffusion_model.{original_unet_name(module, xl.unet.config)}.{leaf}"] = value
    back = convert_ldm_unet_checkpoint(ldm, dict(xl.unet.config))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.slow
def test_ti_on_sdxl_trains_both_encoders_and_its_files_load_in_diffusers_and_generate(
    runs, tiny_xl_dir, tmp_path
):
    run = runs["ti"]
    concepts = run / "concepts"
    assert read_summary(run)["files"]["concepts"] == [
        "concepts/diffusers/learned_embeds.safetensors", "concepts/diffusers/learned_embeds_2.safetensors",
        "concepts/robot.safetensors",
    ]  # fmt: skip
    tools = load_file(concepts / "robot.safetensors")
    assert tools.keys() == {"clip_l", "clip_g"}
    assert tools["clip_l"].shape == (2, 32) and tools["clip_g"].shape == (2, 48)
    # ComfyUI's reader (sdxl_clip.py: each encoder loads the file with its own embed_key) takes each half.
    assert torch.equal(comfyui_embedding(concepts / "robot.safetensors", "clip_l"), tools["clip_l"])
    assert torch.equal(comfyui_embedding(concepts / "robot.safetensors", "clip_g"), tools["clip_g"])
    first, second = (
        load_file(concepts / "diffusers" / n)
        for n in ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
    )
    assert torch.equal(first["<robot>"], tools["clip_l"]) and torch.equal(second["<robot>"], tools["clip_g"])

    # Both encoders' vectors trained: neither is still the initializer token's row.
    pipe = xl_pipeline(tiny_xl_dir)
    ids = pipe.tokenizer("object", add_special_tokens=False).input_ids
    for encoder, part in ((pipe.text_encoder, "clip_l"), (pipe.text_encoder_2, "clip_g")):
        start = encoder.get_input_embeddings().weight[ids[0]]
        assert not torch.allclose(tools[part][0], start)

    # diffusers needs one load per text encoder (the README's two calls), then encodes the word as we do.
    pipe.load_textual_inversion(
        tools["clip_l"], token="<robot>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        tools["clip_g"], token="<robot>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    embeds, _, pooled, _ = pipe.encode_prompt(["a photo of <robot>"], do_classifier_free_guidance=False)

    inference = prepare(
        [str(concepts / "robot.safetensors")], compose(["model=tiny_xl"], config="generate").model, "cpu"
    )
    backbone = inference.backbone
    text = inference.concepts[0].rewrite_prompt("a photo of <robot>")
    text = pipe.maybe_convert_prompt(text, pipe.tokenizer)  # <robot> -> <robot> <robot>_1
    conditioning = backbone.encode_text(backbone.tokenize([text]))
    torch.testing.assert_close(conditioning[:, :77], embeds)
    torch.testing.assert_close(conditioning[:, 77, :48], pooled)

    # generate.py with the run folder: the word changes the picture. (The tools' file is called by its
    # file name, as the webui calls it: "robot" there means the embedding too.)
    _, bare = generate(tmp_path / "a", "model=tiny_xl", "prompt=a photo of a thing", f"concepts=[{run}]")
    _, word = generate(tmp_path / "b", "model=tiny_xl", "prompt=a photo of <robot>", f"concepts=[{run}]")
    assert not np.array_equal(first_image(bare), first_image(word))


@pytest.mark.slow
def test_embeddings_of_the_other_family_or_missing_a_half_are_refused_in_one_line(tmp_path, tiny_xl_dir):
    save_file({"<sd>": torch.zeros(1, 32)}, tmp_path / "sd.safetensors")
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 48)}, tmp_path / "xl.safetensors")
    save_file({"clip_l": torch.zeros(1, 32)}, tmp_path / "half.safetensors")
    with pytest.raises(
        ConceptFileError,
        match=r"32-wide vectors \(an SD 1.x/2.x embedding\); this SDXL backbone needs two parts, clip_l 32 and clip_g 48",
    ):
        generate(
            tmp_path / "a", "model=tiny_xl", "prompt=a <sd>", f"concepts=[{tmp_path / 'sd.safetensors'}]"
        )
    with pytest.raises(
        ConceptFileError,
        match=r"is an SDXL embedding \(clip_l 32 \+ clip_g 48 wide\); this backbone is Stable Diffusion 1.x/2.x",
    ):
        generate(tmp_path / "b", "prompt=a xl", f"concepts=[{tmp_path / 'xl.safetensors'}]")
    with pytest.raises(
        ConceptFileError,
        match=r"half.safetensors: an SDXL embedding holds clip_l and clip_g, and this one has no clip_g",
    ):
        generate(
            tmp_path / "c", "model=tiny_xl", "prompt=a half", f"concepts=[{tmp_path / 'half.safetensors'}]"
        )


KOHYA_XL_KEY = re.compile(
    r"^lora_(unet_(input_blocks|middle_block|output_blocks)_\d+(_\d+)?_transformer_blocks_\d+_attn[12]_to_(q|k|v|out_0)"
    r"|te[12]_text_model_encoder_layers_\d+_self_attn_(q|k|v|out)_proj)$"
)


@pytest.mark.slow
def test_lora_on_sdxl_writes_kohyas_sdxl_names_and_both_files_load_in_diffusers_sdxl(
    runs, xl, tiny_xl_dir, tmp_path
):
    from conceptlab.layouts import original_unet_name
    from conceptlab.methods.lora import ADAPTER

    run = runs["lora"]
    kohya = run / "concepts" / "robot.safetensors"
    modules = kohya_modules(kohya)
    assert modules and all(KOHYA_XL_KEY.match(m) for m in modules), sorted(modules)[:3]
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    # The readers' rules: the webui looks `lora_unet_` up as `diffusion_model_` + the original layout's
    # name and ComfyUI as `lora_unet_` + that name (original names: the converter test above); both read
    # the text encoders' as `lora_te1_` / `lora_te2_` + text_model_encoder_layers_<n>_<layer>.
    names = {
        original_unet_name(n, xl.unet.config).replace(".", "_")
        for n, m in xl.unet.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    comfy_te = {f"lora_te{k}_text_model_encoder_layers_{b}_{layer}" for k in (1, 2) for b in range(2)
                for layer in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")}  # fmt: skip
    for module in modules:
        assert module.removeprefix("lora_unet_") in names or module in comfy_te, module
    with safe_open(str(kohya), framework="pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"

    # diffusers' SDXL loader reads both files into the very adapters we trained (UNet and both encoders).
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ours = {k.removeprefix("backbone.").replace(f".{ADAPTER}.", "."): v for k, v in state.items()}
    assert {k.split(".")[0] for k in ours} == {"unet", "text_encoder", "text_encoder_2"}
    outputs = []
    for source in (run / "concepts" / "diffusers", kohya):
        pipe = xl_pipeline(tiny_xl_dir)
        pipe.load_lora_weights(str(source), adapter_name="x")
        loaded = {
            f"{part}.{k.replace('.x.', '.')}": v
            for part in ("unet", "text_encoder", "text_encoder_2")
            for k, v in getattr(pipe, part).state_dict().items()
            if ".lora_" in k
        }
        assert loaded.keys() == ours.keys(), source
        for key in ours:
            torch.testing.assert_close(loaded[key], ours[key])
        outputs.append(pipe("a robot", num_inference_steps=2, output_type="pt", height=64, width=64,
                            generator=torch.Generator().manual_seed(0)).images)  # fmt: skip
    torch.testing.assert_close(outputs[0], outputs[1])

    # generate.py: <lora:robot:0> is the bare model bit for bit, <lora:robot:1> is not.
    check_tag_at_zero_and_one(
        tmp_path, "a photo of robot", "<lora:robot", f"concepts=[{run}]", "model=tiny_xl"
    )


@pytest.mark.slow
def test_hypernetworks_on_sdxl_take_the_attention_widths_and_zero_is_the_bare_model(runs, tmp_path):
    run = runs["hypernet"]
    file = torch.load(run / "concepts" / "robot.pt", weights_only=True)
    # The widths the webui looks layers up by: the 80-wide joint text context and the 64-wide blocks with
    # attention; not the attention-less first level's 32.
    assert sorted(k for k in file if isinstance(k, int)) == [64, 80]
    check_tag_at_zero_and_one(
        tmp_path, "a photo of robot", "<hypernet:robot", f"concepts=[{run}]", "model=tiny_xl"
    )


@pytest.mark.slow
def test_pivotal_tuning_on_sdxl_bundles_both_halves_as_the_webui_reads_them(runs, tmp_path):
    run = runs["pivotal"]
    bundle = load_file(run / "concepts" / "robot.safetensors")
    [(name, data)] = webui_bundle(bundle).items()  # the webui's rule: an SDXL embedding's two entries
    assert name == "<robot>" and data.keys() == {"clip_l", "clip_g"}
    assert data["clip_l"].shape == (2, 32) and data["clip_g"].shape == (2, 48)
    pair = load_file(run / "concepts" / "embedding" / "robot.safetensors")
    assert torch.equal(pair["clip_l"], data["clip_l"]) and torch.equal(pair["clip_g"], data["clip_g"])
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {"method.embedding.vectors", "method.embedding.vectors_2"} <= set(state)
    # generate.py reads the bundle: the word joins both encoders, <lora:robot:0> leaves the word alone.
    check_tag_at_zero_and_one(
        tmp_path,
        "a photo of <robot>",
        "<lora:robot",
        f"concepts=[{run / 'concepts' / 'robot.safetensors'}]",
        "model=tiny_xl",
    )


def test_a_single_file_sdxl_checkpoint_loads_its_folders_weights_and_a_wrong_family_is_named(
    tmp_path, tiny_dir, tiny_xl_dir
):
    """sd_xl_base_1.0.safetensors' layout (sgm's: `conditioner.embedders.0/1`, OpenCLIP's names for the
    second encoder), written from the tiny SDXL folder, loads as that folder does; a file of the other
    family is named before diffusers reads it."""
    from ldm_layout import write_single_file

    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig

    file = write_single_file(tiny_xl_dir, tmp_path / "tiny-xl.safetensors")
    with safe_open(str(file), framework="pt") as f:
        keys = set(f.keys())
    # the names sgm's (the webui's) and ComfyUI's SDXL models hold; OpenCLIP's q, k, v in one matrix
    assert {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
            "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
            "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.ln_final.weight",
            "model.diffusion_model.label_emb.0.0.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight"} <= keys  # fmt: skip
    # ComfyUI's clip_g rules (comfy/utils.py clip_text_transformers_convert) rename every OpenCLIP key
    comfy = re.compile(r"conditioner\.embedders\.1\.model\.(positional_embedding|token_embedding\.weight|"
                       r"ln_final\.(weight|bias)|text_projection|transformer\.resblocks\.\d+\."
                       r"(attn\.in_proj_(weight|bias)|(ln_1|ln_2|mlp\.c_fc|mlp\.c_proj|attn\.out_proj)\.(weight|bias)))")  # fmt: skip
    second = [k for k in keys if k.startswith("conditioner.embedders.1.")]
    assert len(second) == 3 + 2 + 2 * 12 and all(comfy.fullmatch(k) for k in second)  # 2 layers of 12 each
    ours = load_backbone(
        ModelConfig(name="sdxl", family="sdxl", path=str(file), single_file_config=str(tiny_xl_dir))
    )
    folder = load_backbone(ModelConfig(name="sdxl", path=str(tiny_xl_dir)))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine, theirs = getattr(ours, part).state_dict(), getattr(folder, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs), part
    assert ours.tokenizer_2.pad_token == "!" and ours.checkpoint_name == "tiny-xl"
    ids = ours.tokenize(["a photo of a cat"])
    assert torch.equal(ids, folder.tokenize(["a photo of a cat"]))
    sd1 = write_single_file(tiny_dir, tmp_path / "sd1.safetensors")
    with pytest.raises(
        BackboneError,
        match=r"is an SD 1.x/2.x checkpoint, but the configs in .* describe an SDXL model; use model=sd15",
    ):
        load_backbone(
            ModelConfig(name="sdxl", family="sdxl", path=str(sd1), single_file_config=str(tiny_xl_dir))
        )
    with pytest.raises(
        BackboneError,
        match=r"is an SDXL checkpoint, but the configs in .* describe an SD 1.x/2.x model; use model=sdxl",
    ):
        load_backbone(ModelConfig(name="sd15", path=str(file), single_file_config=str(tiny_dir)))


@pytest.mark.slow
def test_generate_on_sdxl_weighs_spans_and_edits_with_a_mask(tmp_path):
    """A prompt with weight-1 spans is the plain prompt's picture (our encoding, pooled row and the
    pipeline's zeros for an empty negative included); the masked edit keeps what lies outside the mask."""
    from PIL import Image

    _, plain = generate(tmp_path / "plain", "model=tiny_xl", "prompt=a photo of a robot")
    _, weighted = generate(tmp_path / "weighted", "model=tiny_xl", "prompt=a photo of (a robot:1)")
    assert np.array_equal(first_image(plain), first_image(weighted))
    _, heavier = generate(tmp_path / "heavier", "model=tiny_xl", "prompt=a photo of (a robot:1.5)")
    assert not np.array_equal(first_image(plain), first_image(heavier))

    init = Image.fromarray(np.full((64, 64, 3), 90, np.uint8))
    init.save(tmp_path / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255  # white: redraw
    Image.fromarray(mask).save(tmp_path / "mask.png")
    record, edited = generate(tmp_path / "edit", "model=tiny_xl", "prompt=a red circle",
                              f"init_image={tmp_path / 'init.png'}", f"mask={tmp_path / 'mask.png'}")  # fmt: skip
    pixels = first_image(edited).astype(np.float32)
    assert record["strength"] == 1.0
    assert np.array_equal(pixels[:, 32:], np.asarray(init, np.float32)[:, 32:])
    assert np.abs(pixels[:, :32] - 90).mean() > 5
    _, moved = generate(tmp_path / "img2img", "model=tiny_xl", "prompt=a red circle",
                        f"init_image={tmp_path / 'init.png'}", "strength=0.5")  # fmt: skip
    assert Image.open(moved / "images" / "00_seed0.png").size == (64, 64)


@pytest.mark.slow
def test_evaluate_py_scores_an_sdxl_lora_under_the_dreambooth_protocol(runs, tiny_encoders, tmp_path):
    from conceptlab.evaluate import evaluate_concepts

    cfg = compose(["model=tiny_xl", "data.class_word=robot", f"encoders.clip={tiny_encoders['clip']}",
                   "encoders.dino=null", "protocol.images_per_prompt=1", "protocol.num_inference_steps=2",
                   "protocol.object.editing=['a {} on the beach']", "protocol.multipliers=[1.0,0.0]"])  # fmt: skip
    record = evaluate_concepts([str(runs["lora"])], cfg.model, cfg.data, cfg.encoders, cfg.protocol, tmp_path)
    assert set(record["results"]) == {"m1", "m0"}
    assert record["results"]["m1"]["prompts"][-1] == "a robot on the beach <lora:robot:1>"
    assert -1 <= record["metrics"]["eval/clip_t"] <= 1 and -1 <= record["metrics"]["eval/clip_i"] <= 1


@pytest.mark.slow
def test_an_sdxl_ti_run_resumes_bit_for_bit(tmp_path):
    check_resume(tmp_path, "model=tiny_xl", "method=ti", "samples.every_n_steps=0", "evaluate.enabled=false")


def test_dreambooth_refuses_a_checkpoint_file_of_an_sd2_shaped_model_in_one_line():
    from types import SimpleNamespace

    from conceptlab.errors import ConfigError
    from conceptlab.methods.dreambooth import DreamBooth

    method = DreamBooth(name="dreambooth", lr=1e-5, scale_lr=False, concept="robot", class_word="robot",
                        checkpoint_file=True)  # fmt: skip
    with pytest.raises(ConfigError, match=r"writes SD 1.x and SDXL checkpoints; this model is SD 2.x-shaped"):
        method.attach(SimpleNamespace(is_xl=False, context_dim=1024))


def test_a_float16_vae_that_says_force_upcast_encodes_in_float32_and_stays_float16(xl):
    """SDXL's own VAE overflows in float16: its config's force_upcast makes the latents' caching encode
    in float32 (as diffusers' pipelines decode), and the VAE is float16 again afterwards."""
    from PIL import Image

    from conceptlab.data import encode_latents

    image = Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    reference, _ = encode_latents(xl, [image], False, torch.device("cpu"))
    xl.vae.to(torch.float16)
    assert xl.vae.config.force_upcast
    mean, _ = encode_latents(xl, [image], False, torch.device("cpu"))
    assert xl.vae.dtype == torch.float16
    torch.testing.assert_close(mean, reference, rtol=1e-2, atol=1e-2)  # float16 weights, float32 arithmetic


def test_the_data_module_gives_each_sdxl_sample_its_images_size_ids(xl, tmp_path):
    from PIL import Image

    from conceptlab.config import DataConfig
    from conceptlab.data import ConceptDataModule, read_concept_images

    Image.fromarray(np.full((100, 200, 3), 90, np.uint8)).save(tmp_path / "wide.png")  # 200 wide, 100 high
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "square.png")
    cfg = DataConfig(path=str(tmp_path), batch_size=2, val_images=0)
    images = read_concept_images(cfg)
    data = ConceptDataModule(cfg, images, xl, "robot", 0, 64, cache_context=True)
    data.setup()
    ids = {im.path.name: data.dataset[(k, 0)]["time_ids"].tolist() for k, im in enumerate(images)}
    assert ids == {"wide.png": [100, 200, 0, 32, 64, 64], "square.png": [64, 64, 0, 0, 64, 64]}
    assert data.dataset[(0, 0)]["context"].shape == (78, 80)  # both encoders' context and the pooled row


@pytest.mark.slow
def test_dreambooth_and_custom_diffusion_on_sdxl_train_both_encoders_and_their_files_load(
    tmp_path, tiny_xl_dir
):
    """DreamBooth with its text encoders (both train; its reader puts back all three parts at 0), and
    Custom Diffusion (its word in both encoders; diffusers' SDXL UNet with its processors predicts what
    ours does)."""
    from conceptlab.backbone import load_backbone
    from conceptlab.config import ModelConfig
    from conceptlab.inference import load_concepts

    prior = ["data.class_word=robot", "method.num_class_images=2", "method.class_steps=2", "method.lr=1e-3"]
    db = run_train(tmp_path / "db", "method=dreambooth", "method.train_text_encoder=true", *prior, *XL,
                   "trainer.max_steps=1", "method.checkpoint_file=true")  # fmt: skip
    # the whole model in one SDXL file (the webui's, ComfyUI's): diffusers reads back the trained parts
    from diffusers import StableDiffusionXLPipeline

    checkpoint = tmp_path / "db" / "concepts" / "checkpoint" / "robot.safetensors"
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(checkpoint), config=str(tiny_xl_dir), local_files_only=True
    )
    for part in ("unet", "text_encoder", "text_encoder_2"):
        trained = load_file(next((tmp_path / "db" / "concepts" / "diffusers" / part).glob("*.safetensors")))
        loaded = getattr(pipe, part).state_dict()
        assert all(torch.equal(loaded[k].half(), trained[k].half()) for k in trained), part
    # ... and generate.py takes it as the model, the way a user's sd_xl_base_1.0.safetensors is taken
    record, out = generate(tmp_path, "model=tiny_xl", f"model.path={checkpoint}",
                           f"model.single_file_config={tiny_xl_dir}", "seeds=[0]", "prompt=a photo of sks robot")  # fmt: skip
    assert (out / record["images"][0]).is_file()
    parts = {k.split(".")[0] for k in load_file(tmp_path / "db" / "concepts" / "robot.safetensors")}
    assert {"text_encoder", "text_encoder_2"} <= parts and db["status"] == "completed"
    backbone = load_backbone(ModelConfig(name="sdxl", path=str(tiny_xl_dir)))
    bare = {part: {k: v.clone() for k, v in getattr(backbone, part).state_dict().items()}
            for part in ("unet", "text_encoder", "text_encoder_2")}  # fmt: skip
    [concept] = load_concepts([tmp_path / "db"])
    concept.install(backbone)
    concept.activate(1.0)
    assert not torch.equal(backbone.text_encoder_2.state_dict()["text_projection.weight"],
                           bare["text_encoder_2"]["text_projection.weight"])  # fmt: skip
    concept.activate(0.0)
    for part, state in bare.items():
        assert all(torch.equal(getattr(backbone, part).state_dict()[k], v) for k, v in state.items()), part

    run_train(tmp_path / "cd", "method=custom_diffusion", *prior, *XL, "trainer.max_steps=1")
    file = load_file(tmp_path / "cd" / "concepts" / "robot.safetensors")
    assert file["word.<new1>"].shape == (1, 32) and file["word_g.<new1>"].shape == (1, 48)
    folder = tmp_path / "cd" / "concepts" / "diffusers"
    assert torch.equal(load_file(folder / "<new1>_2.safetensors")["<new1>"], file["word_g.<new1>"])
    backbone = load_backbone(ModelConfig(name="sdxl", path=str(tiny_xl_dir)))
    [concept] = load_concepts([tmp_path / "cd"])
    concept.install(backbone)
    concept.activate(1.0)
    pipe = xl_pipeline(tiny_xl_dir)
    pipe.unet.load_attn_procs(
        folder, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe
    )
    context = backbone.encode_text(backbone.tokenize(["a photo of <new1> robot"]))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = backbone.size_ids(latents)
    with torch.no_grad():
        ours = backbone.denoise(latents, torch.tensor([500]), context, time_ids)
        theirs = pipe.unet(latents, torch.tensor([500]), context[:, :77],
                           added_cond_kwargs={"text_embeds": context[:, 77, :48], "time_ids": time_ids}).sample  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
