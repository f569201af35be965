"""Evaluation: perplexity on shipped corpora (more to come: lm-eval, recall, speed)."""

from linearize.eval.perplexity import chunk_tokens, perplexity

__all__ = ["chunk_tokens", "perplexity"]
