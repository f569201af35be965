"""The global cache (a LoLA-style sparse cache of the keys the linear state recalls worst), checked
against an oracle written from the definition in ``linearize/hf/attention_math.py``.

The oracle shares no code with the implementation: per batch row and KV head it keeps plain Python
sets of cached and folded positions, chooses the cache at every block start by sorting the recall
errors it computes itself, and sums each query's output key by key in float64.
"""

from __future__ import annotations

import pytest
import torch
from model_testing import TEACHERS, VOCAB, assert_close, converted

from linearize.convert.inference_options import apply_inference_options, parse_config
from linearize.errors import UserError
from linearize.eval.frontier import decode_state_bytes
from linearize.hf.configuration_linearized import LinearAttentionOptions
from linearize.hf.feature_maps import HedgehogFeatureMap
from linearize.kernels.reference import (
    AttentionSpec,
    RecurrentState,
    build_state,
    hybrid_attention_cached,
    hybrid_attention_quadratic,
    hybrid_attention_step,
)

EPS = 1e-6
BATCH, HEADS, KV_HEADS, HEAD_DIM, VALUE_DIM, FEATURES = 2, 4, 2, 6, 5, 3  # 2 query heads per KV head
GAMMA = torch.tensor([0.2, 0.5, 0.7, 0.9])
# (window, sinks, cache size, block): a cache that turns over often, a longer block, no sinks,
# a cache larger than every candidate set, a block of one token (the window slides).
SPECS = [(3, 1, 2, 4), (4, 2, 3, 5), (2, 0, 1, 3), (3, 1, 40, 4), (3, 1, 2, 1)]


def spec_id(values) -> str:
    return "w{}s{}G{}C{}".format(*values)


pytestmark = pytest.mark.usefixtures("one_thread")


def oracle(q, k, v, fq, fk, gamma, spec: AttentionSpec, valid=None) -> torch.Tensor:
    """out [B, H, T, D] in float64, from the definition.

    Positions count the real tokens of a row. For the query at position i, with block start
    s = i - i % C: the softmax part is the sinks, the cached keys and the keys j with
    s - window < j <= i; every other earlier key was folded into the linear part. At each block
    start s > 0 the candidates are the cached keys and the keys s - C - window < j <= s - window
    (not sinks); the ``cache_size`` with the largest error sum_h |v_j - fk_hj S_h / (fk_hj z_h + eps)|^2
    over the KV head's query heads stay cached, the others are folded.
    """
    batch, heads, length, _ = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    window, sinks, block, size = spec.window, spec.sinks, spec.block, spec.cache_size
    q, k, v, fq, fk = (t.detach().double() for t in (q, k, v, fq, fk))
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        index = [t for t in range(length) if valid is None or bool(valid[b, t])]  # index of position p
        for kvh in range(kv_heads):
            heads_of = range(kvh * groups, (kvh + 1) * groups)
            cached, folded = set(), set()
            for i, t in enumerate(index):
                if i % block == 0 and i > 0:
                    leaving = range(max(sinks, i - block - window + 1), i - window + 1)
                    candidates = sorted(cached | set(leaving))
                    error = dict.fromkeys(candidates, 0.0)
                    for h in heads_of:
                        S = torch.zeros(fk.shape[-1], v.shape[-1], dtype=torch.float64)
                        z = torch.zeros(fk.shape[-1], dtype=torch.float64)
                        for f in folded:
                            S += torch.outer(fk[b, h, index[f]], v[b, kvh, index[f]])
                            z += fk[b, h, index[f]]
                        for j in candidates:
                            phi = fk[b, h, index[j]]
                            error[j] += float(((v[b, kvh, index[j]] - phi @ S / (phi @ z + EPS)) ** 2).sum())
                    ranked = sorted(candidates, key=lambda j: -error[j])
                    cached = set(ranked[:size])
                    folded |= set(ranked[size:])
                start = i - i % block
                soft = [j for j in range(i + 1) if j < sinks or j in cached or j > start - window]
                for h in heads_of:
                    scores = {j: float(q[b, h, t] @ k[b, kvh, index[j]]) * spec.scaling for j in soft}
                    m = max(scores.values())
                    g = float(gamma[h])
                    numerator = torch.zeros(v.shape[-1], dtype=torch.float64)
                    denominator = 0.0
                    for j in soft:
                        weight = (1 - g) * torch.exp(torch.tensor(scores[j] - m, dtype=torch.float64)).item()
                        numerator += weight * v[b, kvh, index[j]]
                        denominator += weight
                    for j in folded:
                        weight = g * float(fq[b, h, t] @ fk[b, h, index[j]])
                        numerator += weight * v[b, kvh, index[j]]
                        denominator += weight
                    out[b, h, t] = numerator / (denominator + EPS)
    return out


def inputs(length: int, seed: int = 0):
    """q [B, H, T, d], keys and values per KV head, and two perturbed Hedgehog maps."""
    torch.manual_seed(seed)
    q = torch.randn(BATCH, HEADS, length, HEAD_DIM)
    k = torch.randn(BATCH, KV_HEADS, length, HEAD_DIM)
    v = torch.randn(BATCH, KV_HEADS, length, VALUE_DIM)
    maps = [HedgehogFeatureMap(HEADS, HEAD_DIM, FEATURES) for _ in range(2)]
    with torch.no_grad():
        for parameter in [p for feature_map in maps for p in feature_map.parameters()]:
            parameter.add_(0.5 * torch.randn_like(parameter))
    return q, k, v, *maps


def left_padding(length: int, pad: int = 3) -> torch.Tensor:
    valid = torch.ones(BATCH, length, dtype=torch.bool)
    valid[1, :pad] = False
    return valid


@pytest.mark.parametrize("values", SPECS, ids=spec_id)
@pytest.mark.parametrize("length", [1, 13, 30])
def test_cached_forward_equals_the_oracle(values, length):
    window, sinks, size, block = values
    spec = AttentionSpec(window=window, sinks=sinks, scaling=HEAD_DIM**-0.5, cache_size=size, cache_block=block)
    q, k, v, map_q, map_k = inputs(length)
    valid = left_padding(length) if length > 3 else None
    fq, fk = map_q(q), map_k(k)
    out, state = hybrid_attention_cached(q, k, v, fq, fk, GAMMA, spec, map_k, valid=valid, chunk_size=7)
    expected = oracle(q, k, v, fq, fk, GAMMA, spec, valid)
    real = torch.ones(BATCH, length, dtype=torch.bool) if valid is None else valid
    assert_close("output", expected[real[:, None].expand(-1, HEADS, -1)],
                 out[real[:, None].expand(-1, HEADS, -1)].double())
    assert state.cache.shape == (BATCH, KV_HEADS, size, HEAD_DIM + VALUE_DIM + 1)


@pytest.mark.parametrize("values", SPECS[:3], ids=spec_id)
def test_decode_steps_equal_the_cached_forward(values):
    """Token by token through the decode step (the cache chosen at block starts) equals the forward,
    from a prefill that ends mid-block, with left padding."""
    window, sinks, size, block = values
    spec = AttentionSpec(window=window, sinks=sinks, scaling=HEAD_DIM**-0.5, cache_size=size, cache_block=block)
    length, prompt = 26, 9
    q, k, v, map_q, map_k = inputs(length, seed=1)
    valid = left_padding(length)
    fq, fk = map_q(q), map_k(k)
    with torch.no_grad():
        full, _ = hybrid_attention_cached(q, k, v, fq, fk, GAMMA, spec, map_k, valid=valid)
        outputs = [hybrid_attention_cached(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], fq[:, :, :prompt],
                                           fk[:, :, :prompt], GAMMA, spec, map_k, valid=valid[:, :prompt])]
        state = outputs[0][1]
        outputs = [outputs[0][0]]
        for t in range(prompt, length):
            step = slice(t, t + 1)
            outputs.append(hybrid_attention_step(q[:, :, step], k[:, :, step], v[:, :, step], fq[:, :, step], GAMMA,
                                                 state, spec, map_k, valid=valid[:, t]))
    stepped = torch.cat(outputs, dim=2)
    real = valid[:, None].expand(-1, HEADS, -1)
    assert_close("stepped output", full[real], stepped[real])


def test_a_cache_that_keeps_every_key_is_softmax_attention_in_values_and_gradients():
    """With more cache slots than keys nothing is ever folded: every key stays in the softmax part,
    so the output is causal softmax attention (up to eps), whatever gamma is. Its gradients in q, k
    and v equal those of softmax attention written out with plain ops."""
    spec = AttentionSpec(window=3, sinks=1, scaling=HEAD_DIM**-0.5, cache_size=32, cache_block=4)
    length = 19
    q, k, v, map_q, map_k = inputs(length, seed=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    weights = torch.linspace(-1, 1, BATCH * HEADS * length * VALUE_DIM).view(BATCH, HEADS, length, VALUE_DIM)
    out, _ = hybrid_attention_cached(q, k, v, map_q(q), map_k(k), GAMMA, spec, map_k)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    keys, values = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))
    scores = (q @ keys.transpose(-1, -2)) * spec.scaling
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(dim=-1) @ values
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    assert_close("output", expected, out)
    for name, want, got in zip("qkv", expected_grads, grads):
        assert_close(f"d{name}", want, got)


def test_gradients_reach_both_feature_maps():
    """With a small cache the linear part is in use: both maps get gradients through the forward."""
    spec = AttentionSpec(window=3, sinks=1, scaling=HEAD_DIM**-0.5, cache_size=2, cache_block=4)
    q, k, v, map_q, map_k = inputs(17, seed=2)
    out, _ = hybrid_attention_cached(q, k, v, map_q(q), map_k(k), GAMMA, spec, map_k)
    out.pow(2).sum().backward()
    for parameter in [*map_q.parameters(), *map_k.parameters()]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_the_worst_recalled_key_is_kept():
    """A key whose value the linear state cannot recall (an outlier among repeated ones) stays cached
    long after it left the window, and the query that matches it reads its value."""
    spec = AttentionSpec(window=2, sinks=0, scaling=1.0, cache_size=1, cache_block=2)
    length = 40
    torch.manual_seed(3)
    base_k, base_v = torch.randn(HEAD_DIM), torch.randn(VALUE_DIM)
    k = (base_k + 0.01 * torch.randn(1, KV_HEADS, length, HEAD_DIM)).clone()
    v = base_v.expand(1, KV_HEADS, length, VALUE_DIM).clone()
    needle = 5
    k[:, :, needle] = -4 * base_k
    v[:, :, needle] = 10.0
    q = torch.zeros(1, HEADS, length, HEAD_DIM)
    q[:, :, -1] = -4 * base_k  # the last query looks for the needle's key
    map_q, map_k = (HedgehogFeatureMap(HEADS, HEAD_DIM, FEATURES) for _ in range(2))
    gamma = torch.full((HEADS,), 0.01)  # a small linear share: 36 folded keys would outweigh one soft key
    with torch.no_grad():
        out, state = hybrid_attention_cached(q, k, v, map_q(q), map_k(k), gamma, spec, map_k)
    assert (state.cache_positions == needle).all()
    assert (out[0, :, -1] > 5.0).all()  # the needle's value, 10, dominates the last query's output


def test_one_shot_forms_refuse_a_cache():
    spec = AttentionSpec(window=3, cache_size=2)
    q, k, v, map_q, map_k = inputs(5)
    with pytest.raises(ValueError, match="global cache"):
        hybrid_attention_quadratic(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), map_q(q), map_k(k), GAMMA, spec)
    with pytest.raises(ValueError, match="global cache"):
        build_state(k, v, map_k(k), spec)


def test_options_name_the_field():
    with pytest.raises(ValueError, match="global_cache"):
        LinearAttentionOptions(global_cache=4, window=0)
    with pytest.raises(ValueError, match="global_cache_block"):
        LinearAttentionOptions(global_cache=4, window=8, global_cache_block=0)


def test_state_size_is_fixed_by_the_spec():
    """The cache adds G slots per KV head and block - 1 window slots; nothing grows with the context."""
    spec = AttentionSpec(window=4, sinks=2, cache_size=3, cache_block=5)
    sizes = []
    for length in (9, 31):
        q, k, v, map_q, map_k = inputs(length)
        with torch.no_grad():
            _, state = hybrid_attention_cached(q, k, v, map_q(q), map_k(k), GAMMA, spec, map_k)
        sizes.append(state.num_bytes())
        assert state.ring.shape[2] == 2 + 4 + 5 - 1 and state.cache.shape[2] == 3
    assert sizes[0] == sizes[1]
    empty = RecurrentState.empty(BATCH, HEADS, KV_HEADS, HEAD_DIM, VALUE_DIM, 2 * FEATURES, spec)
    assert empty.num_bytes() == sizes[0]


def test_cache_changes_what_a_model_computes():
    """The tiny model's cached variant differs from the same weights without a cache once keys leave
    the window (the cache is in use), and equals it before."""
    model = converted("llama", "window_hedgehog_cache")
    plain = converted("llama", "window_hedgehog")
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB, (1, 24))
    with torch.no_grad():
        cached, windowed = model(ids).logits, plain(ids).logits
    first_change = 6 + 2  # window 6 + sinks 2: the first key leaves the window at position 8
    assert_close("before any key leaves", windowed[:, :first_change], cached[:, :first_change])
    assert (cached[:, 12:] - windowed[:, 12:]).abs().max() > 1e-3


def test_decode_state_bytes_equal_a_real_cache():
    """The frontier's state size, from the shapes alone, equals the bytes a prefill leaves in the
    cache: fixed for linear layers, growing for a softmax layer and for the teacher."""
    model = converted("llama", "window_hedgehog_cache", softmax_layers=[1])
    teacher = TEACHERS["llama"]()
    ids = torch.randint(3, VOCAB, (1, 21))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        teacher_cache = teacher(ids, use_cache=True).past_key_values
    assert decode_state_bytes(model, 21) == cache.num_bytes()
    teacher_bytes = sum(t.numel() * t.element_size() for layer in teacher_cache.layers for t in (layer.keys, layer.values))
    assert decode_state_bytes(teacher, 21) == teacher_bytes


def test_gamma_zero_with_a_window_over_the_whole_sequence_is_the_teacher():
    """gamma = 0 removes the linear part; a window as long as the sequence then leaves softmax attention."""
    teacher = TEACHERS["llama"]()
    model = converted("llama", "window_hedgehog")
    model.load_state_dict(teacher.state_dict(), strict=False)
    apply_inference_options(model, {"gamma": 0.0, "window": 32})
    ids = torch.randint(3, VOCAB, (2, 20))
    with torch.no_grad():
        assert_close("logits", teacher(ids).logits, model(ids).logits, atol=1e-4)
    assert model.config.linear_attention["window"] == 32


def test_inference_options_refuse_bad_input():
    with pytest.raises(UserError, match="key=value"):
        parse_config("cache=4")
    with pytest.raises(UserError, match="not a number"):
        parse_config("window=big")
    assert parse_config("window=8, softmax_layers=0+1,gamma=0") == {"window": 8, "softmax_layers": [0, 1], "gamma": 0.0}
    model = converted("llama", "window_hedgehog")
    with pytest.raises(UserError, match="fixed_gamma"):
        apply_inference_options(model, {"gamma": 2.0})
    with pytest.raises(UserError, match="global_cache"):
        apply_inference_options(model, {"window": 0, "sink_tokens": 0, "global_cache": 4})
    with pytest.raises(UserError, match="layers 0"):
        apply_inference_options(model, {"softmax_layers": [99]})
    with pytest.raises(UserError, match="no mix factor"):
        apply_inference_options(converted("llama", "hedgehog"), {"window": 8})
