"""Textual inversion: only the new vectors train; the vocabulary and table stay what they were."""

import pytest
import torch
from conftest import fit_a_few_steps

from conceptlab.errors import ConceptFileError, ConfigError
from conceptlab.methods.textual_inversion import TextualInversion, write_a1111_embedding


def make_ti(**kwargs) -> TextualInversion:
    args = {"name": "ti", "lr": 5e-3, "scale_lr": False, "concept": "robot"} | kwargs
    return TextualInversion(**args)


def test_placeholder_tokens_follow_the_diffusers_convention(backbone):
    ti = make_ti(num_vectors=3)
    ti.attach(backbone)
    assert ti.tokens == ["<robot>", "<robot>_1", "<robot>_2"]
    ids = backbone.tokenizer(ti.prompt_text, add_special_tokens=False).input_ids
    assert ids == [ti.first_id, ti.first_id + 1, ti.first_id + 2] and ti.first_id == 49408


def test_vectors_start_from_the_initializer_token(backbone):
    table = backbone.text_encoder.get_input_embeddings().weight.clone()
    ti = make_ti(num_vectors=2, initializer_token="cat")
    ti.attach(backbone)
    assert torch.equal(ti.vectors[0], table[2368]) and torch.equal(ti.vectors[1], table[2368])


def test_text_encoder_reads_the_trainable_vectors(backbone):
    ti = make_ti()
    ti.attach(backbone)
    ids = backbone.tokenizer([f"a photo of {ti.prompt_text}"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids  # fmt: skip
    before = backbone.encode_text(ids)
    with torch.no_grad():
        ti.vectors.add_(1.0)
    assert not torch.allclose(before, backbone.encode_text(ids))


def test_training_changes_only_the_new_vectors(backbone):
    """A few real optimizer steps: gradients and optimizer state exist for the new rows alone."""
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    original_table = backbone.text_encoder.get_input_embeddings().weight.clone()
    ti = make_ti(num_vectors=2)
    ti.attach(backbone)
    table_after_attach = backbone.text_encoder.get_input_embeddings().weight.clone()
    start = ti.vectors.detach().clone()
    module, _ = fit_a_few_steps(backbone, ti, "bundled:robot", lr=5e-3)

    assert not torch.equal(ti.vectors, start)
    table = backbone.text_encoder.get_input_embeddings().weight
    assert torch.equal(table, table_after_attach)  # every row, the placeholder rows' init included
    assert torch.equal(table[:49408], original_table)
    for name, tensor in backbone.state_dict().items():
        if name in frozen and "token_embedding" not in name:
            assert torch.equal(tensor, frozen[name]), name
    assert all(p.grad is None for p in backbone.parameters())
    [optimizer] = module.trainer.optimizers
    assert [p for group in optimizer.param_groups for p in group["params"]] == [ti.vectors]
    assert sum(s["exp_avg"].numel() for s in optimizer.state.values()) == 2 * backbone.context_dim


def test_placeholder_already_in_vocabulary_is_refused(backbone):
    make_ti().attach(backbone)
    with pytest.raises(ConfigError, match="already in the tokenizer's vocabulary"):
        make_ti().attach(backbone)
    with pytest.raises(ConfigError, match="already in the tokenizer's vocabulary"):
        make_ti(placeholder="cat").attach(backbone)


def test_initializer_must_be_one_token(backbone):
    with pytest.raises(ConfigError, match="is 3 tokens; it must be exactly one"):
        make_ti(initializer_token="a fluffy cat").attach(backbone)


def test_num_vectors_below_one_is_refused():
    with pytest.raises(ConfigError, match="at least 1 vector"):
        make_ti(num_vectors=0)


def test_init_from_a_file_of_the_wrong_width_is_refused(backbone, tmp_path):
    path = write_a1111_embedding(tmp_path / "sd15.pt", "sd15", torch.zeros(1, 768), 1, None, "sd15")
    with pytest.raises(ConceptFileError, match="768-wide vectors but this model.s text encoder is 32 wide"):
        make_ti(init_from=str(path)).attach(backbone)


def test_init_from_an_existing_embedding(backbone, tmp_path):
    vectors = torch.randn(2, 32)
    path = write_a1111_embedding(tmp_path / "old.pt", "old", vectors, 1, None, "tiny")
    with pytest.raises(ConceptFileError, match="set method.num_vectors=2"):
        make_ti(init_from=str(path)).attach(backbone)
    ti = make_ti(init_from=str(path), num_vectors=2, placeholder="<old>")
    ti.attach(backbone)
    assert torch.equal(ti.vectors.detach(), vectors)
