"""Training data for `moekit finetune`: chat `messages` (UltraChat style) or `prompt`/`completion`.

    load_training_data(ref, tokenizer) -> TrainingData

`ref` is a local JSON/JSONL/Parquet file or directory, or a Hub dataset id `name[:split]`. Rows are
checked and normalised here, before any model is loaded, so bad data fails fast with a DataError;
tokenisation, the assistant/completion loss mask, truncation and packing are left to TRL's
SFTTrainer, which reads the `messages` or conversational `prompt`/`completion` columns produced here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moekit.errors import DataError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
ACCEPTED_COLUMNS = "`messages` (a list of {role, content}) or `prompt` + `completion`"

# Used when the base tokenizer has no chat template. ChatML-like turns ending in the EOS token, with
# `{% generation %}` markers so the assistant-token mask (and so the loss) covers the replies and the
# EOS that ends them: the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TrainingData:
    dataset: object  # datasets.Dataset with `messages` or conversational `prompt`/`completion` columns
    source: str  # the ref as given
    format: str  # "messages" or "prompt_completion"
    loss_on: str  # "assistant turns", "last assistant turn" or "completion"
    template: str  # "tokenizer" or "default"
    dropped: int  # rows left out (empty, or without an assistant reply)

    def describe(self) -> str:
        dropped = f", {self.dropped} dropped" if self.dropped else ""
        return f"{len(self.dataset)} examples from {self.source} ({self.format}{dropped}); loss on {self.loss_on}; {self.template} chat template"


def load_training_data(ref: str, tokenizer) -> TrainingData:
    """Load, check and normalise a dataset; sets a default chat template on `tokenizer` if it has none."""
    dataset = load_rows(ref)
    columns = list(dataset.column_names)
    if "messages" in columns:
        data_format = "messages"
        dataset = dataset.select_columns(["messages"])
    elif "prompt" in columns and "completion" in columns:
        data_format = "prompt_completion"
        dataset = dataset.select_columns(["prompt", "completion"])
    else:
        raise DataError(f"dataset {ref} has columns {columns}; moekit accepts {ACCEPTED_COLUMNS}")
    if len(dataset) == 0:
        raise DataError(f"dataset {ref} has no rows")

    before = len(dataset)
    if data_format == "messages":
        _check_messages(dataset[0]["messages"], ref)
        _check_contents(dataset, ref)
        dataset = dataset.filter(_has_assistant_reply, desc="checking conversations")
    else:
        dataset = dataset.filter(lambda row: bool(row["prompt"]) and bool(row["completion"]), desc="checking rows")
        dataset = dataset.map(_as_conversation, desc="formatting prompts")
    dropped = before - len(dataset)
    if len(dataset) == 0:
        what = "an assistant reply" if data_format == "messages" else "a non-empty prompt and completion"
        raise DataError(f"no row of dataset {ref} has {what} ({before} rows read)")

    template = ensure_chat_template(tokenizer)
    first = dataset[0]
    _check_template_applies(tokenizer, first["messages"] if data_format == "messages" else first["prompt"] + first["completion"], ref)
    loss_on = "assistant turns" if data_format == "messages" else "completion"
    if data_format == "messages" and not _has_training_template(tokenizer):
        # Without generation markers no assistant mask can be made: train on each conversation's last
        # reply as a completion, whose start TRL finds by rendering the prompt alone.
        dataset = dataset.map(_split_last_reply, remove_columns=["messages"], desc="splitting last replies")
        data_format, loss_on = "prompt_completion", "last assistant turn"
    return TrainingData(dataset=dataset, source=ref, format=data_format, loss_on=loss_on, template=template, dropped=dropped)


def check_trainable_tokens(data: TrainingData, tokenizer, max_seq_len: int) -> None:
    """Refuse data in which no example has a token to train on within its first `max_seq_len` tokens.

    Tokenizes as TRL's SFTTrainer will (chat template; assistant mask, or the completion after the common
    prefix with the prompt; truncation keeps the start), stopping at the first example that has one, so
    that such data fails before any weight is loaded.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.data_utils import common_prefix_length

    chat_template = None
    if data.format == "messages" and not has_generation_markers(tokenizer.chat_template):
        chat_template = get_training_chat_template(tokenizer)  # what TRL trains with (load_training_data checked it exists)
    for row in data.dataset:
        if data.format == "messages":
            encoded = tokenizer.apply_chat_template(
                row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True, chat_template=chat_template
            )
            if 1 in encoded["assistant_masks"][:max_seq_len]:
                return
        else:
            prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
            whole = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)["input_ids"]
            if common_prefix_length(prompt, whole) < min(len(whole), max_seq_len):
                return
    raise DataError(
        f"no example of {data.source} has a trainable token within --max-seq-len {max_seq_len} "
        f"({'assistant replies' if data.format == 'messages' else 'completions'} start later, or are empty)",
        hint="raise --max-seq-len or shorten the prompts",
    )


def load_rows(ref: str):
    """A `datasets.Dataset` from a local file/directory or a Hub id `name[:split]` (default split: train)."""
    import datasets

    path = Path(ref).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_BUILDERS and p.is_file())
        if not files:
            raise DataError(f"no JSON, JSONL or Parquet files in {ref}")
        builders = {FILE_BUILDERS.get(p.suffix.lower()) for p in files}
        if None in builders:
            raise DataError(f"{ref} is not a JSON, JSONL or Parquet file (suffixes accepted: {', '.join(FILE_BUILDERS)})")
        if len(builders) > 1:
            raise DataError(f"{ref} mixes JSON and Parquet files; put one kind in a directory")
        import logging

        datasets_logger = logging.getLogger("datasets")
        level = datasets_logger.level
        datasets_logger.setLevel(logging.CRITICAL)  # its log of a bad file would say less than the DataError below
        try:
            return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")
        except Exception as err:  # noqa: BLE001 (the builders raise many types for unreadable files)
            raise DataError(f"cannot read dataset {ref}: {_json_problem(files) or _first_line(err)}") from None
        finally:
            datasets_logger.setLevel(level)
    if path.suffix.lower() in FILE_BUILDERS or ref.startswith((".", "/", "~")):
        raise DataError(f"dataset file {ref} does not exist")
    name, _, split = ref.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # noqa: BLE001 (offline, missing repository, unknown split, ...)
        raise DataError(
            f"cannot load dataset {ref} from the Hub: {_first_line(err)}", hint="give a local JSON/JSONL/Parquet file, or `name:split` for a Hub dataset"
        ) from None


def ensure_chat_template(tokenizer) -> str:
    """'tokenizer' if it has a chat template, else sets DEFAULT_CHAT_TEMPLATE on it and returns 'default'."""
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default"


def _has_training_template(tokenizer) -> bool:
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
    )

    if has_generation_markers(tokenizer.chat_template):
        return True
    try:
        return get_training_chat_template(tokenizer) is not None  # TRL knows a marked version of this template
    except ValueError:
        return False


def _check_messages(messages, ref: str) -> None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"dataset {ref}: `messages` must be a list of {{role, content}} dicts, the first row has {str(messages)[:120]}")


def _json_problem(files: list[Path]) -> str | None:
    """Where a JSON Lines dataset that `datasets` could not read is wrong: the file and line, or that it is empty."""
    import json

    for file in files:
        if file.suffix.lower() != ".jsonl":
            continue
        try:
            with file.open(encoding="utf-8") as handle:
                lines = 0
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    lines += 1
                    try:
                        json.loads(line)
                    except ValueError as err:
                        return f"{file}:{number} is not valid JSON ({err})"
        except (OSError, UnicodeDecodeError) as err:
            return f"{file}: {err}"
        if lines == 0:
            return f"{file} is empty (no rows)"
    return None


def _check_contents(dataset, ref: str) -> None:
    """Every message has a role and a string content (a null content would fail inside the chat template)."""
    for index, messages in enumerate(dataset["messages"]):
        for message in messages or []:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
                content = message.get("content") if isinstance(message, dict) else message
                raise DataError(
                    f"dataset {ref}, row {index + 1}: every message needs a `role` and a string `content`, found {json_repr(content)}",
                    hint="fix or remove that row",
                )


def json_repr(value) -> str:
    import json

    try:
        return json.dumps(value)[:120]
    except (TypeError, ValueError):
        return repr(value)[:120]


def _has_assistant_reply(row) -> bool:
    return any(m.get("role") == "assistant" and m.get("content") for m in (row["messages"] or []))


def _as_conversation(row) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    return {
        "prompt": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
        "completion": [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion,
    }


def _split_last_reply(row) -> dict:
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant" and m["content"])
    return {"prompt": messages[:last], "completion": [messages[last]]}


def _check_template_applies(tokenizer, messages, ref: str) -> None:
    try:
        tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # noqa: BLE001 (jinja raises TemplateError and others for templates that reject the roles)
        raise DataError(
            f"the chat template cannot be applied to the first row of {ref}: {_first_line(err)}",
            hint="check the roles in `messages`, or use a tokenizer whose chat template accepts them",
        ) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
