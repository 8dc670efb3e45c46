"""Hypernetworks: AUTOMATIC1111's architecture and files, applied through attention processors."""

import pytest
import torch
from conftest import fit_a_few_steps, unet_output
from torch import nn

from conceptlab.errors import ConfigError
from conceptlab.methods.hypernetwork import (
    Hypernetwork,
    HypernetworkProcessor,
    HypernetworkStack,
    hypernetwork_from_file,
    install_hypernetworks,
    read_hypernetwork,
    write_a1111_hypernetwork,
    write_hypernetwork_safetensors,
)
from conceptlab.schedules import parse_lr_schedule, rate_at

A1111_META = {
    "step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
    "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
    "last_layer_dropout", "optional_info",
}  # fmt: skip


def make_hn(**kwargs) -> Hypernetwork:
    args = {"name": "hypernet", "lr": 1e-5, "scale_lr": False, "concept": "style"} | kwargs
    return Hypernetwork(**args)


def randomize(hypernetwork: Hypernetwork, scale: float = 0.5) -> Hypernetwork:
    """Weights large enough that the hypernetwork visibly changes the UNet's output."""
    with torch.no_grad():
        for p in hypernetwork.parameters():
            p.normal_(0, scale)
    return hypernetwork


def test_default_widths_are_the_text_width_and_the_block_widths(backbone):
    hn = make_hn()
    hn.attach(backbone)
    assert hn.sizes == sorted({backbone.context_dim, *backbone.unet.config.block_out_channels}) == [32, 64]


def test_processors_wrap_the_backbones_own_sdpa_processor(backbone):
    from diffusers.models.attention_processor import AttnProcessor2_0

    make_hn().attach(backbone)
    processors = backbone.unet.attn_processors.values()
    assert processors and all(isinstance(p, HypernetworkProcessor) for p in processors)
    assert all(isinstance(p.inner, AttnProcessor2_0) for p in processors)


def test_multiplier_zero_is_exactly_the_bare_unet(backbone):
    bare = unet_output(backbone)
    hn = randomize(make_hn())
    hn.attach(backbone)
    hn.eval()
    stack = install_hypernetworks(backbone.unet)
    stack.entries = [(hn, 0.0)]
    assert torch.equal(unet_output(backbone), bare)
    stack.entries = [(hn, 1.0)]
    assert not torch.allclose(unet_output(backbone), bare)


def test_modules_act_on_key_and_value_inputs_of_matching_width_only(backbone):
    """Text context in cross-attention, hidden states in self-attention; queries never."""
    hn = make_hn(enable_sizes=[64])  # a block width only: cross-attention's 32-wide context untouched
    hn.attach(backbone)
    hn.eval()
    seen = []
    for module in hn.pair(64):
        module.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    unet_output(backbone)
    assert seen and all(shape[-1] == 64 and shape[1] != 77 for shape in seen)
    attn64 = [m for m in backbone.unet.modules() if hasattr(m, "to_k") and m.to_k.in_features == 64]
    assert len(seen) == 2 * len(attn64)  # one key and one value transform per 64-wide attention layer


def test_queries_are_untouched(backbone):
    hn = randomize(make_hn())
    hn.attach(backbone)
    hn.eval()
    queries = []
    for m in backbone.unet.modules():
        if hasattr(m, "to_q"):
            m.to_q.register_forward_hook(lambda mod, args, out: queries.append(args[0].clone()))
    install_hypernetworks(backbone.unet).entries = [(hn, 0.0)]
    unet_output(backbone)
    bare_queries, queries[:] = list(queries), []
    install_hypernetworks(backbone.unet).entries = [(hn, 1.0)]
    unet_output(backbone)
    # The first attention layer's query input comes before any hypernetwork has acted.
    assert torch.equal(queries[0], bare_queries[0])


def test_stacked_hypernetworks_apply_in_order_with_their_own_multipliers(backbone):
    a, b = randomize(make_hn(enable_sizes=[32, 64])), randomize(make_hn(enable_sizes=[32, 64], concept="b"))
    a.eval(), b.eval()
    stack = install_hypernetworks(backbone.unet)
    stack.entries = [(a, 0.7), (b, 0.3)]
    x = torch.randn(1, 5, 32)
    k, v = stack(x)
    ka = a.pair(32)[0](x, 0.7)
    va = a.pair(32)[1](x, 0.7)
    assert torch.allclose(k, b.pair(32)[0](ka, 0.3)) and torch.allclose(v, b.pair(32)[1](va, 0.3))


class ReferenceModule(nn.Module):
    """AUTOMATIC1111's HypernetworkModule for [1, 2, 1], relu, layer norm, built from the format alone."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.LayerNorm(2 * dim), nn.Linear(2 * dim, dim),
                                    nn.LayerNorm(dim))  # fmt: skip

    def forward(self, x, multiplier):
        return x + self.linear(x) * multiplier


def test_a1111_file_built_from_the_recipe_loads_and_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    reference = {
        32: (ReferenceModule(32), ReferenceModule(32)),
        64: (ReferenceModule(64), ReferenceModule(64)),
    }
    data = {size: (k.state_dict(), v.state_dict()) for size, (k, v) in reference.items()}
    data.update(layer_structure=[1, 2, 1], activation_func="relu", is_layer_norm=True,
                weight_initialization="Normal", activate_output=False, use_dropout=False, name="ref", step=7)  # fmt: skip
    torch.save(data, tmp_path / "ref.pt")
    ours = hypernetwork_from_file(tmp_path / "ref.pt")
    assert ours.sizes == [32, 64] and ours.concept == "ref"
    x = torch.randn(3, 7, 32)
    for i in (0, 1):
        assert torch.allclose(ours.pair(32)[i](x, 0.6), reference[32][i](x, 0.6), atol=1e-6)


def test_written_file_has_a1111_keys_shapes_and_metadata(tmp_path, backbone):
    hn = make_hn(activation_func="relu", add_layer_norm=True, use_dropout=True, layer_structure=[1, 2, 2, 1])
    hn.attach(backbone)
    path = write_a1111_hypernetwork(tmp_path / "style.pt", hn.net, 12, None, "tiny")
    data = torch.load(path, weights_only=True)
    assert {k for k in data if not isinstance(k, int)} == A1111_META
    assert sorted(k for k in data if isinstance(k, int)) == [32, 64]
    k_state, v_state = data[64]
    # dropout_structure [0, 0.3, 0, 0]: Linear ReLU LayerNorm Dropout | Linear ReLU LayerNorm | Linear LayerNorm
    assert sorted(k_state) == sorted(
        f"linear.{i}.{p}" for i in (0, 2, 4, 6, 7, 8) for p in ("weight", "bias")
    )
    assert k_state["linear.0.weight"].shape == (128, 64) and k_state["linear.7.weight"].shape == (64, 128)
    assert data["dropout_structure"] == [0.0, 0.3, 0.0, 0.0] and data["use_dropout"] is True
    assert data["layer_structure"] == [1.0, 2.0, 2.0, 1.0] and data["step"] == 12 and data["name"] == "style"
    assert sorted(v_state) == sorted(k_state)


def test_safetensors_twin_round_trips(tmp_path, backbone):
    hn = randomize(make_hn(activation_func="swish"))
    hn.attach(backbone)
    path = write_hypernetwork_safetensors(tmp_path / "style.safetensors", hn.net, 3, "tiny")
    again = hypernetwork_from_file(path)
    assert again.sizes == hn.sizes and again.activation_func == "swish"
    assert isinstance(again.pair(32)[0].linear[1], nn.Hardswish)  # A1111's swish is Hardswish
    for a, b in zip(hn.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_legacy_keys_load_as_a1111_does(tmp_path):
    torch.manual_seed(0)
    old = {"linear1.weight": torch.randn(64, 32), "linear1.bias": torch.randn(64),
           "linear2.weight": torch.randn(32, 64), "linear2.bias": torch.randn(32)}  # fmt: skip
    torch.save({32: (old, dict(old))}, tmp_path / "old.pt")  # the first hypernetworks had nothing else
    hn = hypernetwork_from_file(tmp_path / "old.pt")
    assert [type(m).__name__ for m in hn.pair(32)[0].linear] == ["Linear", "Linear"]
    assert torch.equal(hn.pair(32)[0].linear[1].weight, old["linear2.weight"])
    x = torch.randn(2, 32)
    expected = (
        x
        + (x @ old["linear1.weight"].T + old["linear1.bias"]) @ old["linear2.weight"].T
        + old["linear2.bias"]
    )
    assert torch.allclose(hn.pair(32)[0](x), expected, atol=1e-5)


def test_file_without_activate_output_activates_the_last_layer(tmp_path):
    module = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
    state = {f"linear.{k}": v for k, v in module.state_dict().items()}
    torch.save(
        {32: (state, dict(state)), "activation_func": "relu", "layer_structure": [1, 2, 1]}, tmp_path / "h.pt"
    )
    assert read_hypernetwork(tmp_path / "h.pt").structure["activate_output"] is True
    hn = hypernetwork_from_file(tmp_path / "h.pt")
    assert [type(m).__name__ for m in hn.pair(32)[0].linear] == ["Linear", "ReLU", "Linear", "ReLU"]


def test_default_sd15_file_is_the_size_a1111_writes(tmp_path):
    """Widths 768, 320, 640, 1280 with [1, 2, 1]: the same bytes, within 1%, as A1111's own layout."""
    ours = make_hn(enable_sizes=[768, 320, 640, 1280])

    class Plain(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.linear = nn.Sequential(nn.Linear(d, 2 * d), nn.Linear(2 * d, d))

    reference = {d: (Plain(d).state_dict(), Plain(d).state_dict()) for d in (768, 320, 640, 1280)}
    reference.update(layer_structure=[1.0, 2.0, 1.0], activation_func="linear", is_layer_norm=False,
                     weight_initialization="Normal", use_dropout=False, sd_checkpoint=None,
                     sd_checkpoint_name="sd15", activate_output=False, last_layer_dropout=False,
                     dropout_structure=[0, 0, 0], optional_info=None, step=0, name="style")  # fmt: skip
    torch.save(reference, tmp_path / "reference.pt")
    path = write_a1111_hypernetwork(tmp_path / "ours.pt", ours.net, 0, None, "sd15")
    assert path.stat().st_size == pytest.approx((tmp_path / "reference.pt").stat().st_size, rel=0.01)


def test_training_changes_only_the_mlps(backbone):
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    hn = make_hn()
    hn.attach(backbone)
    start = [p.detach().clone() for p in hn.parameters()]
    _, data = fit_a_few_steps(backbone, hn, "bundled:ink", lr=1e-3, templates="style")
    assert all(not torch.equal(a, b) for a, b in zip(start, hn.parameters()))
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, frozen[name]), name
    assert all(p.grad is None for p in backbone.parameters())
    # The text encoder was not run during training: contexts were cached once.
    assert data.dataset.caption_key == "context" and data.dataset.captions.shape[-1] == backbone.context_dim


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"layer_structure": [2, 1]}, "must start and end with 1"),
        ({"activation_func": "wobble"}, "not one of"),
        ({"weight_initialization": "Zeros"}, "weight_initialization"),
        ({"dropout_structure": [0, 0.3]}, "one entry per layer_structure"),
        ({"lr": "1e-5:100, fast"}, "is not 'rate' or 'rate:step'"),
    ],
)
def test_bad_structure_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_hn(**kwargs)


def test_width_without_an_attention_layer_is_refused(backbone):
    with pytest.raises(ConfigError, match="match no attention layer"):
        make_hn(enable_sizes=[768]).attach(backbone)


def test_a1111_learning_rate_schedule():
    schedule = parse_lr_schedule("1e-5:1000, 5e-6:3000, 1e-6")
    assert schedule == [(1e-5, 1000), (5e-6, 3000), (1e-6, None)]
    assert [rate_at(schedule, s) for s in (0, 999, 1000, 2999, 3000, 10**6)] == [
        1e-5,
        1e-5,
        5e-6,
        5e-6,
        1e-6,
        1e-6,
    ]
    assert parse_lr_schedule(5e-3) == [(5e-3, None)]
    with pytest.raises(ConfigError, match="steps must increase"):
        parse_lr_schedule("1e-5:1000, 5e-6:500")


def test_shared_context_transform_is_reused_until_weights_or_multiplier_change():
    hn = randomize(make_hn(enable_sizes=[32])).eval()
    stack = HypernetworkStack()
    stack.entries = [(hn, 1.0)]
    context = torch.randn(1, 77, 32)
    first = stack(context, shared=True)
    assert stack(context, shared=True) is first  # every cross-attention layer reads one transform
    with torch.no_grad():
        next(hn.parameters()).add_(1.0)  # an optimizer step updates weights in place
    second = stack(context, shared=True)
    assert second is not first and not torch.equal(second[0], first[0])
    stack.entries = [(hn, 0.5)]
    assert not torch.equal(stack(context, shared=True)[0], second[0])


def test_init_from_continues_an_existing_hypernetwork(backbone, tmp_path):
    source = randomize(make_hn(enable_sizes=[32, 64]))
    path = write_a1111_hypernetwork(tmp_path / "old.pt", source.net, 100, None, "tiny")
    hn = make_hn(init_from=str(path))
    hn.attach(backbone)
    assert all(torch.equal(a, b) for a, b in zip(hn.parameters(), source.parameters()))
    with pytest.raises(ConfigError, match=r"has widths \[32, 64\] but this hypernetwork has \[64\]"):
        make_hn(init_from=str(path), enable_sizes=[64]).attach(backbone)


# ------------------------------------------------------------------ packed sweeps: stacks grouped


def job_stacks(count: int, width: int = 32, multipliers=None, **structure) -> list[HypernetworkStack]:
    """One stack per packed job, each with its own (random) hypernetwork of the given structure."""
    from conceptlab.methods.hypernetwork import HypernetworkLayers

    stacks = []
    for j in range(count):
        torch.manual_seed(100 + j)
        layers = HypernetworkLayers(f"job{j}", enable_sizes=[width], **structure)
        with torch.no_grad():
            for p in layers.parameters():
                p.normal_(0, 0.2)
        stack = HypernetworkStack()
        stack.entries = [(layers, 1.0 if multipliers is None else multipliers[j])]
        stacks.append(stack)
    return stacks


def grads_of(stacks: list[HypernetworkStack]) -> list[torch.Tensor]:
    return [p.grad.clone() for s in stacks for h, _ in s.entries for p in h.parameters()]


@pytest.mark.parametrize(
    "structure",
    [
        {},
        {"layer_structure": (1, 1.5, 2, 1), "activation_func": "relu"},
        {"activation_func": "tanh", "activate_output": True},
    ],
)
def test_a_packs_stacks_grouped_compute_what_each_computes_alone_with_the_same_gradients(structure):
    """A packed sweep computes its jobs' hypernetworks at one layer as batched matrix products over the
    stacked weights (packed_group): the same key/value inputs and the same gradients as one by one."""
    stacks = job_stacks(3, **structure)
    torch.manual_seed(0)
    contexts = [torch.randn(2, 7, 32) for _ in stacks]
    weights = [(torch.randn(2, 7, 32), torch.randn(2, 7, 32)) for _ in stacks]  # a loss that tells k from v

    def loss(outputs):
        return sum((k * wk).sum() + (v * wv).sum() for (k, v), (wk, wv) in zip(outputs, weights))

    alone = [stack(c) for stack, c in zip(stacks, contexts)]
    loss(alone).backward()
    expected = grads_of(stacks)
    for s in stacks:
        s.entries[0][0].zero_grad(set_to_none=True)
    together = HypernetworkStack.packed_group(stacks, [((c,), {"shared": False}) for c in contexts], {})
    assert together is not None and len(together) == 3
    for (k, v), (k_alone, v_alone) in zip(together, alone):
        torch.testing.assert_close(k, k_alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, v_alone, rtol=1e-5, atol=1e-6)
        assert not torch.equal(k, v)  # the key and value modules differ: each went through its own
    loss(together).backward()
    for got, want in zip(grads_of(stacks), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_grouped_stacks_apply_each_jobs_multiplier_at_inference():
    stacks = job_stacks(3, multipliers=[1.0, 0.5, 0.0])
    for s in stacks:
        s.entries[0][0].eval()
    contexts = [torch.randn(1, 4, 32) for _ in stacks]
    with torch.no_grad():
        together = HypernetworkStack.packed_group(stacks, [((c,), {}) for c in contexts], {})
        for (k, v), stack, c in zip(together, stacks, contexts):
            k_alone, v_alone = stack(c)
            torch.testing.assert_close(k, k_alone, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v, v_alone, rtol=1e-5, atol=1e-6)
    assert torch.equal(together[2][0], contexts[2])  # multiplier 0: the bare model


def test_a_text_context_read_by_every_cross_attention_layer_is_grouped_once_per_pass():
    stacks = job_stacks(2)
    contexts = [torch.randn(1, 77, 32) for _ in stacks]
    memo: dict = {}
    shared = [((c,), {"shared": True}) for c in contexts]
    first = HypernetworkStack.packed_group(stacks, shared, memo)
    assert HypernetworkStack.packed_group(stacks, shared, memo) is first  # the next layer reads the memo
    own = [((c,), {"shared": False}) for c in contexts]  # hidden states: computed for each layer
    assert HypernetworkStack.packed_group(stacks, own, memo) is not first
    assert HypernetworkStack.packed_group(stacks, own, memo) is not first
    # ...but from one stacked copy of the jobs' weights per pass: [1, 2, 1] = 2 linear layers, key and value
    assert len([key for key in memo if key[0] == "stacked"]) == 4


@pytest.mark.parametrize(
    "why",
    ["structure", "dropout", "layer norm", "batch", "two hypernetworks", "no pair for the width"],
)
def test_stacks_that_cannot_be_grouped_say_so_and_run_one_by_one(why):
    structure = {
        "dropout": {"use_dropout": True, "layer_structure": (1, 2, 2, 1)},
        "layer norm": {"add_layer_norm": True},
    }.get(why, {})
    stacks = job_stacks(2, **structure)
    contexts = [torch.randn(2, 5, 32), torch.randn(2, 5, 32)]
    if why == "structure":
        stacks[1] = job_stacks(1, layer_structure=(1, 3, 1))[0]
    elif why == "batch":
        contexts[1] = torch.randn(1, 5, 32)
    elif why == "two hypernetworks":
        stacks[0].entries.append(job_stacks(1)[0].entries[0])
    elif why == "no pair for the width":
        stacks[1] = job_stacks(1, width=64)[0]
    assert HypernetworkStack.packed_group(stacks, [((c,), {}) for c in contexts], {}) is None
