"""Training text: read the recipe's sources, tokenize with the teacher's tokenizer, pack into blocks.

Documents are tokenized on their own, joined with the end-of-text token, packed into blocks of
``block_length`` tokens, shuffled with the run's seed and split into validation and training
blocks, so the split is the same on every run, process and resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from linearize.corpora import corpus_documents
from linearize.errors import UserError
from linearize.recipe import DataSection, DataSource


@dataclass
class Blocks:
    train: torch.Tensor  # [N, block_length] token ids
    validation: torch.Tensor  # [M, block_length]

    @property
    def train_tokens(self) -> int:
        return self.train.numel()


def _chat_text(tokenizer: PreTrainedTokenizerBase, instruction: str, response: str) -> str:
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{instruction}\n{response}"


def _jsonl_documents(source: DataSource, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    documents = []
    path = Path(source.path).expanduser()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number} is not valid JSON ({error.msg}). Fix: one JSON object per line") from None
        fields = [source.instruction_field, source.response_field] if source.instruction_field else [source.text_field]
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise UserError(
                f"{path}:{number} has no field {missing[0]!r}. Fix: set the source's text_field "
                "(or instruction_field/response_field) to the field that holds the text"
            )
        if source.instruction_field:
            documents.append(_chat_text(tokenizer, record[source.instruction_field], record[source.response_field]))
        else:
            documents.append(str(record[source.text_field]))
    return documents


def _hub_documents(source: DataSource) -> list[str]:
    try:
        import datasets

        dataset = datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as error:  # offline machines, unknown names and splits all land here
        raise UserError(
            f"could not load the dataset {source.name!r} (split {source.split!r}): {error}. "
            "Fix: check the name, or use a local text/jsonl source where no hub is reachable"
        ) from None
    if source.text_field not in dataset.column_names:
        raise UserError(f"dataset {source.name!r} has no column {source.text_field!r}; columns: {dataset.column_names}")
    return [str(text) for text in dataset[source.text_field]]


def source_documents(source: DataSource, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The documents of one recipe data source."""
    if source.type == "corpus":
        documents = corpus_documents(source.name)
    elif source.type == "text":
        documents = [Path(source.path).expanduser().read_text(encoding="utf-8")]
    elif source.type == "jsonl":
        documents = _jsonl_documents(source, tokenizer)
    else:
        documents = _hub_documents(source)
    return documents[: source.max_documents]


def pack(token_lists: list[list[int]], separator: int | None, block_length: int) -> torch.Tensor:
    """Concatenate token lists (with ``separator`` between them) into [N, block_length] blocks."""
    stream: list[int] = []
    for tokens in token_lists:
        stream.extend(tokens)
        if separator is not None:
            stream.append(separator)
    count = len(stream) // block_length
    return torch.tensor(stream[: count * block_length], dtype=torch.long).view(count, block_length)


def build_blocks(section: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int) -> Blocks:
    """Tokenize every source, pack, shuffle with ``seed`` and split off the validation blocks."""
    documents = [doc for source in section.sources for doc in source_documents(source, tokenizer)]
    token_lists = tokenizer(documents, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    blocks = pack(token_lists, tokenizer.eos_token_id, section.block_length)
    needed = section.validation_blocks + 1
    if len(blocks) < needed:
        raise UserError(
            f"the data gives {len(blocks)} blocks of {section.block_length} tokens, but data.validation_blocks="
            f"{section.validation_blocks} needs at least {needed}. Fix: add data, or lower data.block_length "
            "or data.validation_blocks"
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    blocks = blocks[order]
    return Blocks(train=blocks[section.validation_blocks:], validation=blocks[: section.validation_blocks])
