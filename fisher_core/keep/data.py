"""What the keep statistics are taken on (docs/design.md §7), resolved before any slow work.

`keep_data` is the user's batches (used as given), a JSONL file (read as the CLI reads `--data`:
text, prompt/completion or chat rows) or None: the model's own greedy answers to the shipped
instructions (`fisher_core.keep.answers`). A file and the own answers need the tokenizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from fisher_core.config import FisherConfig
from fisher_core.data import DataError, load_batches
from fisher_core.estimate.cache import data_fingerprint
from fisher_core.estimate.distributed import world_size
from fisher_core.estimate.objective import Batch, can_generate, unwrapped
from fisher_core.keep.answers import (
    BATCH_SIZE,
    MAX_NEW_TOKENS,
    instructions,
    own_answer_batches,
    pad_id,
    plan_share,
    prompt_ids,
)

MAX_LENGTH = 512  # tokens per row of a keep_data file, as the CLI's default --max-length


@dataclass(frozen=True)
class KeepData:
    """The keep batches, or how to make them from the model. `key` names them without making them, so a cached
    keep pass needs no generation: the batches' fingerprint, or for own answers the prompts' tokens and the
    generation settings (the model's weights are fingerprinted by the cache itself)."""

    key: str
    make: Callable[[nn.Module], list[Batch]]


def keep_data(config: FisherConfig, tokenizer: Any | None, model: nn.Module | None = None) -> KeepData:
    """Resolve `config.keep_data`; a missing tokenizer, an unusable file or (for the own answers) a `model` that
    cannot generate fails here, in one line."""
    source = config.keep_data
    if isinstance(source, list):
        return KeepData(data_fingerprint(source), lambda model: source)
    if tokenizer is None:
        made = f"reads keep_data {source}" if source is not None else "answers the shipped instructions itself"
        raise ValueError(
            f"keep_knowledge {made}, which needs the model's tokenizer: pass tokenizer=... to initialize, "
            "or keep_data=[batches]"
        )
    if source is not None:
        try:
            batches = load_batches(source, tokenizer, batch_size=BATCH_SIZE, num_batches=config.num_batches,
                                   max_length=MAX_LENGTH)  # fmt: skip
        except DataError as e:
            raise DataError(f"keep_data: {e}") from e
        return KeepData(data_fingerprint(batches), lambda model: batches)
    if model is not None and not can_generate(model):
        raise ValueError(
            f"keep_knowledge without keep_data keeps the model's own answers, but {type(unwrapped(model)).__name__} "
            "cannot generate (a causal LM can): pass keep_data (a JSONL file or batches with labels)"
        )
    available = instructions()
    share = plan_share(len(available), config.num_batches, world_size())
    read = available[: share.count]
    prompts = [prompt_ids(tokenizer, instruction) for instruction in read]
    settings = f"own-answers:greedy:{MAX_NEW_TOKENS}:{BATCH_SIZE}:{pad_id(tokenizer)}:{tokenizer.eos_token_id}"
    h = hashlib.sha256(settings.encode())
    h.update(repr(prompts).encode())
    return KeepData(h.hexdigest(), lambda model: own_answer_batches(model, tokenizer, prompts, share.shared))
