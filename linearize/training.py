"""The training loop shared by attention transfer and LoRA finetuning.

What it guarantees, for any loss:
    * the same global batches on 1 or N processes (each process takes its share of every step's
      blocks; DDP averages the gradients), so losses agree across world sizes;
    * checkpoints every ``checkpoint_every`` steps and on Ctrl-C; a rerun resumes from the last one
      and replays the same batches, so the result equals an uninterrupted run;
    * validation every ``validate_every`` steps, keeping the best trainable weights;
    * a progress bar with tokens/s and an ETA, and a JSON-lines log.

Checkpoints hold only what training changes (trainable weights, optimizer, scheduler, RNG states
and counters): the frozen model is rebuilt from the recipe, so a checkpoint of an 8B model is small.
Under FSDP2 (which accelerate applies to the module in place) only the frozen weights are sharded:
the trainable ones stay whole on every process, as under DDP. Weights and optimizer state are
gathered onto the main process with ``torch.distributed.checkpoint.state_dict`` and keyed by
parameter name, so one checkpoint resumes on any number of processes, with or without FSDP.
Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, is_torch_version
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from linearize.errors import UserError
from linearize.recipe import TrainingSection

LossFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
ValidateFn = Callable[[torch.nn.Module], dict[str, float]]


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, partial)
    partial.replace(path)


def atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


# Whole CPU tensors on the main process (empty dicts on the others), without the frozen weights.
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def check_accelerator(accelerator: Accelerator) -> None:
    """Reject the FSDP settings the stages cannot train with (before any model is loaded)."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if not is_torch_version(">=", "2.7.0"):  # accelerate passes FSDP2 no ignored parameters before 2.7
        raise UserError(f"FSDP training needs torch >= 2.7 (this is {torch.__version__}). Fix: upgrade torch, or use DDP")
    if not accelerator.is_fsdp2:
        raise UserError(
            "FSDP version 1 replaces the model's parameters with flat shards that the training stages cannot "
            "read. Fix: set fsdp_version: 2 in the accelerate config (see recipes/accelerate/fsdp.yaml)"
        )
    if accelerator.state.fsdp_plugin.cpu_ram_efficient_loading:
        raise UserError(
            "fsdp_cpu_ram_efficient_loading leaves the model empty on all processes but the first, and every "
            "process converts its own copy. Fix: set fsdp_cpu_ram_efficient_loading: false in the accelerate config"
        )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require gradients, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def gather_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights as whole CPU tensors on the main process (empty on the others); every
    process must call it (it gathers whatever is sharded)."""
    gathered = get_model_state_dict(model, options=GATHERED)
    # With tied embeddings the state dict names the frozen shared weight twice, and torch's
    # frozen-parameter filter lets the second name (lm_head.weight) through: keep trainable names only.
    return {name: tensor for name, tensor in gathered.items() if name in trainable_state(model)}


def load_trainable_state(model: torch.nn.Module, path: Path) -> None:
    """Copy saved trainable weights into ``model``; every saved name must exist. The parameters are
    whole on every process (``train`` keeps them out of FSDP's shards)."""
    saved = load_file(path)
    parameters = dict(model.named_parameters())
    missing = sorted(set(saved) - set(parameters))
    if missing:
        raise UserError(f"{path} holds weights the model does not have ({missing[:3]}...). Fix: delete the run folder")
    with torch.no_grad():
        for name, tensor in saved.items():
            parameters[name].copy_(tensor)


def global_batch_indices(step: int, batch_size: int, num_blocks: int, seed: int) -> torch.Tensor:
    """Block indices of optimizer step ``step``: consecutive slices of per-epoch permutations."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_blocks)
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.extend(order[offset : offset + batch_size - len(indices)].tolist())
    return torch.tensor(indices)


@dataclass
class StageResult:
    best: dict[str, float]  # validation metrics of the kept weights
    first: dict[str, float]  # validation metrics before training
    steps: int
    seconds: float


def _lr_lambda(section: TrainingSection) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to 10% of the peak rate."""

    def factor(step: int) -> float:
        if step < section.warmup_steps:
            return (step + 1) / section.warmup_steps
        progress = (step - section.warmup_steps) / max(1, section.steps - section.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``checkpoint/``, or the previous one if a swap was cut short."""
    for candidate in (checkpoint_dir, checkpoint_dir.with_name("checkpoint.previous")):
        if (candidate / "state.pt").is_file():
            return candidate
    return None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    accelerator: Accelerator,
    model: torch.nn.Module,
    blocks: torch.Tensor,
    loss_fn: LossFn,
    validate: ValidateFn,
    section: TrainingSection,
    stage_dir: Path,
    *,
    seed: int,
    log_every: int,
    description: str,
    metric: str = "loss",
) -> StageResult:
    """Train the parameters of ``model`` that require grad; keep the best by validation ``metric``.

    ``loss_fn(model, batch)`` returns the loss to minimise and numbers to log; ``validate(model)``
    returns metrics (lower ``metric`` is better); every process runs it, and the main process's
    numbers decide. On return ``model`` holds the best weights. Resumes from ``stage_dir/checkpoint``
    when present. Under FSDP (version 2, see ``check_accelerator``) accelerate shards ``model`` in
    place, so ``model`` and the wrapped module are one object.
    """
    world = accelerator.num_processes
    per_process, remainder = divmod(section.batch_size, world * section.gradient_accumulation)
    if remainder or per_process == 0:
        raise UserError(
            f"batch_size {section.batch_size} must be a multiple of processes ({world}) x gradient_accumulation "
            f"({section.gradient_accumulation}). Fix: change batch_size or gradient_accumulation"
        )
    stage_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = stage_dir / "checkpoint"
    best_path = stage_dir / "best.safetensors"
    parameters = list(trainable_state(model).values())
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp:
        # FSDP2 reduces a group's gradients from hooks on the group's outputs, which the attention-transfer
        # loss (read inside the layers) never passes through, so those gradients would be dropped without
        # a word. The trainable parameters are small: FSDP shards only the frozen ones, and the trainable
        # ones stay whole on every process with their gradients averaged below, as DDP would.
        accelerator.state.fsdp_plugin.ignored_modules = [
            module for module in model.modules() if any(p.requires_grad for p in module.parameters(recurse=False))
        ]
    wrapped, optimizer = accelerator.prepare(
        model, torch.optim.AdamW(parameters, lr=section.lr, weight_decay=section.weight_decay)
    )
    # Not prepared by accelerate: its scheduler wrapper steps once per process, and here one step is
    # one global batch whatever the number of processes.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(section))

    step, best, first, history_seconds = 0, None, None, 0.0
    resume_from = _complete_checkpoint(checkpoint_dir)
    if resume_from is not None:
        state = torch.load(resume_from / "state.pt", weights_only=False)
        load_trainable_state(model, resume_from / "trainable.safetensors")
        set_optimizer_state_dict(model, optimizer.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None:  # fp16 loss scaling
            accelerator.scaler.load_state_dict(state["scaler"])
        _set_rng_state(torch.load(resume_from / f"rng_{accelerator.process_index}.pt", weights_only=False))
        step, best, first, history_seconds = state["step"], state["best"], state["first"], state["seconds"]
        accelerator.print(f"{description}: resuming at step {step}/{section.steps}")

    def save_checkpoint() -> None:
        # Every process writes into a staging folder; the main process then swaps it in with renames,
        # so a kill at any moment leaves either the previous or the new checkpoint complete.
        staging = checkpoint_dir.with_name("checkpoint.next")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        accelerator.wait_for_everyone()
        torch.save(rng_at_step, staging / f"rng_{accelerator.process_index}.pt")
        trainable = gather_trainable_state(model)
        optimizer_state = get_optimizer_state_dict(model, optimizer.optimizer, options=GATHERED)
        if accelerator.is_main_process:
            atomic_save_tensors(trainable, staging / "trainable.safetensors")
            torch.save(
                {"step": step, "best": best, "first": first, "seconds": history_seconds + time.perf_counter() - started,
                 "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
                staging / "state.pt",
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            previous = checkpoint_dir.with_name("checkpoint.previous")
            shutil.rmtree(previous, ignore_errors=True)
            if checkpoint_dir.exists():
                checkpoint_dir.rename(previous)
            staging.rename(checkpoint_dir)
            shutil.rmtree(previous, ignore_errors=True)
        accelerator.wait_for_everyone()

    def run_validation() -> None:
        nonlocal best, first
        model.eval()
        with torch.no_grad():
            metrics = validate(model)
        model.train()
        # One verdict for all: processes whose numbers differ in the last bit must not part ways below.
        metrics = broadcast_object_list([metrics])[0]
        first = first or metrics
        log({"step": step, "validation": metrics})
        if best is None or metrics[metric] < best[metric]:
            best = metrics
            trainable = gather_trainable_state(model)
            if accelerator.is_main_process:
                atomic_save_tensors(trainable, best_path)
        accelerator.wait_for_everyone()

    log_path = stage_dir / "log.jsonl"

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    started = time.perf_counter()
    model.train()
    if first is None:
        run_validation()
    # The RNG states at the start of step ``step``: a Ctrl-C mid-step must not save states that the
    # interrupted step (dropout, say) already advanced, or the replayed step would draw differently.
    rng_at_step = _rng_state()
    progress = tqdm(
        total=section.steps, initial=step, desc=description, unit="step", disable=not accelerator.is_main_process,
    )
    tokens_per_step = section.batch_size * blocks.shape[1]
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < section.steps:
            indices = global_batch_indices(step, section.batch_size, len(blocks), seed)
            mine = indices.view(section.gradient_accumulation, world, per_process)[:, accelerator.process_index]
            logged: dict[str, float] = {}
            for micro, micro_indices in enumerate(mine):
                last = micro == section.gradient_accumulation - 1
                with nullcontext() if last else accelerator.no_sync(wrapped):
                    with accelerator.autocast():
                        loss, numbers = loss_fn(wrapped, blocks[micro_indices].to(accelerator.device))
                    accelerator.backward(loss / section.gradient_accumulation)
                for key, value in numbers.items():
                    logged[key] = logged.get(key, 0.0) + value / section.gradient_accumulation
            if fsdp:
                for parameter in parameters:
                    parameter.grad = accelerator.reduce(parameter.grad, "mean")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            rng_at_step = _rng_state()
            window_steps += 1
            reduced = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item()
                       for k, v in logged.items()}
            elapsed = time.perf_counter() - window_start
            progress.set_postfix(loss=f"{reduced.get('loss', float('nan')):.4f}",
                                 tok_s=f"{tokens_per_step * window_steps / max(elapsed, 1e-9):.0f}")
            progress.update(1)
            if step % log_every == 0 or step == section.steps:
                log({"step": step, "lr": scheduler.get_last_lr()[0], **reduced})
            if step % section.validate_every == 0 or step == section.steps:
                run_validation()
            if step % section.checkpoint_every == 0 and step < section.steps:
                save_checkpoint()
    except KeyboardInterrupt:
        save_checkpoint()
        progress.close()
        raise
    progress.close()
    if best_path.is_file():
        load_trainable_state(model, best_path)
    accelerator.wait_for_everyone()
    return StageResult(best=best, first=first, steps=step, seconds=history_seconds + time.perf_counter() - started)
