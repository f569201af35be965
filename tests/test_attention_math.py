"""The three forms of the attention math agree on values and gradients (fp32, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from model_testing import assert_close

from linearize.hf.feature_maps import BasedFeatureMap, HedgehogFeatureMap
from linearize.kernels.reference import (
    RecurrentState,
    hedgehog_features,
    hybrid_attention_chunked,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
    taylor_features,
)

B, H, D_HEAD, D_VALUE = 2, 3, 12, 10
PAD = 3  # leading padding tokens in batch row 1
SHAPES = [(0, 0), (6, 0), (6, 2), (1, 3)]  # (window, sinks): linear only, window, window+sinks, sinks only


def make_inputs(length: int, feature_map: str, with_state: bool, seed: int = 0):
    torch.manual_seed(seed)
    tensors = {
        "q": torch.randn(B, H, length, D_HEAD),
        "k": torch.randn(B, H, length, D_HEAD),
        "v": torch.randn(B, H, length, D_VALUE),
        "gamma_logit": torch.randn(H),
    }
    maps = {"hedgehog": HedgehogFeatureMap, "based": BasedFeatureMap}[feature_map]
    fmap_q, fmap_k = maps(H, D_HEAD), maps(H, D_HEAD)
    with torch.no_grad():
        for p in list(fmap_q.parameters()) + list(fmap_k.parameters()):
            p.add_(0.2 * torch.randn_like(p))
    features = fmap_q.output_dim
    if with_state:
        tensors["S0"] = torch.rand(B, H, features, D_VALUE)
        tensors["z0"] = torch.rand(B, H, features) + 0.5
    for t in tensors.values():
        t.requires_grad_(True)
    valid = torch.ones(B, length, dtype=torch.bool)
    valid[1, : min(PAD, length - 1)] = False
    return tensors, (fmap_q, fmap_k), valid


def run(form: str, tensors, maps, valid, window, sinks, chunk_size=5):
    fq, fk = maps[0](tensors["q"]), maps[1](tensors["k"])
    gamma = torch.sigmoid(tensors["gamma_logit"])
    common = dict(window=window, sinks=sinks, scaling=D_HEAD**-0.5, valid=valid)
    args = (tensors["q"], tensors["k"], tensors["v"], fq, fk, gamma)
    if form == "quadratic":
        initial = (tensors["S0"], tensors["z0"]) if "S0" in tensors else None
        return hybrid_attention_quadratic(*args, initial_state=initial, **common)[0]
    state = RecurrentState.empty(tensors["q"], tensors["v"], fq)
    if "S0" in tensors:
        state = state.with_prefix(tensors["S0"], tensors["z0"])
    if form == "recurrent":
        return hybrid_attention_recurrent(*args, state, **common)[0]
    return hybrid_attention_chunked(*args, state, chunk_size=chunk_size, **common)[0]


def outputs_and_grads(form, tensors, maps, valid, window, sinks, **kwargs):
    out = run(form, tensors, maps, valid, window, sinks, **kwargs)
    mask = valid[:, None, :, None].float()  # padding queries' outputs are unused
    torch.manual_seed(123)
    (out * mask * torch.randn_like(out)).sum().backward()
    named = {name: t for name, t in tensors.items()}
    for side, fmap in zip("qk", maps):
        named.update({f"phi_{side}.{n}": p for n, p in fmap.named_parameters()})
    grads = {name: t.grad.clone() for name, t in named.items()}
    for t in named.values():
        t.grad = None
    return out * mask, grads


@pytest.mark.parametrize("feature_map", ["hedgehog", "based"])
@pytest.mark.parametrize("window,sinks", SHAPES, ids=[f"w{w}-s{s}" for w, s in SHAPES])
@pytest.mark.parametrize("length", [1, 17, 40], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "initial-state"])
def test_forms_agree(feature_map, window, sinks, length, with_state):
    tensors, maps, valid = make_inputs(length, feature_map, with_state)
    ref_out, ref_grads = outputs_and_grads("quadratic", tensors, maps, valid, window, sinks)
    for form, kwargs in [("chunked", {"chunk_size": 5}), ("chunked", {"chunk_size": 64}), ("recurrent", {})]:
        out, grads = outputs_and_grads(form, tensors, maps, valid, window, sinks, **kwargs)
        label = f"{form}{kwargs.get('chunk_size', '')}"
        assert_close(f"{label} out", ref_out, out)
        for name in ref_grads:
            assert_close(f"{label} d{name}", ref_grads[name], grads[name])


@pytest.mark.parametrize("window,sinks", SHAPES, ids=[f"w{w}-s{s}" for w, s in SHAPES])
def test_split_and_resume_equals_one_pass(window, sinks):
    tensors, maps, valid = make_inputs(29, "hedgehog", with_state=False)
    fq, fk = (m(tensors[x]) for m, x in zip(maps, "qk"))
    gamma = torch.sigmoid(tensors["gamma_logit"])
    common = dict(window=window, sinks=sinks, scaling=D_HEAD**-0.5, chunk_size=4)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    whole, final = hybrid_attention_chunked(q, k, v, fq, fk, gamma, valid=valid, **common)
    split = 11
    first, state = hybrid_attention_chunked(
        q[:, :, :split], k[:, :, :split], v[:, :, :split], fq[:, :, :split], fk[:, :, :split], gamma,
        valid=valid[:, :split], **common,
    )
    second, resumed = hybrid_attention_chunked(
        q[:, :, split:], k[:, :, split:], v[:, :, split:], fq[:, :, split:], fk[:, :, split:], gamma, state,
        valid=valid[:, split:], **common,
    )
    assert_close("resumed out", whole, torch.cat([first, second], dim=2))
    assert_close("resumed S", final.S, resumed.S)
    assert_close("resumed z", final.z, resumed.z)
    assert torch.equal(final.positions, resumed.positions)
    assert torch.equal(final.seen, resumed.seen)


@pytest.mark.parametrize("window,sinks", SHAPES, ids=[f"w{w}-s{s}" for w, s in SHAPES])
def test_left_padding_matches_unpadded_row(window, sinks):
    tensors, maps, valid = make_inputs(20, "based", with_state=False)
    with torch.no_grad():
        padded = run("chunked", tensors, maps, valid, window, sinks)
        row = {name: t[1:, :, PAD:] if t.dim() == 4 else t for name, t in tensors.items()}
        alone = run("quadratic", row, maps, torch.ones(1, 20 - PAD, dtype=torch.bool), window, sinks)
    assert_close("padded row", alone, padded[1:, :, PAD:])


def test_state_size_is_bounded_by_window_and_sinks():
    tensors, maps, valid = make_inputs(50, "hedgehog", with_state=False)
    with torch.no_grad():
        fq, fk = (m(tensors[x]) for m, x in zip(maps, "qk"))
        _, state = hybrid_attention_chunked(
            tensors["q"], tensors["k"], tensors["v"], fq, fk, torch.full((H,), 0.5),
            window=6, sinks=2, scaling=0.3, chunk_size=7,
        )
    assert state.keys.shape[2] == 2 + 6 - 1
    assert state.positions[0].tolist() == [0, 1, *range(45, 50)]


def test_quadratic_weights_are_a_distribution():
    tensors, maps, valid = make_inputs(15, "hedgehog", with_state=False)
    with torch.no_grad():
        fq, fk = (m(tensors[x]) for m, x in zip(maps, "qk"))
        _, weights = hybrid_attention_quadratic(
            tensors["q"], tensors["k"], tensors["v"], fq, fk, torch.full((H,), 0.3),
            window=4, sinks=1, scaling=0.3, eps=0.0,
        )
    assert_close("row sums", torch.ones(B, H, 15), weights.sum(-1))
    assert torch.all(weights.triu(diagonal=1) == 0), "weights on future keys"


def test_taylor_features_give_second_order_exponential():
    torch.manual_seed(0)
    x, y = torch.randn(7, 16), torch.randn(7, 16)
    s = (x * y).sum(-1) / math.sqrt(16)
    phi_x, phi_y = taylor_features(x), taylor_features(y)
    assert phi_x.shape[-1] == 153
    assert_close("phi(x).phi(y)", 1 + s + s**2 / 2, (phi_x * phi_y).sum(-1))


def test_hedgehog_definition_is_two_softmaxes():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 4)
    weight, bias = torch.randn(2, 4, 3), torch.randn(2, 3)
    phi = hedgehog_features(x, weight, bias)
    u = torch.einsum("bhtd,hde->bhte", x, weight) + bias[:, None]
    assert phi.shape == (1, 2, 5, 6)
    assert_close("positive half", torch.softmax(u, -1), phi[..., :3])
    assert_close("negative half", torch.softmax(-u, -1), phi[..., 3:])
    assert torch.allclose(HedgehogFeatureMap(2, 4).weight, torch.eye(4).expand(2, 4, 4)), "identity initialisation"
