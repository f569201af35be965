"""Linearized causal LMs: the teacher's architecture with linear attention in chosen layers.

Each family (Llama, Mistral, Qwen2, GPT-2) keeps its own ``transformers`` classes; only the attention
module of each converted layer is replaced. The replacement reuses the teacher's projections as
they are (same parameter names, so checkpoints line up) and adds per-head feature maps, a mix
factor when there is a softmax window, and JRT's encoder projections when asked for.

This file, with its single-dot siblings, is copied into every export, so it must not import
``linearize`` except inside a try-block: the package only adds faster kernels.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.pytorch_utils import Conv1D

from .attention_math import (
    RecurrentState,
    StepPlan,
    build_state,
    expand_kv_heads,
    hybrid_attention_cached,
    hybrid_attention_continue,
    hybrid_attention_step,
    hybrid_attention_torch,
    prefix_state,
    token_positions,
)
from .configuration_linearized import (
    LinearAttentionOptions,
    LinearizedGPT2Config,
    LinearizedLlamaConfig,
    LinearizedMistralConfig,
    LinearizedQwen2Config,
    linear_attention_options,
)
from .feature_maps import FEATURE_MAPS
from .linearized_cache import LinearizedCache, RecurrentStateLayer

try:  # fused kernels, device dispatch and the compiled CPU decode step, when linearize is installed
    from linearize.kernels import CompiledOnCPU as _compiled_on_cpu
    from linearize.kernels import hybrid_attention as _hybrid_attention
    from linearize.kernels import hybrid_attention_decode as _hybrid_attention_decode
except ImportError:  # an export loaded without linearize: the exact PyTorch math, eager
    _hybrid_attention = hybrid_attention_torch
    _hybrid_attention_decode = hybrid_attention_step

    def _compiled_on_cpu(fn):
        return fn


def token_validity_from_mask(
    attention_mask: torch.Tensor | None, batch: int, length: int, device, sliding_window: int | None = None
) -> torch.Tensor:
    """[B, T] bool, False for padding among the T new tokens of a call.

    A 2D padding mask [B, past + T] is read directly. A 4D mask is read off its last query's row,
    which allows exactly the non-padding keys only for a plain causal mask; a sliding-window mask
    also hides the keys behind its window there, so it is refused.
    """
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            "linearized attention reads padding from a tensor mask; load the model with "
            "attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.dim() == 4:
        if sliding_window is not None:
            raise ValueError(
                "a 4D attention mask of a sliding-window model hides old keys as well as padding; "
                "pass the 2D padding mask [batch, tokens] instead"
            )
        row = attention_mask[:, 0, -1, -length:]
    else:
        row = attention_mask[:, -length:]
    if row.dtype == torch.bool:
        return row
    if row.is_floating_point():
        return row > torch.finfo(row.dtype).min / 2
    return row != 0


def positions_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids [B, T] of the last T tokens of a 2D padding mask: each token's index among the real
    tokens of its row (padding gets 0), so a left-padded row is embedded like the unpadded one."""
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -length:]


def teacher_sliding_window(config, layer_idx: int) -> int | None:
    """The sliding window of the teacher's attention in layer ``layer_idx`` (Mistral, Qwen2 with
    ``use_sliding_window``), or None for full causal attention. It counts the query itself."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and layer_types[layer_idx] != "sliding_attention"):
        return None
    return int(window)


def _in_own_dtype(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` computed in the dtype of the module's (fp32 master) weights, returned in x's dtype."""
    return module(x.to(next(module.parameters()).dtype)).to(x.dtype)


def jrt_prefix_positions(valid: torch.Tensor, prefix_length: int | torch.Tensor | None) -> torch.Tensor:
    """[B, T] bool: the real tokens a JRT encoder read non-causally (the first ``prefix_length`` of each row).

    Losses must not fall on them, nor on the tokens they predict: their outputs saw their successors.
    """
    lengths = torch.as_tensor(0 if prefix_length is None else prefix_length, device=valid.device).reshape(-1, 1)
    return valid & (token_positions(valid) < lengths)


class LinearAttentionCore(nn.Module):
    """Feature maps, mix factor and the attention math shared by every family.

    Takes queries [B, H, T, d] and keys/values per KV head [B, Hkv, T, *], already projected and
    rotated; GQA repeats keys and values where the math reads them, the cache stores them unrepeated.
    """

    def __init__(
        self, options: LinearAttentionOptions, num_heads: int, head_dim: int, scaling: float,
        teacher_window: int | None = None,
    ):
        super().__init__()
        feature_map = FEATURE_MAPS[options.feature_map]
        self.feature_map_q = feature_map(num_heads, head_dim, options.feature_dim)
        self.feature_map_k = feature_map(num_heads, head_dim, options.feature_dim)
        if options.has_softmax_part:
            logit = math.log(options.init_gamma / (1 - options.init_gamma))
            self.mix_logit = nn.Parameter(torch.full((num_heads,), logit))
        self.options = options
        self.num_heads = num_heads
        self.scaling = scaling
        self.spec = options.attention_spec(scaling)
        self.teacher_window = teacher_window  # the teacher's sliding window (transfer-mode target)

    def set_options(self, options: LinearAttentionOptions) -> None:
        """Use ``options`` from now on; only fields that need no new weights may differ (window,
        sinks, the global cache): the feature maps and the mix factor stay as they are."""
        if options.has_softmax_part and not hasattr(self, "mix_logit"):
            raise ValueError("this layer was built without a softmax part, so it has no mix factor for one")
        self.options = options
        self.spec = options.attention_spec(self.scaling)

    def gamma(self, device: torch.device) -> torch.Tensor:
        """Per-head share of the linear part, [H]; 1 when there is no softmax part."""
        if self.options.fixed_gamma is not None:
            return torch.full((self.num_heads,), self.options.fixed_gamma, device=device)
        if self.options.has_softmax_part:
            return torch.sigmoid(self.mix_logit)
        return torch.ones(self.num_heads, device=device)

    def key_features(self, k: torch.Tensor) -> torch.Tensor:
        """phi(k) [B, H, T, F] of keys per KV head [B, Hkv, T, d] (each read by its query heads)."""
        return self.feature_map_k(k)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        valid: torch.Tensor | None,
        cache_layer: RecurrentStateLayer | None,
        encoder_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        prefix_length: int | torch.Tensor = 0,
        plan: StepPlan | None = None,
    ) -> torch.Tensor:
        """q [B, H, T, d], k [B, Hkv, T, d], v [B, Hkv, T, D], valid [B, T] (None: all real) -> [B, H, T, D].

        The output is in q's dtype.

        Without a state (training, scoring, prefill) it runs the cheapest exact form over the whole
        sequence and, with a cache, builds the state in one shot. With a state, one token is a
        decode step (in place, constant cost) and more tokens continue chunk by chunk.
        ``encoder_kv`` (JRT) are the encoder keys/values of these tokens; when this call starts a
        sequence, the first ``prefix_length`` real tokens of each row (an int or a [B] tensor) form
        the initial state. ``plan``: the decode step's ``StepPlan``, shared by all layers of a forward.
        """
        length, groups, spec = q.shape[2], self.num_heads // k.shape[1], self.spec
        state = cache_layer.state if cache_layer is not None else None
        if state is not None and length == 1:
            out = self.decode(q, k, v, state, plan, valid=None if valid is None else valid[:, 0])
            cache_layer.set_state(state, length)
            return out
        fq, gamma = self.feature_map_q(q), self.gamma(q.device)
        if state is None and spec.cache_size:  # the cache is chosen as the keys arrive, block by block
            initial = self.encoder_prefix_state(valid, encoder_kv, prefix_length)
            out, state = hybrid_attention_cached(
                q, k, v, fq, self.key_features(k), gamma, spec, self.key_features, valid=valid, initial_state=initial,
                chunk_size=self.options.chunk_size,
            )
        elif state is None:
            fk = self.key_features(k)
            initial = self.encoder_prefix_state(valid, encoder_kv, prefix_length)
            out = _hybrid_attention(
                q, expand_kv_heads(k, groups), expand_kv_heads(v, groups), fq, fk, gamma, spec, valid=valid,
                initial_state=initial, chunk_size=self.options.chunk_size,
            )
            if cache_layer is not None:
                state = build_state(k, v, fk, spec, valid=valid, initial_state=initial)
        else:
            out, state = hybrid_attention_continue(
                q, k, v, fq, self.key_features(k), gamma, state, self.key_features(state.keys), spec, valid=valid,
                chunk_size=self.options.chunk_size, key_features=self.key_features,
            )
        if cache_layer is not None:
            cache_layer.set_state(state, length)
        return out.to(q.dtype)

    def decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: RecurrentState, plan: StepPlan | None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row from ``state``, which is updated in place: q [B, H, 1, d], k, v
        [B, Hkv, 1, *], valid [B] (None: all real) -> [B, H, 1, D] in q's dtype."""
        fq, gamma = self.feature_map_q(q), self.gamma(q.device)
        out = _hybrid_attention_decode(q, k, v, fq, gamma, state, self.spec, self.key_features, valid=valid, plan=plan)
        return out.to(q.dtype)

    def compiles_step(self, cache_layer: RecurrentStateLayer | None, shape: torch.Size, all_tokens_real: bool,
                      plan: StepPlan | None) -> bool:
        """Whether the attention module runs this forward as its compiled step (``_compiled_on_cpu``): a
        plain decode step of one row, that is one real token continuing a state, no gradients, no
        global cache (whose choice reads the host once per block). Its shapes are static. One row only:
        there the step's cost is the overhead of its ~50 small calls, while at batch 16 the eager step's
        larger ops measured faster than the compiled one (README, "Speed and memory")."""
        batch, length = shape[:2]
        return (batch == 1 and length == 1 and all_tokens_real and plan is not None and not self.spec.cache_size
                and cache_layer is not None and cache_layer.state is not None and not torch.is_grad_enabled())

    def encoder_prefix_state(
        self,
        valid: torch.Tensor | None,
        encoder_kv: tuple[torch.Tensor, torch.Tensor] | None,
        prefix_length: int | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """JRT's (S_enc [B, H, F, D], z_enc [B, H, F]) over the first ``prefix_length`` real tokens of
        each row, or None when there is no encoder or no prefix."""
        if encoder_kv is None:
            return None
        if valid is None:
            valid = torch.ones(encoder_kv[0].shape[0], encoder_kv[0].shape[2], dtype=torch.bool,
                               device=encoder_kv[0].device)
        in_prefix = jrt_prefix_positions(valid, prefix_length)
        if not bool(in_prefix.any()):
            return None
        k_enc, v_enc = encoder_kv
        return prefix_state(self.feature_map_k(k_enc), v_enc, in_prefix)


def _layer_cache(cache, layer_idx: int) -> RecurrentStateLayer | None:
    return cache.layers[layer_idx] if cache is not None else None


class LinearizedLlamaAttention(nn.Module):
    """Llama-family attention (also Mistral, Qwen2) computed as linear attention.

    Reuses ``base``'s q/k/v/o projections; RoPE is applied to queries and keys as in the teacher.
    """

    shared_modules = ("q_proj", "k_proj", "v_proj", "o_proj")  # taken over from the teacher's module

    def __init__(self, base: nn.Module, config, layer_idx: int):
        super().__init__()
        options = linear_attention_options(config)
        self.layer_idx = layer_idx
        self.head_dim = base.head_dim
        self.num_key_value_groups = base.num_key_value_groups
        self.teacher_class = type(base)
        for name in self.shared_modules:
            setattr(self, name, getattr(base, name))
        self.core = LinearAttentionCore(
            options, config.num_attention_heads, base.head_dim, base.scaling, teacher_sliding_window(config, layer_idx)
        )
        if options.jrt:
            # JRT-RNN's encoder projections start as copies of the decoder's; fp32 masters, as every
            # new parameter, so low-precision training does not round their updates away.
            self.k_enc_proj = copy.deepcopy(base.k_proj).float()
            self.v_enc_proj = copy.deepcopy(base.v_proj).float()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)  # [B, T, H*d] -> [B, H, T, d]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        jrt_prefix_length: int | torch.Tensor | None = None,
        token_validity: torch.Tensor | None = None,
        all_tokens_real: bool = False,
        decode_plan: StepPlan | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cos, sin = position_embeddings
        cache_layer = _layer_cache(cache, self.layer_idx)
        if self.core.compiles_step(cache_layer, hidden_states.shape, all_tokens_real, decode_plan):
            out = _llama_decode_step(self, hidden_states, cos, sin, cache_layer.state, decode_plan)
            cache_layer.set_state(cache_layer.state, 1)
            return out, None
        q, k, v = self._project(hidden_states, cos, sin)
        encoder_kv = None
        if self.core.options.jrt:
            k_enc, _ = apply_rotary_pos_emb(self._heads(_in_own_dtype(self.k_enc_proj, hidden_states)), k, cos, sin)
            encoder_kv = (
                expand_kv_heads(k_enc, self.num_key_value_groups),
                expand_kv_heads(self._heads(_in_own_dtype(self.v_enc_proj, hidden_states)), self.num_key_value_groups),
            )
        if all_tokens_real:
            token_validity = None
        elif token_validity is None:
            token_validity = token_validity_from_mask(
                attention_mask, q.shape[0], q.shape[2], q.device, self.core.teacher_window
            )
        out = self.core(
            q, k, v, valid=token_validity, cache_layer=cache_layer,
            encoder_kv=encoder_kv, prefix_length=0 if jrt_prefix_length is None else jrt_prefix_length,
            plan=decode_plan,
        )
        return self.o_proj(_merge_heads(out)), None

    def _project(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries [B, H, T, d] and keys [B, Hkv, T, d], rotated, and values [B, Hkv, T, D]."""
        q, k = apply_rotary_pos_emb(
            self._heads(self.q_proj(hidden_states)), self._heads(self.k_proj(hidden_states)), cos, sin
        )
        return q, k, self._heads(self.v_proj(hidden_states))


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    return out.transpose(1, 2).flatten(2)  # [B, H, T, d] -> [B, T, H*d]


# A decode step as one function of the layer (an argument, so one compilation serves every layer).
@_compiled_on_cpu
def _llama_decode_step(attention: LinearizedLlamaAttention, hidden_states: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, state: RecurrentState, plan: StepPlan) -> torch.Tensor:
    q, k, v = attention._project(hidden_states, cos, sin)
    return attention.o_proj(_merge_heads(attention.core.decode(q, k, v, state, plan)))


class LinearizedGPT2Attention(nn.Module):
    """GPT-2 attention computed as linear attention; reuses the fused ``c_attn`` and ``c_proj``."""

    shared_modules = ("c_attn", "c_proj", "resid_dropout")  # taken over from the teacher's module

    def __init__(self, base: nn.Module, config, layer_idx: int):
        super().__init__()
        if base.is_cross_attention:
            raise ValueError("GPT-2 cross-attention layers cannot be linearized")
        options = linear_attention_options(config)
        self.layer_idx = layer_idx
        self.head_dim = base.head_dim
        self.split_size = base.split_size
        self.teacher_class = type(base)
        for name in self.shared_modules:
            setattr(self, name, getattr(base, name))
        self.core = LinearAttentionCore(options, base.num_heads, base.head_dim, base.scaling)
        if options.jrt:
            # JRT-RNN's encoder key/value projection starts as the key/value columns of c_attn (fp32 master).
            self.c_attn_enc = Conv1D(2 * base.split_size, base.embed_dim).to(base.c_attn.weight.device)
            with torch.no_grad():
                self.c_attn_enc.weight.copy_(base.c_attn.weight[:, base.split_size:])
                self.c_attn_enc.bias.copy_(base.c_attn.bias[base.split_size:])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)  # [B, T, H*d] -> [B, H, T, d]

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        jrt_prefix_length: int | torch.Tensor | None = None,
        token_validity: torch.Tensor | None = None,
        all_tokens_real: bool = False,
        decode_plan: StepPlan | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache_layer = _layer_cache(cache, self.layer_idx)
        if self.core.compiles_step(cache_layer, hidden_states.shape, all_tokens_real, decode_plan):
            out = _gpt2_decode_step(self, hidden_states, cache_layer.state, decode_plan)
            cache_layer.set_state(cache_layer.state, 1)
            return out, None
        q, k, v = self._project(hidden_states)
        encoder_kv = None
        if self.core.options.jrt:
            encoded = _in_own_dtype(self.c_attn_enc, hidden_states)
            encoder_kv = tuple(self._heads(x) for x in encoded.split(self.split_size, dim=2))
        if all_tokens_real:
            token_validity = None
        elif token_validity is None:
            token_validity = token_validity_from_mask(attention_mask, q.shape[0], q.shape[2], q.device)
        out = self.core(
            q, k, v, valid=token_validity, cache_layer=cache_layer,
            encoder_kv=encoder_kv, prefix_length=0 if jrt_prefix_length is None else jrt_prefix_length,
            plan=decode_plan,
        )
        return self.resid_dropout(self.c_proj(_merge_heads(out))), None

    def _project(self, hidden_states: torch.Tensor):
        """Queries, keys and values [B, H, T, d] from the fused ``c_attn``."""
        return tuple(self._heads(x) for x in self.c_attn(hidden_states).split(self.split_size, dim=2))


@_compiled_on_cpu
def _gpt2_decode_step(attention: LinearizedGPT2Attention, hidden_states: torch.Tensor, state: RecurrentState,
                      plan: StepPlan) -> torch.Tensor:
    q, k, v = attention._project(hidden_states)
    return attention.resid_dropout(attention.c_proj(_merge_heads(attention.core.decode(q, k, v, state, plan))))


class LinearizedCausalLMMixin:
    """What every linearized causal LM adds to its teacher's class.

    Family mixins set ``attention_attr`` (the attribute of a decoder layer holding attention) and
    ``linear_attention_class``, define ``decoder_layers()``, and define ``forward`` with the
    teacher's explicit signature (``generate`` checks its keyword arguments against it).
    """

    attention_attr: str
    linear_attention_class: type[nn.Module]
    # save_pretrained (and push_to_hub, Trainer checkpoints) copies this file with its siblings and
    # writes auto_map, so every saved folder loads with trust_remote_code where linearize is absent.
    _auto_class = "AutoModelForCausalLM"
    # New parameters stay fp32 masters when a checkpoint is loaded in bf16/fp16 (as after convert).
    _keep_in_fp32_modules_strict = ["feature_map_q", "feature_map_k", "mix_logit", "k_enc_proj", "v_enc_proj",
                                    "c_attn_enc"]

    def __init__(self, config):
        super().__init__(config)
        self.swap_attention()

    @property
    def linear_attention_options(self) -> LinearAttentionOptions:
        return linear_attention_options(self.config)

    def swap_attention(self) -> None:
        """Replace the attention of every layer not listed in ``softmax_layers``."""
        softmax_layers = self.linear_attention_options.softmax_layers
        for index, layer in enumerate(self.decoder_layers()):
            if index not in softmax_layers:
                base = getattr(layer, self.attention_attr)
                setattr(layer, self.attention_attr, self.linear_attention_class(base, self.config, index))

    def new_cache(self) -> LinearizedCache:
        """An empty generation cache: recurrent states for linear layers, KV for softmax layers."""
        return LinearizedCache(len(self.decoder_layers()), self.linear_attention_options.softmax_layers)

    def _own_cache(self, cache, use_cache: bool | None, kwargs: dict):
        """The cache to run with: ours, replacing the empty DynamicCache that generate() creates."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, LinearizedCache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    f"a linearized model needs its own cache; got a filled {type(cache).__name__}. "
                    "Pass cache=None (or model.new_cache()) when starting a sequence."
                )
            cache = None
        if cache is None and use_cache:
            cache = self.new_cache()
        return cache, use_cache

    def _prompt_fork(
        self, input_ids, attention_mask, cache, labels, enabled: bool, kwargs: dict
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(first row of each distinct prompt [U], prompt of each row [B]) when this call starts a
        cache for a batch that repeats prompts, as ``generate(num_return_sequences=N)`` does.

        Prefill once, fork many (Hydragen, arXiv 2402.05099, carried over to a recurrent state): the
        distinct prompts are prefilled once and their fixed-size states copied to every row, which
        gives each row exactly what it would compute alone. ``fork_prompts=False`` turns it off.
        """
        if (not enabled or cache is None or labels is not None or input_ids is None or input_ids.shape[0] < 2
                or cache.get_seq_length() > 0 or kwargs.get("output_hidden_states") or kwargs.get("output_attentions")):
            return None
        if torch.is_tensor(attention_mask) and attention_mask.dim() != 2:
            return None  # rows that differ only in a 4D mask would look alike
        mask = attention_mask if torch.is_tensor(attention_mask) else None
        rows = input_ids if mask is None else torch.cat([input_ids, mask.to(input_ids.dtype)], dim=1)
        _, prompt_of_row = torch.unique(rows, dim=0, return_inverse=True)
        distinct = int(prompt_of_row.max()) + 1
        if distinct == rows.shape[0]:
            return None
        row_ids = torch.arange(rows.shape[0], device=rows.device)
        first = torch.full((distinct,), rows.shape[0], device=rows.device).scatter_reduce(0, prompt_of_row, row_ids, "amin")
        return first, prompt_of_row

    def _forked_forward(self, fork: tuple[torch.Tensor, torch.Tensor], cache: LinearizedCache, inputs: dict):
        """The forward of the distinct prompts only, its cache rows copied into ``cache`` for every row."""
        first, prompt_of_row = fork
        batch = prompt_of_row.shape[0]
        per_row = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "jrt_prefix_length")
        inputs = {
            name: value.index_select(0, first) if name in per_row and torch.is_tensor(value) and value.dim() >= 1
            and value.shape[0] == batch else value
            for name, value in inputs.items()
        }
        prompts = self.new_cache()
        output = self(**inputs, cache=prompts, use_cache=True, fork_prompts=False)
        cache.adopt_rows(prompts, prompt_of_row)
        output["logits"] = output.logits.index_select(0, prompt_of_row)
        output["cache"] = cache
        return output

    def _decode_plan(self, cache, length: int) -> StepPlan | None:
        """A one-token step's ring slot, computed once for all layers (they have seen the same tokens).

        On CPU it also checks whether the rings are full (a cheap host read), so that the layers
        can skip masking empty slots.
        """
        if not isinstance(cache, LinearizedCache) or length != 1:
            return None
        state = next((layer.state for layer in cache.layers if getattr(layer, "state", None) is not None), None)
        if state is None:
            return None
        spec = self.linear_attention_options.attention_spec()
        return state.step_plan(spec, check_full=state.seen.device.type == "cpu")

    def _padding_aware_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, kwargs: dict):
        """Position ids from the padding mask when none are given, and each new token's validity.

        Validity goes to the linear layers as ``token_validity`` (they must not read it off the 4D
        mask the model builds, which a sliding window also cuts); positions from the mask make a
        left-padded row compute exactly what the unpadded row does, in a direct call as in generate.
        """
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        windows = [teacher_sliding_window(self.config, i) for i in range(len(self.decoder_layers()))]
        sliding = next((w for w in windows if w is not None), None)
        validity = token_validity_from_mask(attention_mask, batch, length, reference.device, sliding)
        # On CPU, a call without padding tells the layers so (one check per forward, not per layer):
        # their decode step then skips the masking. On CUDA the check would cost a host sync.
        kwargs["all_tokens_real"] = validity.device.type == "cpu" and bool(validity.all())
        kwargs["token_validity"] = validity
        if position_ids is None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            position_ids = positions_from_mask(attention_mask, length)
        return position_ids

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache = inputs.get("cache")
        starting = cache is None or cache.get_seq_length() == 0
        if self.linear_attention_options.jrt and starting and "jrt_prefix_length" not in kwargs:
            inputs["jrt_prefix_length"] = input_ids.shape[1]  # JRT reads the whole prompt
        return inputs


class LlamaFamilyMixin(LinearizedCausalLMMixin):
    """Llama, Mistral and Qwen2 share the attention layout and the causal-LM signature."""

    attention_attr = "self_attn"
    linear_attention_class = LinearizedLlamaAttention

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.layers

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        fork_prompts=True,
        **kwargs,
    ):
        cache, use_cache = self._own_cache(cache, use_cache, kwargs)
        fork = self._prompt_fork(input_ids, attention_mask, cache, labels, fork_prompts, kwargs)
        if fork is not None:
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=logits_to_keep, **kwargs)
            return self._forked_forward(fork, cache, inputs)
        position_ids = self._padding_aware_inputs(input_ids, inputs_embeds, attention_mask, position_ids, kwargs)
        kwargs["decode_plan"] = self._decode_plan(cache, (input_ids if input_ids is not None else inputs_embeds).shape[1])
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep,
            **kwargs,
        )


class LinearizedLlamaForCausalLM(LlamaFamilyMixin, LlamaForCausalLM):
    config_class = LinearizedLlamaConfig


class LinearizedMistralForCausalLM(LlamaFamilyMixin, MistralForCausalLM):
    config_class = LinearizedMistralConfig


class LinearizedQwen2ForCausalLM(LlamaFamilyMixin, Qwen2ForCausalLM):
    config_class = LinearizedQwen2Config


class LinearizedGPT2LMHeadModel(LinearizedCausalLMMixin, GPT2LMHeadModel):
    config_class = LinearizedGPT2Config
    attention_attr = "attn"
    linear_attention_class = LinearizedGPT2Attention

    def decoder_layers(self) -> nn.ModuleList:
        return self.transformer.h

    def forward(
        self,
        input_ids=None,
        cache=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        fork_prompts=True,
        **kwargs,
    ):
        cache, use_cache = self._own_cache(cache, use_cache, kwargs)
        fork = self._prompt_fork(input_ids, attention_mask, cache, labels, fork_prompts, kwargs)
        if fork is not None:
            inputs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)
            return self._forked_forward(fork, cache, inputs)
        position_ids = self._padding_aware_inputs(input_ids, inputs_embeds, attention_mask, position_ids, kwargs)
        kwargs["decode_plan"] = self._decode_plan(cache, (input_ids if input_ids is not None else inputs_embeds).shape[1])
        return super().forward(
            input_ids=input_ids, cache=cache, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs,
        )
