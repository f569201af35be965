"""Training text: read the recipe's sources, tokenize with the teacher's tokenizer, pack into blocks.

Documents are tokenized on their own, joined with the end-of-text token, packed into blocks of
``block_length`` tokens, shuffled with the run's seed and split into validation and training
blocks. The main process does this once and caches the blocks in the run folder, under a name
hashed from the data section, the tokenizer and the seed; the other processes, and every rerun or
resume of the run, read that file, so all of them train on the same blocks.

Dataset sources (``hf``, ``parquet``) are streamed, so ``max_documents`` reads only that many rows,
not the whole split (FineWeb-Edu's sample-10BT is 28 GB); a ``disk`` dataset is memory-mapped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from linearize.corpora import corpus_documents
from linearize.errors import UserError
from linearize.recipe import DataSection, DataSource
from linearize.training import atomic_save_tensors

TOKENIZE_BATCH = 1000  # documents per tokenizer call: bounds the Python lists alive at once


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


def _record_text(record: object, source: DataSource, tokenizer: PreTrainedTokenizerBase, where: str, field: str) -> str:
    """The document of one record (a JSON line or a dataset row): its text, or its rendered chat turn."""
    names = [source.instruction_field, source.response_field] if source.instruction_field else [source.text_field]
    missing = [name for name in names if not isinstance(record, dict) or name not in record]
    if missing:
        present = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(
            f"{where} has no field {missing[0]!r} (it has {present}). Fix: set {field}.text_field "
            "(or instruction_field/response_field) to the field that holds the text"
        )
    if source.instruction_field:
        return _chat_text(tokenizer, record[source.instruction_field], record[source.response_field])
    return str(record[source.text_field])


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number} is not valid JSON ({error.msg}). Fix: one JSON object per line") from None
        yield f"{path}:{number}", record


def _dataset_rows(source: DataSource, field: str) -> Iterator[dict]:
    """The rows of a ``datasets`` source, read lazily so that a row limit stops the reading."""
    import datasets  # only sources that need it pay for the import

    try:
        if source.type == "hf":
            yield from datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
        elif source.type == "parquet":
            files = source.parquet_files()
            yield from datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        else:
            dataset = datasets.load_from_disk(str(Path(source.path).expanduser()))
            if isinstance(dataset, datasets.DatasetDict):
                if source.split not in dataset:
                    raise UserError(f"{field}.split: {source.path!r} has no split {source.split!r}. "
                                    f"Fix: use one of {sorted(dataset)}")
                dataset = dataset[source.split]
            yield from dataset
    except UserError:
        raise
    except Exception as error:  # offline machines, unknown names and splits, unreadable files all land here
        if source.type == "hf":
            what = f"the dataset {source.name!r} (split {source.split!r})"
            fix = "check the name, or save the dataset and use a disk or parquet source where no hub is reachable"
        else:
            what, fix = f"the {source.type} dataset at {source.path!r}", "check the files there"
        raise UserError(f"{field}: could not read {what}: {error}. Fix: {fix}") from None


def source_documents(source: DataSource, tokenizer: PreTrainedTokenizerBase, field: str) -> Iterator[str]:
    """The documents of one recipe data source (at most ``max_documents``); ``field`` names it in errors."""
    if source.type == "corpus":
        documents: Iterable[str] = corpus_documents(source.name)
    elif source.type == "text":
        documents = [Path(source.path).expanduser().read_text(encoding="utf-8")]
    else:
        records = (
            _jsonl_records(Path(source.path).expanduser()) if source.type == "jsonl"
            else ((f"{field} row {number}", row) for number, row in enumerate(_dataset_rows(source, field), start=1))
        )
        documents = (_record_text(record, source, tokenizer, where, field) for where, record in records)
    return itertools.islice(documents, source.max_documents)


def pack(documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, block_length: int) -> torch.Tensor:
    """Tokenize ``documents``, join them with the end-of-text token and cut [N, block_length] int32 blocks."""
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    documents = iter(documents)
    pieces = [torch.empty(0, dtype=torch.int32)]
    while batch := list(itertools.islice(documents, TOKENIZE_BATCH)):
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        pieces.append(torch.tensor([token for tokens in ids for token in tokens + separator], dtype=torch.int32))
    stream = torch.cat(pieces)
    count = len(stream) // block_length
    return stream[: count * block_length].view(count, block_length)


def _tokenizer_spec(tokenizer: PreTrainedTokenizerBase) -> list:
    """What the blocks depend on in the tokenizer: its full definition where it has one (vocabulary,
    merges, normalizer), else its vocabulary; the end-of-text token; the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return [definition, tokenizer.eos_token_id, tokenizer.chat_template]


def blocks_path(section: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int, cache_dir: Path) -> Path:
    """The cache file of these blocks: its name hashes everything they depend on."""
    key = json.dumps([section.model_dump(mode="json"), seed, _tokenizer_spec(tokenizer)], sort_keys=True)
    return cache_dir / f"blocks-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def _tokenized_blocks(section: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int) -> dict[str, torch.Tensor]:
    documents = itertools.chain.from_iterable(
        source_documents(source, tokenizer, f"data.sources.{index}") for index, source in enumerate(section.sources)
    )
    blocks = pack(documents, tokenizer, section.block_length)
    needed = section.validation_blocks + 1
    if len(blocks) < needed:
        raise UserError(
            f"the data gives {len(blocks)} blocks of {section.block_length} tokens, but data.validation_blocks="
            f"{section.validation_blocks} needs at least {needed}. Fix: add data, or lower data.block_length "
            "or data.validation_blocks"
        )
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]
    return {"train": blocks[section.validation_blocks:], "validation": blocks[: section.validation_blocks]}


def build_blocks(section: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int, cache_dir: Path,
                 accelerator: Accelerator) -> Blocks:
    """Tokenize every source, pack, shuffle with ``seed`` and split off the validation blocks.

    The main process builds the blocks once into ``cache_dir`` (while the others wait); then every
    process reads that file. Delete it to rebuild the blocks from changed data files.
    """
    path = blocks_path(section, tokenizer, seed, cache_dir)
    with accelerator.main_process_first():
        if not path.is_file():
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_save_tensors(_tokenized_blocks(section, tokenizer, seed), path)
    saved = load_file(path)
    return Blocks(train=saved["train"].long(), validation=saved["validation"].long())
