"""Readers of user files never crash on bad bytes: Hypothesis mutates real files (flipped, inserted and
deleted bytes, truncations) and every reader either reads the file or refuses it as conceptlab says:
an image is skipped with a warning, a concept file is one ConceptFileError naming the file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import DREAMBOOTH, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conceptlab.data import open_rgb
from conceptlab.errors import ConceptFileError
from conceptlab.methods import read_concept

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


@st.composite
def mutations(draw, size: int):
    """Edits of a file of `size` bytes: (position, kind, byte) triples, and maybe a truncation."""
    edits = draw(st.lists(st.tuples(st.integers(0, max(size - 1, 0)), st.sampled_from(["flip", "insert", "delete"]),
                                    st.integers(0, 255)), min_size=1, max_size=8))  # fmt: skip
    cut = draw(st.one_of(st.none(), st.integers(0, size)))
    return edits, cut


def mutate(data: bytes, mutation) -> bytes:
    edits, cut = mutation
    out = bytearray(data)
    for position, kind, value in sorted(edits, reverse=True):
        position = min(position, max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[position] ^= value or 1
        elif kind == "insert":
            out.insert(position, value)
        elif out:
            del out[position]
    return bytes(out[:cut] if cut is not None else out)


def concept_files(tmp: Path) -> dict[str, Path]:
    """One real file of every format conceptlab reads, written by conceptlab's own writers."""
    from conceptlab.methods.hypernetwork import HypernetworkLayers, write_a1111_hypernetwork
    from conceptlab.methods.textual_inversion import write_a1111_embedding, write_diffusers_embedding

    vectors = torch.randn(2, 32)
    layers = HypernetworkLayers("ink", enable_sizes=[32], activation_func="relu", add_layer_norm=True)
    return {
        "ti.pt": write_a1111_embedding(tmp / "cat.pt", "cat", vectors, 5, None, "tiny"),
        "ti.safetensors": write_diffusers_embedding(tmp / "cat.safetensors", "<cat>", vectors),
        "hypernet.pt": write_a1111_hypernetwork(tmp / "ink.pt", layers, 5, None, "tiny"),
    }


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, tuple[str, bytes]]:
    from test_interop import webui_embedding_image

    tmp = tmp_path_factory.mktemp("originals")
    files = concept_files(tmp)
    files["ti.png"] = webui_embedding_image(tmp / "cat.png", "cat", torch.randn(1, 32))
    return {kind: (path.suffix, path.read_bytes()) for kind, path in files.items()}


@pytest.mark.parametrize("kind", ["ti.pt", "ti.safetensors", "hypernet.pt", "ti.png"])
def test_mutated_concept_files_are_read_or_refused_in_one_line(kind, originals, tmp_path):
    suffix, data = originals[kind]
    read_concept(_written(tmp_path / f"original{suffix}", data))  # the unmutated file reads

    @FUZZ
    @given(mutation=mutations(len(data)))
    def check(mutation):
        path = _written(tmp_path / f"mutated{suffix}", mutate(data, mutation))
        try:
            read_concept(path)
        except ConceptFileError as err:
            assert str(path) in str(err) and "\n" not in str(err).strip()

    check()


IMAGES = [ROOT / "src" / "conceptlab" / "examples" / "robot" / "00.png"]
if DREAMBOOTH.is_dir():
    IMAGES.append(sorted(DREAMBOOTH.glob("*/*.jpg"))[0])


@pytest.mark.parametrize("image", IMAGES, ids=lambda p: p.suffix)
def test_mutated_images_are_decoded_or_skipped_with_a_warning(image, tmp_path, caplog):
    data = image.read_bytes()

    @FUZZ
    @given(mutation=mutations(len(data)))
    def check(mutation):
        path = _written(tmp_path / f"mutated{image.suffix}", mutate(data, mutation))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="conceptlab.data"):
            decoded = open_rgb(path, 64)
        assert decoded is not None or f"skipping {path}: not a readable image" in caplog.text
        if decoded is not None:
            assert decoded.mode == "RGB"

    check()


def test_a_png_with_a_short_chunk_is_skipped_not_fatal(tmp_path, caplog):
    """The case found by hand: Pillow raises SyntaxError for a broken chunk."""
    data = IMAGES[0].read_bytes()
    path = _written(tmp_path / "broken.png", data[:33] + b"\x00\x00\x00\x05IDAT\x00")
    with caplog.at_level(logging.WARNING, logger="conceptlab.data"):
        assert open_rgb(path, 64) is None
    assert "not a readable image" in caplog.text


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
