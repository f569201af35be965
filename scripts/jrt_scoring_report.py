"""Score a JRT export causally and with a JRT prefix: perplexity and MQAR, teacher alongside.

    python scripts/jrt_scoring_report.py runs/smollm2-jrt/export --prefix 128 --out results/jrt_scoring

For each model it reports WikiText-2 perplexity on 512-token chunks scored causally (no token sees a
later one) and, with ``--prefix M``, scored the way a stored ``jrt_prefix_length: M`` made every
plain forward call score them before (the first M tokens read non-causally, so their predictions saw
their targets); and MQAR accuracy, causal and with each test's context as the JRT prefix (the
explicit context/continuation split: no answer token lies in the context). The export's own
modeling code is used (``trust_remote_code``), so exports written by older versions score as they did.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.corpora import read_corpus
from linearize.eval import chunk_tokens, perplexity
from linearize.eval.recall import mqar_examples, mqar_vocabulary, recall_accuracy


class WithPrefix(torch.nn.Module):
    """``model`` called with a fixed ``jrt_prefix_length`` (0 = causal) unless the caller gives one."""

    def __init__(self, model: torch.nn.Module, prefix: int):
        super().__init__()
        self.model, self.prefix, self.config = model, prefix, model.config

    def forward(self, input_ids, **kwargs):
        kwargs.setdefault("jrt_prefix_length", self.prefix)
        return self.model(input_ids, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--prefix", type=int, default=128, help="the leaky prefix to compare with (0 to skip)")
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--mqar-lengths", default="64,256,512")
    parser.add_argument("--mqar-pairs", type=int, default=8)
    parser.add_argument("--mqar-examples", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("results/jrt_scoring"))
    args = parser.parse_args()

    teacher, tokenizer = linearize.load(args.teacher)
    student = AutoModelForCausalLM.from_pretrained(args.export, trust_remote_code=True, dtype=torch.float32).eval()
    chunks = chunk_tokens(tokenizer, read_corpus("wikitext2"), 512, args.chunks)
    vocabulary = mqar_vocabulary(tokenizer, "words", 4 * args.mqar_pairs)
    lengths = [int(x) for x in args.mqar_lengths.split(",")]

    def mqar(model, jrt_prefix: bool) -> dict[int, float]:
        return {length: recall_accuracy(model, mqar_examples(
            vocabulary, num_kv_pairs=args.mqar_pairs, seq_len=length, num_examples=args.mqar_examples, seed=0,
        ), jrt_prefix=jrt_prefix) for length in lengths}

    causal = WithPrefix(student, 0)
    report = {
        "export": str(args.export), "chunks": args.chunks, "mqar_pairs": args.mqar_pairs,
        "teacher": {"perplexity": perplexity(teacher, chunks, desc="teacher"), "mqar": mqar(teacher, False)},
        "student_causal": {"perplexity": perplexity(causal, chunks, desc="student, causal"),
                           "mqar": mqar(causal, False)},
        "student_context_prefix": {"mqar": mqar(student, True)},
    }
    if args.prefix:
        leaky = WithPrefix(student, args.prefix)
        report[f"student_prefix_{args.prefix}"] = {
            "perplexity": perplexity(leaky, chunks, desc=f"student, prefix {args.prefix}"), "mqar": mqar(leaky, False),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.export.parent.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
