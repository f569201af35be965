"""Where a timing was measured, recorded next to every speed number (speeds are only compared as
ratios within one run, but a reader needs the machine and threads to read them)."""

from __future__ import annotations

import os
import platform

import torch


def machine_settings(model: torch.nn.Module) -> dict:
    """Device, dtype, torch threads, CPU count, machine, torch version (and the GPU's name on CUDA)."""
    parameter = next(model.parameters())
    found = {
        "device": str(parameter.device), "dtype": str(parameter.dtype), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch_version": torch.__version__,
    }
    if parameter.device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(parameter.device)
    return found


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer read afterwards includes it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
