"""The report: reading a statistics file without the model, the per-layer numbers, the picture."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny import tiny_llama
from torch import nn

from fisher_core import FisherConfig, estimate
from fisher_core.estimate import FisherStats, LayerStats
from fisher_core.estimate.cache import save
from fisher_core.report import ReportError, read_stats, summarize, write_report


def random_psd(n: int, generator: torch.Generator, decay: float) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    return (q * decay ** torch.arange(n)) @ q.T


def synthetic_stats(num_blocks: int) -> tuple[FisherStats, dict[str, nn.Module]]:
    """q/v layers of `num_blocks` blocks (q and v share S_A), masses spread over orders of magnitude."""
    g = torch.Generator().manual_seed(0)
    layers, modules = {}, {}
    for block in range(num_blocks):
        s_a = random_psd(8, g, 0.7) * (block + 1)
        for kind, m in (("q_proj", 8), ("v_proj", 4)):
            name = f"model.layers.{block}.self_attn.{kind}"
            group = f"model.layers.{block}.self_attn.q_proj"
            layers[name] = LayerStats(s_a, random_psd(m, g, 0.5) * 10.0**-block, 100, input_group=group)
            modules[name] = nn.Linear(8, m)
    return FisherStats(layers, fisher_type="empirical", num_batches=1), modules


def test_read_stats_matches_what_estimate_cached_without_the_model(tmp_path):
    model = tiny_llama()
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    config = FisherConfig(num_batches=1, cache_path=tmp_path / "stats.safetensors", progress=False)
    stats = estimate(model, [batch], target_modules=["q_proj", "v_proj"], config=config)
    read = read_stats(tmp_path / "stats.safetensors")
    assert set(read) == set(stats) and read.fisher_type == "empirical" and read.num_batches == 1
    for name, s in stats.items():
        assert torch.equal(read[name].input_cov, s.input_cov) and torch.equal(read[name].grad_cov, s.grad_cov)
        assert torch.equal(read[name].mean_grad, s.mean_grad) and read[name].num_tokens == s.num_tokens


def test_read_stats_refuses_other_safetensors_files(tmp_path):
    save_file({"weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(ReportError, match="not a fisher-lora statistics file"):
        read_stats(tmp_path / "model.safetensors")


def test_mass_is_the_kfac_trace_and_spectra_are_the_top_layers_eigenvalues():
    stats, _ = synthetic_stats(3)
    summary = summarize(stats, {}, top=2)
    layers = summary["layers"]
    for name, s in stats.items():
        expected = float(s.input_cov.trace() * s.grad_cov.trace())
        assert layers[name]["fisher_mass"] == pytest.approx(expected, rel=1e-5)
    masses = sorted(layers, key=lambda n: -layers[n]["fisher_mass"])
    assert summary["totals"]["top_layers"] == masses[:2]
    assert sum(v["mass_share"] for v in layers.values()) == pytest.approx(1.0)
    top = masses[0]
    expected_eig = torch.linalg.eigvalsh(stats[top].grad_cov.double()).flip(0)
    torch.testing.assert_close(
        torch.tensor(layers[top]["eig_S_G"], dtype=torch.float64), expected_eig, rtol=1e-6, atol=1e-9
    )
    assert all("eig_S_A" not in layers[n] for n in masses[2:])


def test_report_keeps_init_fields_and_draws_many_layers(tmp_path):
    stats, modules = synthetic_stats(24)
    save(stats, tmp_path / "fisher_stats.safetensors", modules, FisherConfig(selector="subspace"), data="")
    init_layers = {n: {"rank": 4 + i % 3, "captured": 0.5 + 0.02 * (i % 10)} for i, n in enumerate(stats)}
    init = {"selector": "subspace", "policy": "zero", "layers": init_layers, "init": {"lora": {"r": 4}}}
    (tmp_path / "report.json").write_text(json.dumps(init))
    png, js = write_report(tmp_path, top=3)
    report = json.loads(js.read_text())
    assert report["selector"] == "subspace" and report["init"] == {"lora": {"r": 4}}
    assert all(report["layers"][n]["rank"] == v["rank"] for n, v in init_layers.items())
    image = Image.open(png).convert("RGB")
    assert list(image.size) == report["figure"]["size"]
    for name, box in report["figure"]["panels"].items():
        pixels = torch.tensor(list(image.crop(box).getdata()))
        coloured = (pixels.amax(dim=1) - pixels.amin(dim=1) > 60).float().mean()  # data: bars, lines
        inked = (pixels < 128).any(dim=1).float().mean()  # axes, ticks, labels
        assert coloured > 0.002 and inked > 0.002, f"panel {name} looks blank ({coloured:.4f}, {inked:.4f})"
    write_report(tmp_path, top=1)  # a second run replaces the spectra, it does not pile them up
    again = json.loads(js.read_text())
    assert sum("eig_S_A" in v for v in again["layers"].values()) == 1 and again["selector"] == "subspace"


def test_missing_statistics_are_named(tmp_path):
    with pytest.raises(ReportError, match=r"fisher_stats\.safetensors: no such file"):
        write_report(tmp_path)
