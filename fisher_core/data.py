"""Calibration batches from a JSONL file: tokenize, mask, pad, batch (what `fisher-lora init` feeds).

Three row formats, one example per line:

- text: `{"text": "..."}` (or another field): every token is supervised.
- prompt/completion: `{"prompt": "...", "completion": "..."}`: prompt tokens get label -100, the
  completion (plus EOS) is supervised. Prompt and completion are tokenized separately and
  concatenated, so the mask boundary is exact.
- chat: `{"messages": [{"role": ..., "content": ...}, ...]}` rendered with the tokenizer's chat
  template; only the assistant turns are supervised.

Batches are right-padded: `attention_mask` is 0 and `labels` is -100 at padding. Rows are read in
file order and only as many as the batches need.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

IGNORE_INDEX = -100
Format = Literal["text", "prompt-completion", "chat"]


class DataError(ValueError):
    """The data file or one of its rows cannot be used; the message names the line and the fix."""


class FormatError(DataError):
    """No format can be told from a row's keys (the CLI adds its flags that name one)."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-empty line; a line that is not a JSON object is an error."""
    path = Path(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{number} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
                ) from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number} is not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number} is a JSON {type(row).__name__}, expected an object")
            yield number, row


def detect_format(row: dict[str, Any], text_field: str | None, chat: bool) -> Format:
    """The format of a row: chat if asked, text if a field was named, else from the row's keys."""
    if chat:
        return "chat"
    if text_field is not None:
        return "text"
    if "prompt" in row and "completion" in row:
        return "prompt-completion"
    if "messages" in row:
        return "chat"
    if "text" in row:
        return "text"
    raise FormatError(
        f"cannot tell the data format from the keys {sorted(row)}: expected 'text', 'prompt'+'completion' or 'messages'"
    )


def tokenize_row(
    row: dict[str, Any], tokenizer: Any, fmt: Format, *, text_field: str = "text", max_length: int | None = None
) -> dict[str, list[int]]:
    """`input_ids` and `labels` (-100 where nothing is supervised), truncated to `max_length`."""
    if fmt == "text":
        ids = _ids(tokenizer, _field(row, text_field), special=True) + _eos(tokenizer)
        labels = list(ids)
    elif fmt == "prompt-completion":
        prompt = _ids(tokenizer, _field(row, "prompt"), special=True)
        completion = _ids(tokenizer, _field(row, "completion"), special=False) + _eos(tokenizer)
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    else:
        ids, labels = _chat(row, tokenizer)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(examples: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest example: `input_ids`, `attention_mask` (0 at padding), `labels`."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def load_batches(
    path: str | Path,
    tokenizer: Any,
    *,
    batch_size: int,
    num_batches: int,
    text_field: str | None = None,
    chat: bool = False,
    max_length: int | None = None,
) -> list[dict[str, Tensor]]:
    """The first `num_batches` batches of `batch_size` examples of the file (fewer if it runs out).

    Rows whose supervised tokens were all cut by `max_length` (or had none) are skipped with a
    warning; a file with no usable row is an error.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token in the model dir")
    examples, skipped, fmt = [], 0, None
    wanted = batch_size * num_batches
    for number, row in read_jsonl(path):
        try:
            fmt = fmt or detect_format(row, text_field, chat)
            example = tokenize_row(row, tokenizer, fmt, text_field=text_field or "text", max_length=max_length)
        except DataError as e:
            raise type(e)(f"{path}:{number}: {e}") from e
        if all(label == IGNORE_INDEX for label in example["labels"]):
            skipped += 1
            continue
        examples.append(example)
        if len(examples) == wanted:
            break
    if skipped:
        warnings.warn(f"skipped {skipped} rows of {path} with no supervised token (raise max_length?)", stacklevel=2)
    if not examples:
        raise DataError(f"{path} has no row with a supervised token")
    it = iter(examples)
    return [collate(chunk, pad) for chunk in iter(lambda: list(islice(it, batch_size)), [])]


def _field(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in row else f"a {type(value).__name__}"
        raise DataError(f"field {key!r} is {found}, expected a string (keys: {sorted(row)})")
    return value


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _chat(row: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """Render with the chat template; supervise the characters of each assistant turn.

    Turn i's span is where `render(messages[:i+1])` extends `render(messages[:i], generation
    prompt)`; tokens whose characters fall in a span are supervised. A template that does not render
    prefixes consistently gets every token supervised, with a warning.
    """
    messages = row.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f"'messages' must be a list of {{'role', 'content'}} objects (keys: {sorted(row)})")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use a model dir with one, or prompt/completion rows")
    full = _render(tokenizer, messages, False)
    spans, consistent = [], True
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = _render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False)
        consistent = consistent and end.startswith(start) and full.startswith(end)
        spans.append((len(start), len(end)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not consistent:
        warnings.warn("the chat template does not render prefixes consistently: supervising every token", stacklevel=3)
        return ids, list(ids)
    labels = [
        t if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE_INDEX
        for t, (a, b) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids, labels


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
