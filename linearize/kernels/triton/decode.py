"""One decoding step of window + linear attention on a fixed-size ring buffer, in Triton.

``DecodeState`` holds what ``reference.RecurrentState`` holds, laid out for in-place updates: S, z
and ``capacity = sinks + max(window - 1, 0)`` slots. The key at position p lives in slot p if it is
a sink (p < sinks), else in slot sinks + (p - sinks) mod (window - 1). The key that leaves the
softmax part when position i arrives is i + 1 - window, which maps to the very slot position i
needs, so a step folds that slot's key into (S, z) and writes the new key over it.

The slot bookkeeping (which slot to fold, which to write) is plain torch on [B] index vectors; the
kernel does the math for one (batch, head) per program: the new query attends to every filled slot
and to its own key (softmax part), and to (S, z) (linear part), then updates S, z and the slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from linearize.kernels.reference import EPS, RecurrentState
from linearize.kernels.triton.utils import NEG_BIG, block, check_shape



@triton.jit  # not autotuned: it updates the state in place, so every trial run would add the token again
def _decode_kernel(
    q, k, v, fq, fk, gamma, S, z, keys, feats, values, positions, write_slot, fold_slot, new_soft, o,
    H, C, K, F, D, scaling, eps,
    BC: tl.constexpr, BK: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    g = tl.load(gamma + i_bh % H).to(tl.float32)
    o_c, o_k, o_f, o_d = tl.arange(0, BC), tl.arange(0, BK), tl.arange(0, BF), tl.arange(0, BD)
    m_k, m_f, m_d = o_k < K, o_f < F, o_d < D
    b_q = tl.load(q + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_bh * K + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_bh * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_fq = tl.load(fq + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    b_fk = tl.load(fk + i_bh * F + o_f, mask=m_f, other=0.0).to(tl.float32)
    p_S = S + i_bh * F * D + o_f[:, None] * D + o_d[None, :]
    m_fd = m_f[:, None] & m_d[None, :]
    b_S = tl.load(p_S, mask=m_fd, other=0.0)
    b_z = tl.load(z + i_bh * F + o_f, mask=m_f, other=0.0)

    # Softmax part: the filled slots and, unless window = 0 and it is no sink, the query's own key.
    filled = (o_c < C) & (tl.load(positions + i_b * C + o_c, mask=o_c < C, other=-1) >= 0)
    p_keys = keys + i_bh * C * K + o_c[:, None] * K + o_k[None, :]
    p_feats = feats + i_bh * C * F + o_c[:, None] * F + o_f[None, :]
    p_values = values + i_bh * C * D + o_c[:, None] * D + o_d[None, :]
    b_keys = tl.load(p_keys, mask=filled[:, None] & m_k[None, :], other=0.0)
    b_values = tl.load(p_values, mask=filled[:, None] & m_d[None, :], other=0.0)
    own_soft = tl.load(new_soft + i_b) != 0
    b_s = tl.where(filled, tl.sum(b_keys * b_q[None, :], axis=1) * scaling, NEG_BIG)
    b_s_own = tl.sum(b_k * b_q) * scaling
    b_m = tl.maximum(tl.max(b_s, axis=0), tl.where(own_soft, b_s_own, NEG_BIG))
    b_m = tl.where(b_m == NEG_BIG, 0.0, b_m)
    b_p = tl.where(filled, tl.exp(b_s - b_m), 0.0)
    b_p_own = tl.where(own_soft, tl.exp(b_s_own - b_m), 0.0)
    num_soft = tl.sum(b_p[:, None] * b_values, axis=0) + b_p_own * b_v
    den_soft = tl.sum(b_p, axis=0) + b_p_own
    # Linear part: the state and, when it is not in the softmax part, the query's own key.
    b_a_own = tl.where(own_soft, 0.0, tl.sum(b_fq * b_fk))
    num_lin = tl.sum(b_fq[:, None] * b_S, axis=0) + b_a_own * b_v
    den_lin = tl.sum(b_fq * b_z) + b_a_own
    b_o = ((1 - g) * num_soft + g * num_lin) / ((1 - g) * den_soft + g * den_lin + eps)
    tl.store(o + i_bh * D + o_d, b_o, mask=m_d)

    # Update: fold the slot that leaves (or the new key when it is not kept), then store the new key.
    i_fold = tl.load(fold_slot + i_b)
    i_write = tl.load(write_slot + i_b)
    is_fold = o_c == i_fold
    b_feats = tl.load(p_feats, mask=filled[:, None] & m_f[None, :], other=0.0)
    fold_fk = tl.sum(tl.where(is_fold[:, None], b_feats, 0.0), axis=0)
    fold_v = tl.sum(tl.where(is_fold[:, None], b_values, 0.0), axis=0)
    own = tl.where(i_write < 0, 1.0, 0.0)
    b_S += fold_fk[:, None] * fold_v[None, :] + own * b_fk[:, None] * b_v[None, :]
    b_z += fold_fk + own * b_fk
    tl.store(p_S, b_S, mask=m_fd)
    tl.store(z + i_bh * F + o_f, b_z, mask=m_f)
    is_write = (o_c == i_write)[:, None]
    tl.store(p_keys, tl.broadcast_to(b_k[None, :], (BC, BK)), mask=is_write & m_k[None, :])
    tl.store(p_feats, tl.broadcast_to(b_fk[None, :], (BC, BF)), mask=is_write & m_f[None, :])
    tl.store(p_values, tl.broadcast_to(b_v[None, :], (BC, BD)), mask=is_write & m_d[None, :])


def ring_slot(position: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Ring slot of each key position (>= 0); only meaningful for positions the buffer keeps."""
    return torch.where(position < sinks, position, sinks + (position - sinks) % max(window - 1, 1))


@dataclass
class DecodeState:
    """Decoding state with a ring buffer (see the module docstring); all tensors fp32 except indices.

    S [B, H, F, D], z [B, H, F]; keys [B, H, C, d], features [B, H, C, F], values [B, H, C, D];
    positions [B, C] (-1: empty slot); seen [B] tokens consumed; C = sinks + max(window - 1, 0).
    """

    S: torch.Tensor
    z: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    seen: torch.Tensor
    window: int
    sinks: int

    @classmethod
    def from_recurrent(cls, state: RecurrentState, window: int, sinks: int) -> DecodeState:
        """The same state as ``state`` (a ``reference.RecurrentState``) in ring-buffer layout."""
        batch, heads = state.keys.shape[:2]
        capacity = sinks + max(window - 1, 0)
        filled = state.positions >= 0
        # Empty reference slots are sent to one extra slot, which is cut off afterwards.
        slot = torch.where(filled, ring_slot(state.positions.clamp(min=0), window, sinks), capacity)

        def scatter(t: torch.Tensor) -> torch.Tensor:
            ring = t.new_zeros(batch, heads, capacity + 1, t.shape[-1], dtype=torch.float32)
            ring.scatter_(2, slot[:, None, :, None].expand(-1, heads, -1, t.shape[-1]), t.float())
            return ring[:, :, :capacity].contiguous()

        positions = state.positions.new_full((batch, capacity + 1), -1)
        positions.scatter_(1, slot, torch.where(filled, state.positions, -1))
        return cls(
            S=state.S.float().clone(), z=state.z.float().clone(), keys=scatter(state.keys),
            features=scatter(state.features), values=scatter(state.values),
            positions=positions[:, :capacity].contiguous(), seen=state.seen.clone(), window=window, sinks=sinks,
        )

    def to_recurrent(self, slots: int | None = None) -> RecurrentState:
        """The ``reference.RecurrentState`` with the same content (slots sorted by position, empty last).

        ``slots``: buffer length of the result; by default min(tokens seen, capacity), the reference's
        length when no padding was ever consumed (padding also counts there).
        """
        length = min(int(self.seen.max()) if self.seen.numel() else 0, self.positions.shape[1])
        length = length if slots is None else slots
        order = torch.where(self.positions >= 0, self.positions, torch.iinfo(torch.long).max)
        index = order.argsort(dim=-1, stable=True)[:, :length]

        def take(t: torch.Tensor) -> torch.Tensor:
            return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))

        return RecurrentState(
            self.S, self.z, take(self.keys), take(self.features), take(self.values),
            self.positions.gather(1, index), self.seen,
        )


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    state: DecodeState,
    *,
    scaling: float,
    eps: float = EPS,
) -> torch.Tensor:
    """Attend with one new token and update ``state`` in place (``hybrid_attention_step`` with T = 1).

    Args:
        q, k: [B, H, 1, d]; v: [B, H, 1, D]; fq, fk: [B, H, 1, F]; gamma: [H].
        state: a ``DecodeState`` (``DecodeState.from_recurrent`` converts a reference state).
    Returns:
        out [B, H, 1, D] (fp32). ``state`` now includes the new token.
    """
    batch, heads, _, head_dim = state.keys.shape
    feat, value_dim = state.S.shape[-2:]
    check_shape("q", q, (batch, heads, 1, head_dim))
    check_shape("k", k, q.shape)
    check_shape("v", v, (batch, heads, 1, value_dim))
    check_shape("fq", fq, (batch, heads, 1, feat))
    check_shape("fk", fk, fq.shape)
    check_shape("gamma", gamma, (heads,))
    window, sinks, capacity = state.window, state.sinks, state.positions.shape[1]
    # Bookkeeping per batch row for the new token at position `seen` (see the module docstring):
    position = state.seen
    kept = (position < sinks) | (window >= 2)  # it stays in the buffer, in slot `write` ...
    write = torch.where(kept, ring_slot(position, window, sinks), -1)  # ... else it is folded at once
    leaving = position + 1 - window  # the key that now leaves the softmax part, if it is no sink
    fold = torch.where((window >= 2) & (leaving >= sinks), ring_slot(leaving.clamp(min=0), window, sinks), -1)
    new_soft = ((position < sinks) | (window > 0)).int()  # the query's own key is in its softmax part
    out = q.new_empty(batch, heads, 1, value_dim, dtype=torch.float32)
    # With no slots (sinks = 0, window <= 1) every slot access is masked off, but the pointers must
    # still be valid device memory.
    slots = [t if t.numel() else out for t in (state.keys, state.features, state.values)]
    positions = state.positions if state.positions.numel() else write
    _decode_kernel[(batch * heads,)](
        q.contiguous(), k.contiguous(), v.contiguous(), fq.contiguous(), fk.contiguous(), gamma.contiguous(),
        state.S, state.z, *slots, positions,
        write.contiguous(), fold.contiguous(), new_soft, out,
        heads, capacity, head_dim, feat, value_dim, scaling, eps,
        BC=block(capacity, 1), BK=block(head_dim, 1), BF=block(feat, 1), BD=block(value_dim, 1), num_warps=4,
    )
    # Which slot holds which position is bookkeeping shared by all heads.
    rows = torch.arange(batch, device=write.device)[kept]
    state.positions[rows, write[kept]] = position[kept]
    state.seen += 1
    return out
