"""MQAR and passkey: deterministic by seed, a perfect copier scores 1.0, a wrong one does not."""

from __future__ import annotations

import pytest
from eval_testing import InductionOracle, tiny_tokenizer
from model_testing import VOCAB, tiny_llama

from linearize.errors import UserError
from linearize.eval.recall import mqar_examples, passkey_examples, recall_accuracy, tokenizer_vocabulary

VOCABULARY = list(range(4, VOCAB))  # token ids, skipping the tiny tokenizer's special tokens


def mqar(**overrides):
    arguments = {"num_kv_pairs": 6, "seq_len": 48, "num_examples": 5, "seed": 3, **overrides}
    return mqar_examples(VOCABULARY, **arguments)


def test_mqar_is_deterministic_by_seed():
    assert mqar() == mqar()
    assert mqar() != mqar(seed=4)


def test_mqar_layout():
    for example in mqar():
        ids = example.input_ids
        assert len(ids) == 48 and len(example.answers) == 6
        keys = ids[0:12:2]
        assert len(set(keys)) == 6, "keys must be distinct"
        pairs = dict(zip(ids[0:12:2], ids[1:12:2]))
        for (position,) in example.answers:
            assert pairs[ids[position]] == ids[position + 1], "each answer is the value of the queried key"
            assert ids.count(ids[position]) == 2, "a key occurs only in its pair and its query"


def test_jrt_prompt_repeats_the_context():
    plain, jrt = mqar()[0], mqar(jrt=True)[0]
    assert jrt.input_ids[:12] == jrt.input_ids[12:24] == plain.input_ids[:12]
    assert len(jrt.input_ids) == len(plain.input_ids) + 12
    assert jrt.input_ids[24:] == plain.input_ids[12:]


@pytest.mark.parametrize("jrt", [False, True], ids=["plain", "jrt"])
def test_perfect_copier_scores_one_on_mqar(jrt):
    examples = mqar(jrt=jrt)
    assert recall_accuracy(InductionOracle(VOCAB), examples, batch_size=2) == 1.0
    # The same copier reading the wrong position must fail, so the score is not a constant.
    assert recall_accuracy(InductionOracle(VOCAB, offset=2), examples) < 0.2


def test_untrained_model_does_not_recall():
    score = recall_accuracy(tiny_llama(), mqar(num_examples=8))
    assert 0.0 <= score < 0.5


@pytest.mark.parametrize("jrt", [False, True], ids=["plain", "jrt"])
def test_passkey_examples_and_perfect_copier(jrt):
    tokenizer = tiny_tokenizer()
    examples = passkey_examples(tokenizer, context_length=120, depths=[0.0, 0.5, 1.0], seed=1, jrt=jrt)
    assert examples == passkey_examples(tokenizer, context_length=120, depths=[0.0, 0.5, 1.0], seed=1, jrt=jrt)
    question = len(tokenizer.encode(" What is the pass key? The pass key is", add_special_tokens=False))
    for example in examples:
        (answer,) = example.answers
        assert len(answer) == 5, "a 5-digit key is 5 single-digit tokens"
        assert len(example.input_ids) == 120 * (2 if jrt else 1) + question + 5
        assert tokenizer.unk_token_id not in example.input_ids
    assert recall_accuracy(InductionOracle(VOCAB), examples) == 1.0
    assert recall_accuracy(InductionOracle(VOCAB, offset=2), examples) == 0.0


def test_passkey_wikitext_haystack_hides_the_key_in_real_text():
    tokenizer = tiny_tokenizer()
    examples = passkey_examples(tokenizer, context_length=200, depths=[0.0, 0.5, 1.0], seed=3, haystack="wikitext")
    assert examples == passkey_examples(tokenizer, context_length=200, depths=[0.0, 0.5, 1.0], seed=3,
                                        haystack="wikitext")
    filler = passkey_examples(tokenizer, context_length=200, depths=[0.5], seed=3)[0]
    question = len(tokenizer.encode(" What is the pass key? The pass key is", add_special_tokens=False))
    for example in examples:
        assert len(example.input_ids) == 200 + question + 5
    # Each example takes its own span of text, and none of it is the filler.
    assert len({tuple(example.input_ids[-question - 60 : -question - 5]) for example in examples}) == 3
    assert examples[1].input_ids[:40] != filler.input_ids[:40]
    assert recall_accuracy(InductionOracle(VOCAB), examples) == 1.0
    assert recall_accuracy(InductionOracle(VOCAB, offset=2), examples) == 0.0
    with pytest.raises(UserError, match="unknown passkey haystack 'books'"):
        passkey_examples(tokenizer, context_length=200, depths=[0.5], haystack="books")
    with pytest.raises(UserError, match="longer than the wikitext haystack"):
        passkey_examples(tokenizer, context_length=10**7, depths=[0.5], haystack="wikitext")


def test_tokenizer_vocabulary_picks_words():
    tokenizer = tiny_tokenizer()
    ids = tokenizer_vocabulary(tokenizer, 10)
    assert len(ids) == 10 and not set(ids) & set(tokenizer.all_special_ids)
    assert all(tokenizer.decode([i]).isalpha() and len(tokenizer.decode([i])) >= 3 for i in ids)
    with pytest.raises(UserError, match="word tokens, fewer than"):
        tokenizer_vocabulary(tokenizer, 1000)


@pytest.mark.parametrize(
    "overrides,message",
    [({"seq_len": 20}, "cannot hold 6 pairs"), ({"num_kv_pairs": 60, "seq_len": 400}, "vocabulary of at least 120")],
    ids=["too-short", "vocabulary-too-small"],
)
def test_impossible_mqar_settings_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        mqar(**overrides)


def test_passkey_context_too_short_is_a_user_error():
    with pytest.raises(UserError, match="shorter than the instructions"):
        passkey_examples(tiny_tokenizer(), context_length=10, depths=[0.5])


def test_recall_accuracy_batches_equal_lengths_only():
    # Mixed lengths (plain and JRT) in one call: batching must not pad or mix them up.
    examples = mqar() + mqar(jrt=True)
    assert recall_accuracy(InductionOracle(VOCAB), examples, batch_size=4) == 1.0


class PrefixSpy(InductionOracle):
    """A JRT-like model for the scorer: records the ``jrt_prefix_length`` it is given."""

    def __init__(self, jrt: bool):
        super().__init__(VOCAB)
        self.config = type("Config", (), {"linear_attention": {"jrt": jrt}})()
        self.prefixes: list = []

    def forward(self, input_ids, **kwargs):
        self.prefixes.append(kwargs.get("jrt_prefix_length"))
        return super().forward(input_ids, kwargs.get("logits_to_keep", 0))


@pytest.mark.parametrize("jrt_model", [True, False], ids=["jrt-model", "other-model"])
def test_jrt_prefix_is_each_context_and_only_on_request(jrt_model):
    vocabulary = list(range(3, VOCAB))
    examples = mqar_examples(vocabulary, num_kv_pairs=4, seq_len=40, num_examples=3)
    examples += passkey_examples(tiny_tokenizer(), context_length=60, depths=[0.0, 1.0])
    for example in examples:  # every answer token (at p + 1) lies after the context
        assert all(p + 1 >= example.context_length for answer in example.answers for p in answer)
    spy = PrefixSpy(jrt_model)
    recall_accuracy(spy, examples)
    assert spy.prefixes and all(p is None for p in spy.prefixes), "scoring must be causal by default"
    spy.prefixes.clear()
    assert recall_accuracy(spy, examples, jrt_prefix=True) == 1.0
    if not jrt_model:
        assert all(p is None for p in spy.prefixes), "a model without a JRT encoder gets no prefix"
        return
    assert spy.prefixes == list(dict.fromkeys(example.context_length for example in examples))  # one batch each
