"""Evaluation sets: local text / JSONL files, Hub datasets (`hf:name[:split]`) and each expert's prompts.

A set is a list of documents; a document is either a string or a chat (a list of `{"role", "content"}`
messages), rendered per model with that model's chat template (see `render`), so that every model sees
the same conversations in the format it was trained on.

Local text files: documents are separated by blank lines; a file without any blank line holds one
document per line. JSONL files: one object per line with a `text` string or a `messages` list.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from moekit.errors import DataError

Document = str | list[dict]
HUB_PREFIX = "hf:"
PROMPTS_PREFIX = "prompts:"
DEFAULT_HUB_SPLIT = "test"
BLANK_LINE = re.compile(r"\n[ \t]*\n")


@dataclass
class EvalSet:
    name: str
    source: str  # file path, hf:name[:split], or a description of where the prompts came from
    documents: list[Document]
    expert: int | None = None  # index of the expert this set belongs to (its prompts or its domain)
    notes: list[str] = field(default_factory=list)


def load_set(name: str, spec: str, limit: int | None = None) -> EvalSet:
    """Read one `--data NAME=SPEC` set; raises DataError naming the file (and line) that is wrong."""
    if spec.startswith(HUB_PREFIX):
        documents = _load_hub(spec)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DataError(
                f"evaluation set '{name}': file {spec} does not exist", hint="pass --data NAME=PATH with a text, .jsonl or hf:dataset[:split] source"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"evaluation set '{name}': cannot read {spec}: {err}") from None
        documents = _parse_jsonl(text, spec) if path.suffix.lower() in (".jsonl", ".json") else _parse_text(text)
    documents = [d for d in documents if not isinstance(d, str) or d.strip()]
    if not documents:
        raise DataError(f"evaluation set '{name}' ({spec}) holds no document")
    return EvalSet(name=name, source=spec, documents=documents[:limit] if limit else documents)


def _parse_text(text: str) -> list[str]:
    text = text.strip()
    if BLANK_LINE.search(text):
        return [block.strip() for block in BLANK_LINE.split(text) if block.strip()]
    return [line for line in text.splitlines() if line.strip()]


def _parse_jsonl(text: str, where: str) -> list[Document]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}:{number} is not valid JSON: {err.msg}") from None
        documents.append(_document(record, f"{where}:{number}"))
    return documents


def _document(record, where: str) -> Document:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
        if all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages) and messages:
            return messages
        raise DataError(f"{where}: `messages` must be a non-empty list of {{'role': str, 'content': str}}")
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f"{where}: expected a `text` string or a `messages` list, found {keys}")


def _load_hub(spec: str) -> list[Document]:
    parts = spec.removeprefix(HUB_PREFIX).split(":")
    if len(parts) > 3 or not parts[0]:
        raise DataError(f"'{spec}' is not hf:name[:split] or hf:name:config:split")
    name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else DEFAULT_HUB_SPLIT
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types (network, missing split or repo)
        raise DataError(
            f"cannot load Hub dataset '{name}' split '{split}': {type(err).__name__}: {err}".splitlines()[0],
            hint="check the name, config and split (hf:name[:split], hf:name:config:split); offline, it must be in the datasets cache",
        ) from None
    columns = dataset.column_names
    if "text" not in columns and "messages" not in columns:
        raise DataError(f"Hub dataset '{name}' has neither a `text` nor a `messages` column (it has {columns})")
    return [_document(row, f"{spec} row {index}") for index, row in enumerate(dataset)]


def prompt_sets(metadata: dict, expert_names: list[str]) -> list[EvalSet]:
    """The default sets: each expert's positive prompts from the build's moekit.json, `prompts:<expert>`."""
    sets = []
    for index, (expert, label) in enumerate(zip(metadata.get("experts", []), expert_names)):
        prompts = [p for p in expert.get("positive_prompts") or [] if p.strip()]
        if prompts:
            sets.append(EvalSet(f"{PROMPTS_PREFIX}{label}", f"positive prompts of expert {index} in moekit.json", prompts, expert=index))
    return sets


def render(document: Document, tokenizer) -> str:
    """The text a model reads for `document`: chats through the tokenizer's chat template, else joined."""
    if isinstance(document, str):
        return document
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(document, tokenize=False)
        bos = tokenizer.bos_token
        return text.removeprefix(bos) if bos else text  # the scorer adds the prefix token itself
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in document)


def training_overlap(eval_set: EvalSet, training_data: str) -> int:
    """How many of `eval_set`'s documents also appear in a fine-tune's training data (a local JSON/JSONL file
    with `text`, `messages` or `prompt`/`completion` records); 0 when that data cannot be read here."""
    path = Path(training_data).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
        return 0
    try:
        text = path.read_text(encoding="utf-8")
        records = (
            json.loads(text)
            if path.suffix.lower() == ".json" and text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return 0
    seen = {key for key in map(_record_key, records) if key is not None}
    return sum(_document_key(document) in seen for document in eval_set.documents)


def _document_key(document: Document) -> str:
    if isinstance(document, str):
        return document.strip()
    return json.dumps([{"role": m["role"], "content": m["content"].strip()} for m in document], sort_keys=True)


def _record_key(record) -> str | None:
    if not isinstance(record, dict):
        return None
    if isinstance(record.get("text"), str):
        return record["text"].strip()
    messages = record.get("messages")
    if messages is None and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return _document_key(messages)
    return None
