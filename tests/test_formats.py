"""Concept files in diffusers' and AUTOMATIC1111's formats: written exactly, read back, loaded by diffusers."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from conceptlab.errors import ConceptFileError
from conceptlab.methods.textual_inversion import (
    read_embedding,
    write_a1111_embedding,
    write_diffusers_embedding,
)

A1111_KEYS = {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}


def test_a1111_embedding_has_webui_keys_and_round_trips(tmp_path):
    vectors = torch.randn(3, 32)
    path = write_a1111_embedding(tmp_path / "my-cat.pt", "my-cat", vectors, 120, None, "tiny")
    raw = torch.load(path, weights_only=True)  # only plain containers and tensors inside
    assert set(raw) == A1111_KEYS
    assert raw["string_to_token"] == {"*": 265}
    assert raw["string_to_param"]["*"].shape == (3, 32)
    assert raw["string_to_param"]["*"].dtype == torch.float32
    emb = read_embedding(path)
    assert emb.name == "my-cat" and emb.step == 120
    assert torch.equal(emb.vectors, vectors)


def test_diffusers_embedding_round_trips(tmp_path):
    vectors = torch.randn(2, 32)
    path = write_diffusers_embedding(tmp_path / "c.safetensors", "<my-cat>", vectors)
    assert set(load_file(path)) == {"<my-cat>"}
    emb = read_embedding(path)
    assert emb.name == "<my-cat>" and torch.equal(emb.vectors, vectors)


def test_diffusers_bin_and_1d_vectors_are_read(tmp_path):
    torch.save({"<tok>": torch.ones(32)}, tmp_path / "learned_embeds.bin")
    emb = read_embedding(tmp_path / "learned_embeds.bin")
    assert emb.vectors.shape == (1, 32)


def test_written_embedding_loads_in_diffusers_and_changes_the_text_embedding(tmp_path, tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    vectors = torch.randn(2, pipe.text_encoder.config.hidden_size)
    path = write_diffusers_embedding(tmp_path / "c.safetensors", "<my-cat>", vectors)
    pipe.load_textual_inversion(str(path))
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["<my-cat>", "<my-cat>_1"])
    assert torch.equal(table[ids[0]], vectors[0]) and torch.equal(table[ids[1]], vectors[1])

    def embed(prompt):
        ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length",
                             max_length=77, return_tensors="pt").input_ids  # fmt: skip
        return pipe.text_encoder(ids)[0]

    assert not torch.allclose(embed("a photo of <my-cat>"), embed("a photo of object"))


def test_a1111_file_loads_in_diffusers(tmp_path, tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None)
    vectors = torch.randn(1, pipe.text_encoder.config.hidden_size)
    path = write_a1111_embedding(tmp_path / "style.pt", "style", vectors, 5, None, "tiny")
    pipe.load_textual_inversion(str(path), token="<style>")
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<style>")]
    assert torch.equal(row, vectors[0])


class NotATensor:
    """Importable, so a plain torch.load would unpickle it (and run whatever it carries)."""


def test_pickled_objects_are_never_loaded(tmp_path):
    torch.save({"string_to_param": {"*": NotATensor()}}, tmp_path / "evil.pt")
    with pytest.raises(ConceptFileError, match="never arbitrary pickled objects"):
        read_embedding(tmp_path / "evil.pt")


@pytest.mark.parametrize(
    "content,match",
    [
        ({"a": torch.ones(1, 4), "b": torch.ones(1, 4)}, "neither a diffusers embedding"),
        ({"<x>": torch.tensor([[float("nan")] * 4])}, "NaN"),
    ],
)
def test_malformed_embedding_files_are_refused(tmp_path, content, match):
    save_file(content, tmp_path / "x.safetensors")
    with pytest.raises(ConceptFileError, match=match):
        read_embedding(tmp_path / "x.safetensors")


def test_garbage_and_missing_files_are_refused(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ConceptFileError, match="not a readable safetensors"):
        read_embedding(tmp_path / "x.safetensors")
    with pytest.raises(ConceptFileError, match="does not exist"):
        read_embedding(tmp_path / "nope.pt")
