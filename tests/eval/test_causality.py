"""Causality: changing token t+1 leaves every logit at positions <= t unchanged.

Checked for every variant, and for the export of every shipped recipe's attention settings, on the
three ways a model is scored: a plain forward, lm-eval's model call, and the perplexity path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_testing import tiny_tokenizer
from model_testing import ALL_ATTENTIONS, VOCAB, converted, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM

import linearize
from linearize.eval.perplexity import next_token_log_likelihoods
from linearize.recipe import load_recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
LENGTH = 150  # longer than every shipped recipe's window + sinks, and than the JRT training prefix (128)
CHANGED = [0, 40, 127, 128, 148]  # positions t + 1 whose token is changed


def assert_causal(score, length: int = LENGTH) -> None:
    """``score(ids)`` [1, T, ...] must not change at positions <= t when token t + 1 changes."""
    torch.manual_seed(9)
    ids = torch.randint(3, VOCAB, (1, length))
    with torch.no_grad():
        base = score(ids)
        for changed in CHANGED:
            other = ids.clone()
            other[0, changed] = (other[0, changed] + 1 - 3) % (VOCAB - 3) + 3
            scores = score(other)
            difference = (scores[:, :changed] - base[:, :changed]).abs().max().item() if changed else 0.0
            assert difference == 0.0, f"changing token {changed} moved earlier scores by {difference:.2e}"
            assert not torch.equal(scores[:, changed:], base[:, changed:]), "the change had no effect at all"


@pytest.mark.parametrize("attention", ALL_ATTENTIONS)
def test_every_variant_is_causal(family, attention):
    model = converted(family, attention, softmax_layers=[1])
    assert_causal(lambda ids: model(ids).logits)


def recipe_export(recipe_path: Path, folder: Path):
    """A tiny teacher of the recipe's family converted with the recipe's attention settings, exported
    and reloaded as a user would load it (the recipe's training-only JRT prefix included)."""
    recipe = load_recipe(recipe_path)
    teacher = tiny_gpt2() if "gpt2" in recipe.model.ref else tiny_llama()
    student = linearize.convert(teacher, attention=recipe.attention.name, **recipe.attention.options())
    linearize.export(student, tiny_tokenizer(), folder)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_export_scores_causally(recipe_path, tmp_path):
    from lm_eval.models.huggingface import HFLM

    model = recipe_export(recipe_path, tmp_path / "export")
    assert_causal(lambda ids: model(ids).logits)
    lm = HFLM(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=1)
    assert_causal(lambda ids: lm._model_call(ids))  # what lm-eval's loglikelihood scores
    # Perplexity: index t holds log p(token t | tokens < t): it may change with token t, never with t + 1.
    assert_causal(lambda ids: torch.nn.functional.pad(next_token_log_likelihoods(model, ids), (1, 0)))
