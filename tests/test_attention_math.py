"""The forms of the attention math agree with each other, and the state has its documented layout
(fp32, CPU). Inputs come with a left-padded batch row, learned feature maps (Hedgehog, BASED) and
GQA (keys and values per KV head, repeated to the query heads).

* quadratic, chunked (several chunk sizes) and continue (from an empty state, several chunk sizes)
  give the same outputs and gradients (inputs, gamma, the initial state, both feature maps);
  recurrent, which updates its state in place as decoding does, gives the same outputs;
* recurrent and continue end in the state ``build_state`` gives in one shot;
* split and resume: the chunked form and ``build_state`` for a prefix, then ``continue`` from that
  state (ring features recomputed from its keys by the feature map) equals one pass, values,
  gradients and final state;
* left padding is invisible; ``index_batch`` selects rows;
* the ring holds the sinks and the last ``window`` keys in their slots, whatever the length, so
  the state's size depends on window and sinks only;
* the quadratic weights are a distribution; the feature-map definitions (Taylor, Hedgehog).
"""

from __future__ import annotations

import math

import pytest
import torch
from model_testing import assert_close

from linearize.hf.feature_maps import BasedFeatureMap, HedgehogFeatureMap
from linearize.kernels.reference import (
    AttentionSpec,
    RecurrentState,
    build_state,
    expand_kv_heads,
    hedgehog_features,
    hybrid_attention_chunked,
    hybrid_attention_continue,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
    hybrid_attention_step,
    taylor_features,
)

B, H, D_HEAD, D_VALUE = 2, 4, 12, 10
PAD = 3  # leading padding tokens in batch row 1
# (window, sinks): linear only, window, window + sinks, sinks outnumbering the window.
SHAPES = [(0, 0), (6, 0), (6, 2), (1, 3)]
KV_HEADS = [pytest.param(H, id="mha"), pytest.param(H // 2, id="gqa")]
FORMS = [("chunked", 1), ("chunked", 5), ("chunked", 64), ("continue", 1), ("continue", 4), ("continue", 64)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only cost time


def make_inputs(length: int, feature_map: str, with_state: bool, kv_heads: int = H, seed: int = 0):
    """Leaf tensors (q [B, H, T, d]; k, v per KV head; gamma logits; S0, z0 if ``with_state``), the
    perturbed feature maps of queries and keys, and ``valid`` with row 1 left-padded."""
    torch.manual_seed(seed)
    tensors = {
        "q": torch.randn(B, H, length, D_HEAD),
        "k": torch.randn(B, kv_heads, length, D_HEAD),
        "v": torch.randn(B, kv_heads, length, D_VALUE),
        "gamma_logit": torch.randn(H),
    }
    maps = {"hedgehog": HedgehogFeatureMap, "based": BasedFeatureMap}[feature_map]
    fmap_q, fmap_k = maps(H, D_HEAD), maps(H, D_HEAD)
    with torch.no_grad():
        for p in list(fmap_q.parameters()) + list(fmap_k.parameters()):
            p.add_(0.2 * torch.randn_like(p))
    if with_state:
        tensors["S0"] = torch.rand(B, H, fmap_q.output_dim, D_VALUE)
        tensors["z0"] = torch.rand(B, H, fmap_q.output_dim) + 0.5
    for t in tensors.values():
        t.requires_grad_(True)
    valid = torch.ones(B, length, dtype=torch.bool)
    valid[1, : min(PAD, length - 1)] = False
    return tensors, (fmap_q, fmap_k), valid


def spec_of(window: int, sinks: int) -> AttentionSpec:
    return AttentionSpec(window=window, sinks=sinks, scaling=D_HEAD**-0.5)


def key_features_of(tensors, maps):
    """The layer's ``key_features``: keys per KV head [B, Hkv, T, d] -> phi [B, H, T, F]."""
    groups = H // tensors["k"].shape[1]
    return lambda keys: maps[1](expand_kv_heads(keys, groups))


def layer_inputs(tensors, maps):
    """(q, k, v, fq, fk, gamma) with k, v per KV head, and the initial state (or None)."""
    fk = key_features_of(tensors, maps)(tensors["k"])
    gamma = torch.sigmoid(tensors["gamma_logit"])
    initial = (tensors["S0"], tensors["z0"]) if "S0" in tensors else None
    return (tensors["q"], tensors["k"], tensors["v"], maps[0](tensors["q"]), fk, gamma), initial


def run(form, tensors, maps, valid, spec, chunk_size=None):
    """(out, final state or None) of one form over the whole sequence."""
    (q, k, v, fq, fk, gamma), initial = layer_inputs(tensors, maps)
    groups = H // k.shape[1]
    if form == "quadratic":
        out, _ = hybrid_attention_quadratic(q, expand_kv_heads(k, groups), expand_kv_heads(v, groups), fq, fk, gamma,
                                            spec, valid=valid, initial_state=initial)
        return out, None
    if form == "chunked":
        return hybrid_attention_chunked(q, expand_kv_heads(k, groups), expand_kv_heads(v, groups), fq, fk, gamma,
                                        spec, valid=valid, initial_state=initial, chunk_size=chunk_size), None
    if form == "recurrent":
        return hybrid_attention_recurrent(q, k, v, fq, fk, gamma, spec, valid=valid, initial_state=initial)
    assert form == "continue"
    state = RecurrentState.empty(B, H, k.shape[1], D_HEAD, D_VALUE, fq.shape[-1], spec)
    if initial is not None:
        state = state.with_prefix(*initial)
    ring = key_features_of(tensors, maps)(state.keys)
    return hybrid_attention_continue(q, k, v, fq, fk, gamma, state, ring, spec, valid=valid, chunk_size=chunk_size)


def run_split(tensors, maps, valid, spec, split, chunk_size=4):
    """Tokens [0, split) by the chunked form and ``build_state``, the rest continued from that state."""
    (q, k, v, fq, fk, gamma), initial = layer_inputs(tensors, maps)
    groups = H // k.shape[1]
    head, tail = slice(0, split), slice(split, None)
    first = hybrid_attention_chunked(
        q[:, :, head], expand_kv_heads(k[:, :, head], groups), expand_kv_heads(v[:, :, head], groups),
        fq[:, :, head], fk[:, :, head], gamma, spec, valid=valid[:, head], initial_state=initial,
        chunk_size=chunk_size,
    )
    state = build_state(k[:, :, head], v[:, :, head], fk[:, :, head], spec, valid=valid[:, head],
                        initial_state=initial)
    ring = key_features_of(tensors, maps)(state.keys)
    second, final = hybrid_attention_continue(q[:, :, tail], k[:, :, tail], v[:, :, tail], fq[:, :, tail],
                                              fk[:, :, tail], gamma, state, ring, spec, valid=valid[:, tail],
                                              chunk_size=chunk_size)
    return torch.cat([first, second], dim=2), final


def full_state(tensors, maps, valid, spec):
    """``build_state`` over the whole sequence: what every form must end in."""
    (_, k, v, _, fk, _), initial = layer_inputs(tensors, maps)
    return build_state(k, v, fk, spec, valid=valid, initial_state=initial)


def upstream_like(out: torch.Tensor) -> torch.Tensor:
    """The same random upstream gradient for every form."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(123))


def outputs_and_grads(compute, tensors, maps, valid):
    """``compute()`` -> (out, state); returns out on real queries, the gradients of a random
    projection of it w.r.t. every input and feature-map parameter, and the state."""
    out, state = compute()
    mask = valid[:, None, :, None].float()  # padding queries' outputs are unused
    (out * mask * upstream_like(out)).sum().backward()
    named = dict(tensors)
    for side, fmap in zip("qk", maps):
        named.update({f"phi_{side}.{n}": p for n, p in fmap.named_parameters()})
    # None: the form never read that input (no key is linear), a zero gradient
    grads = {name: torch.zeros_like(t) if t.grad is None else t.grad.clone() for name, t in named.items()}
    for t in named.values():
        t.grad = None
    return out * mask, grads, state


def assert_same_state(label: str, expected: RecurrentState, actual: RecurrentState) -> None:
    for name in ("kv", "keys", "values"):
        want, got = getattr(expected, name), getattr(actual, name)
        assert want.shape == got.shape, f"{label} state.{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        if want.numel():  # no ring without window and sinks
            assert_close(f"{label} state.{name}", want, got)
    assert torch.equal(expected.positions, actual.positions), f"{label}: ring positions differ"
    assert torch.equal(expected.seen, actual.seen), f"{label}: token counts differ"


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("feature_map", ["hedgehog", "based"])
@pytest.mark.parametrize("window,sinks", SHAPES, ids=[f"w{w}-s{s}" for w, s in SHAPES])
@pytest.mark.parametrize("length", [1, 17, 40], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "initial-state"])
def test_forms_agree(feature_map, window, sinks, length, with_state, kv_heads):
    tensors, maps, valid = make_inputs(length, feature_map, with_state, kv_heads)
    spec = spec_of(window, sinks)
    expected_state = full_state(tensors, maps, valid, spec)
    ref_out, ref_grads, _ = outputs_and_grads(lambda: run("quadratic", tensors, maps, valid, spec), tensors, maps,
                                              valid)
    for form, chunk_size in FORMS:
        out, grads, state = outputs_and_grads(lambda: run(form, tensors, maps, valid, spec, chunk_size), tensors,
                                              maps, valid)
        label = f"{form}{chunk_size}"
        assert_close(f"{label} out", ref_out, out)
        for name in ref_grads:
            atol = 1e-5
            if name == "gamma_logit" and window == sinks == 0:
                # No softmax part: gamma cancels but for eps, so its small gradient is the difference
                # of terms of the size of sum |upstream * out|, each rounded in fp32.
                atol += 1e-6 * (ref_out * upstream_like(ref_out)).abs().sum().item()
            assert_close(f"{label} d{name}", ref_grads[name], grads[name], atol=atol)
        if state is not None:
            assert_same_state(label, expected_state, state)
    with torch.no_grad():  # the recurrent form updates its state in place: values only
        out, state = run("recurrent", tensors, maps, valid, spec)
    assert_close("recurrent out", ref_out, out * valid[:, None, :, None])
    assert_same_state("recurrent", expected_state, state)


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("split", [1, 11, 28], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("window,sinks", SHAPES, ids=[f"w{w}-s{s}" for w, s in SHAPES])
def test_split_and_resume_equals_one_pass(window, sinks, split, kv_heads):
    """Split 1 falls inside row 1's padding; 28 leaves one token to continue."""
    tensors, maps, valid = make_inputs(29, "hedgehog", with_state=True, kv_heads=kv_heads)
    spec = spec_of(window, sinks)
    whole, whole_grads, _ = outputs_and_grads(lambda: run("quadratic", tensors, maps, valid, spec), tensors, maps,
                                              valid)
    resumed, resumed_grads, final = outputs_and_grads(lambda: run_split(tensors, maps, valid, spec, split), tensors,
                                                      maps, valid)
    assert_close("resumed out", whole, resumed)
    for name in whole_grads:
        assert_close(f"resumed d{name}", whole_grads[name], resumed_grads[name])
    assert_same_state("resumed", full_state(tensors, maps, valid, spec), final)


@pytest.mark.parametrize("window,sinks", SHAPES, ids=[f"w{w}-s{s}" for w, s in SHAPES])
def test_left_padding_matches_unpadded_row(window, sinks):
    """Row 1's outputs and final state equal those of its real tokens alone, in every form."""
    tensors, maps, valid = make_inputs(20, "based", with_state=False, kv_heads=H // 2)
    spec = spec_of(window, sinks)
    row = {name: t[1:, :, PAD:] if name in ("q", "k", "v") else t for name, t in tensors.items()}
    with torch.no_grad():
        alone, alone_state = run("recurrent", row, maps, torch.ones(1, 20 - PAD, dtype=torch.bool), spec)
        for form, chunk_size in [("quadratic", None), ("chunked", 5), ("continue", 4), ("recurrent", None)]:
            padded, state = run(form, tensors, maps, valid, spec, chunk_size)
            assert_close(f"{form} padded row", alone, padded[1:, :, PAD:])
            if state is not None:
                assert_same_state(f"{form} padded row", alone_state, state.index_batch(torch.tensor([1])))


def test_index_batch_selects_rows():
    tensors, maps, valid = make_inputs(13, "hedgehog", with_state=True, kv_heads=H // 2)
    spec = spec_of(4, 1)
    with torch.no_grad():
        state = full_state(tensors, maps, valid, spec)
        order = torch.tensor([1, 0, 1])
        swapped = {name: t[order] if name != "gamma_logit" else t for name, t in tensors.items()}
        expected = full_state(swapped, maps, valid[order], spec)
    picked = state.index_batch(order)
    assert_same_state("index_batch", expected, picked)
    picked.kv.add_(1.0)
    assert not torch.equal(picked.kv[0], state.kv[1]), "index_batch must copy, not view"


def expected_ring(length: int, window: int, sinks: int) -> list[int]:
    """The slots' positions after ``length`` tokens, from the rule of ``RecurrentState`` written out:
    the sinks in slots 0..sinks-1, key p >= length - window in slot sinks + (p - sinks) mod window."""
    slots = [-1] * (sinks + window)
    for p in range(length):
        if p < sinks:
            slots[p] = p
        elif p >= length - window:
            slots[sinks + (p - sinks) % window] = p
    return slots


RINGS = [(6, 2), (0, 3), (1, 0), (5, 0), (2, 4)]


@pytest.mark.parametrize("window,sinks", RINGS, ids=[f"w{w}-s{s}" for w, s in RINGS])
@pytest.mark.parametrize("length", [1, 3, 8, 50, 200], ids=lambda t: f"T{t}")
def test_ring_layout_and_bounded_size(window, sinks, length):
    """The ring of a built state, continued by chunks and by one decode step, keeps the documented
    layout and exactly ``sinks + window`` slots: keys, [v | 1] and positions of the kept keys,
    zeros and -1 in empty slots, and a byte count that does not depend on the length."""
    kv_heads, capacity = H // 2, sinks + window
    tensors, maps, _ = make_inputs(length + 1, "hedgehog", with_state=False, kv_heads=kv_heads)
    spec = spec_of(window, sinks)
    features = key_features_of(tensors, maps)
    feat = maps[1].output_dim
    # fp32 [S | z], keys and [v | 1]; int64 positions and counts
    size = 4 * B * (H * feat * (D_VALUE + 1) + kv_heads * capacity * (D_HEAD + D_VALUE + 1)) + 8 * B * (capacity + 1)
    with torch.no_grad():
        (q, k, v, fq, fk, gamma), _ = layer_inputs(tensors, maps)
        head, token = slice(0, length), slice(length, length + 1)
        built = build_state(k[:, :, head], v[:, :, head], fk[:, :, head], spec)
        empty = RecurrentState.empty(B, H, kv_heads, D_HEAD, D_VALUE, feat, spec)
        _, continued = hybrid_attention_continue(*(t[:, :, head] for t in (q, k, v, fq, fk)), gamma, empty,
                                                 features(empty.keys), spec, chunk_size=3)
        stepped = RecurrentState(*(t.clone() for t in built.tensors()))
        hybrid_attention_step(q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token], gamma, stepped, spec,
                              features)
        # no mask takes build_state's slicing path; an all-true mask the general one
        masked = build_state(k[:, :, head], v[:, :, head], fk[:, :, head], spec,
                             valid=torch.ones(B, length, dtype=torch.bool))
    for name, fast, general in zip(("kv", "ring", "positions", "seen"), built.tensors(), masked.tensors()):
        assert_close(f"build_state {name}: no mask vs all-true mask", general.float(), fast.float(), atol=1e-5, rtol=0)
    for state, seen in [(built, length), (continued, length), (stepped, length + 1)]:
        assert state.keys.shape == (B, kv_heads, capacity, D_HEAD)
        assert state.num_bytes() == size
        positions = expected_ring(seen, window, sinks)
        assert state.positions.tolist() == [positions] * B
        assert state.seen.tolist() == [seen] * B
        filled = torch.tensor([p >= 0 for p in positions])
        at = torch.tensor([max(p, 0) for p in positions])
        ones = torch.ones(B, kv_heads, seen, 1)
        expected_values = torch.cat([v[:, :, :seen], ones], dim=-1)[:, :, at] * filled[:, None]
        assert torch.equal(state.keys, k[:, :, at] * filled[:, None]), f"ring keys after {seen} tokens"
        assert torch.equal(state.values, expected_values), f"ring values after {seen} tokens"


def test_quadratic_weights_are_a_distribution():
    tensors, maps, valid = make_inputs(15, "hedgehog", with_state=False)
    with torch.no_grad():
        (q, k, v, fq, fk, _), _ = layer_inputs(tensors, maps)
        spec = AttentionSpec(window=4, sinks=1, scaling=0.3, eps=0.0)
        _, weights = hybrid_attention_quadratic(q, k, v, fq, fk, torch.full((H,), 0.3), spec)
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
