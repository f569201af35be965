"""Recall tests: multi-query associative recall (MQAR) and passkey retrieval, with JRT-Prompt.

Both are scored the same way: one forward pass over the whole sequence, and an answer counts as
recalled when the greedy (argmax) prediction at each of its positions is the next token of the
sequence. That equals greedy decoding of the answer, without a generation loop.

* **MQAR** (Zoology, Arora et al. 2023, arXiv 2312.04927): ``k1 v1 k2 v2 ... kN vN``, filler, then
  every key again in a random order, each followed by its value: ``q1 a1 q2 a2 ...``. Keys and
  values are distinct tokens from disjoint halves of a vocabulary; the filler is drawn from the
  value half, so a key occurs only in its pair and its query. Each value predicted after its query
  key is one answer. ``seq_len`` is the length without JRT.
* **Passkey** (needle in a haystack): a 5-digit key hidden at a relative depth of a haystack, then ``What is the pass key? The pass key is``; the answer is the key's
  tokens, all of which must be right. The context length counts tokens before the question. The
  haystack is repeated filler sentences (``filler``, the common test), or a random span of real
  text (``wikitext``: WikiText-2's first half, the perplexity tests use the second), which a
  linear memory cannot compress the way it compresses a repetition.
* **JRT-Prompt** (Arora et al. 2024, arXiv 2407.05483): the context (MQAR's pairs, the passkey
  haystack) is given twice, so a recurrent model sees every fact again after knowing the question
  shape. It makes sequences longer by one context.

Scoring is causal by default: no logit depends on a later token. Every example also records its
*context*, the tokens before the first answer token (MQAR's pairs and filler; the passkey haystack
and question). With ``jrt_prefix=True`` a JRT-RNN model reads that context as its non-causal prefix
(``jrt_prefix_length``), as ``generate()`` reads a prompt; answers never lie inside it, so nothing
scored can see its own answer. Models without a JRT encoder score the same either way.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from linearize.corpora import read_corpus
from linearize.errors import UserError


@dataclass(frozen=True)
class RecallExample:
    """A token sequence and its answers: each answer is the positions whose next token must be
    predicted (logits at position p predict ``input_ids[p + 1]``). The first ``context_length``
    tokens are the context, which holds no answer token (a JRT model may read it non-causally)."""

    input_ids: list[int]
    answers: list[list[int]]
    context_length: int

    def __post_init__(self) -> None:
        first_answer_token = min(p for positions in self.answers for p in positions) + 1
        if not 0 < self.context_length <= first_answer_token:
            raise ValueError(f"context_length {self.context_length} overlaps the answers (first at {first_answer_token})")


def _context(context: list[int], jrt: bool) -> list[int]:
    """JRT-Prompt: the context twice; otherwise once."""
    return context * 2 if jrt else list(context)


def mqar_examples(
    vocabulary: Sequence[int], *, num_kv_pairs: int, seq_len: int, num_examples: int, seed: int = 0,
    jrt: bool = False,
) -> list[RecallExample]:
    """MQAR sequences over the token ids ``vocabulary``, the same for the same arguments.

    Needs ``seq_len >= 4 * num_kv_pairs`` (pairs plus queries) and at least ``num_kv_pairs``
    ids in each half of ``vocabulary``.
    """
    if num_kv_pairs < 1 or num_examples < 1:
        raise UserError(f"MQAR needs num_kv_pairs >= 1 and num_examples >= 1, got {num_kv_pairs}, {num_examples}")
    if seq_len < 4 * num_kv_pairs:
        raise UserError(
            f"MQAR seq_len {seq_len} cannot hold {num_kv_pairs} pairs and their queries. "
            f"Fix: use seq_len >= {4 * num_kv_pairs} or fewer pairs"
        )
    ids = list(dict.fromkeys(vocabulary))
    half = len(ids) // 2
    if half < num_kv_pairs:
        raise UserError(
            f"MQAR with {num_kv_pairs} pairs needs a vocabulary of at least {2 * num_kv_pairs} distinct "
            f"tokens, got {len(ids)}. Fix: use fewer pairs or a larger vocabulary"
        )
    key_ids, value_ids = ids[:half], ids[half:]
    rng = random.Random(seed)
    examples = []
    for _ in range(num_examples):
        keys = rng.sample(key_ids, num_kv_pairs)
        values = rng.sample(value_ids, num_kv_pairs)
        pairs = [token for kv in zip(keys, values) for token in kv]
        filler = [rng.choice(value_ids) for _ in range(seq_len - 4 * num_kv_pairs)]
        order = rng.sample(range(num_kv_pairs), num_kv_pairs)
        queries = [token for i in order for token in (keys[i], values[i])]
        prefix = _context(pairs, jrt) + filler
        # The query key sits at len(prefix) + 2j; its logits predict the value after it.
        answers = [[len(prefix) + 2 * j] for j in range(num_kv_pairs)]
        examples.append(RecallExample(prefix + queries, answers, context_length=len(prefix)))
    return examples


def tokenizer_vocabulary(tokenizer: PreTrainedTokenizerBase, size: int) -> list[int]:
    """``size`` ids of word tokens: 3+ letters that encode back to themselves, special tokens excluded.

    Tokens with a leading space (whole words in a BPE vocabulary, e.g. `` house``) come first, in
    id order, then bare ones (word pieces in BPE, whole words in a word-level vocabulary), so keys
    and values read like ordinary words rather than single letters.
    """
    special = set(tokenizer.all_special_ids)
    spaced, bare = [], []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        word = text.removeprefix(" ")
        if len(word) >= 3 and word.isalpha() and tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            (spaced if text.startswith(" ") else bare).append(token_id)
            if len(spaced) == size:
                return spaced
    if len(spaced) + len(bare) < size:
        raise UserError(f"the tokenizer has only {len(spaced) + len(bare)} word tokens, fewer than the {size} asked for")
    return (spaced + bare)[:size]


PASSKEY_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"passkey depth {depth} is outside [0, 1]. Fix: give depths as fractions like 0,0.5,1")


PASSKEY_HAYSTACKS = ("filler", "wikitext")


def _check_haystack(haystack: str) -> None:
    if haystack not in PASSKEY_HAYSTACKS:
        raise UserError(f"unknown passkey haystack {haystack!r}. Fix: use one of {', '.join(PASSKEY_HAYSTACKS)}")


def passkey_examples(
    tokenizer: PreTrainedTokenizerBase, *, context_length: int, depths: Sequence[float], seed: int = 0,
    jrt: bool = False, keys_per_depth: int = 1, haystack: str = "filler",
) -> list[RecallExample]:
    """``keys_per_depth`` passkey examples per depth (0 = needle first, 1 = needle last), each with its
    own random key (and, for the ``wikitext`` haystack, its own span of text), at ``context_length`` tokens."""
    if keys_per_depth < 1:
        raise UserError(f"passkey keys per depth must be >= 1, got {keys_per_depth}")
    _check_haystack(haystack)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    intro, question = encode(PASSKEY_INTRO), encode(PASSKEY_QUESTION)
    if haystack == "filler":
        text = encode(PASSKEY_FILLER)
    else:
        corpus = read_corpus("wikitext2")
        text = encode(corpus[: len(corpus) // 2])
    rng = random.Random(seed)
    examples = []
    for depth in (depth for depth in depths for _ in range(keys_per_depth)):
        _check_depth(depth)
        key = encode(" " + str(rng.randint(10000, 99999)))
        # The key is spliced in as the same ids that answer the question, so tokenization at the
        # splice can never make a correct answer unmatchable.
        needle = encode(" The pass key is") + key + encode(". Remember it.")
        haystack_length = context_length - len(intro) - len(needle)
        if haystack_length < 0:
            raise UserError(
                f"passkey context_length {context_length} is shorter than the instructions and the needle "
                f"({len(intro) + len(needle)} tokens). Fix: use a longer context"
            )
        if haystack == "filler":
            hay = (text * (haystack_length // len(text) + 1))[:haystack_length]
        else:
            if haystack_length > len(text):
                raise UserError(f"passkey context_length {context_length} is longer than the wikitext haystack "
                                f"({len(text)} tokens). Fix: use a shorter context or the filler haystack")
            start = rng.randint(0, len(text) - haystack_length)
            hay = text[start : start + haystack_length]
        at = round(depth * haystack_length)
        context = intro + hay[:at] + needle + hay[at:]
        prefix = _context(context, jrt) + question
        answer = [len(prefix) - 1 + i for i in range(len(key))]  # the question's last token predicts key[0]
        examples.append(RecallExample(prefix + key, [answer], context_length=len(prefix)))
    return examples


def reads_jrt_prefix(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a JRT encoder that can read a non-causal prefix."""
    return bool((getattr(model.config, "linear_attention", None) or {}).get("jrt"))


@torch.no_grad()
def recall_accuracy(
    model: torch.nn.Module, examples: Sequence[RecallExample], batch_size: int = 8, jrt_prefix: bool = False
) -> float:
    """Fraction of answers whose every position is predicted right; ``model(ids).logits`` [B, T, V].

    Examples of equal length and context are batched together (no padding, so no mask is involved).
    With ``jrt_prefix`` a JRT model reads each example's context as its non-causal prefix.
    """
    device = next(model.parameters(), torch.empty(0)).device
    prefix = jrt_prefix and reads_jrt_prefix(model)
    groups: dict[tuple[int, int], list[RecallExample]] = {}
    for example in examples:
        groups.setdefault((len(example.input_ids), example.context_length), []).append(example)
    correct = total = 0
    for (_, context_length), group in groups.items():
        extra = {"jrt_prefix_length": context_length} if prefix else {}
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            ids = torch.tensor([example.input_ids for example in batch], device=device)
            # Logits only where answers are read: at 4k tokens the full [T, vocabulary] head would
            # cost as much as the rest of a small model.
            scored = sorted({p for example in batch for positions in example.answers for p in positions})
            column = {p: i for i, p in enumerate(scored)}
            keep = torch.tensor(scored, device=device)
            predicted = model(ids, use_cache=False, logits_to_keep=keep, **extra).logits.argmax(-1)  # [B, len(scored)]
            for row, example in enumerate(batch):
                for positions in example.answers:
                    index = torch.tensor(positions, device=device)
                    at = torch.tensor([column[p] for p in positions], device=device)
                    correct += bool((predicted[row, at] == ids[row, index + 1]).all())
                    total += 1
    return correct / total


@dataclass(frozen=True)
class RecallSettings:
    """What the recall curves are measured over; saved next to the scores."""

    mqar_lengths: tuple[int, ...] = (64, 128, 256, 512)
    mqar_kv_pairs: tuple[int, ...] = (8,)  # one curve per count; lengths too short for a count are skipped
    mqar_examples: int = 16
    mqar_vocabulary: str = "words"  # "words": word tokens of the tokenizer; "ids": any non-special id
    passkey_lengths: tuple[int, ...] = (256, 512, 1024)
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_keys: int = 1  # examples (keys) per depth and length
    passkey_haystack: str = "filler"  # "filler": repeated sentences; "wikitext": spans of real text
    jrt: bool = False  # also score every test with JRT-Prompt
    jrt_prefix: bool = False  # a JRT-RNN model reads each context as its non-causal prefix
    seed: int = 0

    def validate(self) -> None:
        """Raise the UserError a run would hit, before any model is loaded (tokenizer-free checks)."""
        for pairs in self.mqar_kv_pairs:
            lengths = self.mqar_lengths_for(pairs)
            if not lengths:
                raise UserError(f"MQAR with {pairs} pairs needs a length >= {4 * pairs}, got lengths "
                                f"{list(self.mqar_lengths)}. Fix: add a longer length or use fewer pairs")
            mqar_examples(range(4 * pairs), num_kv_pairs=pairs, seq_len=lengths[0], num_examples=self.mqar_examples)
        if self.passkey_keys < 1:
            raise UserError(f"passkey keys per depth must be >= 1, got {self.passkey_keys}")
        for depth in self.passkey_depths:
            _check_depth(depth)
        _check_haystack(self.passkey_haystack)

    def mqar_lengths_for(self, pairs: int) -> list[int]:
        """The lengths that hold ``pairs`` pairs and their queries."""
        return [length for length in self.mqar_lengths if length >= 4 * pairs]


def mqar_vocabulary(tokenizer: PreTrainedTokenizerBase, kind: str, size: int) -> list[int]:
    """MQAR's token ids: word tokens (``words``) or the first non-special ids (``ids``)."""
    if kind == "words":
        return tokenizer_vocabulary(tokenizer, size)
    if kind == "ids":
        special = set(tokenizer.all_special_ids)
        return [i for i in range(len(tokenizer)) if i not in special][:size]
    raise UserError(f"unknown MQAR vocabulary {kind!r}. Fix: use 'words' or 'ids'")


def recall_curves(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, settings: RecallSettings) -> dict:
    """MQAR accuracy per pair count and sequence length, and passkey accuracy per context length
    (plain, and JRT when asked): ``{"mqar": {"plain": [{"length": L, "pairs": P, "accuracy": a}, ...],
    ...}, "passkey": {"plain": [{"length": L, "accuracy": a}, ...], ...}}``."""
    # Twice the pairs per half, so keys and values differ between examples.
    vocabulary = mqar_vocabulary(tokenizer, settings.mqar_vocabulary, 4 * max(settings.mqar_kv_pairs))
    prompts = ["plain", "jrt"] if settings.jrt else ["plain"]
    curves: dict[str, dict[str, list[dict]]] = {"mqar": {}, "passkey": {}}
    for prompt in prompts:
        jrt = prompt == "jrt"
        curves["mqar"][prompt] = [
            {"length": length, "pairs": pairs, "accuracy": recall_accuracy(model, mqar_examples(
                vocabulary, num_kv_pairs=pairs, seq_len=length,
                num_examples=settings.mqar_examples, seed=settings.seed, jrt=jrt,
            ), jrt_prefix=settings.jrt_prefix)}
            for pairs in settings.mqar_kv_pairs for length in settings.mqar_lengths_for(pairs)
        ]
        curves["passkey"][prompt] = [
            {"length": length, "accuracy": recall_accuracy(model, passkey_examples(
                tokenizer, context_length=length, depths=settings.passkey_depths, seed=settings.seed, jrt=jrt,
                keys_per_depth=settings.passkey_keys, haystack=settings.passkey_haystack,
            ), jrt_prefix=settings.jrt_prefix)}
            for length in settings.passkey_lengths
        ]
    return curves
