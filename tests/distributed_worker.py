"""One process of the tests in test_distributed.py, started by torchrun (2 processes on CPU, gloo).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py blocks RECIPE OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py resume ddp|fsdp OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py run RECIPE

``blocks`` builds the recipe's blocks and writes, per rank, a digest of them and how often this
process tokenized. ``resume`` trains attention transfer and then LoRA (uninterrupted; Ctrl-C in
the middle of one stage, then rerun) and writes the final trainable weights of both. ``run`` runs a
whole recipe under FSDP.

accelerate 1.15 only turns on FSDP for GPU-like devices: ``AcceleratorState.__init__`` sets
``DistributedType.FSDP`` inside ``elif self.distributed_type in [MULTI_GPU, MULTI_NPU, ...]``, so
with ``Accelerator(cpu=True)`` (MULTI_CPU) the FSDP plugin is dropped without a word and
``prepare`` wraps the model in DDP. torch's FSDP2 itself runs on CPU over gloo, so the ``fsdp``
mode switches accelerate's state to FSDP by hand, exactly where that branch would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from model_testing import VOCAB, converted  # noqa: E402

import linearize.data  # noqa: E402
import linearize.pipeline  # noqa: E402
from linearize.attention_transfer import run_attention_transfer  # noqa: E402
from linearize.finetune import add_lora, run_finetune  # noqa: E402
from linearize.recipe import AttentionTransferSection, FinetuneSection, load_recipe  # noqa: E402
from linearize.training import check_accelerator, gather_trainable_state, load_trainable_state  # noqa: E402


def fsdp_accelerator(**kwargs) -> Accelerator:
    """An fp32 Accelerator under FSDP2 on CPU, with the plugin that the FSDP_* variables describe."""
    accelerator = Accelerator(**{**kwargs, "cpu": True})
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* (set by accelerate launch or by the caller)
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ ends
    return accelerator


def blocks(recipe_path: str, out: Path) -> None:
    recipe = load_recipe(recipe_path)
    calls = []
    pack = linearize.data.pack
    linearize.data.pack = lambda *args: calls.append(1) or pack(*args)
    accelerator = Accelerator(cpu=True)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.ref)
    built = linearize.data.build_blocks(recipe.data, tokenizer, recipe.run.seed,
                                        Path(recipe.run.output_dir) / "data", accelerator)
    digest = hashlib.sha256(torch.cat([built.train, built.validation]).numpy().tobytes()).hexdigest()
    (out / f"rank{accelerator.process_index}.json").write_text(
        json.dumps({"digest": digest, "tokenized": len(calls), "train": len(built.train)})
    )


def interrupt_at(model: torch.nn.Module, count: int) -> None:
    """Raise KeyboardInterrupt, as Ctrl-C would, at the ``count``-th training forward of ``model``."""
    seen = []

    def hook(module, args):
        seen.extend([1] if module.training else [])
        if len(seen) == count:
            handle.remove()
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(hook)


def resume(mode: str, out: Path) -> None:
    if mode == "fsdp":
        os.environ.update(FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                          FSDP_CPU_RAM_EFFICIENT_LOADING="false")
    accelerator = fsdp_accelerator() if mode == "fsdp" else Accelerator(cpu=True)
    check_accelerator(accelerator)
    torch.manual_seed(0)
    train_blocks, validation_blocks = torch.randint(3, VOCAB, (16, 24)), torch.randint(3, VOCAB, (2, 24))
    transfer = AttentionTransferSection(steps=6, batch_size=2, lr=0.05, validate_every=6, checkpoint_every=2,
                                        warmup_steps=2)
    # Two micro-batches per step, so an interruption can fall mid-step; dropout, so RNG states matter.
    finetune = FinetuneSection(steps=6, batch_size=4, gradient_accumulation=2, lr=0.01, validate_every=6,
                               checkpoint_every=2, lora={"rank": 2, "alpha": 4, "dropout": 0.1})

    def stages(run_dir: Path, interrupt: str | None = None) -> dict[str, torch.Tensor] | None:
        """Attention transfer then LoRA into ``run_dir``: the trainable weights of both (on the main
        process), or None when the ``interrupt`` stage was interrupted at its 4th training forward."""
        model = converted("llama", "window_hedgehog")
        if interrupt == "transfer":
            interrupt_at(model, 4)
        try:
            run_attention_transfer(accelerator, model, train_blocks, validation_blocks, transfer,
                                   run_dir / "attention_transfer", seed=0, log_every=1)
            # LoRA goes on a whole copy, as in the pipeline: under FSDP ``model`` is sharded now.
            student = converted("llama", "window_hedgehog")
            load_trainable_state(student, run_dir / "attention_transfer" / "best.safetensors")
            for parameter in student.parameters():
                parameter.requires_grad_(False)
            torch.manual_seed(1)
            adapted = add_lora(student, finetune.lora)
            if interrupt == "finetune":
                interrupt_at(adapted, 4)
            run_finetune(accelerator, adapted, train_blocks, validation_blocks, finetune, run_dir / "finetune",
                         seed=0, log_every=1)
        except KeyboardInterrupt:
            return None
        assert isinstance(model, FSDPModule) == isinstance(adapted, FSDPModule) == (mode == "fsdp")
        return {**{f"transfer/{k}": v for k, v in gather_trainable_state(model).items()},
                **{f"finetune/{k}": v for k, v in gather_trainable_state(adapted).items()}}

    reference = stages(out / "reference")
    for stage in ("transfer", "finetune"):
        folder = out / f"interrupted-{stage}"
        assert stages(folder, interrupt=stage) is None, "the interruption did not happen"
        resumed = stages(folder)
        if accelerator.is_main_process:
            torch.save({"reference": reference, "resumed": resumed}, out / f"{stage}.pt")
    accelerator.wait_for_everyone()


def run(recipe_path: str) -> None:
    """``linearize run RECIPE`` with accelerate's state switched to FSDP (the launcher set FSDP_*)."""
    linearize.pipeline.Accelerator = fsdp_accelerator
    linearize.pipeline.run_recipe(load_recipe(recipe_path))


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "blocks":
        blocks(arguments[0], Path(arguments[1]))
    elif command == "resume":
        resume(arguments[0], Path(arguments[1]))
    else:
        run(arguments[0])
