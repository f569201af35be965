"""Cached generation equals the parallel forward, with padding, and the cache stays small."""

from __future__ import annotations

import pytest
import torch
from model_testing import (
    ALL_ATTENTIONS,
    SMALL_WINDOW,
    TEACHERS,
    VOCAB,
    assert_close,
    attention_attr,
    converted,
    decoder_layers,
)
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache

PROMPT, NEW = 9, 14  # the sequence outgrows window + sinks


def full_forward_logits(model, sequence: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(sequence, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("attention", ALL_ATTENTIONS)
@pytest.mark.parametrize("softmax_layers", [[], [1]], ids=["all-linear", "hybrid"])
def test_cached_generation_logits_equal_full_forward(family, attention, softmax_layers):
    """At every step of cached greedy generation, the logits equal those of the full forward."""
    model = converted(family, attention, softmax_layers=softmax_layers)
    torch.manual_seed(2)
    prompt = torch.randint(3, VOCAB, (2, PROMPT))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    # generate() gives JRT the whole prompt as its prefix; the full forward must be told the same.
    extra = {"jrt_prefix_length": PROMPT} if attention == "jrt" else {}
    full = full_forward_logits(model, out.sequences[:, :-1], **extra)
    for step, logits in enumerate(out.logits):
        assert_close(f"step {step} logits", full[:, PROMPT - 1 + step], logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ALL_ATTENTIONS)
@pytest.mark.parametrize("softmax_layers", [[], [1]], ids=["all-linear", "hybrid"])
def test_multi_token_continuation_from_a_filled_cache(family, attention, softmax_layers):
    """Prefill, then 5 tokens at once, then one at a time: every logit equals the full forward's."""
    model = converted(family, attention, softmax_layers=softmax_layers)
    torch.manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 20))
    first = 7
    extra = {"jrt_prefix_length": first} if attention == "jrt" else {}
    cache = model.new_cache()
    pieces = []
    with torch.no_grad():
        for start, end in [(0, first), (first, first + 5), *[(t, t + 1) for t in range(first + 5, 20)]]:
            kwargs = extra if start == 0 else {}
            pieces.append(model(ids[:, start:end], cache=cache, use_cache=True, **kwargs).logits)
    assert_close("continued logits", full_forward_logits(model, ids, **extra), torch.cat(pieces, dim=1),
                 atol=1e-4, rtol=0)


def left_padded_pair(model, long_length: int = 12, short_length: int = 7):
    torch.manual_seed(3)
    long, short = torch.randint(3, VOCAB, (1, long_length)), torch.randint(3, VOCAB, (1, short_length))
    pad = long_length - short_length
    batch = torch.cat([long, torch.cat([torch.full((1, pad), model.config.pad_token_id), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    return long, short, batch, mask


@pytest.mark.parametrize("attention", ALL_ATTENTIONS)
def test_left_padded_direct_forward_equals_unpadded_rows(family, attention):
    """model(ids, attention_mask=m) alone, without position_ids: each row computes what it computes unpadded."""
    model = converted(family, attention, softmax_layers=[1])
    long, short, batch, mask = left_padded_pair(model, 20, 11)
    together = full_forward_logits(model, batch, attention_mask=mask)
    assert_close("long row", full_forward_logits(model, long)[0], together[0], rtol=0)
    assert_close("short row", full_forward_logits(model, short)[0], together[1, 9:], rtol=0)


@pytest.mark.parametrize("attention", ALL_ATTENTIONS)
def test_left_padded_batch_generates_like_single_prompts(family, attention):
    model = converted(family, attention)
    long, short, batch, mask = left_padded_pair(model)
    options = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **options)
        alone_long = model.generate(long, **options)
        alone_short = model.generate(short, **options)
    assert torch.equal(together.sequences[0, 12:], alone_long.sequences[0, 12:])
    assert torch.equal(together.sequences[1, 12:], alone_short.sequences[0, 7:])
    for step, logits in enumerate(together.logits):
        assert_close(f"long row, step {step}", alone_long.logits[step][0], logits[0], atol=1e-4, rtol=0)
        assert_close(f"short row, step {step}", alone_short.logits[step][0], logits[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["hedgehog", "window_based", "jrt"])
def test_cache_size_does_not_grow_with_context(family, attention):
    model = converted(family, attention, softmax_layers=[0])
    sizes = {}
    for length in (20, 80):
        cache = model.new_cache()
        with torch.no_grad():
            model(torch.randint(3, VOCAB, (1, length)), cache=cache, use_cache=True)
        linear = [layer for i, layer in enumerate(cache.layers) if i != 0]
        sizes[length] = (sum(layer.num_bytes() for layer in linear), cache.layers[0].keys.shape[2])
        if attention.startswith("window"):
            # a ring of sinks + window keys, stored once per KV head (GQA repeats at use)
            kept = SMALL_WINDOW["window"] + SMALL_WINDOW["sink_tokens"]
            kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
            assert all(layer.state.keys.shape[1:3] == (kv_heads, kept) for layer in linear)
            assert all(bool((layer.state.positions >= 0).all()) for layer in linear), "ring not full"
    assert sizes[20][0] == sizes[80][0], "linear layers' state grew with the context"
    assert (sizes[20][1], sizes[80][1]) == (20, 80), "the softmax layer keeps every key"


def test_filled_foreign_cache_is_rejected():
    model = converted("llama", "hedgehog")
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 12), torch.zeros(1, 2, 3, 12), 0)
    with pytest.raises(ValueError, match="needs its own cache"):
        model(torch.randint(3, VOCAB, (1, 4)), cache=cache, use_cache=True)


def test_cache_cannot_be_cropped():
    model = converted("llama", "hedgehog")
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (1, 5)), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.crop(2)


# --------------------------------------------------------------------------------------------------
# Prefill once, fork many
# --------------------------------------------------------------------------------------------------


def _left_padded_prompts():
    torch.manual_seed(8)
    prompt = torch.randint(3, VOCAB, (2, PROMPT))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    return prompt.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("attention", ["window_hedgehog", "jrt"])
def test_forked_sampling_gives_the_same_tokens(family, attention):
    """num_return_sequences prefills each prompt once; the same seed samples the very same tokens."""
    model = converted(family, attention, softmax_layers=[1])
    prompt, mask = _left_padded_prompts()

    def sample(fork: bool) -> torch.Tensor:
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(prompt, attention_mask=mask, do_sample=True, num_return_sequences=3,
                                  max_new_tokens=NEW, pad_token_id=0, fork_prompts=fork)

    forked, plain = sample(True), sample(False)
    assert forked.shape == (6, PROMPT + NEW)
    assert torch.equal(forked, plain)
    assert not torch.equal(forked[0], forked[1]), "the samples of one prompt should differ (vacuous test)"


def test_fork_prefills_each_distinct_prompt_once(family):
    model = converted(family, "window_hedgehog", softmax_layers=[1])
    prompt, mask = _left_padded_prompts()
    rows = []
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda module, args, out: rows.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            model.generate(prompt, attention_mask=mask, do_sample=True, num_return_sequences=4, max_new_tokens=3,
                           pad_token_id=0)
    finally:
        handle.remove()
    assert rows[0] == (2, PROMPT), f"the prefill ran on {rows[0]}, not once per distinct prompt"
    assert rows[1:] == [(8, 1), (8, 1)]


def test_forked_forward_logits_and_cache_equal_unforked(family):
    model = converted(family, "window_hedgehog", softmax_layers=[1])
    prompt, mask = _left_padded_prompts()
    repeated, repeated_mask = prompt.repeat_interleave(3, dim=0), mask.repeat_interleave(3, dim=0)
    results = {}
    for fork in (True, False):
        cache = model.new_cache()
        with torch.no_grad():
            first = model(repeated, attention_mask=repeated_mask, cache=cache, use_cache=True, fork_prompts=fork)
            step_mask = torch.cat([repeated_mask, torch.ones(6, 1, dtype=mask.dtype)], dim=1)
            second = model(first.logits[:, -1:].argmax(-1), attention_mask=step_mask, cache=cache, use_cache=True)
        results[fork] = (first.logits, second.logits, cache.num_bytes())
    for name, forked, plain in zip(("prefill logits", "step logits", "cache bytes"), results[True], results[False]):
        if torch.is_tensor(forked):
            assert_close(name, plain, forked, atol=1e-5, rtol=0)
        else:
            assert forked == plain, name


def test_shared_prefix_state_continues_every_prompt(family):
    """Prompts sharing a prefix: prefill it once, copy its state, continue each row with its suffix."""
    model = converted(family, "window_hedgehog", softmax_layers=[1])
    torch.manual_seed(4)
    prefix, suffixes = torch.randint(3, VOCAB, (1, 11)), torch.randint(3, VOCAB, (3, 5))
    cache = model.new_cache()
    with torch.no_grad():
        model(prefix, cache=cache, use_cache=True)
        cache.batch_repeat_interleave(3)
        continued = model(suffixes, cache=cache, use_cache=True).logits
    full = full_forward_logits(model, torch.cat([prefix.expand(3, -1), suffixes], dim=1))
    assert_close("suffix logits", full[:, 11:], continued, atol=1e-4, rtol=0)


class _TorchCalls(TorchFunctionMode):
    """Counts the torch functions called while ``active`` and the tensor elements they are given (a
    structural measure of work; no timing)."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.count = self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.active:
            self.count += 1
            self.elements += sum(a.numel() for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def _attention_step_work(model, family: str, length: int) -> tuple[int, int]:
    """(torch calls, tensor elements) inside the attention modules during one decode step."""
    torch.manual_seed(6)
    cache = model.new_cache() if hasattr(model, "new_cache") else DynamicCache()
    calls = _TorchCalls()
    hooks = []
    for layer in decoder_layers(model):
        attention = getattr(layer, attention_attr(family))
        hooks.append(attention.register_forward_pre_hook(lambda *_: setattr(calls, "active", True)))
        hooks.append(attention.register_forward_hook(lambda *_: setattr(calls, "active", False)))
    try:
        with torch.no_grad():
            model(torch.randint(3, VOCAB, (2, length)), cache=cache, use_cache=True)
            with calls:
                model(torch.randint(3, VOCAB, (2, 1)), cache=cache, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    return calls.count, calls.elements


@pytest.mark.parametrize("attention", ["hedgehog", "window_hedgehog"])
def test_decode_step_work_does_not_grow_with_context(family, attention):
    """A decode step's attention calls the same torch functions on tensors of the same sizes after 20
    or 200 tokens: a constant amount of work per layer, whatever the context. The teacher's grows."""
    student = converted(family, attention)
    assert _attention_step_work(student, family, 20) == _attention_step_work(student, family, 200)
    teacher = TEACHERS[family]()
    teacher_work = [_attention_step_work(teacher, family, length)[1] for length in (20, 200)]
    assert teacher_work[0] < teacher_work[1], "the measure is vacuous"
