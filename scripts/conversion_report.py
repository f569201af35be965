"""Perplexity of every attention variant before training, and state vs KV-cache size, on a real model.

    .venv/bin/python scripts/conversion_report.py --model smollm2-135m --chunks 64 --out results/conversion

Writes conversion.json and conversion.md to --out. Perplexity uses 512-token chunks of WikiText-2
(each chunk scored on its own). Two training-free reference points are measured on the same chunks:
softmax over only the last 64 keys, and the last 64 keys plus 4 sink tokens (gamma = 0).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import linearize
from linearize.corpora import read_corpus
from linearize.eval import chunk_tokens, perplexity
from linearize.hf.modeling_linearized import LinearAttentionCore

VARIANTS = ["hedgehog", "based", "window_hedgehog", "window_based", "jrt"]


def softmax_window_only(teacher, sink_tokens: int):
    """Softmax over the last 64 keys (+ sinks) alone: the window variant with its linear share at 0."""
    model = linearize.convert(copy.deepcopy(teacher), attention="window_hedgehog", sink_tokens=sink_tokens)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LinearAttentionCore):
                module.mix_logit.fill_(-torch.inf)
    return model


@torch.no_grad()
def cache_bytes(model, tokenizer, length: int) -> int:
    """Bytes held by the generation cache after a prefill of ``length`` tokens."""
    text = read_corpus("wikitext2")
    ids = tokenizer(text[: length * 8], return_tensors="pt")["input_ids"][:, :length]
    cache = model.new_cache() if hasattr(model, "new_cache") else None
    output = model(ids, cache=cache, use_cache=True)
    cache = output.cache
    if hasattr(cache, "num_bytes"):
        return cache.num_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--cache-lengths", default="2048,8192")
    parser.add_argument("--out", type=Path, default=Path("results/conversion"))
    args = parser.parse_args()

    teacher, tokenizer = linearize.load(args.model)
    chunks = chunk_tokens(tokenizer, read_corpus("wikitext2"), 512, args.chunks)
    rows = {"teacher": perplexity(teacher, chunks, desc="teacher")}
    rows["softmax, last 64 keys only"] = perplexity(softmax_window_only(teacher, 0), chunks, desc="window")
    rows["softmax, last 64 keys + 4 sinks"] = perplexity(softmax_window_only(teacher, 4), chunks, desc="window+sinks")
    for attention in VARIANTS:
        student = linearize.convert(copy.deepcopy(teacher), attention=attention)
        rows[attention] = perplexity(student, chunks, desc=attention)

    lengths = [int(n) for n in args.cache_lengths.split(",")]
    sizes = {"teacher (KV cache)": {n: cache_bytes(teacher, tokenizer, n) for n in lengths}}
    for attention in ("hedgehog", "window_hedgehog", "based", "window_based"):
        student = linearize.convert(copy.deepcopy(teacher), attention=attention)
        sizes[attention] = {n: cache_bytes(student, tokenizer, n) for n in lengths}

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "chunks": len(chunks), "chunk_length": 512, "perplexity": rows, "cache_bytes": sizes}
    (args.out / "conversion.json").write_text(json.dumps(result, indent=2) + "\n")
    teacher_ppl = rows["teacher"]
    lines = [
        f"WikiText-2 perplexity, {len(chunks)} chunks of 512 tokens, {args.model}, before any training:",
        "",
        "| model | perplexity | × teacher |",
        "|---|---|---|",
        *(f"| {name} | {value:.2f} | {value / teacher_ppl:.2f} |" for name, value in rows.items()),
        "",
        "Generation cache after a prefill (fp32, batch 1):",
        "",
        "| model | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
        *(f"| {name} | " + " | ".join(f"{b / 2**20:.1f} MiB" for b in by_length.values()) + " |"
          for name, by_length in sizes.items()),
    ]
    (args.out / "conversion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
