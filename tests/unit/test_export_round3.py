"""`export_adapter` (round 3): layer names that are suffixes of others, files in the directory that are not
ours, and PEFT's own residual-base conversion (`path_initial_model_for_weight_conversion`) beside ours."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import tiny_llama
from torch import nn

from fisher_core import FisherConfig, export_adapter, initialize

WIDTH = 8


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(WIDTH, WIDTH)})])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0]["q_proj"](x)


class _Twin(nn.Module):
    """`vision.model.layers.0.q_proj` registered before `model.layers.0.q_proj` (a suffix of its name)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Module()
        self.vision.model = _Stack()
        self.model = _Stack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + 3.0 * torch.tanh(self.vision.model(x))


def _sum_of_squares(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).square().sum()


def _twin_batches() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(16, WIDTH, generator=g)} for _ in range(2)]


def _train(model: nn.Module, batches: list[dict]) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches:
        _sum_of_squares(model, batch).backward()
        opt.step()
        opt.zero_grad()


def test_export_after_preserve_puts_each_factor_under_its_own_layer_when_names_are_suffixes(tmp_path):
    batches = _twin_batches()
    model = get_peft_model(_Twin(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    config = FisherConfig(progress=False, num_batches=2, policy="preserve", selector="fwsvd")
    initialize(model, batches, loss_fn=_sum_of_squares, config=config)
    _train(model, batches)
    with torch.no_grad():
        trained = model(**batches[0])
    export_adapter(model, tmp_path / "a")
    loaded = PeftModel.from_pretrained(_Twin(), tmp_path / "a")
    with torch.no_grad():
        assert (loaded(**batches[0]) - trained).abs().max() <= 1e-5


def _llama_batches() -> list[dict]:
    ids = torch.randint(3, 384, (4, 12), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": ids[:2], "labels": ids[:2]}, {"input_ids": ids[2:], "labels": ids[2:]}]


def _peft_llama(**kw) -> nn.Module:
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **kw))


def test_export_into_a_directory_with_a_readme_keeps_the_users_readme(tmp_path):
    model = _peft_llama()
    initialize(model, _llama_batches(), config=FisherConfig(progress=False, num_batches=2))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "README.md").write_text("# my notes\n")
    export_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "# my notes\n"
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trained_preserve(tmp_path, config: FisherConfig, **lora) -> tuple[nn.Module, torch.Tensor]:
    """A preserve init, its adapter saved right after it (what PEFT's conversion needs on disk), then training."""
    batches = _llama_batches()
    model = _peft_llama(**lora)
    initialize(model, batches, config=config)
    model.save_pretrained(tmp_path / "initial")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, _logits(model, batches[0]["input_ids"])


def test_peft_conversion_gives_the_same_adapter_as_export_for_one_uniform_preserve_init(tmp_path):
    """Where PEFT's conversion applies (one preserve init, one rank, the initial adapter saved on disk), its
    adapter is the same function as ours: ΔW = s·(B·A − B₀·A₀) on the original base, at rank 2r."""
    config = FisherConfig(progress=False, num_batches=2, policy="preserve", selector="fwsvd")
    model, trained = _trained_preserve(tmp_path, config)
    export_adapter(model, tmp_path / "ours")
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ids = _llama_batches()[0]["input_ids"]
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert (_logits(ours, ids) - trained).abs().max() <= 1e-5
    assert (_logits(theirs, ids) - trained).abs().max() <= 1e-5
    assert theirs.peft_config["default"].r == 8  # 2r: B·A and B₀·A₀ side by side, never compressed


def test_peft_conversion_refuses_per_layer_ranks_under_rslora_which_export_handles(tmp_path):
    """A rank budget gives per-layer ranks (`rank_pattern`); with rsLoRA PEFT's conversion refuses them, ours
    exports an adapter that reproduces the trained model on the original base."""
    config = FisherConfig(progress=False, num_batches=2, policy="preserve", selector="fwsvd", rank_budget=12)
    model, trained = _trained_preserve(tmp_path, config, use_rslora=True)
    assert model.peft_config["default"].rank_pattern
    with pytest.raises(ValueError, match="rank_pattern"):
        model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    export_adapter(model, tmp_path / "ours")
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert (_logits(ours, _llama_batches()[0]["input_ids"]) - trained).abs().max() <= 1e-5
