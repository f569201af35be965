"""The compiled CPU decode step (``linearize.kernels.compiled``) computes what the full forward does.

The rest of the suite runs the eager step (conftest switches compilation off: it costs seconds per
model shape). Here it is switched on, for one Llama-family and one GPT-2 model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from model_testing import VOCAB, assert_close, converted

from linearize.hf import modeling_linearized
from linearize.kernels.compiled import ENVIRONMENT_SWITCH, CompiledOnCPU

PROMPT, NEW = 9, 12  # the sequence outgrows window + sinks, so steps fold keys into the state
STEPS = {"llama": modeling_linearized._llama_decode_step, "gpt2": modeling_linearized._gpt2_decode_step}


@pytest.fixture
def compiling(monkeypatch):
    monkeypatch.setenv(ENVIRONMENT_SWITCH, "1")


@pytest.mark.parametrize("family", sorted(STEPS))
def test_compiled_decode_logits_equal_full_forward(family, compiling):
    """Greedy generation through the compiled step: every step's logits equal the full forward's,
    and the steps did run compiled (the wrapper compiled, and no layer fell back)."""
    step = STEPS[family]
    model = converted(family, "window_hedgehog")
    torch.manual_seed(4)
    prompt = torch.randint(3, VOCAB, (1, PROMPT))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        full = model(out.sequences[:, :-1], use_cache=False).logits
    assert step.failure is None, step.failure
    assert step.compiled is not None and step.uses_compiled(prompt.float())
    for index, logits in enumerate(out.logits):
        assert_close(f"step {index} logits", full[:, PROMPT - 1 + index], logits, atol=1e-4, rtol=0)


def test_compiled_step_changes_the_state_as_the_eager_step(compiling):
    """One compiled step from a filled cache leaves the same state (ring, [S | z], positions, seen)
    and gives the same logits as one eager step from a copy of that cache."""
    model = converted("llama", "window_hedgehog")
    torch.manual_seed(6)
    sequence = torch.randint(3, VOCAB, (1, PROMPT + 1))
    with torch.no_grad():
        caches = []
        for _ in range(2):
            cache = model.new_cache()
            model(sequence[:, :PROMPT], cache=cache, use_cache=True)
            caches.append(cache)
        compiled = model(sequence[:, PROMPT:], cache=caches[0], use_cache=True).logits
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(ENVIRONMENT_SWITCH, "0")
            eager = model(sequence[:, PROMPT:], cache=caches[1], use_cache=True).logits
    assert_close("logits", eager, compiled, atol=1e-5, rtol=0)
    for compiled_layer, eager_layer in zip(caches[0].layers, caches[1].layers, strict=True):
        for name, a, b in zip(("kv", "ring", "positions", "seen"), compiled_layer.state.tensors(),
                              eager_layer.state.tensors(), strict=True):
            assert_close(name, b, a, atol=1e-5, rtol=0)


def test_switched_off_or_on_cuda_it_calls_the_function_itself(monkeypatch):
    def step(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    wrapped = CompiledOnCPU(step)
    monkeypatch.setenv(ENVIRONMENT_SWITCH, "0")
    assert not wrapped.uses_compiled(torch.ones(1))
    assert torch.equal(wrapped(torch.ones(3)), torch.full((3,), 2.0))
    assert wrapped.compiled is None
    monkeypatch.setenv(ENVIRONMENT_SWITCH, "1")
    assert wrapped.uses_compiled(torch.ones(1))
    assert not wrapped.uses_compiled(torch.ones(1, device="meta"))  # not a CPU tensor: never compiled


def test_a_failed_compilation_warns_once_and_decodes_eagerly(monkeypatch, compiling):
    """Where inductor cannot build (here: no C++ compiler found), the call still gives the eager
    result, with one warning that names the fix; later calls do not try again."""

    def no_compiler(fn, **kwargs):
        def compiled(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(fn, RuntimeError("InvalidCxxCompiler: no working C++ compiler"), None)
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    wrapped = CompiledOnCPU(lambda x: x + 1)
    with pytest.warns(UserWarning, match="C\\+\\+ compiler"):
        assert torch.equal(wrapped(torch.zeros(2)), torch.ones(2))
    assert wrapped.failure is not None and not wrapped.uses_compiled(torch.zeros(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would fail here
        assert torch.equal(wrapped(torch.zeros(2)), torch.ones(2))
