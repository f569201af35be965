"""The ``linearize`` command line.

    linearize convert MODEL --attention NAME --out DIR [options]   convert, export, check, generate
    linearize bench kernels --out DIR                             kernel speed vs softmax attention

A user mistake (bad reference, bad option, existing output) prints one ``error:`` line naming the
problem and the fix, and exits with status 2; it never prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from linearize.convert import ATTENTION_PRESETS

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake in the command line or its inputs; printed as one line, exit status 2."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,5,11, got {text!r}") from None


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a model to linear attention and export it",
        description="Convert MODEL to linear attention, export it as a Hugging Face folder, reload the "
        "export and check its logits, and print a short generation from teacher and student.",
    )
    parser.add_argument("model", help="smollm2-135m, a .gguf file, a saved model folder, or a hub id")
    parser.add_argument("--attention", default="window_hedgehog", choices=sorted(ATTENTION_PRESETS))
    parser.add_argument("--out", required=True, type=Path, help="export folder (must not exist unless --overwrite)")
    parser.add_argument("--softmax-layers", type=_int_list, default=None, help="layers kept as softmax, e.g. 0,5")
    parser.add_argument("--window", type=int, default=None, help="softmax window (counts the query itself)")
    parser.add_argument("--sink-tokens", type=int, default=None, help="first tokens kept in every softmax part")
    parser.add_argument("--init-gamma", type=float, default=None, help="initial linear share, in (0, 1)")
    parser.add_argument("--feature-dim", type=int, default=None, help="feature map width (hedgehog e, based d_f)")
    parser.add_argument("--seed", type=int, default=0, help="seed for new parameters")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    parser.add_argument(
        "--perplexity-chunks", type=int, default=8,
        help="512-token WikiText-2 chunks for teacher vs student perplexity (0 to skip)",
    )
    parser.add_argument("--prompt", default="What is the capital of France?", help="prompt for the generation check")
    parser.add_argument("--max-new-tokens", type=int, default=24)


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks")
    kinds = parser.add_subparsers(dest="kind", required=True)
    kernels = kinds.add_parser("kernels", help="attention kernels vs SDPA (and fla where installed)")
    kernels.add_argument("--out", type=Path, default=Path("results/bench_kernels"))
    kernels.add_argument("--lengths", type=_int_list, default=None, help="sequence lengths, e.g. 1024,2048")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linearize", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert(subparsers)
    _add_bench(subparsers)
    return parser


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_convert(args: argparse.Namespace) -> int:
    # Imported here so `linearize --help` stays fast.
    from transformers import AutoModelForCausalLM

    import linearize
    from linearize.convert import attention_options
    from linearize.corpora import read_corpus
    from linearize.eval import chunk_tokens, perplexity

    if args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} already exists. Fix: choose another --out, or pass --overwrite")
    options = {
        "softmax_layers": args.softmax_layers, "window": args.window, "sink_tokens": args.sink_tokens,
        "init_gamma": args.init_gamma, "feature_dim": args.feature_dim,
    }
    try:  # validate every option before loading anything
        attention_options(args.attention, **options)
    except ValueError as error:
        raise UserError(str(error)) from None

    started = time.perf_counter()
    teacher, tokenizer = linearize.load(args.model)
    print(f"loaded {args.model}: {type(teacher).__name__}, {teacher.num_parameters() / 1e6:.1f}M parameters")
    chunks = None
    if args.perplexity_chunks > 0:
        chunks = chunk_tokens(tokenizer, read_corpus("wikitext2"), 512, args.perplexity_chunks)
        teacher_ppl = perplexity(teacher, chunks, desc="teacher perplexity")
    teacher_answer = _generate(teacher, tokenizer, args.prompt, args.max_new_tokens)

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
    student_answer = _generate(student, tokenizer, args.prompt, args.max_new_tokens)
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


def run_bench(args: argparse.Namespace) -> int:
    from linearize.kernels.benchmark import run_kernel_benchmark

    run_kernel_benchmark(args.out, lengths=args.lengths)
    return 0


COMMANDS = {"convert": run_convert, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from linearize.convert import UnsupportedModelError
    from linearize.export import ExportError
    from linearize.models import ModelReferenceError

    try:
        return COMMANDS[args.command](args)
    except (UserError, ModelReferenceError, UnsupportedModelError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
