"""The generation cache of a linearized model.

Linear layers keep a :class:`RecurrentState` whose size does not grow with the context ([S | z] and a
ring of ``sink_tokens + window`` keys per KV head); layers kept as softmax attention keep the usual
growing key/value cache. The class plugs into ``transformers``' ``Cache`` so ``generate``, beam
search and masks work unchanged; ``adopt_rows`` copies a prefilled prompt's rows (forking).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .attention_math import RecurrentState


class RecurrentStateLayer(CacheLayerMixin):
    """One linear layer's state. ``state`` is None until the layer has seen a token."""

    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: RecurrentState | None = None
        self.cumulative_length = 0  # tokens fed so far, padding included, as the masks count them

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate ahead: the state is created by the first forward."""

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError(
            "a linearized attention layer keeps a recurrent state, not keys and values; "
            "it updates its cache through `state`, so `update` must not be called on it"
        )

    def set_state(self, state: RecurrentState, new_tokens: int) -> None:
        self.state = state
        self.cumulative_length += new_tokens
        self.is_initialized = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def num_bytes(self) -> int:
        return 0 if self.state is None else self.state.num_bytes()

    def reset(self) -> None:
        self.state = None
        self.cumulative_length = 0
        self.is_initialized = False

    def offload(self) -> None:
        """States are small; they stay where they are."""

    def prefetch(self) -> None:
        """States are small; they stay where they are."""

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError("a recurrent state cannot be rolled back: crop() is not supported by linearized layers")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state = self.state.index_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.index_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.seen.shape[0], device=self.state.seen.device)
            self.state = self.state.index_batch(rows.repeat_interleave(repeats))


class LinearizedCache(Cache):
    """A ``Cache`` with a :class:`RecurrentStateLayer` per linear layer and a ``DynamicLayer`` per
    layer kept as softmax attention."""

    def __init__(self, num_layers: int, softmax_layers: list[int] | tuple[int, ...] = ()):
        keep = set(softmax_layers)
        layers = [DynamicLayer() if i in keep else RecurrentStateLayer() for i in range(num_layers)]
        super().__init__(layers=layers)

    def adopt_rows(self, other: LinearizedCache, index: torch.Tensor) -> None:
        """Fill this (empty) cache with rows ``index`` of ``other``: a prompt's fixed-size states,
        prefilled once, copied to every sequence that continues it (softmax layers copy their KV)."""
        for mine, theirs in zip(self.layers, other.layers):
            if isinstance(theirs, RecurrentStateLayer):
                if theirs.state is not None:
                    mine.set_state(theirs.state.index_batch(index), theirs.cumulative_length)
            elif theirs.is_initialized:
                mine.lazy_initialization(theirs.keys, theirs.values)
                mine.keys = theirs.keys.index_select(0, index.to(theirs.keys.device))
                mine.values = theirs.values.index_select(0, index.to(theirs.values.device))

    def num_bytes(self) -> int:
        """Memory held by all layers: recurrent states plus softmax layers' keys and values."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, RecurrentStateLayer):
                total += layer.num_bytes()
            elif layer.is_initialized:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total
