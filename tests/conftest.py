"""Fixtures shared by the tests (helpers live in model_testing.py)."""

import os

import torch

# Without CUDA the Triton kernels run in Triton's interpreter, which has to be switched on before
# anything (transformers, through torch._dynamo) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Compiling the decode step costs seconds per model shape, and the suite decodes hundreds of tiny
# models of different shapes: the suite runs the eager step, and test_compiled_decode.py the compiled one.
os.environ.setdefault("LINEARIZE_COMPILE_DECODE", "0")

import pytest  # noqa: E402
from model_testing import TEACHERS, save_tiny_model_folder  # noqa: E402


@pytest.fixture(params=sorted(TEACHERS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """A saved tiny Llama with its tokenizer: a local model reference for CLI and recipe tests."""
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors, where threads only cost time (a lot on a busy
    machine); the count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
