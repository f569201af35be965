"""Small real corpora shipped with the package (each folder has a README with source and licence)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CORPORA = {
    "wikitext2": "wikitext2/wiki.test.raw",  # WikiText-2 raw test split, CC BY-SA 3.0
}


def corpus_path(name: str) -> Path:
    """Path of the shipped corpus ``name``; raises ValueError listing the known names."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; shipped corpora: {sorted(CORPORA)}")
    return Path(str(resources.files("linearize.corpora") / CORPORA[name]))


def read_corpus(name: str) -> str:
    """The corpus text with newline line endings."""
    return corpus_path(name).read_text(encoding="utf-8").replace("\r\n", "\n")
