"""Oracle tests for the window + linear hybrid attention math (``linearize/hf/attention_math.py``).

The oracle below is written straight from the module docstring, as plain Python loops over batch
rows, heads, queries and keys. It shares no code with the implementation's position and mask
helpers (``token_positions``, ``part_masks``, ``_mix``): a query's position is counted by hand as
the number of real tokens before it in its row, and each key is put in the softmax or the linear
part by the rule of the docstring, one key at a time.

The oracle runs in float64 on float64 copies of the fp32 inputs; the implementation runs in fp32.
Only real (non-padding) queries are compared: the output of a padding query is not specified.
"""

from __future__ import annotations

import math

import pytest
import torch

from linearize.hf.feature_maps import HedgehogFeatureMap
from linearize.kernels import dispatch
from linearize.kernels.reference import (
    AttentionSpec,
    RecurrentState,
    build_state,
    hybrid_attention_chunked,
    hybrid_attention_continue,
    hybrid_attention_quadratic,
    hybrid_attention_recurrent,
    token_positions,
)

EPS = 1e-6
ATOL = 1e-5
# (window, sinks): no softmax part, own key only, a band, a band with sinks, sinks only, a band
# longer than every test sequence.
WINDOW_SINKS = [(0, 0), (1, 0), (4, 0), (4, 2), (0, 3), (30, 1)]
LENGTHS = [1, 7, 19]
PAD = 3  # left padding of the second batch row (fewer when the sequence is shorter)
HEADS, HEAD_DIM, VALUE_DIM, FEATURE_DIM = 3, 6, 5, 10
GAMMA_LOGITS = [-1.2, 0.4, 2.0]  # per head: gamma = sigmoid(logit), about 0.23, 0.60, 0.88


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only cost time


def ws_id(window_sinks: tuple[int, int]) -> str:
    return f"w{window_sinks[0]}s{window_sinks[1]}"


# --------------------------------------------------------------------------------------------------
# The oracles
# --------------------------------------------------------------------------------------------------


def brute_force_hybrid(q, k, v, fq, fk, gamma, window, sinks, scaling, valid=None, initial_state=None, eps=EPS):
    """o_i from the docstring's formula, one batch row, head, query and key at a time.

    Shapes as in the implementation: q, k [B, H, T, d], v [B, H, T, D], fq, fk [B, H, T, F], gamma [H],
    valid [B, T] bool (None: all real), initial_state (S0 [B, H, F, D], z0 [B, H, F]) or None.
    Padding queries get zeros. Differentiable in every input except through m_i.
    """
    batch, heads, length, _ = q.shape
    value_dim = v.shape[-1]
    rows = []
    for b in range(batch):
        is_real = [True] * length if valid is None else [bool(valid[b, t]) for t in range(length)]
        # position of token t: the number of real tokens before it in its row
        position = {}
        count = 0
        for t in range(length):
            if is_real[t]:
                position[t] = count
                count += 1
        head_outputs = []
        for h in range(heads):
            g = gamma[h]
            query_outputs = []
            for t in range(length):
                if not is_real[t]:
                    query_outputs.append(torch.zeros(value_dim, dtype=v.dtype))
                    continue
                i = position[t]
                soft_keys, linear_keys = [], []
                for u in range(length):
                    if not is_real[u]:
                        continue
                    j = position[u]
                    if j > i:
                        continue
                    if j < sinks or j > i - window:
                        soft_keys.append(u)
                    else:
                        linear_keys.append(u)
                numerator = torch.zeros(value_dim, dtype=v.dtype)
                denominator = torch.zeros((), dtype=v.dtype)
                if soft_keys:
                    scores = [scaling * torch.dot(q[b, h, t], k[b, h, u]) for u in soft_keys]
                    m = torch.stack(scores).max().detach()
                    for u, s in zip(soft_keys, scores):
                        weight = (1 - g) * torch.exp(s - m)
                        numerator = numerator + weight * v[b, h, u]
                        denominator = denominator + weight
                for u in linear_keys:
                    weight = g * torch.dot(fq[b, h, t], fk[b, h, u])
                    numerator = numerator + weight * v[b, h, u]
                    denominator = denominator + weight
                if initial_state is not None:
                    s0, z0 = initial_state
                    numerator = numerator + g * (fq[b, h, t] @ s0[b, h])
                    denominator = denominator + g * torch.dot(fq[b, h, t], z0[b, h])
                query_outputs.append(numerator / (denominator + eps))
            head_outputs.append(torch.stack(query_outputs))
        rows.append(torch.stack(head_outputs))
    return torch.stack(rows)


def brute_force_causal_softmax(q, k, v, scaling, valid=None):
    """The teacher: causal softmax attention over the real keys up to the query; zeros for padding."""
    batch, heads, length, _ = q.shape
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=v.dtype)
    for b in range(batch):
        real = [t for t in range(length) if valid is None or bool(valid[b, t])]
        for h in range(heads):
            for t in real:
                keys = [u for u in real if u <= t]
                scores = torch.stack([scaling * torch.dot(q[b, h, t], k[b, h, u]) for u in keys])
                probs = torch.softmax(scores, dim=0)
                out[b, h, t] = sum(p * v[b, h, u] for p, u in zip(probs, keys))
    return out


# --------------------------------------------------------------------------------------------------
# Inputs and comparisons
# --------------------------------------------------------------------------------------------------


def make_inputs(length, *, seed=0, heads=HEADS, d=HEAD_DIM, D=VALUE_DIM, F=FEATURE_DIM, pad=PAD, batch=2,
                hedgehog=False):
    """fp32 inputs: row 0 unpadded, row 1 (if any) left-padded by min(pad, T - 1) tokens.

    Queries and keys are scaled up so that scores spread over several units (m_i matters); features
    are positive (softmax of random numbers, or a perturbed Hedgehog map of q and k).
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q = 1.7 * randn(batch, heads, length, d)
    k = 1.7 * randn(batch, heads, length, d)
    v = randn(batch, heads, length, D)
    if hedgehog:
        assert F % 2 == 0
        fmap = HedgehogFeatureMap(heads, d, F // 2)
        with torch.no_grad():
            fmap.weight.add_(0.5 * randn(*fmap.weight.shape))
            fmap.bias.add_(0.5 * randn(*fmap.bias.shape))
            fq, fk = fmap(q), fmap(k)
    else:
        fq = randn(batch, heads, length, F).softmax(dim=-1)
        fk = randn(batch, heads, length, F).softmax(dim=-1)
    logits = torch.tensor(GAMMA_LOGITS[:heads] + [0.0] * max(0, heads - len(GAMMA_LOGITS)))
    s0 = 0.3 * randn(batch, heads, F, D)
    z0 = 0.5 * torch.rand(batch, heads, F, generator=gen) + 0.1
    valid = torch.ones(batch, length, dtype=torch.bool)
    if batch > 1:
        valid[1, : min(pad, length - 1)] = False
    return dict(q=q, k=k, v=v, fq=fq, fk=fk, logits=logits, s0=s0, z0=z0, valid=valid)


def run_form(form, q, k, v, fq, fk, gamma, *, window, sinks, scaling, valid, initial_state, eps=EPS):
    """The implementation's output [B, H, T, D] for one form of the math.

    ``continueN`` starts from an empty state (plus the initial state) and continues in chunks of N.
    """
    spec = AttentionSpec(window=window, sinks=sinks, scaling=scaling, eps=eps)
    if form == "quadratic":
        out, _ = hybrid_attention_quadratic(q, k, v, fq, fk, gamma, spec, valid=valid, initial_state=initial_state)
        return out
    if form == "recurrent":
        out, _ = hybrid_attention_recurrent(q, k, v, fq, fk, gamma, spec, valid=valid, initial_state=initial_state)
        return out
    if form.startswith("continue"):
        batch, heads, _, head_dim = q.shape
        state = RecurrentState.empty(batch, heads, heads, head_dim, v.shape[-1], fq.shape[-1], spec)
        if initial_state is not None:
            state = state.with_prefix(*initial_state)
        ring_features = torch.zeros(batch, heads, spec.capacity, fq.shape[-1])
        out, _ = hybrid_attention_continue(q, k, v, fq, fk, gamma, state, ring_features, spec, valid=valid,
                                           chunk_size=int(form[len("continue"):]))
        return out
    assert form.startswith("chunked")
    chunk = int(form[len("chunked"):])
    return hybrid_attention_chunked(q, k, v, fq, fk, gamma, spec, valid=valid, initial_state=initial_state,
                                    chunk_size=chunk)


def ring_features_of(state, fk, valid):
    """phi of the state's ring keys [B, H, C, F], looked up in ``fk`` [B, H, T, F] by position."""
    positions = token_positions(valid).masked_fill(~valid, -2)
    rows = []
    for b in range(fk.shape[0]):
        slots = []
        for p in state.positions[b].tolist():
            match = (positions[b] == p).nonzero()
            slots.append(fk[b, :, int(match[0])] if p >= 0 else torch.zeros(fk.shape[1], fk.shape[-1]))
        rows.append(torch.stack(slots, dim=1) if slots else fk.new_zeros(fk.shape[1], 0, fk.shape[-1]))
    return torch.stack(rows)


def real_rows(x, valid):
    """The outputs of real queries, row by row: a list of [H, T_b, D]."""
    if valid is None:
        return [x[b] for b in range(x.shape[0])]
    return [x[b][:, valid[b]] for b in range(x.shape[0])]


def max_abs_error(expected, actual, valid):
    """Largest |expected - actual| over real queries (NaN counts as infinite)."""
    worst = 0.0
    for e, a in zip(real_rows(expected, valid), real_rows(actual, valid)):
        if e.numel() == 0:
            continue
        diff = (e.double() - a.double()).abs()
        if not bool(torch.isfinite(diff).all()):
            return math.inf
        worst = max(worst, diff.max().item())
    return worst


def assert_matches(name, expected, actual, valid, atol=ATOL):
    assert expected.shape == actual.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = max_abs_error(expected, actual, valid)
    assert error <= atol, f"{name}: max abs error {error:.3e} over real queries > {atol:.0e}"


def double(x):
    return None if x is None else x.detach().double()


# --------------------------------------------------------------------------------------------------
# 2. Values: every form against the oracle
# --------------------------------------------------------------------------------------------------

FORMS = ["quadratic", "chunked1", "chunked4", "chunked64", "continue1", "continue4", "recurrent"]
_ORACLE_CACHE: dict = {}


def _oracle_output(length, window, sinks, padded, with_state, hedgehog=False, eps=EPS):
    key = (length, window, sinks, padded, with_state, hedgehog, eps)
    if key not in _ORACLE_CACHE:
        x = make_inputs(length, seed=length * 100 + window * 10 + sinks, hedgehog=hedgehog)
        valid = x["valid"] if padded else None
        gamma = torch.sigmoid(x["logits"])
        state = (x["s0"], x["z0"]) if with_state else None
        expected = brute_force_hybrid(
            double(x["q"]), double(x["k"]), double(x["v"]), double(x["fq"]), double(x["fk"]), gamma.double(),
            window, sinks, HEAD_DIM**-0.5, valid, None if state is None else tuple(map(double, state)), eps,
        )
        _ORACLE_CACHE[key] = (x, valid, gamma, state, expected)
    return _ORACLE_CACHE[key]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("window_sinks", WINDOW_SINKS, ids=ws_id)
@pytest.mark.parametrize("length", LENGTHS, ids=lambda t: f"T{t}")
def test_forms_match_brute_force(length, window_sinks, padded, with_state, form):
    window, sinks = window_sinks
    x, valid, gamma, state, expected = _oracle_output(length, window, sinks, padded, with_state)
    actual = run_form(form, x["q"], x["k"], x["v"], x["fq"], x["fk"], gamma, window=window, sinks=sinks,
                      scaling=HEAD_DIM**-0.5, valid=valid, initial_state=state)
    assert_matches(form, expected, actual, valid)


@pytest.mark.parametrize("form", ["quadratic", "chunked4"])
@pytest.mark.parametrize("window_sinks", WINDOW_SINKS, ids=ws_id)
def test_hedgehog_features_match_brute_force(window_sinks, form):
    """The real Hedgehog map (F = 2 * 5) of q and k as features, padded row and initial state."""
    window, sinks = window_sinks
    x, valid, gamma, state, expected = _oracle_output(19, window, sinks, True, True, hedgehog=True)
    actual = run_form(form, x["q"], x["k"], x["v"], x["fq"], x["fk"], gamma, window=window, sinks=sinks,
                      scaling=HEAD_DIM**-0.5, valid=valid, initial_state=state)
    assert_matches(form, expected, actual, valid)


@pytest.mark.parametrize("form", ["quadratic", "chunked4", "recurrent"])
@pytest.mark.parametrize("window_sinks", [(0, 0), (4, 2), (30, 1)], ids=ws_id)
def test_large_eps_matches_brute_force(window_sinks, form):
    """eps = 0.25 makes its place in the formula visible (added once, to the whole denominator)."""
    window, sinks = window_sinks
    x, valid, gamma, state, expected = _oracle_output(7, window, sinks, True, True, eps=0.25)
    actual = run_form(form, x["q"], x["k"], x["v"], x["fq"], x["fk"], gamma, window=window, sinks=sinks,
                      scaling=HEAD_DIM**-0.5, valid=valid, initial_state=state, eps=0.25)
    assert_matches(form, expected, actual, valid)


@pytest.mark.parametrize("form", ["chunked1", "chunked4", "chunked64"])
@pytest.mark.parametrize("split", [1, 3, 5, 12], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("window_sinks", WINDOW_SINKS, ids=ws_id)
def test_state_continuation_matches_brute_force(window_sinks, split, form):
    """Two calls, the second continuing from the state of the first, give the oracle's full sequence.

    The padding of row 1 (3 tokens) straddles split 1.
    """
    window, sinks = window_sinks
    length = 19
    x, valid, gamma, state, expected = _oracle_output(length, window, sinks, True, True)
    chunk = int(form[len("chunked"):])
    spec = AttentionSpec(window=window, sinks=sinks, scaling=HEAD_DIM**-0.5)
    names = ["q", "k", "v", "fq", "fk"]
    first = [x[n][:, :, :split] for n in names]
    second = [x[n][:, :, split:] for n in names]
    out1 = hybrid_attention_chunked(*first, gamma, spec, valid=valid[:, :split], initial_state=state, chunk_size=chunk)
    middle = build_state(first[1], first[2], first[4], spec, valid=valid[:, :split], initial_state=state)
    ring = ring_features_of(middle, first[4], valid[:, :split])
    out2, _ = hybrid_attention_continue(*second, gamma, middle, ring, spec, valid=valid[:, split:], chunk_size=chunk)
    assert_matches(form, expected, torch.cat([out1, out2], dim=2), valid)


# --------------------------------------------------------------------------------------------------
# 3. Gradients
# --------------------------------------------------------------------------------------------------

GRAD_NAMES = ["q", "k", "v", "fq", "fk", "logits", "s0", "z0"]


def _grads(fn, x, valid, upstream, names, dtype):
    """Gradients of sum(out * upstream) over real queries w.r.t. the named inputs, cast to dtype."""
    leaves = {n: x[n].detach().to(dtype).requires_grad_(True) for n in names}
    out = fn(leaves)
    loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(real_rows(out, valid), real_rows(upstream, valid)))
    got = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, got)}


@pytest.mark.parametrize("form", ["quadratic", "chunked1", "chunked4"])
@pytest.mark.parametrize("with_state", [False, True], ids=["nostate", "state"])
@pytest.mark.parametrize("window_sinks", WINDOW_SINKS, ids=ws_id)
def test_gradients_match_brute_force(window_sinks, with_state, form):
    window, sinks = window_sinks
    length = 9
    x = make_inputs(length, seed=7 + window * 10 + sinks)
    valid = x["valid"]
    scaling = HEAD_DIM**-0.5
    upstream = torch.randn(2, HEADS, length, VALUE_DIM, generator=torch.Generator().manual_seed(3))
    names = GRAD_NAMES if with_state else GRAD_NAMES[:6]

    def oracle(t):
        state = (t["s0"], t["z0"]) if with_state else None
        return brute_force_hybrid(t["q"], t["k"], t["v"], t["fq"], t["fk"], torch.sigmoid(t["logits"]),
                                  window, sinks, scaling, valid, state, EPS)

    def implementation(t):
        state = (t["s0"], t["z0"]) if with_state else None
        return run_form(form, t["q"], t["k"], t["v"], t["fq"], t["fk"], torch.sigmoid(t["logits"]),
                        window=window, sinks=sinks, scaling=scaling, valid=valid, initial_state=state)

    expected = _grads(oracle, x, valid, upstream, names, torch.float64)
    actual = _grads(implementation, x, valid, upstream, names, torch.float32)
    for name in names:
        error = (expected[name] - actual[name].double()).abs().max().item()
        assert error <= ATOL, f"d{name} ({form}): max abs error {error:.3e} > {ATOL:.0e}"


@pytest.mark.parametrize("chunks_per_group", [1, 10], ids=lambda g: f"group{g}")
@pytest.mark.parametrize("window_sinks", [(0, 0), (4, 2), (0, 3)], ids=ws_id)
def test_chunked_groups_of_heads_match_brute_force(window_sinks, chunks_per_group, monkeypatch):
    """The chunked form splits long inputs into groups of (row, head) sequences: with one sequence
    per group, or two and three (a group then spans two rows), values and gradients still match the
    oracle, with a padded row and an initial state."""
    from linearize.hf import attention_math

    monkeypatch.setattr(attention_math, "CHUNKS_PER_GROUP", chunks_per_group)
    test_gradients_match_brute_force(window_sinks, True, "chunked4")
    window, sinks = window_sinks
    x, valid, gamma, state, expected = _oracle_output(19, window, sinks, True, True)
    actual = run_form("chunked4", x["q"], x["k"], x["v"], x["fq"], x["fk"], gamma, window=window, sinks=sinks,
                      scaling=HEAD_DIM**-0.5, valid=valid, initial_state=state)
    assert_matches("chunked4", expected, actual, valid)


# --------------------------------------------------------------------------------------------------
# 4. Teacher identity: a window covering the sequence is causal softmax attention, whatever gamma
# --------------------------------------------------------------------------------------------------


_TEACHER_CACHE: dict = {}


def _teacher_output(length):
    if length not in _TEACHER_CACHE:
        x = make_inputs(length, seed=11 + length)
        expected = brute_force_causal_softmax(double(x["q"]), double(x["k"]), double(x["v"]), HEAD_DIM**-0.5,
                                              x["valid"])
        _TEACHER_CACHE[length] = (x, expected)
    return _TEACHER_CACHE[length]


@pytest.mark.parametrize("form", ["quadratic", "chunked1", "chunked4"])
@pytest.mark.parametrize("sinks", [0, 2, 40], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("window_extra", [0, 5], ids=lambda e: "w=T" if e == 0 else f"w=T+{e}")
@pytest.mark.parametrize("length", LENGTHS, ids=lambda t: f"T{t}")
def test_full_window_is_causal_softmax(length, window_extra, sinks, form):
    window = length + window_extra
    x, expected = _teacher_output(length)
    gamma = torch.tensor([0.01, 0.6, 0.999])  # gamma cancels when there is no linear part
    scaling = HEAD_DIM**-0.5
    valid = x["valid"]
    actual = run_form(form, x["q"], x["k"], x["v"], x["fq"], x["fk"], gamma, window=window, sinks=sinks,
                      scaling=scaling, valid=valid, initial_state=None, eps=0.0)
    assert_matches(form, expected, actual, valid, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 5. Causality and padding, exactly
# --------------------------------------------------------------------------------------------------

INPUT_NAMES = ["q", "k", "v", "fq", "fk"]


def _perturbed(x, index):
    """A copy of the inputs where token ``index`` of every row has new q, k, v, fq, fk."""
    gen = torch.Generator().manual_seed(1000 + index)
    y = dict(x)
    for name in INPUT_NAMES:
        t = x[name].clone()
        fresh = 3.0 * torch.randn(t[:, :, index].shape, generator=gen)
        t[:, :, index] = fresh.softmax(dim=-1) if name in ("fq", "fk") else fresh
        y[name] = t
    return y


def _run(form, x, gamma, window, sinks, valid, with_state=True):
    state = (x["s0"], x["z0"]) if with_state else None
    return run_form(form, *(x[n] for n in INPUT_NAMES), gamma, window=window, sinks=sinks,
                    scaling=HEAD_DIM**-0.5, valid=valid, initial_state=state)


@pytest.mark.parametrize("form", ["quadratic", "chunked1", "chunked4", "chunked64"])
@pytest.mark.parametrize("window_sinks", WINDOW_SINKS, ids=ws_id)
def test_causality_exact(window_sinks, form):
    """Changing token t+1 leaves the outputs of tokens 0..t bit for bit the same, for every t."""
    window, sinks = window_sinks
    length = 13
    x = make_inputs(length, seed=5)
    valid, gamma = x["valid"], torch.sigmoid(x["logits"])
    base = _run(form, x, gamma, window, sinks, valid)
    for t in range(length - 1):
        changed = _run(form, _perturbed(x, t + 1), gamma, window, sinks, valid)
        for b in range(2):
            keep = valid[b, : t + 1]
            before, after = base[b, :, : t + 1][:, keep], changed[b, :, : t + 1][:, keep]
            assert torch.equal(before, after), (
                f"row {b}: changing token {t + 1} changed outputs at tokens <= {t} "
                f"(max abs {(before - after).abs().max().item():.3e})"
            )
        # and the change is seen downstream (the test is not vacuous)
        assert not torch.equal(base[:, :, t + 1:], changed[:, :, t + 1:])


@pytest.mark.parametrize("form", ["quadratic", "chunked1", "chunked4"])
@pytest.mark.parametrize("window_sinks", WINDOW_SINKS, ids=ws_id)
def test_left_padding_is_invisible(window_sinks, form):
    """A left-padded row gives exactly what its padding content does not matter for, and the same
    outputs as the unpadded row of its real tokens."""
    window, sinks = window_sinks
    length = 19
    x = make_inputs(length, seed=9)
    valid, gamma = x["valid"], torch.sigmoid(x["logits"])
    base = _run(form, x, gamma, window, sinks, valid)
    y = x
    for index in range(PAD):
        y = _perturbed(y, index)
    changed = _run(form, y, gamma, window, sinks, valid)
    assert torch.equal(base[1][:, PAD:], changed[1][:, PAD:]), "padding tokens' content changed real outputs"

    # row 1's real tokens alone, unpadded (batch of one)
    alone = {n: x[n][1:2, :, PAD:] for n in INPUT_NAMES}
    alone.update(s0=x["s0"][1:2], z0=x["z0"][1:2])
    unpadded = _run(form, alone, gamma, window, sinks, None)
    error = (unpadded[0] - base[1][:, PAD:]).abs().max().item()
    assert error <= 1e-6, f"padded row differs from the unpadded one by {error:.3e}"


# --------------------------------------------------------------------------------------------------
# 6. The fused Triton kernel (in Triton's interpreter on CPU) against the oracle
# --------------------------------------------------------------------------------------------------

# (T, window, sinks, initial state, left padding)
TRITON_CASES = [
    (7, 4, 2, True, False),
    (7, 1, 0, False, False),
    (19, 0, 0, True, False),
    (19, 4, 2, False, False),
    (19, 0, 3, True, False),
    (19, 30, 1, False, False),
    (19, 4, 2, False, True),
    (19, 0, 3, True, True),
]
TRITON_SCALING = 0.25


def _triton_id(case):
    length, window, sinks, with_state, padded = case
    return f"T{length}-w{window}s{sinks}-{'state' if with_state else 'nostate'}-{'leftpad' if padded else 'nopad'}"


def _triton_inputs(case):
    """Inputs, valid (None unless padded), gamma and the initial state (s0, z0) or None."""
    length, window, sinks, with_state, padded = case
    x = make_inputs(length, seed=21 + length, heads=2, d=16, D=16, F=16)
    valid = x["valid"] if padded else None
    gamma = torch.sigmoid(x["logits"])
    state = (x["s0"], x["z0"]) if with_state else None
    return x, valid, gamma, state


def _call_triton(x, gamma, state, window, sinks, valid):
    spec = AttentionSpec(window=window, sinks=sinks, scaling=TRITON_SCALING)
    return dispatch.hybrid_attention(*(x[n] for n in INPUT_NAMES), gamma, spec, valid=valid, initial_state=state,
                                     backend="triton")


def _oracle(x, gamma, state, window, sinks, valid):
    return brute_force_hybrid(*(double(x[n]) for n in INPUT_NAMES), gamma.double(), window, sinks, TRITON_SCALING,
                              valid, None if state is None else tuple(double(t) for t in state), EPS)


@pytest.mark.parametrize("case", TRITON_CASES, ids=_triton_id)
def test_triton_matches_brute_force(case):
    _, window, sinks, _, _ = case
    x, valid, gamma, state = _triton_inputs(case)
    expected = _oracle(x, gamma, state, window, sinks, valid)
    assert_matches("triton", expected, _call_triton(x, gamma, state, window, sinks, valid), valid)


@pytest.mark.parametrize("case", [TRITON_CASES[i] for i in (0, 3, 4, 6)], ids=_triton_id)
def test_triton_state_continues_like_brute_force(case):
    """The kernel's output over T tokens, then ``build_state`` of them continued by the reference
    (``hybrid_attention_continue``, ring features looked up by position), gives the oracle's longer
    sequence."""
    length, window, sinks, _, _ = case
    x, valid, gamma, state = _triton_inputs(case)
    first_valid = torch.ones(2, length, dtype=torch.bool) if valid is None else valid
    extra = make_inputs(5, seed=99, heads=2, d=16, D=16, F=16)
    full = {n: torch.cat([x[n], extra[n]], dim=2) for n in INPUT_NAMES}
    full_valid = torch.cat([first_valid, torch.ones(2, 5, dtype=torch.bool)], dim=1)
    expected = _oracle(full, gamma, state, window, sinks, full_valid)
    spec = AttentionSpec(window=window, sinks=sinks, scaling=TRITON_SCALING)
    out1 = _call_triton(x, gamma, state, window, sinks, valid)
    middle = build_state(x["k"], x["v"], x["fk"], spec, valid=first_valid, initial_state=state)
    ring = ring_features_of(middle, x["fk"], first_valid)
    out2, _ = hybrid_attention_continue(*(extra[n] for n in INPUT_NAMES), gamma, middle, ring, spec, chunk_size=2)
    assert_matches("triton + continuation", expected, torch.cat([out1, out2], dim=2), full_valid)


@pytest.mark.parametrize("case", [TRITON_CASES[i] for i in (0, 2, 7)], ids=_triton_id)
def test_triton_gradients_match_brute_force(case):
    length, window, sinks, with_state, _ = case
    x, valid, _, _ = _triton_inputs(case)
    upstream = torch.randn(2, 2, length, 16, generator=torch.Generator().manual_seed(4))
    names = GRAD_NAMES if with_state else GRAD_NAMES[:6]

    def oracle(t):
        state = (t["s0"], t["z0"]) if with_state else None
        return brute_force_hybrid(*(t[n] for n in INPUT_NAMES), torch.sigmoid(t["logits"]), window, sinks,
                                  TRITON_SCALING, valid, state, EPS)

    def kernel(t):
        state = (t["s0"], t["z0"]) if with_state else None
        return _call_triton(t, torch.sigmoid(t["logits"]), state, window, sinks, valid)

    expected = _grads(oracle, x, valid, upstream, names, torch.float64)
    actual = _grads(kernel, x, valid, upstream, names, torch.float32)
    for name in names:
        error = (expected[name] - actual[name].double()).abs().max().item()
        assert error <= ATOL, f"d{name} (triton): max abs error {error:.3e} > {ATOL:.0e}"
