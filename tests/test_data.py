"""Tokenization of JSONL calibration data: masks, chat template, padding, batching."""

from __future__ import annotations

import json

import pytest
from tiny import DATA, train_tokenizer

from fisher_core.data import IGNORE_INDEX, DataError, FormatError, collate, load_batches, read_jsonl, tokenize_row


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def supervised(example: dict[str, list[int]]) -> list[int]:
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def test_prompt_tokens_are_masked_and_completion_supervised(tokenizer):
    row = {"prompt": "Master: Boatswain!\nBoatswain:", "completion": " Here, master: what cheer?"}
    ex = tokenize_row(row, tokenizer, "prompt-completion")
    prompt_len = len(tokenizer(row["prompt"])["input_ids"])
    assert ex["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert ex["labels"][prompt_len:] == ex["input_ids"][prompt_len:]
    assert tokenizer.decode(supervised(ex)) == row["completion"] + tokenizer.eos_token


def test_text_rows_supervise_every_token_and_end_with_eos(tokenizer):
    ex = tokenize_row({"body": "Good! Speak to the mariners."}, tokenizer, "text", text_field="body")
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id


def test_chat_template_applied_and_only_assistant_turns_supervised(tokenizer):
    messages = [
        {"role": "user", "content": "Boatswain!"},
        {"role": "assistant", "content": "Here, master: what cheer?"},
        {"role": "user", "content": "Good!"},
        {"role": "assistant", "content": "Heigh, my hearts!"},
    ]
    ex = tokenize_row({"messages": messages}, tokenizer, "chat")
    assert tokenizer.decode(ex["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    kept = tokenizer.decode(supervised(ex))
    assert kept == "Here, master: what cheer?</s>Heigh, my hearts!</s>"
    assert "Boatswain" not in kept and "<|user|>" not in kept


def test_padding_is_masked_in_attention_and_labels(tokenizer):
    short = {"input_ids": [5, 6], "labels": [IGNORE_INDEX, 6]}
    long = {"input_ids": [7, 8, 9, 10], "labels": [7, 8, 9, 10]}
    batch = collate([short, long], pad_token_id=tokenizer.pad_token_id)
    assert batch["input_ids"].tolist() == [[5, 6, tokenizer.pad_token_id, tokenizer.pad_token_id], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX], [7, 8, 9, 10]]


def test_load_batches_truncates_and_skips_rows_left_without_supervision(tokenizer):
    with pytest.warns(UserWarning, match=r"skipped \d+ rows"):
        batches = load_batches(DATA / "sft.jsonl", tokenizer, batch_size=3, num_batches=2, max_length=48)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3]
    assert all(b["input_ids"].shape[1] <= 48 for b in batches)
    assert all((b["labels"] != IGNORE_INDEX).any() for b in batches)


def test_load_batches_detects_the_chat_format_from_the_rows(tokenizer):
    (batch,) = load_batches(DATA / "chat.jsonl", tokenizer, batch_size=2, num_batches=1)
    first = json.loads((DATA / "chat.jsonl").read_text().splitlines()[0])["messages"]
    rendered = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist())
    assert rendered == tokenizer.apply_chat_template(first, tokenize=False)


def test_unknown_row_format_names_the_line_and_the_formats(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "?"}\n')
    with pytest.raises(FormatError, match=r"rows\.jsonl:1: cannot tell .* expected 'text', 'prompt'\+'completion'"):
        load_batches(path, tokenizer, batch_size=1, num_batches=1)


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2 is not valid JSON"):
        list(read_jsonl(path))


def test_chat_rows_need_a_chat_template(tokenizer):
    bare = train_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize_row({"messages": [{"role": "user", "content": "hi"}]}, bare, "chat")
