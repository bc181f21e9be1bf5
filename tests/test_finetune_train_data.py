"""Training data loading: formats, the default chat template, and the errors for bad data (no model needed)."""

from __future__ import annotations

import json

import pytest

from moekit.errors import DataError
from moekit.finetune.data import DEFAULT_CHAT_TEMPLATE, load_training_data
from moekit.testing import make_tokenizer

CHAT = [{"messages": [{"role": "user", "content": "2 + 2 ="}, {"role": "assistant", "content": "4"}]}]


def test_default_chat_template_when_the_tokenizer_has_none(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    (tmp_path / "d.jsonl").write_text(json.dumps(CHAT[0]) + "\n")
    data = load_training_data(str(tmp_path / "d.jsonl"), tokenizer)
    assert data.template == "default" and tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    assert data.format == "messages" and data.loss_on == "assistant turns"
    # the assistant mask covers the reply and the EOS that ends it, nothing of the user turn
    rendered = tokenizer.apply_chat_template(CHAT[0]["messages"], return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
    assert tokenizer.decode(assistant) == "4</s>"


def test_prompt_completion_strings_become_a_conversation_and_parquet_dirs_load(tmp_path):
    import pandas as pd

    folder = tmp_path / "data"
    folder.mkdir()
    pd.DataFrame({"prompt": ["a", "b", ""], "completion": ["x", "y", "z"], "extra": [1, 2, 3]}).to_parquet(folder / "part-0.parquet")
    data = load_training_data(str(folder), make_tokenizer())
    assert data.format == "prompt_completion" and data.dropped == 1 and len(data.dataset) == 2
    assert data.dataset[0] == {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "x"}]}


def test_template_without_generation_markers_trains_the_last_reply(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = [{"messages": CHAT[0]["messages"] + [{"role": "user", "content": "and 3 + 3?"}, {"role": "assistant", "content": "6"}]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    data = load_training_data(str(tmp_path / "d.json"), tokenizer)
    assert data.loss_on == "last assistant turn"
    assert data.dataset[0]["completion"] == [{"role": "assistant", "content": "6"}] and len(data.dataset[0]["prompt"]) == 3


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"conversation": "hi"}], "has columns ['conversation']"),
        ([{"messages": "hello"}], "must be a list of {role, content}"),
        ([{"messages": [{"role": "user", "content": "no reply"}]}], "no row of dataset"),
    ],
)
def test_bad_rows(tmp_path, rows, expected):
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=expected.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")):
        load_training_data(str(tmp_path / "d.json"), make_tokenizer())


def test_hub_dataset_offline_is_a_data_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load dataset someone/chats:train_sft"):
        load_training_data("someone/chats:train_sft", make_tokenizer())
