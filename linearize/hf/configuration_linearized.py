"""Configurations of linearized models: the teacher's config plus one ``linear_attention`` dict.

Every field of that dict is documented on :class:`LinearAttentionOptions`, which also validates
it. The config classes only give each family its own ``model_type`` so exports load through
``auto_map`` (or through ``import linearize``, which registers them).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields

from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from .attention_math import AttentionSpec

FEATURE_MAP_NAMES = ("hedgehog", "based")


@dataclass
class LinearAttentionOptions:
    """How the attention layers of a linearized model compute.

    Attributes:
        attention: the variant's name, e.g. ``"window_hedgehog"`` (informational; the fields below
            decide the math).
        feature_map: ``"hedgehog"`` (learned, identity-initialised, 2 * feature_dim features) or
            ``"based"`` (learned projection to ``feature_dim`` then the 2nd-order Taylor map).
        feature_dim: hedgehog: width e of each softmax half (default head_dim); based: d_f (16).
        window: softmax keys per query, counting the query itself; 0 = no softmax part.
        sink_tokens: the first n tokens of a sequence stay in every query's softmax part.
        init_gamma: initial share of the linear part, gamma = sigmoid(logit), in (0, 1); only used
            when there is a softmax part (window or sinks).
        jrt: JRT-RNN prefix encoder (separate key/value projections initialised from k/v). The
            encoder reads a prefix non-causally, so it is used only where a caller names the prefix:
            ``generate`` (the prompt) or a forward call's ``jrt_prefix_length`` argument. A plain
            forward call reads no prefix, so scoring is causal.
        softmax_layers: layer indices kept as the teacher's softmax attention.
        chunk_size: tokens per chunk in the chunked form, at least the window (speed and memory, not the math).
        eps: added to the normaliser.
        global_cache: keys per KV head kept in the softmax part after they leave the window, chosen
            at run time as the ones the linear state recalls worst (LoLA, arXiv 2505.23666); 0 = none.
            Training-free: it needs no new weights, so it can be set on any trained model.
        global_cache_block: with a global cache, the window moves and the cache is chosen every this
            many tokens (a query sees between ``window`` and ``window + block - 1`` window keys).
        fixed_gamma: a fixed share of the linear part in [0, 1] for every head, instead of the learned
            mix factor (null: learned). 0 leaves the softmax part alone (window, sinks, global cache);
            the linear state is then only the cache's yardstick.
    """

    attention: str = "hedgehog"
    feature_map: str = "hedgehog"
    feature_dim: int | None = None
    window: int = 0
    sink_tokens: int = 0
    init_gamma: float = 0.5
    jrt: bool = False
    softmax_layers: list[int] = field(default_factory=list)
    chunk_size: int = 64
    eps: float = 1e-6
    global_cache: int = 0
    global_cache_block: int = 64
    fixed_gamma: float | None = None

    def __post_init__(self) -> None:
        if self.feature_map not in FEATURE_MAP_NAMES:
            raise ValueError(f"feature_map must be one of {FEATURE_MAP_NAMES}, got {self.feature_map!r}")
        checks = [
            ("feature_dim", self.feature_dim is None or self.feature_dim >= 1, "a positive integer or null"),
            ("window", self.window >= 0, "an integer >= 0"),
            ("sink_tokens", self.sink_tokens >= 0, "an integer >= 0"),
            ("init_gamma", 0.0 < self.init_gamma < 1.0, "a number strictly between 0 and 1"),
            ("chunk_size", self.chunk_size >= 1, "an integer >= 1"),
            ("eps", self.eps > 0, "a positive number"),
            ("global_cache", self.global_cache >= 0, "an integer >= 0"),
            ("global_cache_block", self.global_cache_block >= 1, "an integer >= 1"),
            ("global_cache", not self.global_cache or self.window >= 1,
             "0 without a window (the cache keeps keys that leave the window; set window >= 1)"),
            ("fixed_gamma", self.fixed_gamma is None or 0.0 <= self.fixed_gamma <= 1.0, "null or a number in [0, 1]"),
            ("fixed_gamma", self.fixed_gamma is None or self.has_softmax_part,
             "null without a softmax part (window or sink_tokens > 0): the linear part is then everything"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"linear attention option {name!r} must be {expected}, got {getattr(self, name)!r}")
        self.softmax_layers = sorted({int(i) for i in self.softmax_layers})

    @property
    def has_softmax_part(self) -> bool:
        return self.window > 0 or self.sink_tokens > 0

    def attention_spec(self, scaling: float = 1.0) -> AttentionSpec:
        """The attention math these options decide, with the teacher's softmax ``scaling``."""
        return AttentionSpec(window=self.window, sinks=self.sink_tokens, scaling=scaling, eps=self.eps,
                             cache_size=self.global_cache, cache_block=self.global_cache_block)

    @classmethod
    def from_dict(cls, options: dict) -> LinearAttentionOptions:
        known = {f.name for f in fields(cls)}
        if "jrt_prefix_length" in options:
            # Older exports stored a default prefix, which made every plain forward call read its
            # first tokens non-causally. It is dropped, loudly: scoring is causal from now on.
            options = {key: value for key, value in options.items() if key != "jrt_prefix_length"}
            warnings.warn(
                "ignoring the stored linear attention option 'jrt_prefix_length': plain forward calls score "
                "causally; pass jrt_prefix_length=M to a forward call to read a JRT prefix", stacklevel=2,
            )
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown linear attention option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def to_dict(self) -> dict:
        return asdict(self)


def linear_attention_options(config) -> LinearAttentionOptions:
    """The validated options stored in ``config.linear_attention``."""
    return LinearAttentionOptions.from_dict(dict(getattr(config, "linear_attention", None) or {}))


class LinearizedLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus ``linear_attention`` (see :class:`LinearAttentionOptions`)."""

    model_type = "linearized_llama"
    _auto_class = "AutoConfig"  # save_pretrained writes auto_map and copies this file


class LinearizedMistralConfig(MistralConfig):
    """``MistralConfig`` plus ``linear_attention`` (see :class:`LinearAttentionOptions`)."""

    model_type = "linearized_mistral"
    _auto_class = "AutoConfig"  # save_pretrained writes auto_map and copies this file


class LinearizedQwen2Config(Qwen2Config):
    """``Qwen2Config`` plus ``linear_attention`` (see :class:`LinearAttentionOptions`)."""

    model_type = "linearized_qwen2"
    _auto_class = "AutoConfig"  # save_pretrained writes auto_map and copies this file


class LinearizedGPT2Config(GPT2Config):
    """``GPT2Config`` plus ``linear_attention`` (see :class:`LinearAttentionOptions`)."""

    model_type = "linearized_gpt2"
    _auto_class = "AutoConfig"  # save_pretrained writes auto_map and copies this file
