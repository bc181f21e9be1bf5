"""Calibration data for `calibrated` routers: text an expert should receive, read into token chunks.

An expert names it under its `moekit:` key:

    experts:
      - source_model: org/code-model
        positive_prompts: ["def main():"]
        moekit:
          calibration: {data: data/code.jsonl, max_tokens: 200000}

`data` is a local `.txt` file (paragraphs, separated by blank lines), a `.jsonl` file (one record a
line, its `text_field`, else `text`, else its first string field) or `hf:dataset[:split]`, read
with `datasets` from the local Hugging Face cache. Records are read only until `max_tokens` tokens
have been taken, in chunks of at most `chunk_tokens` tokens, each starting with BOS like a prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from moekit.errors import SourceError
from moekit.recipe import CalibrationData


def load_calibration(settings: CalibrationData, tokenizer, expert: str) -> list[torch.Tensor]:
    """Token chunks (each (tokens,), BOS first) of `settings.data`, `settings.max_tokens` tokens at most."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = settings.chunk_tokens - len(bos)
    chunks, taken = [], 0
    for text in _records(settings, expert):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            piece = ids[start : start + body]
            room = settings.max_tokens - taken - len(bos)
            if room < 1:
                return chunks
            piece = bos + piece[:room]
            chunks.append(torch.tensor(piece, dtype=torch.long))
            taken += len(piece)
    if not chunks:
        raise SourceError(f"calibration data {settings.data!r} of expert {expert} holds no text")
    return chunks


def _records(settings: CalibrationData, expert: str) -> Iterator[str]:
    where = f"calibration data {settings.data!r} of expert {expert}"
    if settings.data.startswith("hf:"):
        yield from _dataset_records(settings, where)
        return
    path = Path(settings.data).expanduser()
    if not path.is_file():
        raise SourceError(f"{where} does not exist", hint="give a local .txt or .jsonl file, or hf:dataset[:split] for a dataset in the Hugging Face cache")
    if path.suffix not in (".txt", ".jsonl", ".md"):
        raise SourceError(f"{where} is a {path.suffix or 'suffix-less'} file; calibration data is read from .txt, .md or .jsonl files")
    try:
        with open(path, encoding="utf-8") as file:
            if path.suffix == ".jsonl":
                for number, line in enumerate(file, start=1):
                    if line.strip():
                        yield _text_of(_json_line(line, where, number), settings.text_field, f"{where}, line {number}")
            else:
                paragraph: list[str] = []
                for line in file:
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        yield "".join(paragraph)
                        paragraph = []
                if paragraph:
                    yield "".join(paragraph)
    except UnicodeDecodeError as err:
        raise SourceError(f"{where} is not UTF-8 text: {err}") from None


def _json_line(line: str, where: str, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise SourceError(f"{where}, line {number}, is not JSON: {err}") from None
    if not isinstance(record, dict):
        raise SourceError(f"{where}, line {number}, is a JSON {type(record).__name__}, not an object with a text field")
    return record


def _text_of(record: dict, field: str | None, where: str) -> str:
    if field is not None:
        if not isinstance(record.get(field), str):
            raise SourceError(f"{where} has no text field {field!r} (fields: {', '.join(record)})")
        return record[field]
    if isinstance(record.get("text"), str):
        return record["text"]
    for value in record.values():
        if isinstance(value, str):
            return value
    raise SourceError(f"{where} has no string field to read text from (fields: {', '.join(record)})", hint="name it with `text_field:`")


def _dataset_records(settings: CalibrationData, where: str) -> Iterator[str]:
    name, _, split = settings.data.removeprefix("hf:").partition(":")
    try:
        import datasets

        rows = datasets.load_dataset(name, split=split or "train", streaming=False)
    except Exception as err:  # datasets raises many unrelated types for "not found / not cached / bad split"
        raise SourceError(
            f"{where} cannot be loaded: {type(err).__name__}: {err}",
            hint="datasets are read from the local Hugging Face cache when offline; download it once with `hf download --repo-type dataset " + name + "`",
        ) from None
    for index, row in enumerate(rows):
        yield _text_of(row, settings.text_field, f"{where}, row {index}")
