"""LoRA finetuning of a linearized model, with optional distillation from the teacher's logits."""

from linearize.finetune.lora import add_lora, merge_lora
from linearize.finetune.train import distillation_loss, finetune_loss, run_finetune, teacher_logits

__all__ = ["add_lora", "distillation_loss", "finetune_loss", "merge_lora", "run_finetune", "teacher_logits"]
