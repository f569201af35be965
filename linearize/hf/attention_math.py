"""The exact math of every linearized attention variant, in plain PyTorch.

This file is the single source of truth for the attention math. It ships inside every exported model
folder (next to ``modeling_linearized.py``) so an export loads where ``linearize`` is not installed,
and ``linearize.kernels.reference`` re-exports it as the oracle that the Triton kernels are tested
against. It depends on nothing but ``torch``.

Notation (per batch row b and query head h):
    q, k        [B, H, T, d]   queries and keys after RoPE; keys repeated for GQA (the state and the
    v           [B, H, T, D]   values                        decode step keep them per KV head, Hkv)
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

Every form computes this and they must agree:
    ``hybrid_attention_quadratic``  materialises the [T, T] weights (the spec; attention-transfer loss)
    ``hybrid_attention_chunked``    chunk by chunk in O(T * chunk), many chunks per product (training, prefill)
    ``hybrid_attention_step``       one token from a ``RecurrentState``, in place (decode)
    ``hybrid_attention_continue``   any number of tokens from a state (a second turn, a shared prefix)
    ``hybrid_attention_recurrent``  token by token through the step (a test of the decode path)
``build_state`` turns a fresh sequence's keys into the state in one shot. The state holds
[S | z] = sum fk_j [v_j | 1]^T over keys that left the softmax part, plus the sinks and the last
``window`` keys per KV head in a ring buffer, so its size does not depend on the length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------------


def per_head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, Hx, T, d] @ weight [H, d, e] per head -> [B, H, T, e], where Hx = H (one input per head)
    or Hx divides H (GQA keys per KV head, each read by H / Hx heads without being repeated).

    Few tokens in a batch (decode) run as one [Hx, B * T, d] GEMM per KV head: broadcasting the
    weights over the batch would copy them for every row.
    """
    batch, kv_heads, length, dim = x.shape
    heads, _, out = weight.shape
    groups = heads // kv_heads
    if batch == 1 or length >= out:
        if groups == 1:
            return x @ weight
        return (x[:, :, None] @ weight.view(kv_heads, groups, dim, out)).flatten(1, 2)
    rows = x.transpose(0, 1).reshape(kv_heads, batch * length, dim)
    grouped = weight.view(kv_heads, groups, dim, out).transpose(1, 2).reshape(kv_heads, dim, groups * out)
    y = (rows @ grouped).view(kv_heads, batch, length, groups, out)
    return y.permute(1, 0, 3, 2, 4).reshape(batch, heads, length, out)


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Hedgehog feature map (Zhang et al. 2024, arXiv 2402.04347), the definition pinned here.

    phi(x) = [softmax(x W + b), softmax(-(x W + b))], each softmax over the feature axis, no extra
    scaling of x. ``x`` [B, H, T, d] (or per KV head, see ``per_head_matmul``), ``weight`` [H, d, e],
    ``bias`` [H, e] -> [B, H, T, 2e].
    """
    u = per_head_matmul(x, weight) + bias[:, None, :]
    return torch.stack([u, -u], dim=-2).softmax(dim=-1).flatten(-2)  # both halves in one softmax call


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
    return taylor_features(per_head_matmul(x, projection))


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
    block: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-part and linear-part masks [B, 1, Tq, Tk] from positions (see the module docstring);
    ``block`` > 1: the window moves every ``block`` positions (a global cache's block window)."""
    qp = query_pos[:, None, :, None]
    kp = key_pos[:, None, None, :]
    causal = (kp <= qp) & key_valid[:, None, None, :]
    soft = causal & ((kp < sinks) | (kp > qp - qp % block - window))
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
# The spec and the state
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSpec:
    """Everything besides weights and inputs that decides a layer's attention math.

    window: softmax keys per query, counting the query itself (0: no window);
    sinks: the first ``sinks`` positions stay in every query's softmax part;
    scaling: the softmax temperature (the teacher's: 1/sqrt(d) for Llama and GPT-2);
    eps: added to the normaliser;
    cache_size: global cache slots per KV head (0: none), see "Global cache" in the module docstring;
    cache_block: with a global cache, the cache is chosen again every ``cache_block`` tokens.
    """

    window: int = 0
    sinks: int = 0
    scaling: float = 1.0
    eps: float = EPS
    cache_size: int = 0
    cache_block: int = 64

    def __post_init__(self) -> None:
        if self.window < 0 or self.sinks < 0:
            raise ValueError(f"window and sinks must be >= 0, got window={self.window}, sinks={self.sinks}")
        if self.cache_size < 0 or self.cache_block < 1:
            raise ValueError(f"cache_size must be >= 0 and cache_block >= 1, got {self.cache_size}, {self.cache_block}")
        if self.cache_size and self.window < 1:
            raise ValueError("a global cache keeps keys that leave the softmax window, so it needs window >= 1")

    @property
    def block(self) -> int:
        """Tokens between two moves of the softmax window: 1 (it slides) unless there is a global cache."""
        return self.cache_block if self.cache_size else 1

    @property
    def window_slots(self) -> int:
        """Ring slots of the window: ``window`` keys, plus the ``block - 1`` that a block window
        holds until its next move."""
        return self.window + self.block - 1 if self.window else 0

    @property
    def capacity(self) -> int:
        """Key slots of a ``RecurrentState``'s ring: the sinks and the window (the global cache apart)."""
        return self.sinks + self.window_slots

    def ring_slot(self, position: torch.Tensor) -> torch.Tensor:
        """The slot of a kept key at ``position`` (>= 0): p for a sink, else sinks + (p - sinks) mod window_slots.

        A new key's slot is the one of the key ``window_slots`` positions before it, which has just left
        the softmax part, so every step overwrites exactly the key it folds (or, with a global cache, a
        slot the last choice emptied).
        """
        if self.window == 0:
            return position
        return torch.where(position < self.sinks, position, self.sinks + (position - self.sinks) % self.window_slots)


def expand_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, X] -> [B, Hkv * groups, T, X]: query head h reads KV head h // groups (GQA)."""
    if groups == 1:
        return x
    batch, kv_heads, length, width = x.shape
    return x[:, :, None].expand(batch, kv_heads, groups, length, width).reshape(batch, kv_heads * groups, length, width)


@dataclass(frozen=True)
class StepPlan:
    """What a decode step computes from the token count alone: shared by all layers of a forward."""

    slot: torch.Tensor  # [B, 1]: the ring slot the new token goes to
    index: torch.Tensor  # [B, Hkv, 1, d + D + 1]: ``slot`` expanded for gather/scatter on the ring
    ones: torch.Tensor  # [B, Hkv, 1, 1]: the last column of a ring entry [k | v | 1]
    ring_full: bool  # every slot holds a key: no masking needed
    choose_cache: bool = False  # some row starts a block: the global cache is chosen first


@dataclass
class RecurrentState:
    """Everything one linearized layer needs to continue its sequences, in a size fixed by the spec.

    After a row has consumed ``seen`` real tokens (positions 0 .. seen - 1):

    * ``ring`` [B, Hkv, C, d + D + 1] holds, per KV head (GQA repeats them at use, not in storage),
      [k | v | 1] of the keys at positions p < sinks or p >= seen - window, each in slot
      ``spec.ring_slot(p)``; C = ``spec.capacity``; ``positions`` [B, C] says which, -1 for an empty
      slot (all zeros). The column of ones makes one product give a numerator and its normaliser;
      ``keys`` and ``values`` ([v | 1]) are views of it;
    * ``kv`` [B, H, F, D + 1] (fp32) is [S | z]: the sums of phi(k_p) v_p^T and phi(k_p) over the keys
      sinks <= p < seen - window, plus any initial state (JRT's prefix);
    * ``seen`` [B] counts the real tokens consumed;
    * with a global cache (``spec.cache_size`` = G > 0), ``cache`` [B, Hkv, G, d + D + 1] holds the
      [k | v | 1] of the chosen keys of each KV head and ``cache_positions`` [B, Hkv, G] their
      positions (-1: empty); otherwise both are None.

    The ring holds one key more than the next query's softmax part: p = seen - window, which is
    linear for that query. A decode step folds it into S, z (one rank-1 update of ``kv`` with its
    [v | 1]; an empty slot adds zero) and writes the new key over it. Features of ring keys are not
    stored: whoever folds a key recomputes phi from it.
    """

    kv: torch.Tensor
    ring: torch.Tensor
    positions: torch.Tensor
    seen: torch.Tensor
    cache: torch.Tensor | None = None
    cache_positions: torch.Tensor | None = None

    @property
    def S(self) -> torch.Tensor:
        """[B, H, F, D]: sum of phi(k) v^T over the folded keys (a view of ``kv``)."""
        return self.kv[..., :-1]

    @property
    def z(self) -> torch.Tensor:
        """[B, H, F]: sum of phi(k) over the folded keys (a view of ``kv``)."""
        return self.kv[..., -1]

    @property
    def head_dim(self) -> int:
        return self.ring.shape[-1] - self.kv.shape[-1]

    @property
    def keys(self) -> torch.Tensor:
        """[B, Hkv, C, d]: the ring's keys (a view of ``ring``)."""
        return self.ring[..., : self.head_dim]

    @property
    def values(self) -> torch.Tensor:
        """[B, Hkv, C, D + 1]: the ring's [v | 1] (a view of ``ring``)."""
        return self.ring[..., self.head_dim :]

    @classmethod
    def empty(
        cls, batch: int, heads: int, kv_heads: int, head_dim: int, value_dim: int, features: int,
        spec: AttentionSpec, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    ) -> RecurrentState:
        """The state of rows that have seen nothing."""
        slots, width = spec.capacity, head_dim + value_dim + 1
        cache = cache_positions = None
        if spec.cache_size:
            cache = torch.zeros(batch, kv_heads, spec.cache_size, width, device=device, dtype=dtype)
            cache_positions = torch.full((batch, kv_heads, spec.cache_size), -1, dtype=torch.long, device=device)
        return cls(
            kv=torch.zeros(batch, heads, features, value_dim + 1, device=device),
            ring=torch.zeros(batch, kv_heads, slots, width, device=device, dtype=dtype),
            positions=torch.full((batch, slots), -1, dtype=torch.long, device=device),
            seen=torch.zeros(batch, dtype=torch.long, device=device),
            cache=cache, cache_positions=cache_positions,
        )

    def with_prefix(self, S: torch.Tensor, z: torch.Tensor) -> RecurrentState:
        """The same state with (S, z) added, e.g. JRT's encoder prefix state."""
        return replace(self, kv=self.kv + torch.cat([S.float(), z.float()[..., None]], dim=-1))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The state's tensors in field order (the global cache's only when there is one)."""
        cache = () if self.cache is None else (self.cache, self.cache_positions)
        return (self.kv, self.ring, self.positions, self.seen, *cache)

    def assign(self, other: RecurrentState) -> None:
        """Copy ``other``'s values into this state's tensors (an in-place update of the same layout)."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs)

    def step_plan(self, spec: AttentionSpec, check_full: bool = False) -> StepPlan:
        """The slot of the next token, the same for every layer of one forward (compute it once).

        ``check_full`` asks (with a host synchronisation) whether every slot is filled, which lets
        the step skip masking empty slots.
        """
        if spec.window > 0:
            slot = spec.ring_slot(self.seen)
        else:  # only sinks are kept; later tokens write nowhere
            slot = self.seen.clamp(max=max(spec.capacity - 1, 0))
        batch, kv_heads, _, width = self.ring.shape
        slot = slot[:, None]
        return StepPlan(
            slot=slot, index=slot[:, None, :, None].expand(batch, kv_heads, 1, width),
            ones=self.ring.new_ones(()).expand(batch, kv_heads, 1, 1),
            ring_full=check_full and bool((self.positions >= 0).all()),
            # One host read per forward, only with a cache: the choice runs once per block, not per token.
            choose_cache=bool(spec.cache_size) and bool((self.seen % spec.block == 0).any()),
        )

    def num_bytes(self) -> int:
        """Memory held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def index_batch(self, index: torch.Tensor) -> RecurrentState:
        """Rows ``index`` of the batch, copied (beam reordering, batch selection, forking a prompt)."""
        return RecurrentState(*(t.index_select(0, index.to(t.device)) for t in self.tensors()))


def prefix_state(
    fk: torch.Tensor, v: torch.Tensor, in_prefix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """JRT encoder state: S = sum fk_j v_j^T and z = sum fk_j over tokens with ``in_prefix`` [B, T]."""
    mask = in_prefix[:, None, :, None].float()
    fk = fk.float() * mask
    return fk.transpose(-1, -2) @ v.float(), fk.sum(dim=-2)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a call when it already is (the decode step runs per token and layer)."""
    return t if t.dtype == dtype else t.to(dtype)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D + 1]: values with the column of ones that sums their weights."""
    return torch.nn.functional.pad(v, (0, 1), value=1.0)


def _fold_and_ring(
    keys: torch.Tensor, values: torch.Tensor, features: torch.Tensor, key_pos: torch.Tensor,
    key_valid: torch.Tensor, seen: torch.Tensor, spec: AttentionSpec, kv: torch.Tensor,
) -> tuple[RecurrentState, torch.Tensor]:
    """The state of rows that have seen ``seen`` tokens, from candidate keys and the [S | z] so far.

    keys [B, Hkv, N, d], values [B, Hkv, N, D + 1] ([v | 1]), features [B, H, N, F], key_pos and
    key_valid [B, N]: the sinks and the last ``window`` keys go to their ring slots, the other real
    keys into [S | z]. Returns the state and the features of its ring keys [B, H, C, F].
    """
    batch, kv_heads = keys.shape[:2]
    last = seen[:, None] - 1
    window_start = last - last % spec.block - spec.window  # keys after it are in the next query's window
    keep = key_valid & ((key_pos < spec.sinks) | (key_pos > window_start))
    folded = features.float() * (key_valid & ~keep)[:, None, :, None]
    kv = kv + folded.transpose(-1, -2) @ expand_kv_heads(values.float(), features.shape[1] // kv_heads)
    slots = spec.capacity
    slot = torch.where(keep, spec.ring_slot(key_pos.clamp(min=0)), slots)  # the rest go to a cut-off slot

    def ring(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(batch, t.shape[1], slots + 1, t.shape[-1])
        out.scatter_(2, slot[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]), t)
        return out[:, :, :slots].contiguous()  # kernels index the state as dense tensors

    positions = key_pos.new_full((batch, slots + 1), -1)
    positions.scatter_(1, slot, torch.where(keep, key_pos, -1))
    state = RecurrentState(kv, ring(torch.cat([keys, values], dim=-1)), positions[:, :slots].contiguous(), seen)
    return state, ring(features.float())


def _refuse_cache(spec: AttentionSpec, form: str) -> None:
    """The one-shot forms cannot know which keys a global cache keeps: it is chosen as keys arrive."""
    if spec.cache_size:
        raise ValueError(f"{form} has no global cache: with cache_size > 0 use hybrid_attention_continue "
                         "from an empty state (the cache is chosen block by block)")


def choose_cache(
    state: RecurrentState, spec: AttentionSpec, key_features: Callable[[torch.Tensor], torch.Tensor],
) -> RecurrentState:
    """The global cache chosen again for rows that start a block (``seen`` a multiple of
    ``spec.cache_block``); returns a new state, other rows unchanged.

    The candidates of a KV head are its cached keys and the keys leaving the window (positions
    <= seen - window). Each is scored by how badly [S | z] recalls its value, the self-recall error
    of LoLA (McDermott et al. 2025, arXiv 2505.23666), summed over the head's query heads:
    ``|| v - phi(k) S / (phi(k) z + eps) ||^2``. The G worst recalled stay in the cache; the other
    candidates are folded into [S | z] and leave the ring. A row without leaving keys (already
    chosen at this ``seen``) keeps its cache as it is, so choosing twice changes nothing.
    """
    batch, kv_heads, slots, width = state.ring.shape
    heads, _, value_width = state.kv.shape[1:]
    head_dim, groups, sinks = width - value_width, heads // kv_heads, spec.sinks
    window_positions = state.positions[:, sinks:]  # [B, W]
    starts_block = state.seen % spec.block == 0
    leaving = (window_positions >= 0) & (window_positions <= (state.seen - spec.window)[:, None]) & starts_block[:, None]
    entries = torch.cat([state.cache, state.ring[:, :, sinks:]], dim=2)  # [B, Hkv, G + W, d + D + 1]
    positions = torch.cat([state.cache_positions, window_positions[:, None].expand(-1, kv_heads, -1)], dim=2)
    candidate = torch.cat([state.cache_positions >= 0, leaving[:, None].expand(-1, kv_heads, -1)], dim=2)
    features = key_features(entries[..., :head_dim]).float()  # [B, H, G + W, F]
    values = expand_kv_heads(entries[..., head_dim:].float(), groups)  # [v | 1]
    recalled = features @ state.kv
    error = (values[..., :-1] - recalled[..., :-1] / (recalled[..., -1:] + spec.eps)).pow(2).sum(dim=-1)
    error = error.view(batch, kv_heads, groups, -1).sum(dim=2).masked_fill(~candidate, float("-inf"))
    top = error.topk(spec.cache_size, dim=-1).indices  # [B, Hkv, G]
    kept = candidate.gather(2, top)
    chosen = leaving.any(dim=1)[:, None, None]  # rows that choose now
    cache = torch.where((chosen & kept)[..., None], entries.gather(2, top[..., None].expand(-1, -1, -1, width)), 0)
    cache = torch.where(chosen[..., None], cache, state.cache)
    cache_positions = torch.where(chosen, torch.where(kept, positions.gather(2, top), -1), state.cache_positions)
    folded = candidate & ~torch.zeros_like(candidate).scatter(2, top, kept) & chosen
    kv = state.kv + (features * expand_kv_heads(folded[..., None].float(), groups)).transpose(-1, -2) @ values
    ring = state.ring.clone()
    ring[:, :, sinks:] = state.ring[:, :, sinks:].masked_fill(leaving[:, None, :, None], 0)
    positions_left = state.positions.clone()
    positions_left[:, sinks:] = window_positions.masked_fill(leaving, -1)
    return RecurrentState(kv, ring, positions_left, state.seen, cache.to(state.cache.dtype), cache_positions)


def build_state(
    k: torch.Tensor,
    v: torch.Tensor,
    fk: torch.Tensor,
    spec: AttentionSpec,
    *,
    valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RecurrentState:
    """The state after a fresh sequence, in one shot (no pass over the tokens).

    k [B, Hkv, T, d] and v [B, Hkv, T, D] per KV head, fk [B, H, T, F], valid [B, T];
    initial_state (S0, z0) is added to S, z (JRT's prefix state).
    """
    _refuse_cache(spec, "build_state")
    batch, kv_heads, length, _ = k.shape
    heads, feat, value_dim = fk.shape[1], fk.shape[-1], v.shape[-1]
    kv = torch.zeros(batch, heads, feat, value_dim + 1, device=k.device)
    if initial_state is not None:
        kv = kv + torch.cat([initial_state[0].float(), initial_state[1].float()[..., None]], dim=-1)
    if valid is None:  # no padding: the folded keys are one slice, the ring's candidates two
        sinks = min(spec.sinks, length)
        start = max(sinks, length - spec.window)
        folded = fk[:, :, sinks:start].float()
        if start > sinks:
            values = expand_kv_heads(_with_ones(v[:, :, sinks:start].float()), heads // kv_heads)
            kv = kv + folded.transpose(-1, -2) @ values
        kept = torch.cat([torch.arange(sinks), torch.arange(start, length)]).to(k.device)
        positions = kept[None].expand(batch, -1)
        seen = torch.full((batch,), length, dtype=torch.long, device=k.device)
        state, _ = _fold_and_ring(k[:, :, kept], _with_ones(v[:, :, kept]), fk[:, :, kept], positions,
                                  torch.ones_like(positions, dtype=torch.bool), seen, spec, kv)
        return state
    seen = valid.long().sum(dim=-1)
    state, _ = _fold_and_ring(k, _with_ones(v), fk, token_positions(valid), valid, seen, spec, kv)
    return state


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
    spec: AttentionSpec,
    *,
    valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window + linear attention with the [T, T] weights materialised.

    Args:
        q, k: [B, H, T, d]; v: [B, H, T, D] (keys and values repeated to the query heads);
        fq, fk: [B, H, T, F]; gamma: [H]; spec: window, sinks, scaling, eps.
        valid: [B, T] bool, False for padding; default all True.
        initial_state: (S [B, H, F, D], z [B, H, F]) added to the linear part (JRT's prefix state).
    Returns:
        out [B, H, T, D] in fp32, weights [B, H, T, T]: the normalised attention weights over the
        keys of this call (they sum to 1 per query when there is no initial state).
    """
    _refuse_cache(spec, "hybrid_attention_quadratic")
    batch, _, length, _ = q.shape
    q, k, v, fq, fk = (t.float() for t in (q, k, v, fq, fk))
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    positions = token_positions(valid)
    soft, lin = part_masks(positions, positions, valid, spec.window, spec.sinks)
    weights = _mix(q @ k.transpose(-1, -2) * spec.scaling, fq @ fk.transpose(-1, -2), soft, lin, gamma.float())
    numerator = weights @ v
    denominator = weights.sum(dim=-1)
    if initial_state is not None:
        s0, z0 = initial_state
        g = gamma.float()[None, :, None]
        numerator = numerator + g[..., None] * (fq @ s0.float())
        denominator = denominator + g * (fq @ z0.float()[..., None]).squeeze(-1)
    denominator = denominator + spec.eps
    return numerator / denominator[..., None], weights / denominator[..., None]


# --------------------------------------------------------------------------------------------------
# Chunked form
# --------------------------------------------------------------------------------------------------


def pack_left(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] permutation putting each row's real tokens first, in order (then the padding)."""
    return (~valid).long().argsort(dim=1, stable=True)


def permute_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, X] with its tokens reordered by ``order`` [B, T]."""
    return x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


def hybrid_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    spec: AttentionSpec,
    *,
    valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The quadratic form's output in O(T * chunk) time and memory, all chunks at once.

    Shapes and arguments as ``hybrid_attention_quadratic``; returns out [B, H, T, D] in fp32.
    Padding is packed out first (real tokens moved to the front of each row, so a token's index is
    its position), then the sequence is cut into chunks of c = max(chunk_size, window) tokens. A
    query in chunk n sees the softmax part of the window only in chunks n - 1 and n (c >= window),
    so it attends to those two chunks through masks, to the sinks directly, and to chunks 0..n-2
    through their summed state, a cumulative sum of per-chunk fk^T v (the sinks excluded). Long
    inputs run in groups of whole (row, head) sequences of about ``CHUNKS_PER_GROUP`` chunks.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _refuse_cache(spec, "hybrid_attention_chunked")
    batch, heads, length, _ = q.shape
    q, k, v, fq, fk = (t.float() for t in (q, k, v, fq, fk))
    if length == 0:
        return q.new_zeros(batch, heads, 0, v.shape[-1])
    if valid is None or bool(valid.all()):
        return _chunked_by_heads(q, k, v, fq, fk, gamma.float(), spec, initial_state, chunk_size)
    order = pack_left(valid)
    packed = [permute_tokens(t, order) for t in (q, k, v, fq, fk)]
    out = _chunked_by_heads(*packed, gamma.float(), spec, initial_state, chunk_size)
    return permute_tokens(out, order.argsort(dim=1))


# The chunked form runs over groups of (row, head) pairs of about this many chunks: the temporaries of
# a group stay a few MiB, which the allocator reuses and the caches hold, where whole-sequence
# temporaries would be fresh pages on every call (on CPU, page faults cost as much as the math).
CHUNKS_PER_GROUP = 128


def _chunked_by_heads(q, k, v, fq, fk, gamma, spec, initial_state, chunk_size) -> torch.Tensor:
    """``_chunked_packed`` over groups of whole (row, head) sequences, each independent of the others."""
    batch, heads, length, _ = q.shape
    chunks = -(-length // max(chunk_size, spec.window, 1))
    per_group = max(1, CHUNKS_PER_GROUP // chunks)
    if per_group >= batch * heads:
        return _chunked_packed(q, k, v, fq, fk, gamma, spec, initial_state, chunk_size)
    rows = [t.reshape(1, batch * heads, *t.shape[2:]) for t in (q, k, v, fq, fk)]
    gamma = gamma.repeat(batch)
    if initial_state is not None:
        initial_state = tuple(t.reshape(1, batch * heads, *t.shape[2:]) for t in initial_state)
    outputs = []
    for start in range(0, batch * heads, per_group):
        part = slice(start, start + per_group)
        initial = None if initial_state is None else tuple(t[:, part] for t in initial_state)
        outputs.append(_chunked_packed(*(t[:, part] for t in rows), gamma[part], spec, initial, chunk_size))
    return torch.cat(outputs, dim=1).view(batch, heads, length, -1)


def _chunked_packed(q, k, v, fq, fk, gamma, spec, initial_state, chunk_size) -> torch.Tensor:
    """``hybrid_attention_chunked`` for rows whose real tokens come first (no padding, or padding last).

    With real tokens first, every causal key of a real query is real, so the masks depend only on
    the offsets of query and key inside their chunks (and, for the sinks, on the chunk); padding
    queries compute values the caller drops. The tokens of all rows and heads are cut into one run
    of R = B * H * N chunks, so that "the previous chunk" is a shifted slice of that run, which
    matrix products read without a copy; pairs that cross from one row or head to the next are
    masked. A query attends to its own chunk and the previous one, to the sinks directly, and to
    chunks 0..n-2 through their summed state.

    The shares are folded in where they cost least: g into fq, log(1 - g) into the softmax shift.
    Values carry a column of ones ([v | 1]), so each product yields a numerator and its normaliser.
    """
    batch, heads, length, _ = q.shape
    window, sinks = spec.window, min(spec.sinks, length)
    c = max(chunk_size, window, 1)
    n = -(-length // c)
    padded, runs = n * c, batch * heads * n
    device = q.device
    pad = torch.nn.functional.pad

    def chunks(x: torch.Tensor, skip: int = 0) -> torch.Tensor:  # [B, H, T, X] -> [R, c, X]
        if skip or padded > length:  # ``skip`` leading tokens become zeros (the sinks, in the linear part)
            x = pad(x[:, :, skip:], (0, 0, skip, padded - length))
        return x.reshape(runs, c, x.shape[-1])

    def crossing(shift: int) -> torch.Tensor:  # rows j of a product of run j + shift with run j that cross a head
        return ((torch.arange(runs - shift, device=device) + shift) % n < shift).nonzero().flatten()

    v1 = chunks(_with_ones(v))
    qs, ks = chunks(q * spec.scaling), chunks(k)
    fq_lin, fks = chunks(fq * gamma[None, :, None, None]), chunks(fk, skip=sinks)
    log_share = torch.log1p(-gamma).repeat_interleave(n)[:, None, None].repeat(batch, 1, 1)  # [R, 1, 1]
    offset = torch.arange(c, device=device)
    distance = offset[:, None] - offset[None, :]  # query offset - key offset, inside a chunk
    cur_soft, prev_soft = (distance >= 0) & (distance < window), distance + c < window  # [c, c]
    cur_lin = (distance >= 0) & ~cur_soft
    chunk = torch.arange(runs, device=device) % n  # each run's chunk index
    if sinks:  # key positions < sinks are attended as sinks, so they leave the window's masks
        not_sink = (torch.arange(padded, device=device) >= sinks).view(n, 1, c)
        cur_soft = cur_soft & not_sink[chunk]  # [R, c, c]
    has_prev = n > 1
    prev_in_window = has_prev and window > 1  # else no key of the previous chunk is in a query's window
    if prev_in_window:
        prev_soft = prev_soft & (chunk[1:] > 0)[:, None, None]  # [R - 1, c, c]; no previous chunk: none
        if sinks:
            prev_soft = prev_soft & not_sink[chunk[:-1]]

    total = None
    if window or sinks:
        neg = float("-inf")
        s_cur = (qs @ ks.transpose(-1, -2)).masked_fill(~cur_soft, neg)  # all -inf when window = 0
        m = s_cur.detach().amax(dim=-1, keepdim=True)
        if prev_in_window:
            s_prev = (qs[1:] @ ks[:-1].transpose(-1, -2)).masked_fill(~prev_soft, neg)
            m[1:] = torch.maximum(m[1:], s_prev.detach().amax(dim=-1, keepdim=True))
        if sinks:
            s_sink = (qs.view(batch, heads, padded, -1) @ k[:, :, :sinks].transpose(-1, -2)).masked_fill(
                torch.arange(sinks, device=device) > torch.arange(padded, device=device)[:, None], neg)
            s_sink = s_sink.view(runs, c, sinks)
            m = torch.maximum(m, s_sink.detach().amax(dim=-1, keepdim=True))
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m)) - log_share
        weights = torch.exp(s_cur - shift)
        if window < c:  # some keys of the query's own chunk are already linear
            weights = torch.where(cur_soft, weights, (fq_lin @ fks.transpose(-1, -2)).masked_fill(~cur_lin, 0.0))
        total = weights @ v1
        if sinks:
            total = total + (torch.exp(s_sink - shift).view(batch, heads, padded, sinks)
                             @ _with_ones(v[:, :, :sinks])).view(runs, c, -1)
    else:
        total = (fq_lin @ fks.transpose(-1, -2)).masked_fill(~cur_lin, 0.0) @ v1
    if has_prev:  # the previous chunk: linear keys, and window keys when window > 1
        lin_prev = fq_lin[1:] @ fks[:-1].transpose(-1, -2)
        if prev_in_window:
            lin_prev = torch.where(prev_soft, torch.exp(s_prev - shift[1:]), lin_prev)
        total[1:] += (lin_prev @ v1[:-1]).index_fill_(0, crossing(1), 0.0)
    if n > 2:  # chunks 0..n-2 through [S | z] summed over them (the sinks are zeros in fks)
        summed = (fks.transpose(-1, -2) @ v1).view(batch * heads, n, *fq_lin.shape[-1:], -1).cumsum(dim=1)
        state = fq_lin[2:] @ summed.view(runs, *summed.shape[2:])[:-2]  # run j + 2 reads the sum through run j
        total[2:] += state.index_fill_(0, crossing(2), 0.0)
    total = total.view(batch, heads, padded, -1)
    if initial_state is not None:
        initial = torch.cat([initial_state[0].float(), initial_state[1].float()[..., None]], dim=-1)
        total = total + fq_lin.view(batch, heads, padded, -1) @ initial
    out = total[..., :-1] / (total[..., -1:] + spec.eps)
    return out[:, :, :length]


# On CPU the quadratic form (a few large ops over [T, T]) beats the chunked one (more, smaller ops)
# up to about this many tokens; measured at SmolLM2-135M sizes (README, "Speed").
QUADRATIC_MAX_LENGTH = 192


def hybrid_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    spec: AttentionSpec,
    *,
    valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The cheapest exact PyTorch form for a fresh sequence: quadratic up to ``QUADRATIC_MAX_LENGTH``
    tokens, chunked beyond. Arguments as ``hybrid_attention_chunked``; returns out [B, H, T, D] fp32.
    An export computes with it where ``linearize`` is not installed, so it gives the same numbers."""
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1], dtype=torch.float32)
    if q.shape[2] <= QUADRATIC_MAX_LENGTH:
        return hybrid_attention_quadratic(q, k, v, fq, fk, gamma, spec, valid=valid, initial_state=initial_state)[0]
    return hybrid_attention_chunked(q, k, v, fq, fk, gamma, spec, valid=valid, initial_state=initial_state,
                                    chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------------
# From a state: one decode step, or any number of tokens
# --------------------------------------------------------------------------------------------------


def hybrid_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    gamma: torch.Tensor,
    state: RecurrentState,
    spec: AttentionSpec,
    key_features: Callable[[torch.Tensor], torch.Tensor],
    *,
    valid: torch.Tensor | None = None,
    plan: StepPlan | None = None,
) -> torch.Tensor:
    """One new token per row from ``state``, which is updated in place; returns out [B, H, 1, D] fp32.

    q [B, H, 1, d], k [B, Hkv, 1, d], v [B, Hkv, 1, D] (per KV head), fq [B, H, 1, F], gamma [H];
    ``key_features`` maps keys per KV head [B, Hkv, 1, d] to phi [B, H, 1, F] (the layer's feature
    map): it is called once, on the key that leaves the softmax part. valid [B] or [B, 1]: False
    leaves that row's state as it was (its output is unspecified). ``plan``: ``state.step_plan``,
    computed once per forward for all layers (default: computed here).

    A fixed number of ops whatever the context (``advance_state`` then ``attend_state``): no host
    synchronisation and static shapes, so the step can be captured by CUDA graphs or torch.compile.
    """
    plan = state.step_plan(spec) if plan is None else plan
    advance_state(k, v, state, spec, key_features, valid=valid, plan=plan)
    return attend_state(q, fq, gamma, state, spec, masked=not plan.ring_full)


def advance_state(
    k: torch.Tensor,
    v: torch.Tensor,
    state: RecurrentState,
    spec: AttentionSpec,
    key_features: Callable[[torch.Tensor], torch.Tensor],
    *,
    valid: torch.Tensor | None = None,
    plan: StepPlan | None = None,
) -> None:
    """Add one token per row to ``state`` in place: fold the leaving key into [S | z] (a rank-1
    update) and write the new key over it. With a global cache, rows that start a block first choose
    the cache (``choose_cache``), which empties the slots the block's keys go to, so nothing is
    folded per token. Shapes as ``hybrid_attention_step``."""
    batch, kv_heads, slots, width = state.ring.shape
    heads, feat, value_width = state.kv.shape[1:]
    head_dim = width - value_width
    live = None if valid is None else valid.reshape(batch, 1)
    plan = state.step_plan(spec) if plan is None else plan
    slot, index = plan.slot, plan.index
    entry = torch.cat([_as(k, state.ring.dtype), _as(v, state.ring.dtype), plan.ones], dim=-1)  # [k | v | 1]
    if spec.cache_size:
        if plan.choose_cache:
            state.assign(choose_cache(state, spec, key_features))
        fold, write = None, live
    elif spec.window > 0:  # the leaving key is the occupant of the new key's slot (zeros when empty)
        leaving = state.ring.gather(2, index)
        fold, write = live, live
    else:  # the new key is linear at once unless it is a sink
        leaving = entry
        fold = state.seen[:, None] >= spec.sinks if spec.sinks else None
        write = None if fold is None else ~fold
        if live is not None:
            fold = live if fold is None else fold & live
            write = None if write is None else write & live
    if not spec.cache_size:
        folded = _as(key_features(leaving[..., :head_dim]), torch.float32)  # [B, H, 1, F]
        if fold is not None:
            folded = folded * fold[:, :, None, None]
        state.kv.view(batch, kv_heads, heads // kv_heads, feat, value_width).addcmul_(
            folded.view(batch, kv_heads, heads // kv_heads, feat, 1),
            _as(leaving[..., head_dim:], torch.float32).view(batch, kv_heads, 1, 1, value_width),
        )
    if slots:
        new_pos = state.seen[:, None]
        if write is not None:
            entry = torch.where(write[:, :, None, None], entry, state.ring.gather(2, index))
            new_pos = torch.where(write, new_pos, state.positions.gather(1, slot))
        state.ring.scatter_(2, index, entry)
        state.positions.scatter_(1, slot, new_pos)
    state.seen.add_(1 if live is None else live.view(batch).long())


def attend_state(
    q: torch.Tensor, fq: torch.Tensor, gamma: torch.Tensor, state: RecurrentState, spec: AttentionSpec,
    masked: bool = True,
) -> torch.Tensor:
    """out [B, H, 1, D] (fp32) of one query per row against ``state``, which already holds its key:
    softmax over the filled slots, linear through S, z; each part's numerator and normaliser come
    out of one product ([v | 1] and [S | z]). ``masked=False`` when every slot is filled."""
    batch, heads, _, head_dim = q.shape
    kv_heads, slots = state.ring.shape[1:3]
    groups, width = heads // kv_heads, state.kv.shape[-1]
    g = _as(gamma, torch.float32)
    total = (_as(fq, torch.float32) * g.view(1, heads, 1, 1)) @ state.kv  # [B, H, 1, D + 1]
    if slots:
        cached = state.cache is not None
        ring = _as(torch.cat([state.ring, state.cache], dim=2) if cached else state.ring, torch.float32)
        grouped_q = _as(q, torch.float32).reshape(batch, kv_heads, groups, head_dim) * spec.scaling
        scores = grouped_q @ ring[..., :head_dim].transpose(-1, -2)  # [B, Hkv, G, C (+ cache)]
        if masked or cached:
            empty = (state.positions < 0)[:, None, None, :]
            if cached:
                empty = torch.cat([empty.expand(-1, kv_heads, -1, -1), (state.cache_positions < 0)[:, :, None]], -1)
            scores = scores.masked_fill(empty, -1e30)  # empty: weight 0
        # (1 - g) e^(s - m) as one exp: the log-share joins the max shift (g = 1: weight 0)
        shift = scores.amax(dim=-1, keepdim=True) - torch.log1p(-g).view(1, kv_heads, groups, 1)
        total = total + (torch.exp(scores - shift) @ ring[..., head_dim:]).view(batch, heads, 1, width)
    return total[..., :-1] / (total[..., -1:] + spec.eps)


def hybrid_attention_continue(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    state: RecurrentState,
    ring_features: torch.Tensor | None,
    spec: AttentionSpec,
    *,
    valid: torch.Tensor | None = None,
    chunk_size: int = 64,
    key_features: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, RecurrentState]:
    """T new tokens from ``state`` (any T, any padding); returns out [B, H, T, D] fp32 and a new state.

    q [B, H, T, d], k [B, Hkv, T, d], v [B, Hkv, T, D], fq, fk [B, H, T, F], valid [B, T];
    ring_features [B, H, C, F]: phi of ``state.keys`` (repeated to the query heads). Chunk by chunk,
    the queries attend to the ring and the chunk's keys through position masks and to S, z.

    With a global cache (``spec.cache_size`` > 0) this is the forward itself: ``key_features`` (the
    layer's map of keys per KV head) is needed, ``ring_features`` is recomputed, and chunks are cut
    where any row starts a block, so that each chunk lies in one block of every row and the cache is
    chosen between chunks (``choose_cache``), exactly where a decode step chooses it.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if spec.cache_size and key_features is None:
        raise ValueError("a global cache is chosen by the key feature map: pass key_features")
    batch, heads, length, _ = q.shape
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    starts = list(range(0, length, chunk_size))
    if spec.cache_size:
        positions = token_positions(valid, state.seen)
        block_starts = (valid & (positions % spec.block == 0)).any(dim=0).nonzero().flatten().tolist()
        starts = sorted(set(starts) | set(block_starts))
    outputs = []
    for start, end in zip(starts, starts[1:] + [length]):
        part = slice(start, end)
        if spec.cache_size:
            state = choose_cache(state, spec, key_features)
            ring_features = key_features(state.keys)
        out, state, ring_features = _continue_chunk(
            q[:, :, part], k[:, :, part], v[:, :, part], fq[:, :, part], fk[:, :, part], gamma, state,
            ring_features, spec, valid[:, part],
        )
        outputs.append(out)
    if not outputs:
        return q.new_zeros(batch, heads, 0, v.shape[-1], dtype=torch.float32), state
    return torch.cat(outputs, dim=2), state


def hybrid_attention_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    spec: AttentionSpec,
    key_features: Callable[[torch.Tensor], torch.Tensor],
    *,
    valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, RecurrentState]:
    """A fresh sequence with a global cache: ``hybrid_attention_continue`` from an empty state.

    q [B, H, T, d], k [B, Hkv, T, d], v [B, Hkv, T, D] (per KV head), fq, fk [B, H, T, F]; returns
    out [B, H, T, D] fp32 and the state after the sequence, which a decode step continues.
    """
    batch, heads, _, head_dim = q.shape
    state = RecurrentState.empty(batch, heads, k.shape[1], head_dim, v.shape[-1], fq.shape[-1], spec, q.device,
                                 k.dtype)
    if initial_state is not None:
        state = state.with_prefix(*initial_state)
    return hybrid_attention_continue(q, k, v, fq, fk, gamma, state, None, spec, valid=valid, chunk_size=chunk_size,
                                     key_features=key_features)


def _continue_chunk(q, k, v, fq, fk, gamma, state, ring_features, spec, valid):
    groups = q.shape[1] // k.shape[1]
    q, fq = q.float(), fq.float()
    query_pos = token_positions(valid, state.seen)
    keys = torch.cat([state.keys, k.to(state.keys.dtype)], dim=2)
    values = torch.cat([state.values, _with_ones(v.to(state.values.dtype))], dim=2)  # [v | 1]
    features = torch.cat([ring_features.float(), fk.float()], dim=2)
    key_pos = torch.cat([state.positions, query_pos], dim=1)
    key_valid = torch.cat([state.positions >= 0, valid], dim=1)
    soft, lin = part_masks(query_pos, key_pos, key_valid, spec.window, spec.sinks, spec.block)
    attended_keys, attended_values, feature_scores = keys, values, fq @ features.transpose(-1, -2)
    if state.cache is not None:  # the cached keys are in every query's softmax part
        head_dim = keys.shape[-1]
        attended_keys = torch.cat([keys, state.cache[..., :head_dim]], dim=2)
        attended_values = torch.cat([values, state.cache[..., head_dim:]], dim=2)
        in_cache = expand_kv_heads((state.cache_positions >= 0)[..., None], groups).transpose(-1, -2)  # [B, H, 1, G]
        in_cache = in_cache.expand(-1, -1, q.shape[2], -1)
        soft = torch.cat([soft.expand(-1, q.shape[1], -1, -1), in_cache], dim=-1)
        lin = torch.cat([lin.expand(-1, q.shape[1], -1, -1), torch.zeros_like(in_cache)], dim=-1)
        feature_scores = torch.nn.functional.pad(feature_scores, (0, in_cache.shape[-1]))
    scores = q @ expand_kv_heads(attended_keys.float(), groups).transpose(-1, -2) * spec.scaling
    weights = _mix(scores, feature_scores, soft, lin, gamma.float())
    g = gamma.float()[None, :, None, None]
    total = weights @ expand_kv_heads(attended_values[..., :-1].float(), groups) + g * (fq @ state.kv)[..., :-1]
    denominator = weights.sum(dim=-1, keepdim=True) + g * (fq @ state.z[..., None]) + spec.eps
    seen = state.seen + valid.long().sum(dim=-1)
    new_state, new_features = _fold_and_ring(keys, values, features, key_pos, key_valid, seen, spec, state.kv)
    new_state = replace(new_state, cache=state.cache, cache_positions=state.cache_positions)
    return total / denominator, new_state, new_features


def hybrid_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gamma: torch.Tensor,
    spec: AttentionSpec,
    *,
    valid: torch.Tensor | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, RecurrentState]:
    """Token by token through ``hybrid_attention_step``, as decoding runs; returns out and the state.

    q [B, H, T, d], k [B, Hkv, T, d], v [B, Hkv, T, D], fq, fk [B, H, T, F]. Each step's leaving
    features are looked up in ``fk`` by the leaving key's position. The state is updated in place,
    so this form gives values, not gradients. Without a global cache (its choice needs the feature map:
    with one, decode through a model).
    """
    _refuse_cache(spec, "hybrid_attention_recurrent")
    batch, heads, length, head_dim = q.shape
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    state = RecurrentState.empty(batch, heads, k.shape[1], head_dim, v.shape[-1], fq.shape[-1], spec, q.device,
                                 k.dtype)
    if initial_state is not None:
        state = state.with_prefix(*initial_state)
    positions = token_positions(valid).masked_fill(~valid, length)  # padding goes to a spare index
    index_of = torch.zeros(batch, length + 1, dtype=torch.long, device=q.device)
    index_of.scatter_(1, positions, torch.arange(length, device=q.device).expand(batch, -1))
    outputs = []
    for t in range(length):
        token = slice(t, t + 1)

        def leaving_features(keys: torch.Tensor, t: int = t) -> torch.Tensor:
            if spec.window == 0:
                return fk[:, :, t : t + 1]
            leaving = state.positions.gather(1, spec.ring_slot(state.seen)[:, None])
            at = index_of.gather(1, leaving.clamp(min=0))  # an empty slot's zero values fold nothing
            return fk.gather(2, at[:, None, :, None].expand(-1, heads, 1, fk.shape[-1]))

        outputs.append(hybrid_attention_step(
            q[:, :, token], k[:, :, token], v[:, :, token], fq[:, :, token], gamma, state, spec, leaving_features,
            valid=valid[:, t],
        ))
    if not outputs:
        return q.new_zeros(batch, heads, 0, v.shape[-1], dtype=torch.float32), state
    return torch.cat(outputs, dim=2), state
