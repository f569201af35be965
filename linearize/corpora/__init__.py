"""Small real corpora shipped with the package (each folder has a README with source and licence)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

CORPORA = {
    "wikitext2": "wikitext2/wiki.test.raw",  # WikiText-2 raw test split (evaluation), CC BY-SA 3.0
    "c4_demo": "c4_demo/c4_demo.jsonl",  # 300 C4 web documents (training), ODC-BY 1.0
}


def corpus_path(name: str) -> Path:
    """Path of the shipped corpus ``name``; raises ValueError listing the known names."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; shipped corpora: {sorted(CORPORA)}")
    return Path(str(resources.files("linearize.corpora") / CORPORA[name]))


def corpus_documents(name: str) -> list[str]:
    """The corpus as documents: one per JSON line for .jsonl corpora, the whole text otherwise."""
    path = corpus_path(name)
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return [text]


def read_corpus(name: str) -> str:
    """The corpus as one text with newline line endings."""
    return "\n\n".join(corpus_documents(name))
