"""Cached generation equals the parallel forward, with padding, and the cache stays small."""

from __future__ import annotations

import pytest
import torch
from model_testing import ALL_ATTENTIONS, SMALL_WINDOW, VOCAB, converted
from transformers import DynamicCache

PROMPT, NEW = 9, 14  # the sequence outgrows window + sinks


def greedy_by_full_forward(model, prompt: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    sequence = prompt
    for _ in range(steps):
        with torch.no_grad():
            logits = model(sequence, use_cache=False, **kwargs).logits
        sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
    return sequence


@pytest.mark.parametrize("attention", ALL_ATTENTIONS)
@pytest.mark.parametrize("softmax_layers", [[], [1]], ids=["all-linear", "hybrid"])
def test_cached_greedy_equals_full_forward(family, attention, softmax_layers):
    model = converted(family, attention, softmax_layers=softmax_layers)
    torch.manual_seed(2)
    prompt = torch.randint(3, VOCAB, (2, PROMPT))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=NEW, do_sample=False)
    # generate() gives JRT the whole prompt as its prefix; the full forward must be told the same.
    extra = {"jrt_prefix_length": PROMPT} if attention == "jrt" else {}
    assert torch.equal(generated, greedy_by_full_forward(model, prompt, NEW, **extra))


@pytest.mark.parametrize("attention", ALL_ATTENTIONS)
def test_left_padded_batch_generates_like_single_prompts(family, attention):
    model = converted(family, attention)
    torch.manual_seed(3)
    long, short = torch.randint(3, VOCAB, (1, 12)), torch.randint(3, VOCAB, (1, 7))
    pad = model.config.pad_token_id
    batch = torch.cat([long, torch.cat([torch.full((1, 5), pad), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        alone_long = model.generate(long, max_new_tokens=NEW, do_sample=False)
        alone_short = model.generate(short, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(together[0, 12:], alone_long[0, 12:])
    assert torch.equal(together[1, 12:], alone_short[0, 7:])


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
            kept = SMALL_WINDOW["window"] - 1 + SMALL_WINDOW["sink_tokens"]
            assert all(layer.state.keys.shape[2] == kept for layer in linear)
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
