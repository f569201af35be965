"""``linearize eval`` (lm-eval tasks, perplexity, recall; teacher vs student) and ``linearize bench decode``."""

from __future__ import annotations

import argparse
import gc
import json
from dataclasses import asdict
from pathlib import Path

from linearize.cli.arguments import float_list, int_list, limit_spec
from linearize.errors import UserError
from linearize.eval.decode_bench import DEFAULT_LENGTHS
from linearize.eval.frontier import STATE_CONTEXT
from linearize.eval.recall import PASSKEY_HAYSTACKS, RecallSettings
from linearize.eval.sampling import SamplingSettings
from linearize.eval.tasks import GROUP

DEFAULT_OUT = Path("runs/eval")


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, as a user gets it)")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="lm-eval tasks, perplexity and recall, student vs teacher",
        description="Evaluate MODEL (an export, or any model reference) and optionally a teacher on the same "
        "lm-eval tasks with the same settings; write eval.json and report.md to --out.",
    )
    parser.add_argument("model", nargs="?", help="the student: an export folder, or any model reference")
    parser.add_argument("--teacher", help="reference model: smollm2-135m, a .gguf file, a folder or a hub id")
    parser.add_argument("--tasks", default=GROUP, help=f"comma-separated lm-eval tasks (default: {GROUP}, the shipped "
                        "offline tasks); none: only perplexity and recall")
    parser.add_argument("--limit", type=limit_spec, default=(None, {}),
                        help="examples per task, with per-task overrides: 200,linearize_wikitext=4 (default: all)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own, 0)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=None, help="lm-eval window (default: the model's maximum)")
    parser.add_argument("--perplexity-chunks", type=int, default=0,
                        help="WikiText-2 chunks per length for chunked perplexity (0: skip)")
    parser.add_argument("--perplexity-lengths", type=int_list, default=[512],
                        help="chunk lengths, each scored on its own, e.g. 512,2048 (default 512)")
    parser.add_argument("--perplexity-start", type=float, default=0.0,
                        help="where in the WikiText-2 test text the chunks start, as a fraction (0.5: the second "
                        "half; default 0)")
    parser.add_argument("--recall", action="store_true", help="also measure MQAR and passkey recall curves")
    parser.add_argument("--jrt", action="store_true", help="with --recall: also score with JRT-Prompt (context twice)")
    parser.add_argument(
        "--jrt-prefix", action="store_true",
        help="with --recall: a JRT-RNN student reads each test's context (everything before the first answer "
        "token) as its non-causal prefix, as generate() reads a prompt; default: causal scoring",
    )
    parser.add_argument("--mqar-lengths", type=int_list, default=RecallSettings.mqar_lengths)
    parser.add_argument("--mqar-kv-pairs", type=int_list, default=RecallSettings.mqar_kv_pairs,
                        help="key-value pair counts, one curve each, e.g. 8,16,64 (default 8)")
    parser.add_argument("--mqar-examples", type=int, default=RecallSettings.mqar_examples)
    parser.add_argument("--mqar-vocabulary", choices=["words", "ids"], default=RecallSettings.mqar_vocabulary,
                        help="MQAR tokens: the tokenizer's plain word tokens, or any non-special token ids")
    parser.add_argument("--passkey-lengths", type=int_list, default=RecallSettings.passkey_lengths)
    parser.add_argument("--passkey-depths", type=float_list, default=RecallSettings.passkey_depths)
    parser.add_argument("--passkey-keys", type=int, default=RecallSettings.passkey_keys,
                        help="passkeys per depth and length, each a different random key (default 1)")
    parser.add_argument("--passkey-haystack", choices=PASSKEY_HAYSTACKS, default=RecallSettings.passkey_haystack,
                        help="what the needle hides in: repeated filler sentences (default), or spans of "
                             "real text from WikiText-2's first half")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recall tests")
    parser.add_argument(
        "--configs", default="",
        help="with --recall: training-free student configurations, separated by ';', each also measured on the "
        "recall tests and put on the recall-state frontier, e.g. 'gamma=0;global_cache=64;window=128,"
        "global_cache=32;softmax_layers=3+17' (keys: window, sink_tokens, global_cache, global_cache_block, "
        "gamma, softmax_layers)",
    )
    parser.add_argument("--state-context", type=int, default=STATE_CONTEXT,
                        help=f"context at which the frontier sizes each decode state (default {STATE_CONTEXT})")
    _add_runtime_options(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"evaluation folder (default {DEFAULT_OUT})")
    parser.add_argument("--update-model-card", action="store_true", help="write the numbers into the export's README.md")
    parser.add_argument("--print-include-path", action="store_true",
                        help="print the folder of the shipped tasks (for lm_eval --include_path) and exit")
    parser.set_defaults(func=run)


def register_bench(bench_kinds) -> None:
    parser = bench_kinds.add_parser(
        "decode", help="prefill time, decode speed, memory and cache size vs context length",
        description="Measure MODEL and optionally a teacher in one run at each context length; write "
        "decode.json, decode.md, decode.png and report.md to --out.",
    )
    parser.add_argument("model", help="the student: an export folder, or any model reference")
    parser.add_argument("--teacher", help="reference model measured in the same run")
    parser.add_argument("--lengths", type=int_list, default=list(DEFAULT_LENGTHS),
                        help=f"context lengths (default {','.join(map(str, DEFAULT_LENGTHS))})")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded after each prefill")
    parser.add_argument("--batch-sizes", type=int_list, default=[1],
                        help="decode batch sizes; those above 1 run at --batch-lengths (default 1)")
    parser.add_argument("--batch-lengths", type=int_list, default=None,
                        help="context lengths of the batched cases (default: the shortest --lengths)")
    parser.add_argument("--fork-samples", type=int, default=0,
                        help="also time generate(num_return_sequences=N, do_sample=True) from one prompt (0: skip)")
    parser.add_argument("--fork-prompt", type=int, default=1024, help="prompt tokens of the fork case")
    parser.add_argument("--fork-tokens", type=int, default=32, help="new tokens per sample in the fork case")
    _add_runtime_options(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"evaluation folder (default {DEFAULT_OUT})")
    parser.set_defaults(func=run_bench)


def register_bench_sampling(bench_kinds) -> None:
    parser = bench_kinds.add_parser(
        "sampling", help="repeated sampling: coverage@k and majority vote@k against seconds, student vs teacher",
        description="Sample N completions per problem of verifiable tasks (GSM8K, synthetic arithmetic) with MODEL "
        "and optionally a teacher, alternating problem by problem; write sampling.json, sampling.md, "
        "coverage_k.png, coverage_seconds.png and report.md to --out. Finished problems are kept in "
        "sampling_samples.jsonl there: an interrupted run resumes.",
    )
    parser.add_argument("model", help="the student: an export folder, or any model reference")
    parser.add_argument("--teacher", help="reference model sampled in the same run")
    parser.add_argument("--tasks", default="gsm8k,arithmetic", help="comma-separated: gsm8k, arithmetic")
    parser.add_argument("--samples", type=limit_spec, default=(SamplingSettings.default_samples, {}),
                        help="samples per problem, with per-task overrides: 16,arithmetic=64 (default 16); "
                        "coverage is reported for k = 1, 2, 4, ... up to it")
    parser.add_argument("--limit", type=limit_spec, default=(None, {}),
                        help="problems per task, with per-task overrides: 20,arithmetic=100 "
                        "(default: all 1319 of GSM8K, 100 sums)")
    parser.add_argument("--temperature", type=float, default=SamplingSettings.temperature)
    parser.add_argument("--top-p", type=float, default=SamplingSettings.top_p)
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens per completion (default: each task's own, gsm8k 192, arithmetic 8)")
    parser.add_argument("--batch-size", type=int, default=SamplingSettings.batch_size,
                        help="samples per generate() call (num_return_sequences)")
    parser.add_argument("--seed", type=int, default=SamplingSettings.seed)
    _add_runtime_options(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"evaluation folder (default {DEFAULT_OUT})")
    parser.add_argument("--update-model-card", action="store_true", help="write the summary into the export's README.md")
    parser.set_defaults(func=run_bench_sampling)


def _roles(args: argparse.Namespace) -> dict[str, str]:
    """Role -> reference, teacher first; every reference is resolved before any model loads."""
    import linearize

    if not args.model:
        raise UserError("no model given. Fix: linearize eval EXPORT_DIR [--teacher REF] (or --print-include-path)")
    roles = {"teacher": args.teacher, "student": args.model} if args.teacher else {"student": args.model}
    for reference in roles.values():
        linearize.resolve(reference)
    return roles


def _runtime(args: argparse.Namespace):
    """Apply --threads and return the torch device: --device, or cuda when available, else cpu."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}. Fix: pass --device cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA device is available. Fix: pass --device cpu")
    return device


def _load(reference: str, device):
    """``linearize.load`` (float32, eval mode), then moved to ``device``."""
    import linearize

    model, tokenizer = linearize.load(reference)
    return model.to(device), tokenizer


def run(args: argparse.Namespace) -> int:
    if args.print_include_path:
        from linearize.eval.tasks import include_path

        print(include_path())
        return 0
    from linearize.corpora import read_corpus
    from linearize.eval import harness, report
    from linearize.eval.frontier import frontier_point
    from linearize.eval.perplexity import chunk_tokens, perplexity
    from linearize.eval.recall import recall_curves

    roles = _roles(args)
    device = _runtime(args)
    manager = harness.task_manager()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = [] if names == ["none"] else harness.check_task_names(names, manager)
    limit, task_limits = args.limit
    stray = sorted(set(task_limits) - set(tasks))
    if stray:
        raise UserError(f"--limit names task(s) not evaluated: {', '.join(stray)}. Fix: use tasks from --tasks")
    settings = harness.TaskSettings(
        tasks=tasks, limit=limit, task_limits=task_limits, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, max_length=args.max_length,
    )
    recall_settings = RecallSettings(
        mqar_lengths=tuple(args.mqar_lengths), mqar_kv_pairs=tuple(args.mqar_kv_pairs),
        mqar_examples=args.mqar_examples, mqar_vocabulary=args.mqar_vocabulary,
        passkey_lengths=tuple(args.passkey_lengths), passkey_depths=tuple(args.passkey_depths),
        passkey_keys=args.passkey_keys, passkey_haystack=args.passkey_haystack, jrt=args.jrt, jrt_prefix=args.jrt_prefix, seed=args.seed,
    )
    configs = _student_configs(args)
    if args.recall:
        recall_settings.validate()
    results: dict = {"models": roles, "settings": settings.to_dict(), "tasks": {}}
    if not 0.0 <= args.perplexity_start < 1.0 or min(args.perplexity_lengths) < 2:
        raise UserError("--perplexity-start must be in [0, 1) and --perplexity-lengths >= 2 tokens each. "
                        "Fix: e.g. --perplexity-start 0.5 --perplexity-lengths 512,2048")
    if args.perplexity_chunks > 0:
        results["perplexity"] = [{"chunks": args.perplexity_chunks, "chunk_length": length,
                                  "start": args.perplexity_start} for length in args.perplexity_lengths]
    if args.recall:
        results["recall"] = {"settings": asdict(recall_settings), "curves": {}, "frontier": []}
    for role, reference in roles.items():  # one model in memory at a time
        model, tokenizer = _load(reference, device)
        print(f"{role}: {reference} ({type(model).__name__} on {model.device})")
        if tasks:
            lm = harness.wrap_model(model, tokenizer, args.batch_size, args.max_length)
            results["tasks"][role] = {task: asdict(r) for task, r in harness.evaluate(lm, settings, manager).items()}
            del lm
        if args.perplexity_chunks > 0:
            text = read_corpus("wikitext2")
            text = text[int(len(text) * args.perplexity_start):]
            for entry in results["perplexity"]:
                chunks = chunk_tokens(tokenizer, text, entry["chunk_length"], args.perplexity_chunks)
                entry[role] = perplexity(model, chunks, batch_size=max(1, 2048 // entry["chunk_length"]),
                                         desc=f"{role} perplexity ({entry['chunk_length']} tokens)")
        if args.recall:
            curves = recall_curves(model, tokenizer, recall_settings)
            results["recall"]["curves"][role] = curves
            label = role if role == "teacher" else "student (as exported)"
            results["recall"]["frontier"].append(frontier_point(label, model, curves, context=args.state_context))
            if role == "student":
                for config in configs:
                    _recall_of_config(model, tokenizer, config, recall_settings, args.state_context, results)
        del model
        gc.collect()

    report.write_json(args.out / report.EVAL_FILE, results)
    path = report.write_report(args.out)
    print("\n\n".join(report.result_sections(results, None)))
    print(f"\nwrote {path}")
    if args.update_model_card:
        card = report.update_model_card(args.model, results, report.read_json(args.out / report.DECODE_FILE),
                                        report.read_json(args.out / report.SAMPLING_FILE))
        print(f"updated {card}")
    return 0


def _student_configs(args: argparse.Namespace) -> list[dict]:
    """--configs parsed and checked before any model loads."""
    from linearize.convert.inference_options import parse_config

    configs = [parse_config(text) for text in args.configs.split(";") if text.strip()]
    if configs and not args.recall:
        raise UserError("--configs adds points to the recall-state frontier, so it needs --recall")
    if args.state_context < 1:
        raise UserError(f"--state-context must be >= 1, got {args.state_context}")
    return configs


def _recall_of_config(model, tokenizer, config: dict, settings, context: int, results: dict) -> None:
    """Recall curves and the frontier point of the student with ``config`` applied to a copy."""
    import copy

    from linearize.convert.inference_options import apply_inference_options, config_label
    from linearize.eval.frontier import frontier_point
    from linearize.eval.recall import recall_curves

    label = f"student ({config_label(config)})"
    print(f"{label}: recall")
    variant = apply_inference_options(copy.deepcopy(model), config)
    curves = recall_curves(variant, tokenizer, settings)
    results["recall"]["frontier"].append(frontier_point(label, variant, curves, config, context))
    del variant
    gc.collect()


def run_bench(args: argparse.Namespace) -> int:
    from linearize.eval import report, tables
    from linearize.eval.decode_bench import run_decode_benchmark

    roles = _roles(args)
    device = _runtime(args)
    models = {role: _load(reference, device) for role, reference in roles.items()}
    decode = run_decode_benchmark(
        models, args.lengths, args.decode_tokens, batch_sizes=args.batch_sizes, batch_lengths=args.batch_lengths,
        fork_samples=args.fork_samples, fork_prompt=args.fork_prompt, fork_tokens=args.fork_tokens,
    )
    decode["models"] = roles
    report.write_json(args.out / report.DECODE_FILE, decode)
    table = tables.decode_table(decode["measurements"])
    if decode["fork"]:
        table += "\n\n" + tables.fork_table(decode["fork"])
    report.write_text_atomic(args.out / "decode.md", f"# Decode benchmark\n\n{table}\n\nSettings: "
                             f"`{json.dumps(decode['settings'])}`\n")
    path = report.write_report(args.out)
    print(table)
    print(f"\nwrote {args.out / report.DECODE_FILE}, {args.out / 'decode.md'}, {args.out / 'decode.png'} and {path}")
    return 0


def run_bench_sampling(args: argparse.Namespace) -> int:
    from linearize.eval import report
    from linearize.eval.sampling import run_sampling

    (samples, task_samples), (limit, task_limits) = args.samples, args.limit
    settings = SamplingSettings(
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()), default_samples=samples,
        samples=task_samples, default_limit=limit, limits=task_limits, temperature=args.temperature,
        top_p=args.top_p, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
    )
    settings.validate()
    roles = _roles(args)
    device = _runtime(args)
    models = {role: _load(reference, device) for role, reference in roles.items()}
    sampling = run_sampling(models, roles, settings, args.out)
    print(report.write_sampling(args.out, sampling))
    print(f"\nwrote {args.out / report.SAMPLING_FILE}, sampling.md, coverage_k.png, coverage_seconds.png and "
          f"{report.REPORT_FILE} in {args.out}")
    if args.update_model_card:
        card = report.update_model_card(args.model, report.read_json(args.out / report.EVAL_FILE),
                                        report.read_json(args.out / report.DECODE_FILE), sampling)
        print(f"updated {card}")
    return 0
