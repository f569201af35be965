"""GPU check: the fused kernels, their speed, a 1B-shaped run end to end, and decode throughput.

    scripts/gpu_check.sh [OUT_DIR] [--smoke]        (OUT_DIR default: results/gpu_check/<date>)

Sections, each in its own process under ``timeout`` (a section that fails, crashes or hangs is
recorded as failed and the next one still runs; the exit status is 1 if any failed):

1. ``kernel_tests``: ``pytest tests/kernels`` on CUDA with compiled Triton (TRITON_INTERPRET=0),
   autotuning on, fp32 and bf16 cases; then one Llama-3-8B-shaped layer (GQA 32 query / 8 KV
   heads, head dim 128, Hedgehog features 256) converted to the recipe's attention: logits and
   new-parameter gradients on CUDA (Triton) against the CPU reference, fp32 and bf16 autocast.
2. ``kernel_bench``: ``linearize.kernels.benchmark`` at Llama-3-8B head sizes, T = 2k..16k, forward
   and forward + backward, against SDPA (FlashAttention) and flash-linear-attention where it imports.
3. ``pipeline``: a random Llama-3.2-1B-shaped teacher runs the 1B recipe for 20 attention-transfer
   and 20 LoRA steps in bf16 on the shipped C4 sample (``python -m linearize run`` with overrides);
   every logged loss must be finite; the export is reloaded where ``linearize`` cannot be imported
   and generates.
4. ``decode``: teacher vs its converted student, batch 64 x 4k context: decode tokens/s and peak
   CUDA memory (``linearize.eval.decode_bench``), ratios student / teacher.

``--smoke`` runs sections 3 and 4 on the CPU (CUDA hidden) at tiny shapes, so that CPU CI covers
this script's Python: tests/test_gpu_check.py runs it, and calls section 1's layer comparison and
section 2 directly (CPU CI runs the kernel tests themselves in Triton's interpreter).

Results: ``gpu_check.json`` (environment, and every section's status, seconds, error and numbers)
and ``gpu_check.md`` in OUT_DIR, rewritten after each section; ``sections/`` and ``logs/`` hold each
section's own JSON and output.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llama3_2_1b_gpu.yaml"
TIME_LIMIT_S = 480  # the whole check on one H200

# Llama-3.2-1B's config.json, less the token ids (the check's tokenizer is a byte-level one).
LLAMA_3_2_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
# One Llama-3-8B layer: 32 query heads and 8 KV heads of 128 (Hedgehog then has 2 * 128 features).
LLAMA_3_8B_LAYER = dict(
    vocab_size=512, hidden_size=4096, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
# Smoke sizes keep the families' features that matter here: GQA, llama3 RoPE, a vocab above the tokenizer's.
TINY_LLAMA = {**LLAMA_3_2_1B, **dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=4096)}
TINY_LAYER = {**LLAMA_3_8B_LAYER, **dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)}


@dataclass(frozen=True)
class Settings:
    device: str
    teacher: dict  # LlamaConfig fields of the random teacher (pipeline and decode)
    layer: dict  # LlamaConfig fields of the layer compared against the reference
    layer_length: int
    run_pytest: bool
    steps: int  # attention-transfer steps, then as many LoRA steps
    batch_size: int
    block_length: int
    documents: int  # c4_demo documents to train on
    bench_lengths: list[int]
    bench_shape: dict  # BenchShape fields replacing those of the benchmark's default shape for the device
    decode_batch: int
    decode_context: int
    decode_tokens: int
    timeouts: dict[str, int]  # seconds per section, in running order


GPU = Settings(
    device="cuda", teacher=LLAMA_3_2_1B, layer=LLAMA_3_8B_LAYER, layer_length=2048, run_pytest=True, steps=20,
    batch_size=4, block_length=512, documents=300, bench_lengths=[2048, 4096, 8192, 16384],
    bench_shape=dict(head_dim=128, feature_dim=256, value_dim=128), decode_batch=64, decode_context=4096,
    decode_tokens=32, timeouts={"kernel_tests": 160, "kernel_bench": 80, "pipeline": 160, "decode": 60},
)
SMOKE = Settings(
    device="cpu", teacher=TINY_LLAMA, layer=TINY_LAYER, layer_length=100, run_pytest=False, steps=2, batch_size=2,
    block_length=64, documents=10, bench_lengths=[64], bench_shape={}, decode_batch=2, decode_context=32,
    decode_tokens=4, timeouts={"pipeline": 240, "decode": 120},
)
assert sum(GPU.timeouts.values()) <= TIME_LIMIT_S - 20, "section timeouts must fit the check's time limit"


@dataclass
class Outcome:
    """What a section found: numbers for the JSON, a markdown part, and any failed checks."""

    results: dict
    markdown: str
    problems: list[str] = field(default_factory=list)


def run_streamed(command: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``command`` with its output copied line by line into this section's log (so a section
    killed by its timeout still shows how far it got); returns the exit status and the output."""
    print("$", " ".join(command), flush=True)
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return process.wait(), "".join(lines)


# --------------------------------------------------------------------------------------------------
# 1. kernel tests
# --------------------------------------------------------------------------------------------------

def junit_counts(path: Path) -> dict:
    """Passed / failed / skipped per precision (the ``fp32`` or ``bf16`` in a test's id) from pytest's junit XML."""
    counts: dict[str, dict[str, int]] = {}
    failed = []
    for case in ElementTree.parse(path).iter("testcase"):
        name = case.get("name", "")
        precision = next((p for p in ("bf16", "fp32") if p in name), "other")
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                   else "skipped" if case.find("skipped") is not None else "passed")
        bucket = counts.setdefault(precision, {"passed": 0, "failed": 0, "skipped": 0})
        bucket[outcome] += 1
        if outcome == "failed":
            failed.append(f"{case.get('classname')}::{name}")
    return {"counts": counts, "failed": failed}


def relative_error(reference, actual) -> float:
    """RMS(reference - actual) / RMS(reference), in fp32 on the CPU; NaN counts as infinitely wrong."""
    reference, actual = reference.detach().float().cpu(), actual.detach().float().cpu()
    error = ((reference - actual).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt().clamp_min(1e-12)).item()
    return math.inf if math.isnan(error) else error


def recipe_attention():
    """The attention section of the 1B recipe: the variant every section converts to."""
    from linearize.recipe import load_recipe

    return load_recipe(RECIPE).attention


# Bounds on a relative RMS error against the fp32 CPU reference: at least the tolerance (Triton's
# fp32 dots run in tf32, and bf16 rounds every activation; the kernel tests allow 1e-2 and 3e-2 per
# kernel), and at least the reference's own bf16 rounding error times the scale: 2 for bf16, and
# 2 / 8 for fp32, as tf32 keeps 10 mantissa bits to bf16's 7.
LAYER_TOLERANCE = {"fp32": 1e-2, "bf16": 5e-2}
ROUNDING_SCALE = {"fp32": 2 / 8, "bf16": 2.0}


def layer_against_reference(config_fields: dict, length: int, device: str) -> dict:
    """One converted layer on ``device`` (Triton on CUDA) against the same layer in fp32 on the CPU
    (the reference path), in fp32 and in bf16 as ``run.precision=bf16`` trains (frozen weights
    bf16, fp32 masters, autocast). For the logits and each new parameter's gradient: the relative
    error and its bound, from ``LAYER_TOLERANCE`` and the error of the reference itself under bf16
    autocast. That yardstick matters for the mix factor, whose gradient is a difference of two
    near-equal attention outputs that bf16 rounding alone blurs by tens of percent."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import linearize
    from linearize.attention_transfer import mark_transfer_parameters

    attention = recipe_attention()
    ids = torch.randint(config_fields["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
    # loss = <logits, probe>: every logit carries gradient
    probe = torch.randn(1, length, config_fields["vocab_size"], generator=torch.Generator().manual_seed(1))

    def outputs(dtype: torch.dtype, on: str) -> dict[str, torch.Tensor]:
        """The logits and every new parameter's gradient, by name."""
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(LlamaConfig(**config_fields)).to(torch.bfloat16).to(dtype)  # bf16-exact weights
        model = linearize.convert(teacher, attention=attention.name, **attention.options()).to(on)
        mark_transfer_parameters(model)
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        torch.manual_seed(1)
        with torch.no_grad():  # away from the identity init, so every term of the math counts
            for parameter in trainable.values():
                parameter.add_(0.1 * torch.randn_like(parameter))
        with torch.autocast(torch.device(on).type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(ids.to(on)).logits
        grads = torch.autograd.grad((logits.float() * probe.to(on)).sum(), list(trainable.values()))
        return {"logits": logits, **dict(zip(trainable, grads))}

    reference = outputs(torch.float32, "cpu")
    rounding = {name: relative_error(reference[name], t) for name, t in outputs(torch.bfloat16, "cpu").items()}
    compared = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        errors = {name: {"error": relative_error(reference[name], t),
                         "bound": max(LAYER_TOLERANCE[precision], ROUNDING_SCALE[precision] * rounding[name])}
                  for name, t in outputs(dtype, device).items()}
        compared[precision] = {"logits": errors.pop("logits"), "gradients": errors}
    return {"shape": {k: config_fields[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim")},
            "length": length, "attention": attention.name, "relative_errors": compared}


def start_kernel_tests(out: Path, budget: int) -> dict[str, tuple[subprocess.Popen, Path, Path]]:
    """One pytest per file of tests/kernels, all started at once (autotuning compiles every candidate
    config of every tested shape: CPU-bound work that a single process would do on one core). Each
    stops starting tests after ``budget`` seconds and writes a junit report and a log."""
    folder = out / "kernel_tests"
    folder.mkdir(parents=True, exist_ok=True)
    runs = {}
    for path in sorted((ROOT / "tests" / "kernels").glob("test_*.py")):
        xml, log = folder / f"{path.stem}.xml", folder / f"{path.stem}.log"
        xml.unlink(missing_ok=True)
        command = [sys.executable, "-m", "pytest", str(path.relative_to(ROOT)), "-q", "-rfE", "-p", "no:cacheprovider",
                   f"--junitxml={xml}", f"--session-timeout={budget}"]
        with log.open("w") as handle:
            runs[path.stem] = (subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT), xml, log)
    return runs


def finish_kernel_tests(runs: dict[str, tuple[subprocess.Popen, Path, Path]], budget: int) -> tuple[dict, list[str]]:
    """Wait for every pytest; their results summed per precision, and what went wrong."""
    counts: dict[str, dict[str, int]] = {}
    failed, problems = [], []
    for name, (process, xml, log) in runs.items():
        returncode = process.wait()
        if not xml.is_file():
            problems.append(f"{name}: pytest wrote no report (status {returncode}; log {log})")
            continue
        found = junit_counts(xml)
        failed += found["failed"]
        for precision, numbers in found["counts"].items():
            bucket = counts.setdefault(precision, {"passed": 0, "failed": 0, "skipped": 0})
            for outcome, number in numbers.items():
                bucket[outcome] += number
        if "session-timeout" in log.read_text(errors="replace"):
            problems.append(f"{name}: pytest stopped at its {budget} s session timeout before running every test")
        elif returncode != 0 and not found["failed"]:
            problems.append(f"{name}: pytest exited with status {returncode} (log {log})")
    if failed:
        problems.append(f"{len(failed)} kernel test(s) failed: {failed[:10]}")
    if counts.get("bf16", {}).get("passed", 0) == 0:
        problems.append("no bf16 kernel test passed: they skip without CUDA, so the real kernels did not run")
    return {"counts": counts, "failed": failed}, problems


def layer_report(layer: dict) -> tuple[list[str], list[str]]:
    """Markdown lines and failed bounds of ``layer_against_reference``'s result."""
    shape = layer["shape"]
    lines = [f"Converted layer ({layer['attention']}, {shape['num_attention_heads']} query / "
             f"{shape['num_key_value_heads']} KV heads of {shape['head_dim']}, T = {layer['length']}) against the "
             "fp32 CPU reference: relative RMS error / its bound (from the precision's tolerance and the "
             "reference's own bf16 rounding error)", "",
             "| precision | logits | worst new-parameter gradient |", "|---|---|---|"]
    problems = []
    for precision, compared in layer["relative_errors"].items():
        logits, gradients = compared["logits"], compared["gradients"]
        worst = max(gradients, key=lambda name: gradients[name]["error"] / gradients[name]["bound"])
        lines.append(f"| {precision} | {logits['error']:.2e} / {logits['bound']:.1e} | "
                     f"{gradients[worst]['error']:.2e} / {gradients[worst]['bound']:.1e} (`{worst}`) |")
        problems += [f"layer {precision}, {name}: relative error {e['error']:.2e} > {e['bound']:.1e}"
                     for name, e in {"logits": logits, **gradients}.items() if e["error"] > e["bound"]]
    return lines, problems


def kernel_tests(settings: Settings, out: Path, work: Path) -> Outcome:
    budget = settings.timeouts.get("kernel_tests", 0) - 20  # time left after the last test for the reports
    runs = start_kernel_tests(out, budget) if settings.run_pytest else {}
    results: dict = {}
    lines: list[str] = []
    problems: list[str] = []
    try:  # while pytest compiles; a failure here must not lose its results
        results["layer"] = layer_against_reference(settings.layer, settings.layer_length, settings.device)
        lines, problems = layer_report(results["layer"])
    except Exception as error:
        traceback.print_exc()
        problems.append(f"layer comparison: {type(error).__name__}: {error}")
    if runs:
        results["pytest"], found = finish_kernel_tests(runs, budget)
        problems += found
        lines += ["", "`pytest tests/kernels` on CUDA, autotuning on:", "",
                  "| precision | passed | failed | skipped |", "|---|---|---|---|"]
        lines += [f"| {p} | {c['passed']} | {c['failed']} | {c['skipped']} |"
                  for p, c in sorted(results["pytest"]["counts"].items())]
        lines += [f"- failed: `{name}`" for name in results["pytest"]["failed"]]
    return Outcome(results, "\n".join(lines), problems)


# --------------------------------------------------------------------------------------------------
# 2. kernel benchmark
# --------------------------------------------------------------------------------------------------

def fla_status(install: bool) -> dict:
    """Whether flash-linear-attention imports; with ``install``, one bounded ``pip install`` first
    that pins torch, triton and transformers to the installed versions so it cannot replace them."""
    tried = None
    if install and importlib.util.find_spec("fla") is None:
        pins = [f"{name}=={found}" for name in ("torch", "triton", "transformers")
                if (found := version(name)) != "not installed"]
        command = [sys.executable, "-m", "pip", "install", "--retries", "0", "--timeout", "5",
                   "flash-linear-attention", *pins]
        try:
            tried = subprocess.run(command, capture_output=True, text=True, timeout=25).returncode
        except subprocess.TimeoutExpired:
            tried = "timed out"
        importlib.invalidate_caches()
    if importlib.util.find_spec("fla") is None:
        return {"version": "not installed", "pip_install": tried}
    # fla >= 0.3.2 ships its kernels (the `fla` package) as fla-core
    found = [version(name) for name in ("fla-core", "flash-linear-attention")]
    return {"version": next((v for v in found if v != "not installed"), "unknown"), "pip_install": tried}


def kernel_bench(settings: Settings, out: Path, work: Path) -> Outcome:
    from linearize.kernels import benchmark

    fla = fla_status(install=settings.device == "cuda")
    default = benchmark.GPU_SHAPE if settings.device == "cuda" else benchmark.CPU_SHAPE
    result = benchmark.run_kernel_benchmark(out / "kernel_bench", lengths=settings.bench_lengths,
                                            device=settings.device, shape=replace(default, **settings.bench_shape))
    fla["benchmarked"] = "fla linear" in result["variants"]
    # None: out of memory (the benchmark's marker); anything else must be a positive time
    bad = sorted({f"{name} at T={row['length']} {row['mode']}: {ms}" for row in result["rows"]
                  for name, ms in row["ms"].items() if ms is None or not (math.isfinite(ms) and ms > 0)})
    problems = [f"no valid timing for {', '.join(bad)}"] if bad else []
    markdown = (Path(result["files"]["markdown"]).read_text()
                + f"\nflash-linear-attention: {fla['version']} (benchmarked: {fla['benchmarked']})\n")
    return Outcome({"fla": fla, **result}, markdown, problems)


# --------------------------------------------------------------------------------------------------
# 3. pipeline, export and reload
# --------------------------------------------------------------------------------------------------

def byte_tokenizer():
    """A byte-level tokenizer (257 ids: the 256 bytes and an end token). Every id is below any
    teacher's vocab size, and text of any language encodes without unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|end|>", pad_token="<|end|>")


def teacher_folder(settings: Settings, work: Path) -> Path:
    """The random teacher and its tokenizer, saved once in bf16 as a local model folder (built on
    the device: initialising a 1B model on the CPU takes longer than the whole run)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = work / "teacher"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    with torch.device(settings.device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**settings.teacher), dtype=torch.bfloat16)
    staging = work / "teacher.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by a section that timed out while saving
    model.save_pretrained(staging)
    byte_tokenizer().save_pretrained(staging)
    staging.rename(folder)  # the decode section may reuse it: only a complete folder counts
    return folder


def recipe_overrides(settings: Settings, teacher: Path, run_dir: Path) -> list[str]:
    """The 1B recipe with this check's teacher, data and step counts (its losses, learning rates and
    attention kept)."""
    stage = dict(steps=settings.steps, batch_size=settings.batch_size, warmup_steps=settings.steps // 10,
                 validate_every=settings.steps, checkpoint_every=settings.steps)
    return [
        f"model.ref={teacher}", f"run.output_dir={run_dir}", "run.precision=bf16", "run.log_every=1",
        f"data.sources=[{{type: corpus, name: c4_demo, max_documents: {settings.documents}}}]",
        f"data.block_length={settings.block_length}", "data.validation_blocks=2",
        *(f"{name}.{key}={value}" for name in ("attention_transfer", "finetune") for key, value in stage.items()),
        "eval.perplexity_chunks=0", "eval.max_new_tokens=4",
    ]


def check_finite(record: dict) -> None:
    """Raise unless every number in a log record (validation records nest theirs) is finite."""
    numbers = [v for v in record.values() if isinstance(v, (int, float))]
    numbers += [v for v in record.get("validation", {}).values() if isinstance(v, (int, float))]
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"non-finite value in log record {record}")


def stage_summary(stage_dir: Path, steps: int) -> dict:
    """Losses of one training stage from its log.jsonl; raises unless it trained ``steps`` steps with
    every logged number finite."""
    records = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    for record in records:
        check_finite(record)
    losses = [r["loss"] for r in records if "loss" in r]
    if len(losses) != steps:
        raise ValueError(f"{stage_dir.name}: {len(losses)} training losses logged, expected {steps}")
    validation = [r["validation"] for r in records if "validation" in r]
    done = json.loads((stage_dir / "done.json").read_text())
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1], "validation": validation,
            "seconds": done["seconds"]}


# Runs where `import linearize` fails, as on a machine without the package: everything must come
# from the export's own modeling files.
RELOAD_AND_GENERATE = textwrap.dedent(
    """
    import json, sys
    sys.modules["linearize"] = None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, device, new_tokens, result = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids.to(device)
    out = model.eval().generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    with open(result, "w") as handle:
        json.dump({
            "model_class": f"{type(model).__module__}.{type(model).__name__}",
            "new_tokens": out.sequences[0, ids.shape[1]:].tolist(),
            "finite_logits": all(bool(torch.isfinite(step).all()) for step in out.logits),
        }, handle)
    """
)


def pipeline(settings: Settings, out: Path, work: Path) -> Outcome:
    started = time.perf_counter()
    teacher = teacher_folder(settings, work)
    built = time.perf_counter() - started
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "linearize", "run", str(RECIPE), *recipe_overrides(settings, teacher, run_dir)]
    started = time.perf_counter()
    returncode, output = run_streamed(command, ROOT)
    if returncode != 0:
        last = [line for line in output.splitlines() if line.strip()][-1:]
        raise RuntimeError(f"linearize run exited with status {returncode}: {' '.join(last)}")
    run_seconds = time.perf_counter() - started
    stages = {name: stage_summary(run_dir / name, settings.steps) for name in ("attention_transfer", "finetune")}

    new_tokens = 8
    started = time.perf_counter()
    reloaded = work / "reloaded.json"
    reload = subprocess.run([sys.executable, "-c", RELOAD_AND_GENERATE, str(run_dir / "export"), settings.device,
                             str(new_tokens), str(reloaded)], cwd=work, capture_output=True, text=True)
    print(reload.stdout, reload.stderr[-5000:], flush=True)
    if reload.returncode != 0:
        raise RuntimeError(f"reloading the export failed: {reload.stderr.strip().splitlines()[-1]}")
    generated = json.loads(reloaded.read_text())
    problems = []
    if len(generated["new_tokens"]) != new_tokens or not generated["finite_logits"]:
        problems.append(f"the reloaded export generated {generated}")
    if generated["model_class"].startswith("linearize"):
        problems.append(f"the reloaded export used {generated['model_class']}, not its own modeling files")
    results = {"teacher": settings.teacher, "build_seconds": built, "run_seconds": run_seconds, "stages": stages,
               "reload": {**generated, "seconds": time.perf_counter() - started}}
    lines = [f"`linearize run {RECIPE.relative_to(ROOT)}` (bf16) on a random "
             f"{settings.teacher['num_hidden_layers']}-layer Llama of hidden size {settings.teacher['hidden_size']}, "
             f"{settings.steps} + {settings.steps} steps of {settings.batch_size} x {settings.block_length} tokens; "
             f"whole run {run_seconds:.0f} s.", "",
             "| stage | first loss | last loss | seconds | all logged numbers finite |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s['first_loss']:.4g} | {s['last_loss']:.4g} | {s['seconds']:.1f} | yes |"
              for name, s in stages.items()]
    lines += ["", f"Export reloaded without `linearize` as `{generated['model_class']}`; generated "
                  f"{len(generated['new_tokens'])} tokens, logits finite: {generated['finite_logits']}."]
    return Outcome(results, "\n".join(lines), problems)


# --------------------------------------------------------------------------------------------------
# 4. decode throughput
# --------------------------------------------------------------------------------------------------

def decode(settings: Settings, out: Path, work: Path) -> Outcome:
    import torch

    import linearize
    from linearize.eval.decode_bench import run_decode_benchmark
    from linearize.eval.tables import decode_table

    folder = teacher_folder(settings, work)
    attention = recipe_attention()
    models = {}
    for role in ("teacher", "student"):  # convert works in place: the student gets its own copy
        model, tokenizer = linearize.load(folder, dtype=torch.bfloat16)
        if role == "student":
            model = linearize.convert(model, attention=attention.name, **attention.options())
        models[role] = (model.to(settings.device), tokenizer)
    result = run_decode_benchmark(models, [settings.decode_context], settings.decode_tokens,
                                  batch_sizes=[settings.decode_batch], batch_lengths=[settings.decode_context])
    rows = {m["model"]: m for m in result["measurements"] if m["batch"] == settings.decode_batch}
    teacher, student = rows["teacher"], rows["student"]
    # On the CPU (smoke) peak memory is resident-set growth, which can be 0 for a tiny model.
    ratios = {key: student[key] / teacher[key] if teacher[key] else None
              for key in ("decode_tokens_per_second", "peak_memory_bytes")}
    gib = 2 ** 30
    lines = [f"Batch {settings.decode_batch} x {settings.decode_context} tokens of context, then "
             f"{settings.decode_tokens} greedy steps, bf16 (peak memory: above what was allocated before each "
             "measurement, i.e. beyond the weights):", "",
             "| | teacher | student | student / teacher |", "|---|---|---|---|",
             f"| decode tokens/s | {teacher['decode_tokens_per_second']:.1f} | "
             f"{student['decode_tokens_per_second']:.1f} | {ratios['decode_tokens_per_second']:.2f}x |",
             f"| peak memory (GiB) | {teacher['peak_memory_bytes'] / gib:.3f} | "
             f"{student['peak_memory_bytes'] / gib:.3f} | {ratios['peak_memory_bytes'] or float('nan'):.3f}x |",
             "", "Every measured case:", "", decode_table(result["measurements"])]
    numbers = [v for m in result["measurements"] for v in m.values() if isinstance(v, float)]
    numbers += [v for v in ratios.values() if v is not None]
    problems = [] if all(math.isfinite(v) and v > 0 for v in numbers) else ["a measurement is not finite and positive"]
    return Outcome({"ratios": ratios, **result}, "\n".join(lines), problems)


SECTIONS: dict[str, Callable[[Settings, Path, Path], Outcome]] = {
    "kernel_tests": kernel_tests, "kernel_bench": kernel_bench, "pipeline": pipeline, "decode": decode,
}
TITLES = {"kernel_tests": "1. Kernel tests", "kernel_bench": "2. Kernel speed", "pipeline": "3. 1B-shaped run",
          "decode": "4. Decode throughput"}


# --------------------------------------------------------------------------------------------------
# Running the sections
# --------------------------------------------------------------------------------------------------

def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def run_worker(name: str, settings: Settings, out: Path, work: Path) -> None:
    """Run one section in this process and write ``sections/<name>.json``; errors are recorded, not raised."""
    try:
        outcome = SECTIONS[name](settings, out, work)
        record = {"status": "failed" if outcome.problems else "passed", "error": "; ".join(outcome.problems) or None,
                  "results": outcome.results, "markdown": outcome.markdown}
    except Exception as error:  # the section failed: say why, keep the traceback in its log
        traceback.print_exc()
        record = {"status": "failed", "error": f"{type(error).__name__}: {error}", "results": {}, "markdown": ""}
    write_atomic(out / "sections" / f"{name}.json", json.dumps(record, indent=2, default=str) + "\n")


def run_section(name: str, limit: int, smoke: bool, out: Path, work: Path, env: dict) -> dict:
    """The section in a fresh process under ``timeout`` (which kills its whole process group)."""
    result_path = out / "sections" / f"{name}.json"
    result_path.unlink(missing_ok=True)
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = ["timeout", "--kill-after=10", str(limit), sys.executable, str(Path(__file__).resolve()),
               "--section", name, "--work", str(work), str(out), *(["--smoke"] if smoke else [])]
    started = time.perf_counter()
    with log.open("w") as handle:
        returncode = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started  # the process's whole life, imports included
    if result_path.is_file():
        return {**json.loads(result_path.read_text()), "seconds": seconds}
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    error = f"timed out after {limit} s" if returncode in (124, 137) else f"exited with status {returncode}"
    return {"status": "failed", "error": f"{error} (log {log}: {tail})", "results": {}, "markdown": "",
            "seconds": seconds}


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(smoke: bool, env: dict) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if not smoke else f"cpu ({os.cpu_count()} cores)",
        "cuda": torch.version.cuda, "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "triton", "transformers", "flash-linear-attention")},
        "git_commit": commit or None, "smoke": smoke,
        "env": {k: env.get(k) for k in ("TRITON_INTERPRET", "LINEARIZE_AUTOTUNE", "CUDA_VISIBLE_DEVICES")},
    }


def write_report(out: Path, info: dict, sections: dict[str, dict]) -> None:
    write_atomic(out / "gpu_check.json", json.dumps({"environment": info, "sections": sections}, indent=2,
                                                    default=str) + "\n")
    lines = ["# GPU check" + (" (CPU smoke mode)" if info["smoke"] else ""), "",
             f"{info['date']} on {info['device']}: torch {info['torch']}, triton {info['triton']}, transformers "
             f"{info['transformers']}, CUDA {info['cuda'] or '-'}, git {info['git_commit']}", "",
             "| section | status | seconds | error |", "|---|---|---|---|"]
    lines += [f"| {TITLES[name]} | {s['status']} | {s['seconds']:.0f} | {s['error'] or ''} |"
              for name, s in sections.items()]
    for name, section in sections.items():
        lines += ["", f"## {TITLES[name]}: {section['status']}", "", section["markdown"] or section["error"] or ""]
    write_atomic(out / "gpu_check.md", "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path,
                        default=Path("results/gpu_check") / datetime.now().strftime("%Y-%m-%d"),
                        help="results folder (default results/gpu_check/<date>)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks this script, not the GPU")
    parser.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)  # internal: one section, in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = SMOKE if args.smoke else GPU
    out = args.out.resolve()
    if args.section:
        run_worker(args.section, settings, out, args.work)
        return 0

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("error: the GPU check needs a CUDA device, and torch.cuda.is_available() is False. Fix: run it on a "
              "GPU machine, or run `scripts/gpu_check.sh --smoke` for the CPU smoke mode", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if args.smoke:  # everything on the CPU, also on a machine with a GPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:  # compiled kernels, autotuned as in real runs
        env.update(TRITON_INTERPRET="0", LINEARIZE_AUTOTUNE="1")
    info = environment(args.smoke, env)
    print(f"GPU check{' (smoke)' if args.smoke else ''} on {info['device']}, results in {out}", flush=True)
    sections: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # models and runs: gigabytes, never kept
    try:
        for name, limit in settings.timeouts.items():
            print(f"{TITLES[name]} (at most {limit} s) ...", flush=True)
            sections[name] = run_section(name, limit, args.smoke, out, work, env)
            print(f"  {sections[name]['status']} in {sections[name]['seconds']:.0f} s"
                  + (f": {sections[name]['error']}" if sections[name]["error"] else ""), flush=True)
            write_report(out, info, sections)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print((out / "gpu_check.md").read_text())
    failed = [name for name, s in sections.items() if s["status"] != "passed"]
    if failed:
        print(f"failed: {', '.join(failed)} (see {out / 'gpu_check.md'} and {out / 'logs'})", file=sys.stderr)
        return 1
    print("every section passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
