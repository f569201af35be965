"""Tiny teacher and student folders shared by the eval tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_testing import tiny_tokenizer
from model_testing import options_for, tiny_llama

import linearize

STUDENT_ATTENTION = "window_hedgehog"


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    """``teacher``: a saved tiny Llama with its tokenizer; ``student``: its linearize export."""
    root = tmp_path_factory.mktemp("tiny-eval-models")
    tokenizer = tiny_tokenizer()
    teacher = tiny_llama()
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    student = linearize.convert(teacher, attention=STUDENT_ATTENTION, **options_for(STUDENT_ATTENTION))
    linearize.export(student, tokenizer, root / "student")
    return {"teacher": root / "teacher", "student": root / "student"}


@pytest.fixture(scope="session")
def task_manager():
    """lm-eval's task index with the shipped tasks (indexing takes seconds: build it once)."""
    from linearize.eval.harness import task_manager

    return task_manager()
