"""Helpers of the eval tests: a tiny word-level tokenizer and an induction-head oracle model."""

from __future__ import annotations

import re

import torch
from model_testing import VOCAB
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutput

from linearize.eval.recall import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION

SPECIAL = ["[UNK]", "[PAD]", "<s>", "</s>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Words of the passkey texts, single digits and a few common words; everything else is [UNK].

    Fits the tiny models' 97-token vocabulary. It has BOS/EOS because lm-eval starts rolling
    log-likelihood windows with one of them.
    """
    texts = " ".join([PASSKEY_INTRO, PASSKEY_FILLER, PASSKEY_QUESTION, "Remember it. Question: Answer:"])
    words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]+", texts)))
    common = ["the", "of", "and", "in", "to", "a", "was", "The", ",", "@", "-", "=", "\"", "(", ")"]
    vocabulary = list(dict.fromkeys(SPECIAL + [str(d) for d in range(10)] + words + common))
    assert len(vocabulary) <= VOCAB, len(vocabulary)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )


class InductionOracle(torch.nn.Module):
    """A perfect in-context copier: at each position it predicts the token that followed the most
    recent earlier occurrence of the longest suffix seen before (an ideal induction head). It is a
    real model for the scorer: logits in, argmax out, nothing about the answers is given to it.

    ``offset`` 1 copies the next token; other offsets copy the wrong one (a model that must fail).
    """

    def __init__(self, vocab_size: int, offset: int = 1):
        super().__init__()
        self.vocab_size, self.offset = vocab_size, offset
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the scorer a device

    def _predict(self, ids: list[int], t: int) -> int:
        best_length, best_next = 0, 0
        for j in range(t - 1, -1, -1):
            length = 0
            while length <= j and ids[j - length] == ids[t - length]:
                length += 1
            if length > best_length and j + self.offset < len(ids):
                best_length, best_next = length, ids[j + self.offset]
        return best_next

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutput:
        batch, length = input_ids.shape
        logits = torch.zeros(batch, length, self.vocab_size)
        for row in range(batch):
            ids = input_ids[row].tolist()
            for t in range(length):
                logits[row, t, self._predict(ids, t)] = 1.0
        # As transformers' causal LMs: an int keeps the last positions (0: all), a tensor those indices.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutput(logits=logits[:, keep])
