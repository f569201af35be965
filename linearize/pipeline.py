"""The whole pipeline of a recipe: convert -> attention transfer -> LoRA -> export -> evaluate.

Every stage writes into the run directory and is skipped when its output is complete; a stage
that was interrupted resumes from its last checkpoint. The same command runs on one process or
under ``accelerate launch`` / ``torchrun`` (accelerate joins the processes; every process takes its
share of each batch, evaluation and export happen on the main process). Under FSDP
(``accelerate launch --config_file recipes/accelerate/fsdp.yaml``) training shards the student in
place; after each training stage every process rebuilds a whole student from the recipe and the
stage's saved weights, so evaluation and export read an ordinary model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

import linearize
from linearize.attention_transfer import run_attention_transfer
from linearize.convert import restore_softmax_layers
from linearize.corpora import read_corpus
from linearize.data import build_blocks
from linearize.eval import chunk_tokens, perplexity, report
from linearize.eval.sampling import SamplingSettings, run_sampling
from linearize.finetune import add_lora, merge_lora, run_finetune
from linearize.generation import generate_answer
from linearize.recipe import Recipe, RecipeError, dump_recipe
from linearize.training import (
    atomic_save_tensors,
    atomic_write_text,
    check_accelerator,
    gather_trainable_state,
    load_trainable_state,
)

# run.precision -> the dtype of the frozen weights; new parameters keep fp32 masters (see convert).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class RunRecord:
    """``metrics.json`` of a run: numbers measured once, kept across reruns (atomic writes)."""

    def __init__(self, path: Path, write: bool):
        self.path = path
        self.write = write
        self.values = json.loads(path.read_text()) if path.is_file() else {}

    def measure(self, key: str, compute):
        if key not in self.values:
            self.values[key] = compute()
            if self.write:
                atomic_write_text(self.path, json.dumps(self.values, indent=2) + "\n")
        return self.values[key]


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    except OSError:
        return None
    return result.stdout.strip() or None


def _check_context(recipe: Recipe, model) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    checks = [("data.block_length", recipe.data.block_length)]
    if recipe.eval.perplexity_chunks:
        checks.append(("eval.perplexity_chunks (512-token chunks)", 512))
    for field, length in checks:
        if limit and length > limit:
            raise RecipeError(f"recipe field '{field}': {length} tokens exceed the model's {limit} positions; fix: lower it")


def _stage_done(stage_dir: Path) -> dict | None:
    done = stage_dir / "done.json"
    return json.loads(done.read_text()) if done.is_file() else None


def _finish_stage(stage_dir: Path, model, summary: dict, accelerator: Accelerator) -> None:
    weights = gather_trainable_state(model)
    if accelerator.is_main_process:
        atomic_save_tensors(weights, stage_dir / "weights.safetensors")
        atomic_write_text(stage_dir / "done.json", json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()


def _layer_table(first: dict, best: dict) -> str:
    layers = sorted((k for k in first if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    rows = [f"  {k.removeprefix('layer_'):>5} {first[k]:10.4f} {best.get(k, float('nan')):10.4f}" for k in layers]
    return "\n".join(["  layer     before      after", *rows])


def run_recipe(recipe: Recipe) -> dict:
    """Run every stage of ``recipe``; returns the run's metrics."""
    precision = recipe.run.precision
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no" if precision == "fp32" else precision)
    check_accelerator(accelerator)
    # FSDP shards a trained model in place: what follows a training stage needs a whole one (rebuilt_student).
    sharded = accelerator.distributed_type == DistributedType.FSDP
    main = accelerator.is_main_process
    run_dir = Path(recipe.run.output_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.resolved.yaml", dump_recipe(recipe))
        info = {"linearize": linearize.__version__, "git_commit": _git_commit(), "command": sys.argv,
                "processes": accelerator.num_processes, "distributed": accelerator.distributed_type.value,
                "torch": torch.__version__}
        atomic_write_text(run_dir / "run_info.json", json.dumps(info, indent=2) + "\n")
    accelerator.wait_for_everyone()
    set_seed(recipe.run.seed)
    started = time.perf_counter()

    teacher, tokenizer = linearize.load(recipe.model.ref, dtype=DTYPES[precision])
    _check_context(recipe, teacher)
    teacher.to(accelerator.device)
    blocks = build_blocks(recipe.data, tokenizer, recipe.run.seed, run_dir / "data", accelerator)
    accelerator.print(
        f"data: {len(blocks.train)} training and {len(blocks.validation)} validation blocks of "
        f"{recipe.data.block_length} tokens (cached in {run_dir / 'data'})"
    )
    record = RunRecord(run_dir / "metrics.json", write=main)
    chunks = None
    if recipe.eval.perplexity_chunks:
        chunks = chunk_tokens(tokenizer, read_corpus("wikitext2"), 512, recipe.eval.perplexity_chunks)

    def evaluate(name: str, model) -> None:
        """Perplexity and an answer to the recipe's prompt, measured once per run (main process)."""
        if main and chunks is not None:
            record.measure(f"{name}_perplexity", lambda: perplexity(model, chunks, desc=f"{name} perplexity"))
        if main:
            record.measure(f"{name}_answer", lambda: generate_answer(model, tokenizer, recipe.eval.prompt,
                                                                      recipe.eval.max_new_tokens))
        accelerator.wait_for_everyone()

    def convert_teacher(model):
        return linearize.convert(model, attention=recipe.attention.name, seed=recipe.run.seed,
                                 **recipe.attention.options())

    def rebuilt_student(transfer: dict | None):
        """A whole student: the teacher converted afresh, with the attention-transfer weights if that stage is done."""
        student = convert_teacher(linearize.load(recipe.model.ref, dtype=DTYPES[precision])[0].to(accelerator.device))
        if transfer is not None:
            load_trainable_state(student, run_dir / "attention_transfer" / "weights.safetensors")
            restore_softmax_layers(student, transfer["auto_softmax_layers"])
        return student

    evaluate("teacher", teacher)
    student = convert_teacher(teacher)
    evaluate("untrained", student)

    # Attention transfer: train the new parameters layer by layer.
    stage_dir = run_dir / "attention_transfer"
    section = recipe.attention_transfer
    done = _stage_done(stage_dir)
    if done is None and section.enabled and section.steps > 0:
        set_seed(recipe.run.seed)  # the same start whether or not earlier stages ran in this process
        result = run_attention_transfer(
            accelerator, student, blocks.train, blocks.validation, section, stage_dir,
            seed=recipe.run.seed, log_every=recipe.run.log_every,
        )
        ranked = sorted((k for k in result.best if k.startswith("layer_")), key=lambda k: -result.best[k])
        keep = sorted(int(k.split("_")[1]) for k in ranked[: recipe.attention.auto_softmax_layers])
        done = {"first": result.first, "best": result.best, "steps": result.steps, "seconds": result.seconds,
                "auto_softmax_layers": keep}
        _finish_stage(stage_dir, student, done, accelerator)
        if sharded:
            student = rebuilt_student(done)
    if done is not None:  # the stage's saved weights, however we got here (a no-op right after training)
        load_trainable_state(student, stage_dir / "weights.safetensors")
        restore_softmax_layers(student, done["auto_softmax_layers"])
        evaluate("distilled", student)

    # LoRA finetuning: adapters on the attention projections, feature maps frozen.
    stage_dir = run_dir / "finetune"
    section = recipe.finetune
    finetune_done = _stage_done(stage_dir)
    if section.enabled and section.steps > 0:
        def adapters_on(model):
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            set_seed(recipe.run.seed + 1)  # LoRA's initialisation must not depend on what ran before
            return add_lora(model, section.lora)

        adapted = adapters_on(student)
        if finetune_done is None:
            result = run_finetune(accelerator, adapted, blocks.train, blocks.validation, section, stage_dir,
                                  seed=recipe.run.seed, log_every=recipe.run.log_every)
            finetune_done = {"first": result.first, "best": result.best, "steps": result.steps,
                             "seconds": result.seconds}
            _finish_stage(stage_dir, adapted, finetune_done, accelerator)
            if sharded:
                adapted = adapters_on(rebuilt_student(done))
        load_trainable_state(adapted, stage_dir / "weights.safetensors")
        student = merge_lora(adapted)
        evaluate("finetuned", student)

    if recipe.export.enabled and main:
        export_dir = recipe.export_dir
        if not (export_dir / "config.json").is_file():
            linearize.export(student, tokenizer, export_dir, overwrite=export_dir.exists(), metrics=record.values,
                             extra_files={"recipe.resolved.yaml": dump_recipe(recipe)})
    if main and recipe.eval.sampling.tasks:
        _sample_against_teacher(recipe, student, tokenizer, run_dir / "eval")
    accelerator.wait_for_everyone()
    if main:
        _print_summary(recipe, record.values, done, finetune_done, time.perf_counter() - started)
    return record.values


def _sample_against_teacher(recipe: Recipe, student, tokenizer, eval_dir: Path) -> None:
    """``eval.sampling``: repeated sampling of the final student and a freshly loaded teacher."""
    section = recipe.eval.sampling
    settings = SamplingSettings(
        tasks=tuple(section.tasks), default_samples=section.samples, default_limit=section.limit,
        temperature=section.temperature, top_p=section.top_p, max_new_tokens=section.max_new_tokens,
        batch_size=section.batch_size, seed=recipe.run.seed,
    )
    teacher = linearize.load(recipe.model.ref, dtype=DTYPES[recipe.run.precision])[0].to(student.device)
    references = {"teacher": recipe.model.ref, "student": str(recipe.export_dir)}
    sampling = run_sampling({"teacher": (teacher, tokenizer), "student": (student, tokenizer)}, references,
                            settings, eval_dir)
    print(report.write_sampling(eval_dir, sampling))


def _print_summary(recipe: Recipe, values: dict, transfer: dict | None, finetune: dict | None, seconds: float) -> None:
    print(f"\nrun {recipe.run.output_dir} finished in {seconds / 60:.1f} min")
    if "teacher_perplexity" in values:
        teacher = values["teacher_perplexity"]
        print(f"WikiText-2 perplexity ({recipe.eval.perplexity_chunks} x 512 tokens):")
        for name in ("teacher", "untrained", "distilled", "finetuned"):
            if f"{name}_perplexity" in values:
                value = values[f"{name}_perplexity"]
                print(f"  {name:<10} {value:8.2f}  ({value / teacher:.2f}x teacher)")
    if transfer is not None:
        print("attention-transfer loss per layer (validation):")
        print(_layer_table(transfer["first"], transfer["best"]))
        if transfer["auto_softmax_layers"]:
            print(f"kept as softmax (highest transfer loss): {transfer['auto_softmax_layers']}")
    if finetune is not None:
        print(f"finetune validation perplexity: {finetune['first']['perplexity']:.2f} -> {finetune['best']['perplexity']:.2f}")
    print(f"prompt: {recipe.eval.prompt}")
    for name in ("teacher", "finetuned" if finetune else "distilled" if transfer else "untrained"):
        if f"{name}_answer" in values:
            print(f"  {name}: {values[f'{name}_answer']}")
    if recipe.export.enabled:
        print(f"exported to {recipe.export_dir}")
