"""``linearize convert``: convert a model, export it, reload the export and check it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from linearize.cli.arguments import int_list
from linearize.convert.presets import ATTENTION_PRESETS, attention_options
from linearize.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a model to linear attention and export it",
        description="Convert MODEL to linear attention, export it as a Hugging Face folder, reload the "
        "export and check its logits, and print a short generation from teacher and student.",
    )
    parser.add_argument("model", help="smollm2-135m, a .gguf file, a saved model folder, or a hub id")
    parser.add_argument("--attention", default="window_hedgehog", choices=sorted(ATTENTION_PRESETS))
    parser.add_argument("--out", required=True, type=Path, help="export folder (must not exist unless --overwrite)")
    parser.add_argument("--softmax-layers", type=int_list, default=None, help="layers kept as softmax, e.g. 0,5")
    parser.add_argument("--window", type=int, default=None, help="softmax window (counts the query itself)")
    parser.add_argument("--sink-tokens", type=int, default=None, help="first tokens kept in every softmax part")
    parser.add_argument("--init-gamma", type=float, default=None, help="initial linear share, in (0, 1)")
    parser.add_argument("--feature-dim", type=int, default=None, help="feature map width (hedgehog e, based d_f)")
    parser.add_argument("--global-cache", type=int, default=None,
                        help="keys per KV head kept after they leave the window, the worst recalled (LoLA)")
    parser.add_argument("--global-cache-block", type=int, default=None, help="tokens between two cache choices")
    parser.add_argument("--seed", type=int, default=0, help="seed for new parameters")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    parser.add_argument(
        "--perplexity-chunks", type=int, default=8,
        help="512-token WikiText-2 chunks for teacher vs student perplexity (0 to skip)",
    )
    parser.add_argument("--prompt", default="What is the capital of France?", help="prompt for the generation check")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so `linearize --help` stays fast.
    from transformers import AutoModelForCausalLM

    import linearize
    from linearize.corpora import read_corpus
    from linearize.eval import chunk_tokens, perplexity
    from linearize.generation import generate_answer

    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists. Fix: choose another --out, or pass --overwrite")
    options = {
        "softmax_layers": args.softmax_layers, "window": args.window, "sink_tokens": args.sink_tokens,
        "init_gamma": args.init_gamma, "feature_dim": args.feature_dim, "global_cache": args.global_cache,
        "global_cache_block": args.global_cache_block,
    }
    attention_options(args.attention, **options)  # validate every option before loading anything

    started = time.perf_counter()
    teacher, tokenizer = linearize.load(args.model)
    print(f"loaded {args.model}: {type(teacher).__name__}, {teacher.num_parameters() / 1e6:.1f}M parameters")
    chunks = None
    if args.perplexity_chunks > 0:
        chunks = chunk_tokens(tokenizer, read_corpus("wikitext2"), 512, args.perplexity_chunks)
        teacher_ppl = perplexity(teacher, chunks, desc="teacher perplexity")
    teacher_answer = generate_answer(teacher, tokenizer, args.prompt, args.max_new_tokens)

    student = linearize.convert(teacher, attention=args.attention, seed=args.seed, **options)
    new_parameters = sum(p.numel() for n, p in student.named_parameters() if ".core." in n or "_enc" in n)
    print(f"converted to {args.attention}: {new_parameters / 1e6:.2f}M new parameters")
    metrics = {"attention": args.attention}
    if chunks is not None:
        student_ppl = perplexity(student, chunks, desc="student perplexity")
        metrics.update(
            wikitext2_chunks=len(chunks), teacher_perplexity=round(teacher_ppl, 3),
            student_perplexity=round(student_ppl, 3), ratio=round(student_ppl / teacher_ppl, 3),
        )
    student_answer = generate_answer(student, tokenizer, args.prompt, args.max_new_tokens)
    linearize.export(student, tokenizer, args.out, overwrite=args.overwrite, metrics=metrics)

    reloaded = AutoModelForCausalLM.from_pretrained(args.out, trust_remote_code=True, dtype=torch.float32).eval()
    probe = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        difference = (student(probe).logits - reloaded(probe).logits).abs().max().item()

    print(f"\nexported to {args.out} in {time.perf_counter() - started:.0f}s")
    if chunks is not None:
        print(
            f"WikiText-2 perplexity ({len(chunks)} x 512 tokens): teacher {teacher_ppl:.2f}, "
            f"student {student_ppl:.2f} ({student_ppl / teacher_ppl:.2f}x, before any training)"
        )
    print(f"prompt: {args.prompt}\n  teacher: {teacher_answer}\n  student: {student_answer}")
    print(f"reload parity: max |logits(export) - logits(in memory)| = {difference:.2e}")
    if difference > 1e-5:
        print("error: the reloaded export does not reproduce the in-memory model", file=sys.stderr)
        return 1
    return 0
