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


def _llama3_8b_summary() -> dict:
    """A report summary at Llama-3-8B's layout (32 blocks × 7 projections = 224 layers), numbers synthesized
    with the right shapes: Fisher mass growing with depth and largest in down_proj, spectra of width 4096/14336."""
    from fisher_core.report import summarize  # noqa: F401 — the summary has summarize's keys

    g = torch.Generator().manual_seed(0)
    modules = {"q_proj": 4096, "k_proj": 4096, "v_proj": 4096, "o_proj": 4096, "gate_proj": 4096,
               "up_proj": 4096, "down_proj": 14336}  # fmt: skip
    layers, groups = {}, {}
    for block in range(32):
        for i, (module, width) in enumerate(modules.items()):
            name = f"model.layers.{block}.{'self_attn' if i < 4 else 'mlp'}.{module}"
            mass = float((1 + block) ** 1.5 * (3.0 if module == "down_proj" else 1.0) * torch.rand(1, generator=g) + 1)
            layers[name] = {"fisher_mass": mass, "trace_S_A": 1.0, "trace_S_G": mass, "rank": int(8 + block % 9),
                            "captured": float(torch.rand(1, generator=g)), "width": width}  # fmt: skip
            groups[name] = f"model.layers.{block}.{'attn_in' if module in ('q_proj', 'k_proj', 'v_proj') else name}"
    total = sum(v["fisher_mass"] for v in layers.values())
    for v in layers.values():
        v["mass_share"] = v["fisher_mass"] / total
    top = sorted(layers, key=lambda n: -layers[n]["fisher_mass"])[:4]
    for name in top:
        w = layers[name].pop("width")
        eig = torch.sort(torch.rand(512, generator=g) ** 4, descending=True).values * w
        layers[name]["eig_S_A"] = eig.tolist()
        layers[name]["eig_S_G"] = (eig * layers[name]["fisher_mass"]).tolist()
        layers[name]["trace_S_A"], layers[name]["trace_S_G"] = float(eig.sum()) * 2, float(eig.sum()) * 2
    for v in layers.values():
        v.pop("width", None)
    totals = {"num_layers": len(layers), "num_tokens": 65536, "top_layers": top}
    return {"layers": layers, "totals": totals, "groups": groups}


def test_report_at_llama3_8b_size_draws_block_by_module_heatmaps(tmp_path):
    from fisher_core.report import plot

    summary = _llama3_8b_summary()
    figure = plot(summary, tmp_path / "report.png", title="Llama-3-8B layout, 224 layers", configured_rank=16)
    assert figure["layout"] == "heatmap" and len(summary["layers"]) == 224
    image = Image.open(tmp_path / "report.png").convert("L")
    assert list(image.size) == figure["size"]
    for name, (x0, y0, x1, y1) in figure["panels"].items():
        pixels = torch.tensor(list(image.crop((x0, y0, x1, y1)).getdata()), dtype=torch.float32)
        assert pixels.std() > 20, f"panel {name} looks empty"  # a drawn heatmap or spectrum, not a blank box
