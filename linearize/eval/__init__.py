"""Evaluation: lm-eval tasks (shipped offline), perplexity, recall, decode speed/memory, reports.

    linearize eval EXPORT --teacher smollm2-135m --tasks linearize --limit 200 --recall --out runs/eval
    linearize bench decode EXPORT --teacher smollm2-135m --lengths 512,1024,2048,4096 --out runs/eval
    lm_eval --model hf --model_args pretrained=EXPORT,trust_remote_code=True \\
        --include_path "$(python -m linearize.eval.tasks)" --tasks linearize

Modules: ``tasks/`` (the offline task files and vendored data), ``harness`` (lm-eval on an
in-memory model), ``perplexity`` (fixed-chunk perplexity), ``recall`` (MQAR, passkey, JRT-Prompt),
``decode_bench`` (prefill/decode/memory), ``tables``/``plots``/``report`` (report.md, model card).
The ``eval`` and ``bench decode`` subcommands live in ``linearize.cli.eval``.
"""

from linearize.eval.perplexity import chunk_tokens, perplexity
from linearize.eval.report import update_model_card, write_report
from linearize.eval.tasks import include_path

__all__ = ["chunk_tokens", "include_path", "perplexity", "update_model_card", "write_report"]
