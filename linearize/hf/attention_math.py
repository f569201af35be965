"""The exact math of every linearized attention variant, in plain PyTorch.

This file is the single source of truth for the attention math. It ships inside every exported model
folder (next to ``modeling_linearized.py``) so an export loads where ``linearize`` is not installed,
and ``linearize.kernels.reference`` re-exports it as the oracle that the Triton kernels are tested
against. It depends on nothing but ``torch``.

Notation (per batch row b and query head h):
    q, k        [B, H, T, d]   queries and keys after RoPE; keys already repeated for GQA
    v           [B, H, T, D]   values (repeated for GQA)
    fq, fk      [B, H, T, F]   feature-mapped queries and keys, phi(q) and phi(k)
    gamma       [H]            share of the linear part, sigmoid of a learned logit

Every token has a *position*: its index among the real (non-padding) tokens of its row, so a
left-padded row gets the same positions, and therefore the same outputs, as the unpadded row.

For the query at position i, key j <= i belongs to
    the softmax part  if  j < sinks  or  j > i - window      (``window`` counts the query itself)
    the linear part   otherwise                              (sinks <= j <= i - window)
and the output is

    o_i = ((1 - g) * sum_soft e^(s_ij - m_i) v_j + g * sum_lin (fq_i . fk_j) v_j)
          / ((1 - g) * sum_soft e^(s_ij - m_i)     + g * sum_lin (fq_i . fk_j)     + eps)

with s_ij = scaling * q_i . k_j and m_i the largest s_ij over the query's softmax keys. m_i keeps
exp() in range in low precision; it is a constant of the forward pass (no gradient flows through it)
and, unlike in a plain softmax, it does not cancel against the linear part, so it belongs to the
definition (this is what LoLCATs does). With window = sinks = 0 the softmax part is empty and the
formula is plain causal linear attention, o_i = fq_i S_i / (fq_i z_i + eps), for any g > 0.

Three forms compute this and must agree:
    ``hybrid_attention_quadratic``  materialises the [T, T] weights (the spec; attention-transfer loss)
    ``hybrid_attention_chunked``    chunk by chunk, carrying a ``RecurrentState`` (training, prefill)
    ``hybrid_attention_recurrent``  token by token from the same state (decode)
The state holds S = sum fk_j v_j^T and z = sum fk_j over keys that left the softmax part, plus the
keys still inside it (at most ``sinks + window - 1``), so its size does not depend on the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------------


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map (Zhang et al. 2024, arXiv 2402.04347), the definition pinned here.

    phi(x) = [softmax(x W + b), softmax(-(x W + b))], each softmax over the feature axis, no extra
    scaling of x. ``x`` [B, H, T, d], ``weight`` [H, d, e], ``bias`` [H, e] -> [B, H, T, 2e].
    """
    u = torch.einsum("bhtd,hde->bhte", x, weight) + bias[:, None, :]
    return torch.cat([u.softmax(dim=-1), (-u).softmax(dim=-1)], dim=-1)


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """2nd-order Taylor map of BASED (Arora et al. 2024, arXiv 2402.18668), upper triangle only.

    For x of size f: phi(x) = [1, x / f^(1/4), (x_a x_b) / sqrt(2 f) for a = b, (x_a x_b) / sqrt(f) for
    a < b], so phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(f). Output size 1 + f + f(f+1)/2.
    """
    f = x.shape[-1]
    rows, cols = torch.triu_indices(f, f, device=x.device)
    scale = torch.where(rows == cols, 1.0 / math.sqrt(2 * f), 1.0 / math.sqrt(f)).to(x.dtype)
    second = x[..., rows] * x[..., cols] * scale
    return torch.cat([torch.ones_like(x[..., :1]), x / f**0.25, second], dim=-1)


def based_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """BASED map: learned per-head projection ``projection`` [H, d, f], then ``taylor_features``."""
    return taylor_features(torch.einsum("bhtd,hdf->bhtf", x, projection))


# --------------------------------------------------------------------------------------------------
# Positions and masks
# --------------------------------------------------------------------------------------------------


def token_positions(valid: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Position of every token among the real tokens of its row, offset by ``start`` [B].

    ``valid`` [B, T] bool. Padding tokens get the position of the previous real token; they are
    masked out everywhere by ``valid``, so that value is never used.
    """
    positions = valid.long().cumsum(dim=-1) - 1
    if start is not None:
        positions = positions + start[:, None]
    return positions


def part_masks(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    window: int,
    sinks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-part and linear-part masks [B, 1, Tq, Tk] from positions (see the module docstring)."""
    qp = query_pos[:, None, :, None]
    kp = key_pos[:, None, None, :]
    causal = (kp <= qp) & key_valid[:, None, None, :]
    soft = causal & ((kp < sinks) | (kp > qp - window))
    return soft, causal & ~soft


def _mix(
    scores: torch.Tensor,
    feature_scores: torch.Tensor,
    soft: torch.Tensor,
    lin: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """Unnormalised weights (1 - g) e^(s - m) on softmax keys plus g fq.fk on linear keys."""
    masked = scores.masked_fill(~soft, float("-inf"))
    m = masked.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    g = gamma.to(scores.dtype)[None, :, None, None]
    return (1 - g) * torch.exp(masked - m) + g * feature_scores.masked_fill(~lin, 0.0)


# --------------------------------------------------------------------------------------------------
# Quadratic form
# --------------------------------------------------------------------------------------------------


def hybrid_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    *,
    window: int,
    sinks: int,
    scaling: float,
    valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window + linear attention with the [T, T] weights materialised.

    Args:
        q, k: [B, H, T, d]; v: [B, H, T, D]; fq, fk: [B, H, T, F]; gamma: [H].
        window, sinks: sizes of the softmax part (``window`` counts the query itself; 0 disables).
        scaling: softmax temperature, the teacher's (1/sqrt(d) for Llama and GPT-2).
        valid: [B, T] bool, False for padding; default all True.
        initial_state: (S [B, H, F, D], z [B, H, F]) added to the linear part (JRT's prefix state).
    Returns:
        out [B, H, T, D] in fp32, weights [B, H, T, T]: the normalised attention weights over the
        keys of this call (they sum to 1 per query when there is no initial state).
    """
    batch, _, length, _ = q.shape
    q, k, v, fq, fk = (t.float() for t in (q, k, v, fq, fk))
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    positions = token_positions(valid)
    soft, lin = part_masks(positions, positions, valid, window, sinks)
    weights = _mix(q @ k.transpose(-1, -2) * scaling, fq @ fk.transpose(-1, -2), soft, lin, gamma.float())
    numerator = weights @ v
    denominator = weights.sum(dim=-1)
    if initial_state is not None:
        s0, z0 = initial_state
        g = gamma.float()[None, :, None]
        numerator = numerator + g[..., None] * (fq @ s0.float())
        denominator = denominator + g * (fq @ z0.float()[..., None]).squeeze(-1)
    denominator = denominator + eps
    return numerator / denominator[..., None], weights / denominator[..., None]


# --------------------------------------------------------------------------------------------------
# State and the chunked / recurrent forms
# --------------------------------------------------------------------------------------------------


@dataclass
class RecurrentState:
    """Everything one linearized layer needs to continue a sequence.

    S [B, H, F, D] and z [B, H, F] (fp32) sum the keys that left the softmax part. ``keys``
    [B, H, K, d], ``features`` [B, H, K, F], ``values`` [B, H, K, D] and ``positions`` [B, K] hold the
    keys still in it (sinks and the last ``window - 1``), K <= sinks + window - 1; position -1 marks an
    empty slot. ``seen`` [B] counts the real tokens consumed per row.
    """

    S: torch.Tensor
    z: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def empty(cls, q: torch.Tensor, v: torch.Tensor, fq: torch.Tensor) -> RecurrentState:
        """A zero state shaped for queries ``q``, values ``v`` and features ``fq`` [B, H, *, *]."""
        batch, heads, _, head_dim = q.shape
        feat, value_dim = fq.shape[-1], v.shape[-1]
        device = q.device
        return cls(
            S=torch.zeros(batch, heads, feat, value_dim, device=device),
            z=torch.zeros(batch, heads, feat, device=device),
            keys=q.new_zeros(batch, heads, 0, head_dim, dtype=torch.float32),
            features=q.new_zeros(batch, heads, 0, feat, dtype=torch.float32),
            values=q.new_zeros(batch, heads, 0, value_dim, dtype=torch.float32),
            positions=torch.zeros(batch, 0, dtype=torch.long, device=device),
            seen=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def with_prefix(self, S: torch.Tensor, z: torch.Tensor) -> RecurrentState:
        """The same state with (S, z) added, e.g. JRT's encoder prefix state."""
        return replace(self, S=self.S + S.float(), z=self.z + z.float())

    def num_bytes(self) -> int:
        """Memory held by the state's tensors."""
        tensors = (self.S, self.z, self.keys, self.features, self.values, self.positions, self.seen)
        return sum(t.numel() * t.element_size() for t in tensors)

    def index_batch(self, index: torch.Tensor) -> RecurrentState:
        """Rows ``index`` of the batch (beam search reordering, batch selection)."""
        return RecurrentState(
            *(t.index_select(0, index.to(t.device)) for t in (self.S, self.z, self.keys, self.features,
                                                                self.values, self.positions, self.seen))
        )


def prefix_state(
    fk: torch.Tensor, v: torch.Tensor, in_prefix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """JRT encoder state: S = sum fk_j v_j^T and z = sum fk_j over tokens with ``in_prefix`` [B, T]."""
    mask = in_prefix[:, None, :, None].float()
    fk = fk.float() * mask
    return fk.transpose(-1, -2) @ v.float(), fk.sum(dim=-2)


def hybrid_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    state: RecurrentState,
    *,
    window: int,
    sinks: int,
    scaling: float,
    valid: torch.Tensor | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, RecurrentState]:
    """Continue a sequence from ``state`` with T new tokens; returns out [B, H, T, D] and the new state.

    The new queries attend to the keys kept in the state plus the new keys (quadratically, masked
    by position) and to S, z through their features. Keys that leave the softmax part are folded
    into S, z; the others are kept, so the state stays O(sinks + window).
    """
    batch, _, length, _ = q.shape
    q, k, v, fq, fk = (t.float() for t in (q, k, v, fq, fk))
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    query_pos = token_positions(valid, state.seen)
    keys = torch.cat([state.keys, k], dim=2)
    features = torch.cat([state.features, fk], dim=2)
    values = torch.cat([state.values, v], dim=2)
    key_pos = torch.cat([state.positions, query_pos], dim=1)
    key_valid = torch.cat([state.positions >= 0, valid], dim=1)

    soft, lin = part_masks(query_pos, key_pos, key_valid, window, sinks)
    weights = _mix(q @ keys.transpose(-1, -2) * scaling, fq @ features.transpose(-1, -2), soft, lin, gamma.float())
    g = gamma.float()[None, :, None]
    numerator = weights @ values + g[..., None] * (fq @ state.S)
    denominator = weights.sum(dim=-1) + g * (fq @ state.z[..., None]).squeeze(-1) + eps
    out = numerator / denominator[..., None]

    # The next query sits at position `seen`; keep what its softmax part needs, fold the rest.
    seen = state.seen + valid.long().sum(dim=-1)
    next_pos = seen[:, None]
    keep = key_valid & ((key_pos < sinks) | (key_pos > next_pos - window))
    fold = (key_valid & ~keep)[:, None, :, None].float()
    S = state.S + (features * fold).transpose(-1, -2) @ values
    z = state.z + (features * fold).sum(dim=-2)

    slots = min(key_pos.shape[1], sinks + max(window - 1, 0))
    order = torch.where(keep, key_pos, torch.full_like(key_pos, torch.iinfo(torch.long).max))
    index = order.argsort(dim=-1, stable=True)[:, :slots]
    kept = keep.gather(1, index)
    positions = torch.where(kept, key_pos.gather(1, index), torch.full_like(index, -1))

    def take(t: torch.Tensor) -> torch.Tensor:
        gathered = t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))
        return gathered * kept[:, None, :, None]

    new_state = RecurrentState(S, z, take(keys), take(features), take(values), positions, seen)
    return out, new_state


def hybrid_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    state: RecurrentState | None = None,
    *,
    window: int,
    sinks: int,
    scaling: float,
    valid: torch.Tensor | None = None,
    chunk_size: int = 128,
    eps: float = EPS,
) -> tuple[torch.Tensor, RecurrentState]:
    """``hybrid_attention_step`` over chunks of ``chunk_size`` tokens: O(T (chunk + window)) time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if state is None:
        state = RecurrentState.empty(q, v, fq)
    length = q.shape[2]
    if valid is None:
        valid = torch.ones(q.shape[0], length, dtype=torch.bool, device=q.device)
    outputs = []
    for start in range(0, length, chunk_size):
        part = slice(start, start + chunk_size)
        out, state = hybrid_attention_step(
            q[:, :, part], k[:, :, part], v[:, :, part], fq[:, :, part], fk[:, :, part], gamma, state,
            window=window, sinks=sinks, scaling=scaling, valid=valid[:, part], eps=eps,
        )
        outputs.append(out)
    if not outputs:
        return q.new_zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32), state
    return torch.cat(outputs, dim=2), state


def hybrid_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    state: RecurrentState | None = None,
    *,
    window: int,
    sinks: int,
    scaling: float,
    valid: torch.Tensor | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, RecurrentState]:
    """One token at a time, as in decoding: the chunked form with chunks of one token."""
    return hybrid_attention_chunked(
        q, k, v, fq, fk, gamma, state, window=window, sinks=sinks, scaling=scaling, valid=valid,
        chunk_size=1, eps=eps,
    )
