"""Fixtures shared by the model tests (helpers live in model_testing.py)."""

import pytest
from model_testing import TEACHERS, save_tiny_model_folder


@pytest.fixture(params=sorted(TEACHERS))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """A saved tiny Llama with its tokenizer: a local model reference for CLI and recipe tests."""
    return save_tiny_model_folder(tmp_path_factory.mktemp("tiny-llama"))
