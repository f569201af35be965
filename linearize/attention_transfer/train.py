"""The attention-transfer stage: train feature maps (and mix factors, JRT encoders) layer by layer.

Only the new parameters train. Each step runs the model once in transfer mode (so every layer
sees the teacher's inputs) and sums the per-layer losses. Validation reports every layer's loss, so
the hardest layers are visible and can be kept as softmax attention (``auto_softmax_layers``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from linearize.attention_transfer.transfer_mode import transfer_mode
from linearize.recipe import AttentionTransferSection
from linearize.training import StageResult, train

ENCODER_MARKERS = ("k_enc_proj", "v_enc_proj", "c_attn_enc")


def mark_transfer_parameters(model: torch.nn.Module, jrt_prefix_length: int = 0) -> int:
    """Make exactly the conversion's new parameters trainable; returns how many values train.

    JRT encoders train only when the transfer forward reads a prefix (``jrt_prefix_length`` > 0);
    otherwise they get no gradient, which DDP would treat as an error.
    """
    markers = (".core.",) + (ENCODER_MARKERS if jrt_prefix_length > 0 else ())
    count = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(marker in name for marker in markers))
        count += parameter.numel() if parameter.requires_grad else 0
    return count


def transfer_forward(model: torch.nn.Module, batch: torch.Tensor, section: AttentionTransferSection) -> None:
    """One forward pass in transfer mode; JRT models read the section's prefix (and no loss falls on it)."""
    extra = {"jrt_prefix_length": section.jrt_prefix_length} if section.jrt_prefix_length else {}
    model(input_ids=batch, use_cache=False, logits_to_keep=1, **extra)


def layer_losses(model: torch.nn.Module, blocks: torch.Tensor, section: AttentionTransferSection,
                 batch_size: int = 1) -> dict[str, float]:
    """Mean weighted transfer loss over ``blocks``, in total and per layer (``layer_<i>``)."""
    totals: dict[str, float] = {}
    device = next(model.parameters()).device
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        with transfer_mode(model, need_xent=section.loss.xent > 0) as recorders:
            transfer_forward(model, batch, section)
        for recorder in recorders:
            value = weighted(recorder.losses, section).item() * len(batch) / len(blocks)
            totals[f"layer_{recorder.layer}"] = totals.get(f"layer_{recorder.layer}", 0.0) + value
    totals["loss"] = sum(totals.values())
    return totals


def weighted(losses: dict[str, torch.Tensor], section: AttentionTransferSection) -> torch.Tensor:
    """The recipe's weighted sum of a layer's losses (a loss with weight 0 may be absent)."""
    weights = {"xent": section.loss.xent, "mse": section.loss.mse}
    return sum(weight * losses[name] for name, weight in weights.items() if weight > 0)


def run_attention_transfer(
    accelerator: Accelerator, model: torch.nn.Module, train_blocks: torch.Tensor, validation_blocks: torch.Tensor,
    section: AttentionTransferSection, stage_dir: Path, *, seed: int, log_every: int,
) -> StageResult:
    """Train the new parameters of ``model`` to reproduce its teacher's attention, layer by layer."""
    mark_transfer_parameters(model, section.jrt_prefix_length)

    def loss_fn(wrapped, batch):
        with transfer_mode(model, need_xent=section.loss.xent > 0) as recorders:
            # Through the (possibly DDP) wrapper so gradients synchronise; the losses need no logits.
            transfer_forward(wrapped, batch, section)
        per_layer = [weighted(recorder.losses, section) for recorder in recorders]
        loss = torch.stack(per_layer).sum()
        return loss, {"loss": loss.item()}

    return train(
        accelerator, model, train_blocks, loss_fn,
        lambda m: layer_losses(m, validation_blocks, section), section, stage_dir,
        seed=seed, log_every=log_every, description="attention transfer",
    )
