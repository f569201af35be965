"""The LoRA finetuning stage: next-token cross-entropy plus optional KL to the teacher's logits.

The teacher needs no second copy of the model: the same model with its adapters disabled, run in
transfer mode (softmax attention in every layer), *is* the teacher.

JRT models may train with a non-causal prefix (``jrt_prefix_length`` M): the first M tokens are
read by the encoder, so the logits at positions < M - 1 saw their targets; no loss falls on them.
Validation is scored causally, like every perplexity.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from linearize.attention_transfer.transfer_mode import transfer_mode
from linearize.recipe import FinetuneSection
from linearize.training import StageResult, train


def teacher_logits(model, batch: torch.Tensor) -> torch.Tensor:
    """Logits of the original softmax-attention model, from the adapted linearized ``model``."""
    with torch.no_grad(), model.disable_adapter(), transfer_mode(model, with_losses=False):
        return model(input_ids=batch, use_cache=False).logits


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) over next-token distributions, scaled by T^2 (Hinton et al. 2015)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student.float() / t, dim=-1).flatten(0, -2),
        F.log_softmax(teacher.float() / t, dim=-1).flatten(0, -2),
        log_target=True, reduction="batchmean",
    ) * t * t


@torch.no_grad()
def validation_metrics(model, blocks: torch.Tensor) -> dict[str, float]:
    """Next-token loss and perplexity on the validation blocks."""
    device = next(model.parameters()).device
    total = 0.0
    for block in blocks:
        batch = block[None].to(device)
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.item()
    loss = total / len(blocks)
    return {"loss": loss, "perplexity": math.exp(loss)}


def finetune_loss(wrapped, model, batch: torch.Tensor, section: FinetuneSection) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token CE (plus KD) of ``batch`` [B, T] through ``wrapped`` (``model``, maybe DDP-wrapped).

    With a JRT prefix of M tokens, the logits at positions < M - 1 read their own target through
    the encoder, so only the targets from token M on are scored.
    """
    prefix = section.jrt_prefix_length
    labels = batch.clone()
    labels[:, :prefix] = -100
    extra = {"jrt_prefix_length": prefix} if prefix else {}
    output = wrapped(input_ids=batch, labels=labels, use_cache=False, **extra)
    numbers = {"ce": output.loss.item()}
    loss = output.loss
    distill = section.distill
    if distill.weight > 0:
        scored = slice(max(prefix - 1, 0), -1)
        kd = distillation_loss(output.logits[:, scored], teacher_logits(model, batch)[:, scored], distill.temperature)
        loss = loss + distill.weight * kd
        numbers["kd"] = kd.item()
    numbers["loss"] = loss.item()
    return loss, numbers


def run_finetune(
    accelerator: Accelerator, model, train_blocks: torch.Tensor, validation_blocks: torch.Tensor,
    section: FinetuneSection, stage_dir: Path, *, seed: int, log_every: int,
) -> StageResult:
    """Train the LoRA adapters of ``model`` (a peft model); keeps the best by validation loss."""
    return train(
        accelerator, model, train_blocks, lambda wrapped, batch: finetune_loss(wrapped, model, batch, section),
        lambda m: validation_metrics(m, validation_blocks), section, stage_dir, seed=seed, log_every=log_every,
        description="LoRA finetune",
    )
