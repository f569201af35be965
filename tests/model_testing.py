"""Test helpers: tiny random models of every supported family, and a checked comparison."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import linearize

VOCAB = 97

ALL_ATTENTIONS = ["hedgehog", "based", "window_hedgehog", "window_based", "jrt", "window_hedgehog_cache"]
# Test variants that are a preset plus options: a global cache of 3 keys per KV head, chosen every
# 4 tokens (so the test sequences cross several blocks and the cache fills and turns over).
TEST_VARIANTS = {"window_hedgehog_cache": ("window_hedgehog", {"global_cache": 3, "global_cache_block": 4})}

# Small enough for fast CPU tests, odd enough to catch shape bugs: GQA (4 query heads, 2 KV
# heads), a non-power-of-two head size (12) and window/sinks shorter than the test sequences.
SMALL_WINDOW = {"window": 6, "sink_tokens": 2}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=36, n_layer=2, n_head=3, n_positions=256, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_qwen2() -> Qwen2ForCausalLM:
    """Qwen2: biases on q/k/v (not o) and an output layer not tied to the embeddings."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None and model.lm_head.weight is not model.model.embed_tokens.weight
    return model


# Shorter than most test sequences, so the teacher's own window is exercised; the converted
# students use windows <= this (SMALL_WINDOW).
MISTRAL_SLIDING_WINDOW = 8


def tiny_mistral() -> MistralForCausalLM:
    """Mistral with a sliding window shorter than the test sequences (as Mistral-7B-v0.1's 4096)."""
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
        sliding_window=MISTRAL_SLIDING_WINDOW,
    )
    return MistralForCausalLM(config).eval()


TEACHERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "qwen2": tiny_qwen2, "mistral": tiny_mistral}


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a teacher or student of any tested family."""
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def attention_attr(family: str) -> str:
    return "attn" if family == "gpt2" else "self_attn"


def options_for(attention: str) -> dict:
    """Conversion options used by the tests: small windows so sequences outgrow them."""
    window = dict(SMALL_WINDOW) if attention.startswith("window") else {}
    return {**window, **TEST_VARIANTS.get(attention, ("", {}))[1]}


def preset_of(attention: str) -> str:
    """The ``linearize.convert`` preset of a test variant."""
    return TEST_VARIANTS.get(attention, (attention, {}))[0]


def converted(family: str, attention: str, **options):
    """A tiny teacher of ``family`` converted to ``attention`` with non-trivial new parameters."""
    model = linearize.convert(TEACHERS[family](), attention=preset_of(attention),
                              **{**options_for(attention), **options})
    # Move new parameters away from their initialisation so tests see every term of the math.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".core." in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    # Random models emit EOS at random; generation tests compare fixed-length greedy runs.
    model.generation_config.eos_token_id = None
    return model.eval()


def assert_close(name: str, reference: torch.Tensor, actual: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4):
    """Compare two tensors; a failure names the tensor, its shape and the worst error."""
    assert reference.shape == actual.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    error = (reference.float() - actual.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    assert error <= atol + rtol * scale, f"{name} {tuple(reference.shape)}: max abs error {error:.3e} (scale {scale:.3e})"


# Runs in a fresh interpreter where `import linearize` fails, as on a machine without the package:
# everything must come from the export folder's own modeling files.
RELOAD_WITHOUT_LINEARIZE = textwrap.dedent(
    """
    import json, sys
    sys.modules["linearize"] = None  # any import of linearize now raises ImportError
    import torch
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    for folder, ids_file, out_file in jobs:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        assert "linearize" not in type(model).__module__.split(".")[0], type(model).__module__
        with torch.no_grad():
            torch.save(model(torch.load(ids_file)).logits, out_file)
    """
)


def reload_in_fresh_process(jobs: list[tuple[Path, Path, Path]]) -> None:
    """For each (export folder, token ids file, output file): reload and save its logits."""
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_LINEARIZE, json.dumps([[str(p) for p in job] for job in jobs])],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


WORDS = ["[UNK]", "[PAD]", "the", "of", "and", "in", "to", "a", "is", "was", "The", ",", ".", "capital", "France"]


def save_tiny_model_folder(folder: Path) -> Path:
    """Save a tiny Llama and a small word-level tokenizer, like a local HF model folder."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="[PAD]")
    model = tiny_llama()
    model.config.max_position_embeddings = 1024  # room for 512-token evaluation chunks
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
