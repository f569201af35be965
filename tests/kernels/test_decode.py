"""``triton.decode`` against ``reference.hybrid_attention_step``, token after token.

The keys' features come from a real (perturbed) Hedgehog map, so ``key_features`` recomputes phi
from the stored keys as a model does; keys and values are per KV head, with one KV head per query
head and with GQA (two query heads per KV head). Checked:

* each step's output, and the whole state after it ([S | z], ring keys and [v | 1], positions,
  seen), equal the reference's, for ring layouts from no softmax part to sinks outnumbering the
  window, starting from a ``build_state`` prefill with an initial (JRT) state; the kernel gets the
  state exactly as ``build_state`` returns it, the reference a dense copy; also at Llama-3-8B head
  sizes with 256 features and a ring of two slot blocks;
* a row whose token is not valid keeps its state bit for bit;
* a left-padded prompt prefilled by ``build_state``, then Triton steps with paused rows, gives
  the outputs of one ``hybrid_attention_quadratic`` pass and the state ``build_state`` gives;
* ``attend_state`` of a state with no filled slot is the linear part alone;
* wrong shapes raise ValueError naming the tensor, the expected and the actual shape.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, PRECISIONS, assert_close, case_id, features, randn, tolerance

from linearize.hf.feature_maps import HedgehogFeatureMap
from linearize.kernels import reference
from linearize.kernels.reference import AttentionSpec, RecurrentState, expand_kv_heads
from linearize.kernels.triton import attend_state, decode_step

# (window, sinks): ring of several slots with sinks, plain linear, own key only, sinks without a
# window, a ring of two slots, sinks that outnumber the window.
SETTINGS = [(5, 2), (0, 0), (1, 0), (0, 2), (2, 0), (4, 6)]
SETTING_IDS = [case_id(w=w, s=s) for w, s in SETTINGS]
HEADS = [pytest.param((3, 3), id="H3-Hkv3"), pytest.param((4, 2), id="H4-Hkv2")]  # (query heads, KV heads)
d, D, F = 10, 12, 8


def _layer(batch: int, length: int, heads: int, kv_heads: int, dtype: torch.dtype = torch.float32,
           dims: tuple[int, int, int] = (d, D, F)):
    """Random q [B, H, T, d], k [B, Hkv, T, d], v [B, Hkv, T, D], fq = phi(q), gamma [H], and the
    layer's ``key_features``: keys per KV head -> phi of them repeated to the query heads."""
    d, D, F = dims
    torch.manual_seed(0)
    fmap = HedgehogFeatureMap(heads, d, F // 2).to(DEVICE).requires_grad_(False)
    fmap.weight.add_(0.5 * torch.randn_like(fmap.weight))
    fmap.bias.add_(0.5 * torch.randn_like(fmap.bias))

    def key_features(keys: torch.Tensor) -> torch.Tensor:
        return fmap(expand_kv_heads(keys, heads // kv_heads)).to(dtype)

    q = randn(batch, heads, length, d, dtype=dtype)
    k, v = randn(batch, kv_heads, length, d, dtype=dtype), randn(batch, kv_heads, length, D, dtype=dtype)
    return q, k, v, fmap(q).to(dtype), torch.rand(heads, device=DEVICE), key_features


def _spec(window: int, sinks: int) -> AttentionSpec:
    return AttentionSpec(window=window, sinks=sinks, scaling=d**-0.5)


def _copy(state: RecurrentState) -> RecurrentState:
    """A copy in fresh (contiguous) tensors."""
    return RecurrentState(*(t.clone() for t in state.tensors()))


def _assert_same_state(label: str, ref: RecurrentState, tri: RecurrentState, ratio: float) -> None:
    for name in ("kv", "keys", "values"):
        assert_close(f"{label}: {name}", getattr(ref, name), getattr(tri, name), ratio)
    assert torch.equal(ref.positions, tri.positions), f"{label}: ring positions differ"
    assert torch.equal(ref.seen, tri.seen), f"{label}: token counts differ"


def _assert_steps_match(layer, spec: AttentionSpec, prefill: int, ratio: float) -> None:
    """Prefill [0, prefill) with ``build_state`` (from an initial JRT state, as a model does), then
    one step per token, Triton against the reference: outputs and the whole state after each."""
    q, k, v, fq, gamma, key_features = layer
    prompt = slice(0, prefill)
    heads, feat, value_dim = q.shape[1], fq.shape[-1], v.shape[-1]
    initial = (features(q.shape[0], heads, feat, value_dim), features(q.shape[0], heads, feat))
    tri_state = reference.build_state(k[:, :, prompt], v[:, :, prompt], key_features(k[:, :, prompt]), spec,
                                      initial_state=initial)  # as a model's prefill leaves it
    ref_state = _copy(tri_state)
    for t in range(prefill, q.shape[2]):
        token = slice(t, t + 1)
        args = (q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token], gamma)
        ref_out = reference.hybrid_attention_step(*args, ref_state, spec, key_features)
        tri_out = decode_step(*args, tri_state, spec, key_features)
        assert_close(f"out[{t}]", ref_out, tri_out, ratio)
        _assert_same_state(f"state after token {t}", ref_state, tri_state, ratio)


@pytest.mark.parametrize("dtype", PRECISIONS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_decode_step_matches_reference(setting: tuple[int, int], heads: tuple[int, int], dtype: torch.dtype) -> None:
    _assert_steps_match(_layer(2, 12, *heads, dtype=dtype), _spec(*setting), 3, tolerance(dtype))


def test_decode_step_at_wide_heads() -> None:
    """d = D = 128 and F = 256 (Llama-3-8B heads, Hedgehog's features: the grid splits D in 2
    tiles, each program loops over 2 key and 4 feature tiles) with a ring of 68 slots (window 64
    and 4 sinks: two slot blocks) full after a 70-token prefill."""
    wide = (128, 128, 256)
    spec = AttentionSpec(window=64, sinks=4, scaling=wide[0] ** -0.5)
    _assert_steps_match(_layer(1, 72, 2, 1, dims=wide), spec, 70, tolerance(torch.float32))


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_invalid_token_leaves_the_row_unchanged(setting: tuple[int, int]) -> None:
    """Row 1 is paused (valid False) for two steps while row 0 decodes."""
    B, T, prefill = 2, 9, 7
    q, k, v, fq, gamma, key_features = _layer(B, T, 4, 2)
    spec = _spec(*setting)
    prompt = slice(0, prefill)
    tri_state = reference.build_state(k[:, :, prompt], v[:, :, prompt], key_features(k[:, :, prompt]), spec)
    ref_state = _copy(tri_state)
    paused = ref_state.index_batch(torch.tensor([1], device=DEVICE))
    valid = torch.tensor([True, False], device=DEVICE)
    ratio = tolerance(torch.float32)
    for t in range(prefill, T):
        token = slice(t, t + 1)
        args = (q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token], gamma)
        ref_out = reference.hybrid_attention_step(*args, ref_state, spec, key_features, valid=valid)
        tri_out = decode_step(*args, tri_state, spec, key_features, valid=valid)
        assert_close(f"out[{t}] of the valid row", ref_out[:1], tri_out[:1], ratio)
        _assert_same_state(f"state after token {t}", ref_state, tri_state, ratio)
        assert tri_state.seen.tolist() == [t + 1, prefill]
    after = tri_state.index_batch(torch.tensor([1], device=DEVICE))
    for name, expected, actual in zip(("kv", "keys", "values", "positions", "seen"), paused.tensors(),
                                      after.tensors()):
        assert torch.equal(expected, actual), f"the paused row's {name} changed"


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_prefill_then_decode_equals_one_pass(setting: tuple[int, int], heads: tuple[int, int]) -> None:
    """Row 1's prompt is left-padded by 2; row 0 pauses at token 9 and row 1 at tokens 11 and 12
    (invalid tokens, as in a batch where a row waits): their outputs are not compared."""
    B, T, prefill = 2, 14, 6
    H, kv_heads = heads
    q, k, v, fq, gamma, key_features = _layer(B, T, H, kv_heads)
    spec = _spec(*setting)
    valid = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    valid[1, :2] = valid[0, 9] = valid[1, 11] = valid[1, 12] = False
    initial = (features(B, H, F, D), features(B, H, F))
    groups = H // kv_heads
    expected, _ = reference.hybrid_attention_quadratic(
        q, expand_kv_heads(k, groups), expand_kv_heads(v, groups), fq, key_features(k), gamma, spec, valid=valid,
        initial_state=initial,
    )
    prompt = slice(0, prefill)
    state = reference.build_state(k[:, :, prompt], v[:, :, prompt], key_features(k[:, :, prompt]), spec,
                                  valid=valid[:, prompt], initial_state=initial)
    outs = []
    for t in range(prefill, T):
        token = slice(t, t + 1)
        outs.append(decode_step(q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token], gamma, state, spec,
                                key_features, valid=valid[:, t]))
    real = valid[:, None, prefill:, None]
    ratio = tolerance(torch.float32)
    assert_close("decoded out", expected[:, :, prefill:] * real, torch.cat(outs, dim=2) * real, ratio)
    one_shot = reference.build_state(k, v, key_features(k), spec, valid=valid, initial_state=initial)
    _assert_same_state("final state", one_shot, state, ratio)


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_attend_state_without_filled_slots_is_the_linear_part(setting: tuple[int, int]) -> None:
    B, H, kv_heads = 2, 4, 2
    q, _, _, fq, gamma, _ = _layer(B, 1, H, kv_heads)
    spec = _spec(*setting)
    S0, z0 = features(B, H, F, D), features(B, H, F)
    state = RecurrentState.empty(B, H, kv_heads, d, D, F, spec, device=DEVICE).with_prefix(S0, z0)
    g = gamma[None, :, None, None]
    linear = g * (fq @ S0) / (g * (fq @ z0[..., None]) + spec.eps)
    ratio = tolerance(torch.float32)
    assert_close("reference", linear, reference.attend_state(q, fq, gamma, state, spec), ratio)
    assert_close("triton", linear, attend_state(q, fq, gamma, state, spec), ratio)


def test_wrong_shapes_raise() -> None:
    B, H, kv_heads = 1, 4, 2
    q, k, v, fq, gamma, key_features = _layer(B, 2, H, kv_heads)
    spec = _spec(3, 1)
    state = RecurrentState.empty(B, H, kv_heads, d, D, F, spec, device=DEVICE)
    token = slice(0, 1)
    q1, k1, v1, fq1 = q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token]
    with pytest.raises(ValueError, match=r"k must have shape \[1, 2, 1, 10\], got \[1, 4, 1, 10\]"):
        decode_step(q1, expand_kv_heads(k1, 2), v1, fq1, gamma, state, spec, key_features)
    with pytest.raises(ValueError, match=r"v must have shape \[1, 2, 1, 12\], got \[1, 2, 1, 11\]"):
        decode_step(q1, k1, v1[..., :11], fq1, gamma, state, spec, key_features)
    with pytest.raises(ValueError, match=r"q must have shape \[1, 4, 1, 10\], got \[1, 4, 2, 10\]"):
        attend_state(q, fq1, gamma, state, spec)
    with pytest.raises(ValueError, match=r"fq must have shape \[1, 4, 1, 8\], got \[1, 4, 1, 6\]"):
        attend_state(q1, fq1[..., :6], gamma, state, spec)
    with pytest.raises(ValueError, match=r"gamma must have shape \[4\], got \[3\]"):
        attend_state(q1, fq1, gamma[:3], state, spec)
