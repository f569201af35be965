"""Perplexity over fixed-length chunks of a text, each chunk scored on its own.

This is the protocol of the reference numbers in DESIGN.md (512-token chunks of WikiText-2): every
chunk starts from an empty context, so it measures attention within 512 tokens, not across chunks.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def chunk_tokens(
    tokenizer: PreTrainedTokenizerBase, text: str, chunk_length: int = 512, max_chunks: int | None = None
) -> torch.Tensor:
    """Tokenize ``text`` (no special tokens) into non-overlapping [N, chunk_length] chunks."""
    if chunk_length < 2:
        raise ValueError(f"chunk_length must be >= 2, got {chunk_length}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    count = len(ids) // chunk_length
    if max_chunks is not None:
        count = min(count, max_chunks)
    if count == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one chunk of {chunk_length}")
    return torch.tensor(ids[: count * chunk_length]).view(count, chunk_length)


@torch.no_grad()
def next_token_log_likelihoods(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1 of ``batch`` [B, L] -> [B, L - 1], fp32 (causal scoring)."""
    logits = model(batch, use_cache=False).logits[:, :-1].float()
    return -torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")


@torch.no_grad()
def perplexity(
    model: PreTrainedModel, chunks: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "perplexity"
) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of ``chunks`` [N, L]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(chunks), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = chunks[start : start + batch_size].to(device)
        total -= next_token_log_likelihoods(model, batch).double().sum().item()  # fp32 sums drift ~1e-4
        count += batch[:, 1:].numel()
    return math.exp(total / count)
