"""Files conceptlab writes, checked against the rules of the programs that read them."""

import pickle
import re
import zipfile

import pytest
import torch

from conceptlab.methods.hypernetwork import (
    HypernetworkLayers,
    read_hypernetwork,
    write_a1111_hypernetwork,
    write_hypernetwork_safetensors,
)
from conceptlab.methods.textual_inversion import read_embedding, write_a1111_embedding

# AUTOMATIC1111 webui v1.10, modules/safe.py (on by default for every torch.load), as its rules read:
# 1. every zip entry is `<dir>/data.pkl`, `<dir>/version`, `<dir>/byteorder`, `<dir>/data/<n>` or
#    `<dir>/.data/serialization_id`, and there is exactly one data.pkl;
# 2. data.pkl unpickles with only these globals; storages come through persistent ids ('storage', ...).
WEBUI_ENTRY = re.compile(r"^[^/]+/(data/\d+|version|byteorder|\.data/serialization_id|data\.pkl)$")
WEBUI_GLOBALS = {
    ("collections", "OrderedDict"),
    *(("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")),
    *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                             "ByteStorage", "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "dtype"), ("_codecs", "encode"), ("__builtin__", "set"),
}  # fmt: skip


class WebuiUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in WEBUI_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return super().find_class(module, name) if module != "__builtin__" else set

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)  # an empty stand-in, as the webui uses


def webui_check(path) -> None:
    """Raise as the webui would refuse the file."""
    with zipfile.ZipFile(path) as z:
        bad = [n for n in z.namelist() if not WEBUI_ENTRY.match(n)]
        if bad:
            raise ValueError(f"bad file inside {path}: {bad[0]}")
        [pkl] = [n for n in z.namelist() if n.endswith("/data.pkl")]
        with z.open(pkl) as f:
            WebuiUnpickler(f).load()


def test_the_webui_check_refuses_what_plain_torch_save_writes(tmp_path):
    """The check is real: torch 2.13's own zip has entries the webui does not allow."""
    torch.save({"string_to_param": {"*": torch.ones(1, 4)}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="bad file inside"):
        webui_check(tmp_path / "plain.pt")


def every_pt_conceptlab_writes(tmp_path):
    embedding = write_a1111_embedding(tmp_path / "cat.pt", "cat", torch.randn(2, 32), 10, None, "tiny")
    layers = HypernetworkLayers("ink", enable_sizes=[32, 64], activation_func="relu", add_layer_norm=True,
                                use_dropout=True, layer_structure=[1, 2, 2, 1])  # fmt: skip
    hypernetwork = write_a1111_hypernetwork(tmp_path / "ink.pt", layers, 5, None, "tiny")
    return embedding, hypernetwork, layers


def test_every_pt_conceptlab_writes_passes_the_webui_check_and_still_loads(tmp_path):
    embedding, hypernetwork, layers = every_pt_conceptlab_writes(tmp_path)
    for path in (embedding, hypernetwork):
        webui_check(path)
        torch.load(path, weights_only=True)  # current torch (and ComfyUI's safe load)
        torch.load(path, weights_only=True, mmap=True)
    assert read_embedding(embedding).vectors.shape == (2, 32)
    again = read_hypernetwork(hypernetwork)
    assert again.sizes == [32, 64] and all(
        torch.equal(again.pairs[64][0][k], v) for k, v in layers.pair(64)[0].state_dict().items()
    )


@pytest.mark.slow
def test_the_pt_files_of_a_training_run_pass_the_webui_check(tmp_path):
    from conftest import run_train

    run_train(tmp_path / "ti", "samples.every_n_steps=0")
    run_train(tmp_path / "hn", "method=hypernet", "data=styles", "samples.every_n_steps=0")
    written = sorted(tmp_path.glob("*/concepts/*.pt"))
    assert [p.name for p in written] == ["ink.pt", "robot.pt"]
    for path in written:
        webui_check(path)


def test_the_original_textual_inversion_files_are_read_safely(tmp_path):
    """Its string_to_param is a torch ParameterDict: the webui and ComfyUI read it, so do we."""
    vectors = torch.randn(2, 32)
    old = {"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)}),
           "name": "old-style", "step": 500}  # fmt: skip
    torch.save(old, tmp_path / "old-style.pt")
    embedding = read_embedding(tmp_path / "old-style.pt")
    assert embedding.name == "old-style" and embedding.step == 500 and torch.equal(embedding.vectors, vectors)


def test_sdxl_embeddings_are_read_and_refused_on_an_sd1_backbone_with_the_reason(tmp_path, backbone):
    from safetensors.torch import save_file

    from conceptlab.errors import ConceptFileError
    from conceptlab.methods.textual_inversion import EmbeddingConcept

    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "xl.safetensors")
    embedding = read_embedding(tmp_path / "xl.safetensors")
    assert embedding.sdxl_clip_g.shape == (2, 1280) and embedding.width == 768
    with pytest.raises(ConceptFileError, match=r"is an SDXL embedding \(clip_l 768 \+ clip_g 1280 wide\)"):
        EmbeddingConcept(embedding, tmp_path / "xl.safetensors").install(backbone)


def generate(tmp_path, *overrides):
    from conftest import compose

    from conceptlab.cli import quote_text_overrides
    from conceptlab.generate import run

    cfg = compose(quote_text_overrides(["model=tiny", "steps=2", "seeds=[0]", *overrides]), config="generate")
    return run(cfg, tmp_path / "gen")


def test_an_a1111_embedding_named_like_a_word_is_triggered_by_that_word_as_in_the_webui(tmp_path):
    import numpy as np
    from PIL import Image

    path = write_a1111_embedding(tmp_path / "robot.pt", "robot", torch.randn(1, 32) * 5, 10, None, "tiny")
    record = generate(tmp_path / "a", "prompt=a photo of robot, robots", f"concepts=[{path}]")
    assert record["text"] == "a photo of <robot>, robots"  # the whole word only
    assert record["concepts"][0] | {"file": ""} == {"method": "ti", "name": "robot", "file": "", "vectors": 1,
                                                    "trigger": "robot", "token": "<robot>"}  # fmt: skip
    plain = generate(tmp_path / "b", "prompt=a photo of robot, robots")
    ours = np.asarray(Image.open(tmp_path / "a" / "gen" / record["images"][0]))
    theirs = np.asarray(Image.open(tmp_path / "b" / "gen" / plain["images"][0]))
    assert not np.array_equal(ours, theirs)


def test_a_diffusers_embedding_whose_token_is_a_word_is_a_real_ambiguity(tmp_path):
    from conceptlab.errors import ConceptFileError
    from conceptlab.methods.textual_inversion import write_diffusers_embedding

    path = write_diffusers_embedding(tmp_path / "x.safetensors", "cat", torch.randn(1, 32))
    with pytest.raises(ConceptFileError, match="already a word of the vocabulary"):
        generate(tmp_path, "prompt=a cat", f"concepts=[{path}]")


def test_hypernetwork_init_from_takes_the_files_structure_and_refuses_a_contradiction(tmp_path, backbone):
    from conceptlab.errors import ConfigError
    from conceptlab.methods.hypernetwork import Hypernetwork

    layers = HypernetworkLayers(
        "relu-net", enable_sizes=[32, 64], activation_func="relu", add_layer_norm=True
    )
    path = write_a1111_hypernetwork(tmp_path / "relu-net.pt", layers, 7, None, "tiny")
    continued = Hypernetwork(name="hypernet", lr=1e-5, scale_lr=False, concept="c", init_from=str(path),
                             activation_func="linear", add_layer_norm=False)  # the config's defaults  # fmt: skip
    continued.attach(backbone)
    assert (
        continued.net.activation_func == "relu"
        and continued.net.add_layer_norm
        and continued.sizes == [32, 64]
    )
    assert all(torch.equal(a, b) for a, b in zip(continued.net.parameters(), layers.parameters()))
    with pytest.raises(ConfigError, match=r"method.activation_func=tanh but .*relu-net.pt was trained with "
                                          r"activation_func=relu"):  # fmt: skip
        Hypernetwork(
            name="hypernet", lr=1e-5, scale_lr=False, concept="c", init_from=str(path), activation_func="tanh"
        )


def webui_embedding_image(path, name, vectors):
    """A PNG as the webui's "save embedding as image" writes it: the embedding as base64 JSON, tensors
    as {"TORCHTENSOR": nested lists}, in the `sd-ti-embedding` text chunk."""
    import base64
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": {"TORCHTENSOR": vectors.tolist()}},
            "name": name, "step": 42, "sd_checkpoint": None, "sd_checkpoint_name": "sd15"}  # fmt: skip
    info = PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    Image.new("RGB", (64, 64), "navy").save(path, pnginfo=info)
    return path


def test_webui_embedding_images_are_read_from_their_text_chunk(tmp_path):
    from PIL import Image

    from conceptlab.errors import ConceptFileError

    vectors = torch.randn(2, 32)
    path = webui_embedding_image(tmp_path / "my-style-1500.png", "my-style", vectors)
    embedding = read_embedding(path)
    assert embedding.name == "my-style" and embedding.step == 42
    torch.testing.assert_close(embedding.vectors, vectors)
    record = generate(tmp_path, "prompt=a house in my-style", f"concepts=[{path}]")
    assert record["concepts"][0]["name"] == "my-style" and record["concepts"][0]["method"] == "ti"
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ConceptFileError, match="has no 'sd-ti-embedding' text chunk"):
        read_embedding(tmp_path / "plain.png")


# ComfyUI's HypernetworkLoader (comfy_extras/nodes_hypernetwork.py), as its rules read: the file is read
# with weights_only; activation_func, is_layer_norm, use_dropout, activate_output, last_layer_dropout come
# from the file's own keys; every key that int() accepts is a width holding [key-side, value-side] state
# dicts, whose ".weight" entries, in order, are the layers: a Linear, then its activation unless
# activation_func is linear or (it is the last entry and not activate_output), then (is_layer_norm) the
# next entry is a LayerNorm, then (use_dropout) Dropout(0.3) unless last or (penultimate and not
# last_layer_dropout). The patch adds mlp(x) * strength to key and value inputs of that width.
COMFY_ACTIVATIONS = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU,
                     "elu": torch.nn.ELU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh,
                     "sigmoid": torch.nn.Sigmoid, "softsign": torch.nn.Softsign, "mish": torch.nn.Mish}  # fmt: skip


def comfyui_hypernetwork(path) -> dict[int, list[torch.nn.Sequential]] | None:
    from safetensors.torch import load_file

    data = torch.load(path, weights_only=True) if str(path).endswith(".pt") else load_file(path)
    activation = data.get("activation_func", "linear")
    if activation not in COMFY_ACTIVATIONS:
        return None  # ComfyUI logs "Unsupported Hypernetwork format" and applies nothing
    out = {}
    for key in data:
        try:
            width = int(key)
        except ValueError:
            continue
        sides = []
        for state in data[width][:2]:
            names = [k.removesuffix(".weight") for k in state if k.endswith(".weight")]
            layers, i = [], 0
            while i < len(names):
                last, penultimate = i == len(names) - 1, i == len(names) - 2
                weight, bias = state[f"{names[i]}.weight"], state[f"{names[i]}.bias"]
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
                linear.load_state_dict({"weight": weight, "bias": bias})
                layers.append(linear)
                if activation != "linear" and (not last or data.get("activate_output", False)):
                    layers.append(COMFY_ACTIVATIONS[activation]())
                if data.get("is_layer_norm", False):
                    i += 1
                    norm = torch.nn.LayerNorm(state[f"{names[i]}.weight"].shape[0])
                    norm.load_state_dict(
                        {"weight": state[f"{names[i]}.weight"], "bias": state[f"{names[i]}.bias"]}
                    )
                    layers.append(norm)
                if (
                    data.get("use_dropout", False)
                    and not last
                    and (not penultimate or data.get("last_layer_dropout"))
                ):
                    layers.append(torch.nn.Dropout(p=0.3))
                i += 1
            sides.append(torch.nn.Sequential(*layers))
        out[width] = sides
    return out


@pytest.mark.parametrize(
    ("structure", "same_in_comfyui"),
    [
        ({"activation_func": "relu"}, True),
        ({"activation_func": "linear", "add_layer_norm": True}, True),
        ({"activation_func": "swish", "activate_output": True, "layer_structure": [1, 2, 2, 1]}, True),
        # ComfyUI counts a LayerNorm as a layer when it looks for the last one: it activates the output.
        ({"activation_func": "relu", "add_layer_norm": True}, False),
    ],
)
def test_comfyui_reads_our_hypernetwork_pt_as_its_loader_rules_say(tmp_path, structure, same_in_comfyui):
    torch.manual_seed(0)
    layers = HypernetworkLayers("style", enable_sizes=[32, 64], **structure)
    with torch.no_grad():
        for p in layers.parameters():
            p.normal_(0, 0.5)
    path = write_a1111_hypernetwork(tmp_path / "style.pt", layers, 5, None, "tiny")
    layers.eval()  # at inference: the multiplier applies
    comfy = comfyui_hypernetwork(path)
    assert sorted(comfy) == [32, 64]
    x = torch.randn(2, 7, 64)
    for side in (0, 1):
        theirs = x + comfy[64][side](x) * 0.7
        ours = layers.pair(64)[side](x, 0.7)
        assert torch.allclose(ours, theirs, atol=1e-5) == same_in_comfyui
    # conceptlab's .safetensors twin is listed by ComfyUI but holds no width it reads: it does nothing.
    twin = write_hypernetwork_safetensors(tmp_path / "style.safetensors", layers, 5, "tiny")
    assert comfyui_hypernetwork(twin) == {}


def comfyui_embedding(path, embed_key: str = "clip_l") -> torch.Tensor:
    """ComfyUI's embedding reader (comfy/sd1_clip.py load_embed), as its rules read: safetensors or a
    weights_only torch.load; then the first value of string_to_param, else the `clip_l` entry, else the
    first value of the file."""
    from safetensors.torch import load_file

    data = load_file(path) if str(path).endswith(".safetensors") else torch.load(path, weights_only=True)
    if "string_to_param" in data:
        return next(iter(data["string_to_param"].values()))
    return data[embed_key] if embed_key in data else next(iter(data.values()))


def test_comfyui_reads_our_embeddings_as_its_loader_rules_say(tmp_path):
    from conceptlab.methods.textual_inversion import write_diffusers_embedding

    vectors = torch.randn(3, 32)
    pt = write_a1111_embedding(tmp_path / "my-cat.pt", "my-cat", vectors, 10, None, "tiny")
    twin = write_diffusers_embedding(tmp_path / "my-cat.safetensors", "<my-cat>", vectors)
    for path in (pt, twin):
        assert torch.equal(comfyui_embedding(path).reshape(-1, 32), vectors), path.name
