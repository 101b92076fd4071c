"""`initialize_lora_fisher_weights`: `initialize` in PEFT's calling convention (`initialize_lora_eva_weights`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tiny import tiny_llama
from torch.utils.data import DataLoader

from fisher_core import FisherConfig, initialize, initialize_lora_fisher_weights

CONFIG = FisherConfig(progress=False, num_batches=3, policy="preserve", stop_tol=None)


def _peft_model():
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return get_peft_model(tiny_llama(0), lora, adapter_name="task")


def _dataloader() -> DataLoader:
    """A torch DataLoader of dicts, as PEFT's EVA takes (default collate stacks each key)."""
    ids = torch.randint(3, 384, (12, 10), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in ids]
    return DataLoader(rows, batch_size=4)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_it_writes_exactly_the_adapter_initialize_writes():
    ours, reference = _peft_model(), _peft_model()
    initialize(reference, _dataloader(), config=CONFIG, adapter_name="task")
    report = initialize_lora_fisher_weights(ours, dataloader=_dataloader(), fisher_config=CONFIG, adapter_name="task")
    expected, got = _weights(reference), _weights(ours)
    assert report.num_batches == 3 and len(report.layers) == 6
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[n], w) for n, w in expected.items())  # lora_A, lora_B and the written base
    assert any("lora_B.task" in n and w.abs().max() > 0 for n, w in got.items())


def _last_token_loss(model, batch) -> torch.Tensor:
    """Another objective: the summed loss of each row's last prediction only."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, -2].float(), batch["labels"][:, -1], reduction="sum")


def test_a_custom_forward_fn_is_the_objective():
    calls = []

    def forward_fn(model, batch):
        calls.append(sorted(batch))
        return _last_token_loss(model, batch)

    ours, reference, default = _peft_model(), _peft_model(), _peft_model()
    initialize_lora_fisher_weights(ours, dataloader=_dataloader(), fisher_config=CONFIG, adapter_name="task",
                                   forward_fn=forward_fn)  # fmt: skip
    initialize(reference, _dataloader(), loss_fn=_last_token_loss, config=CONFIG, adapter_name="task")
    initialize_lora_fisher_weights(default, dataloader=_dataloader(), fisher_config=CONFIG, adapter_name="task")
    assert calls and all(keys == ["attention_mask", "input_ids", "labels"] for keys in calls)
    got, expected, other = _weights(ours), _weights(reference), _weights(default)
    assert all(torch.equal(got[n], w) for n, w in expected.items())
    b = [n for n in got if "lora_B.task" in n]
    assert max((got[n] - other[n]).abs().max() / other[n].abs().max() for n in b) > 0.1  # not the default objective


def test_show_progress_bar_overrides_the_config_without_changing_the_adapter():
    quiet, loud = _peft_model(), _peft_model()
    initialize_lora_fisher_weights(quiet, dataloader=_dataloader(), fisher_config=CONFIG, adapter_name="task")
    initialize_lora_fisher_weights(
        loud, _dataloader(), fisher_config=CONFIG, adapter_name="task", show_progress_bar=True
    )
    assert all(torch.equal(p, _weights(quiet)[n]) for n, p in _weights(loud).items())
