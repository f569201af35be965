"""Fixtures shared by the model tests (helpers live in model_testing.py)."""

import pytest
from model_testing import TEACHERS


@pytest.fixture(params=sorted(TEACHERS))
def family(request) -> str:
    return request.param
