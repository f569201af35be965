"""Prefill time, decode speed, peak memory and cache size of a model at growing context lengths.

For each context length L and batch size B the model prefills B distinct rows of L tokens of
WikiText-2 into a fresh cache, then greedily decodes ``decode_tokens`` more, one token per forward.
Measured per (model, L, B):

* prefill seconds (one forward over L tokens, filling the cache);
* decode tokens/s: rows per second of the median decode step (context L and growing); the median,
  not the mean, so that a few steps slowed by another process on a shared machine do not decide it;
* peak memory: on CUDA the peak of allocated memory above what was allocated before; on CPU the
  peak resident set size above the level before, sampled every 10 ms (freed heap is handed
  back to the OS first, so an earlier, longer run does not hide this one's allocations; the
  sampler holds the GIL while it reads, and every millisecond it slowed a Python-heavy decode
  loop by up to 15%);
* cache bytes after decoding: a linearized model's ``LinearizedCache.num_bytes()`` (recurrent
  states, plus keys/values of layers kept as softmax), a teacher's keys and values.

The fork case samples ``samples`` continuations of ``fork_tokens`` tokens from one prompt of
``fork_prompt`` tokens with ``generate(do_sample=True, num_return_sequences=samples)``, the same
arguments for every model, and records the wall time (a linearized model prefills the prompt once
and copies its state; a softmax teacher prefills every copy).

Timings are wall-clock on whatever machine runs them: compare models from one run, never numbers
from different machines.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import psutil
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from linearize.corpora import read_corpus
from linearize.errors import UserError
from linearize.eval.machine import machine_settings, synchronize
from linearize.eval.perplexity import chunk_tokens
from linearize.kernels.compiled import ENVIRONMENT_SWITCH

DEFAULT_LENGTHS = (512, 1024, 2048, 4096)


@dataclass(frozen=True)
class DecodeMeasurement:
    model: str  # role in the comparison, e.g. "teacher" or "student"
    context_length: int
    prefill_seconds: float
    decode_tokens_per_second: float  # summed over the batch's rows, at the median step time
    peak_memory_bytes: int
    cache_bytes: int
    batch: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ForkMeasurement:
    model: str
    prompt_length: int
    samples: int
    new_tokens: int
    seconds: float  # wall time of the whole generate call

    def to_dict(self) -> dict:
        return asdict(self)


def new_cache(model: PreTrainedModel):
    """The cache ``generate`` would use: the model's own when it has one, else a DynamicCache."""
    if hasattr(model, "new_cache"):
        return model.new_cache()
    return DynamicCache(config=model.config)


def cache_num_bytes(cache) -> int:
    """Bytes held by ``cache``: its own count when it keeps one, else its layers' keys and values."""
    if hasattr(cache, "num_bytes"):
        return cache.num_bytes()
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in cache.layers if layer.is_initialized
        for tensor in (layer.keys, layer.values)
    )


def position_limit(model: PreTrainedModel) -> int | None:
    """Largest sequence the model's position scheme supports (learned positions cannot extrapolate)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


class PeakMemory:
    """Context manager measuring peak memory growth of the block, on ``device``."""

    def __init__(self, device: torch.device, interval_s: float = 0.01):
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return self
        _release_free_heap()
        self._process = psutil.Process(os.getpid())
        self._baseline = self._highest = self._process.memory_info().rss
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.interval_s):
            self._highest = max(self._highest, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._baseline
            return
        self._done.set()
        self._sampler.join()
        self._highest = max(self._highest, self._process.memory_info().rss)
        self.peak_bytes = self._highest - self._baseline


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc only) so RSS growth reflects new allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS growth may then under-count reuse of already-freed memory



@torch.no_grad()
def measure(model: PreTrainedModel, prompt: torch.Tensor, decode_tokens: int, role: str) -> DecodeMeasurement:
    """Prefill ``prompt`` [B, L] into a fresh cache, then decode ``decode_tokens`` greedily."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    with PeakMemory(device) as memory:
        cache = new_cache(model)
        synchronize(device)
        started = time.perf_counter()
        logits = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1).logits
        synchronize(device)
        prefill_seconds = time.perf_counter() - started
        step_seconds = []
        for _ in range(decode_tokens):
            started = time.perf_counter()
            next_token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            logits = model(input_ids=next_token, cache=cache, use_cache=True).logits
            synchronize(device)
            step_seconds.append(time.perf_counter() - started)
    return DecodeMeasurement(
        model=role, context_length=prompt.shape[1], prefill_seconds=prefill_seconds,
        decode_tokens_per_second=prompt.shape[0] / statistics.median(step_seconds), peak_memory_bytes=memory.peak_bytes,
        cache_bytes=cache_num_bytes(cache), batch=prompt.shape[0],
    )


@torch.no_grad()
def measure_fork(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: torch.Tensor, samples: int, new_tokens: int,
    role: str,
) -> ForkMeasurement:
    """Wall time of sampling ``samples`` continuations of ``new_tokens`` tokens from ``prompt`` [1, L]."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(0)
    synchronize(device)
    started = time.perf_counter()
    model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        num_return_sequences=samples, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
    )
    synchronize(device)
    return ForkMeasurement(model=role, prompt_length=prompt.shape[1], samples=samples, new_tokens=new_tokens,
                           seconds=time.perf_counter() - started)


def run_decode_benchmark(
    models: dict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]], lengths: list[int], decode_tokens: int = 32,
    progress: bool = True, batch_sizes: list[int] | None = None, batch_lengths: list[int] | None = None,
    fork_samples: int = 0, fork_prompt: int = 1024, fork_tokens: int = 32,
) -> dict:
    """Measure every model at every length; returns ``{"settings": ..., "measurements": [...], "fork": [...]}``.

    Batch 1 runs at every length; every batch size in ``batch_sizes`` (and 1) at ``batch_lengths``
    (default: the shortest length). Lengths run in increasing order, all models at one length before
    the next, so a run cut short still holds a complete comparison for the shorter contexts. With
    ``fork_samples`` > 0 the fork case runs last.
    """
    batch_sizes = sorted(set(batch_sizes or [1]) | {1})
    if not lengths or min(lengths) < 1 or decode_tokens < 1 or min(batch_sizes) < 1:
        raise UserError(f"need positive --lengths, --decode-tokens and --batch-sizes, got {lengths}, "
                        f"{decode_tokens} and {batch_sizes}")
    if fork_samples < 0 or (fork_samples and (fork_prompt < 1 or fork_tokens < 1)):
        raise UserError(f"need --fork-samples >= 0 and positive --fork-prompt and --fork-tokens, got "
                        f"{fork_samples}, {fork_prompt} and {fork_tokens}")
    lengths = sorted(set(lengths))
    batch_lengths = sorted(set(batch_lengths or lengths[:1]))
    cases = sorted({(n, 1) for n in lengths} | {(n, b) for n in batch_lengths for b in batch_sizes})
    longest = max([n for n, _ in cases] + ([fork_prompt] if fork_samples else []))
    for role, (model, _) in models.items():
        limit = position_limit(model)
        needed = max(longest + decode_tokens, fork_prompt + fork_tokens if fork_samples else 0)
        if limit is not None and needed > limit:
            raise UserError(
                f"the {role} supports {limit} positions, but the benchmark needs {needed} (longest context plus "
                f"decoded tokens). Fix: use --lengths (and --fork-prompt) up to {limit - decode_tokens}"
            )
    rows = max(b for _, b in cases)
    prompts = {
        role: chunk_tokens(tokenizer, read_corpus("wikitext2"), longest, rows) for role, (_, tokenizer) in models.items()
    }
    for role, prompt in prompts.items():
        if prompt.shape[0] < rows:
            raise UserError(f"WikiText-2 holds only {prompt.shape[0]} distinct rows of {longest} tokens for the "
                            f"{role}; use smaller --batch-sizes or --batch-lengths")
    for role, (model, _) in models.items():  # first calls allocate and pick kernels: keep them out of the numbers
        measure(model, prompts[role][:1, :16], 2, role)
    measurements = []
    for length, batch in cases:
        for role, (model, _) in models.items():
            result = measure(model, prompts[role][:batch, :length], decode_tokens, role)
            measurements.append(result.to_dict())
            if progress:  # long contexts take minutes on CPU: show each point as it lands
                print(f"{role} @ {length} x {batch}: prefill {result.prefill_seconds:.2f}s, "
                      f"decode {result.decode_tokens_per_second:.1f} tok/s, cache {result.cache_bytes} B", flush=True)
    forks = []
    for role, (model, tokenizer) in models.items() if fork_samples else ():
        result = measure_fork(model, tokenizer, prompts[role][:1, :fork_prompt], fork_samples, fork_tokens, role)
        forks.append(result.to_dict())
        if progress:
            print(f"{role}: {fork_samples} samples x {fork_tokens} tokens from {fork_prompt}: {result.seconds:.2f}s",
                  flush=True)
    settings = {
        "lengths": lengths, "decode_tokens": decode_tokens, "batch_sizes": batch_sizes, "batch_lengths": batch_lengths,
        "fork": {"samples": fork_samples, "prompt": fork_prompt, "new_tokens": fork_tokens} if fork_samples else None,
        "prompt": "WikiText-2 test text", **machine_settings(next(iter(models.values()))[0]),
        # A linearized model's CPU decode step runs compiled unless this switch is 0 (linearize.kernels.compiled).
        ENVIRONMENT_SWITCH: os.environ.get(ENVIRONMENT_SWITCH, "1"),
    }
    return {"settings": settings, "measurements": measurements, "fork": forks}
