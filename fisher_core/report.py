"""The visual report: what the statistics say about each layer and what the initializer chose.

Reads a statistics file (the cache format of `fisher_core.estimate.cache`, without the model, so no
fingerprint check) and, when it sits in an adapter directory written by `fisher-lora init`, that
directory's `report.json` (chosen ranks and captured Fisher fractions). Writes `report.png` and
merges the per-layer numbers into `report.json`:

- Fisher mass per layer: the trace of the K-FAC Fisher, `tr(S_A ⊗ S_G) = tr(S_A)·tr(S_G)`.
- eigen-spectra of `S_A` and `S_G` for the layers with the most mass, as fractions of the trace.
- chosen rank and captured Fisher fraction per layer (from the init report).

Up to `HEATMAP_ABOVE` layers the per-layer panels are bars in model order; above it (a 7B–70B model adapted
on all linear layers has 224–560) they become block × module heatmaps, which stay readable at any depth.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from fisher_core.estimate.cache import FORMAT, unpack_stats
from fisher_core.estimate.factors import FisherStats
from fisher_core.estimate.sums import FactorSketch, factor_eigenvalues, factor_trace
from fisher_core.io import atomic_path, atomic_write_text

STATS_FILE = "fisher_stats.safetensors"
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"
SPECTRUM_KEEP = 512  # eigenvalues per factor kept in report.json
FIG_INCHES, DPI = (14.0, 13.0), 100
HEATMAP_ABOVE = 48  # layers; more are drawn as block × module heatmaps


class ReportError(ValueError):
    """The source is missing or is not a fisher-lora statistics file."""


def read_stats(path: str | Path) -> FisherStats:
    """The statistics in a fisher-lora stats file, without checking which model they came from."""
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ReportError(f"{path} is not a fisher-lora statistics file (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ReportError(f"{path} is unreadable as safetensors ({e})") from e
    stats = unpack_stats(tensors, meta)
    stats.meta.update(meta)
    return stats


def write_report(source: str | Path, out_dir: str | Path | None = None, *, top: int = 4) -> tuple[Path, Path]:
    """Write `report.png` and `report.json` for an adapter directory or a statistics file.

    `report.json` keeps what `fisher-lora init` wrote there and adds, per layer, `fisher_mass`,
    `trace_S_A`, `trace_S_G` and (for the `top` layers by mass) `eig_S_A`, `eig_S_G`.
    """
    source = Path(source)
    stats_path = source / STATS_FILE if source.is_dir() else source
    if not stats_path.is_file():
        raise ReportError(
            f"{stats_path}: no such file; pass an adapter dir written by `fisher-lora init` or a stats file"
        )
    out = Path(out_dir) if out_dir is not None else stats_path.parent
    stats = read_stats(stats_path)
    candidates = (_read_json(stats_path.parent / REPORT_JSON), _read_json(out / REPORT_JSON))
    init = next((j for j in candidates if set(j.get("layers", {})) == set(stats)), {})  # what init wrote
    summary = summarize(stats, init.get("layers", {}), top=top)
    with atomic_path(out / REPORT_PNG) as tmp:
        figure = plot(
            summary, tmp, title=_title(stats, init), configured_rank=init.get("init", {}).get("lora", {}).get("r")
        )
    merged = {**init, **summary["totals"], "figure": {"file": REPORT_PNG, **figure}}
    merged["layers"] = summary["layers"]
    merged["statistics"] = {"file": str(stats_path.resolve()), "fisher_type": stats.fisher_type}
    atomic_write_text(out / REPORT_JSON, json.dumps(merged, indent=2))
    return out / REPORT_PNG, out / REPORT_JSON


def summarize(stats: FisherStats, init_layers: dict[str, dict[str, Any]], *, top: int) -> dict[str, Any]:
    """Per-layer numbers in model order: mass, traces, spectra of the top layers, rank and captured."""
    layers: dict[str, dict[str, Any]] = {}
    for name, s in stats.items():
        tr_a, tr_g = factor_trace(s.input_cov), factor_trace(s.grad_cov)
        init = {k: v for k, v in init_layers.get(name, {}).items() if not k.startswith("eig_")}
        layers[name] = {**init, "trace_S_A": tr_a, "trace_S_G": tr_g, "fisher_mass": tr_a * tr_g}
    total = sum(v["fisher_mass"] for v in layers.values())
    for v in layers.values():
        v["mass_share"] = v["fisher_mass"] / total if total > 0 else 0.0
    ranked = sorted(layers, key=lambda n: -layers[n]["fisher_mass"])[:top]
    for name in ranked:
        layers[name]["eig_S_A"] = _spectrum(stats[name].input_cov)
        layers[name]["eig_S_G"] = _spectrum(stats[name].grad_cov)
    totals = {"num_layers": len(layers), "num_tokens": stats.num_tokens, "top_layers": ranked}
    return {"layers": layers, "totals": totals, "groups": {n: s.input_group for n, s in stats.items()}}


def plot(summary: dict[str, Any], path: Path, *, title: str, configured_rank: int | None = None) -> dict[str, Any]:
    """Draw the five panels to `path` (PNG); returns the image size and each panel's pixel box.

    `configured_rank` (the `--rank` of init) is drawn as a reference line over the chosen ranks.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, names = summary["layers"], list(summary["layers"])
    kinds = sorted({_kind(n) for n in names})
    palette = plt.get_cmap("tab10")
    colour = {k: palette(i % 10) for i, k in enumerate(kinds)}
    bar_colours = [colour[_kind(n)] for n in names]
    x = list(range(len(names)))

    fig = plt.figure(figsize=FIG_INCHES, dpi=DPI, layout="constrained")
    fig.suptitle(title, fontsize=14)
    grid = fig.add_gridspec(3, 2, height_ratios=[1.1, 1.0, 1.0])
    axes = {
        "mass": fig.add_subplot(grid[0, :]),
        "spectrum_S_A": fig.add_subplot(grid[1, 0]),
        "spectrum_S_G": fig.add_subplot(grid[1, 1]),
        "ranks": fig.add_subplot(grid[2, 0]),
        "captured": fig.add_subplot(grid[2, 1]),
    }

    grid_of = _block_grid(names) if len(names) > HEATMAP_ABOVE else None
    ax = axes["mass"]
    mass_title = "Fisher mass per layer: tr(S_A)·tr(S_G), the trace of the K-FAC Fisher"
    if grid_of is not None:
        shares = {n: max(layers[n]["mass_share"], 1e-12) for n in names}
        _heatmap(fig, ax, grid_of, shares, mass_title + " (share of the total)", "share of Fisher mass", log=True)
    else:
        _mass_bars(ax, x, names, layers, bar_colours, mass_title)
        ax.legend(
            handles=[plt.Rectangle((0, 0), 1, 1, color=colour[k]) for k in kinds], labels=kinds, title="module",
            loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9,
        )  # fmt: skip

    top = summary["totals"]["top_layers"]
    _spectra(axes["spectrum_S_A"], layers, top, "eig_S_A", summary["groups"], "S_A (layer inputs)")
    _spectra(axes["spectrum_S_G"], layers, top, "eig_S_G", None, "S_G (output gradients)")

    _rank_panels(fig, axes, layers, grid_of, bar_colours, configured_rank)

    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    width, height = (round(v) for v in fig.get_size_inches() * DPI)
    panels = {key: _pixel_box(ax, height) for key, ax in axes.items()}
    plt.close(fig)
    return {"size": [width, height], "panels": panels, "layout": "heatmap" if grid_of is not None else "bars"}


def _pixel_box(ax: Any, height: int) -> list[int]:
    """[left, top, right, bottom] of an axes in image pixels (origin at the top left)."""
    box = ax.get_window_extent()
    return [math.floor(box.x0), math.floor(height - box.y1), math.ceil(box.x1), math.ceil(height - box.y0)]


def _rank_panels(
    fig: Any, axes: dict[str, Any], layers: dict[str, Any], grid_of: dict | None, bar_colours: list,
    configured_rank: int | None,
) -> None:  # fmt: skip
    """The chosen rank and captured Fisher fraction per layer: heatmaps above `HEATMAP_ABOVE` layers, else bars;
    a note instead where the statistics come without an init report."""
    from matplotlib.ticker import PercentFormatter

    names = list(layers)
    if not all("rank" in layers[n] for n in names):
        for key, what in (("ranks", "chosen ranks"), ("captured", "captured Fisher fraction")):
            axes[key].set_title(what)
            axes[key].text(
                0.5, 0.5, f"no {what}: this statistics file has no init report;\n"
                "run `fisher-lora report` on the adapter dir written by `fisher-lora init`",
                ha="center", va="center", transform=axes[key].transAxes, fontsize=11,
            )  # fmt: skip
            axes[key].set_axis_off()
        return
    if grid_of is not None:
        ranks = {n: layers[n]["rank"] for n in names}
        captured = {n: layers[n]["captured"] for n in names}
        mean = sum(captured.values()) / len(captured)
        _heatmap(fig, axes["ranks"], grid_of, ranks, f"chosen LoRA rank (total {sum(ranks.values())})", "rank r")
        _heatmap(
            fig, axes["captured"], grid_of, captured, f"captured Fisher fraction, mean {mean:.0%}", "captured",
            vmin=0.0, vmax=1.0,
        )  # fmt: skip
        return
    x = list(range(len(names)))
    ax = axes["ranks"]
    ranks = [layers[n]["rank"] for n in names]
    ax.bar(x, ranks, color=bar_colours)
    if configured_rank is not None:
        ax.axhline(configured_rank, color="0.3", linestyle="--", linewidth=1, label=f"--rank {configured_rank}")
        ax.legend(loc="upper right", fontsize=9)
    ax.set_title(f"chosen LoRA rank per layer (total {sum(ranks)})")
    ax.set_ylabel("rank r")
    ax.set_ylim(0, max(ranks) * 1.15)
    _layer_axis(ax, names)
    ax = axes["captured"]
    captured = [layers[n]["captured"] for n in names]
    ax.bar(x, captured, color=bar_colours)
    mean = sum(captured) / len(captured)
    ax.axhline(mean, color="0.3", linestyle="--", linewidth=1)
    ax.set_title(f"captured Fisher fraction per layer (share of the scores in the chosen rank), mean {mean:.0%}")
    ax.set_ylabel("captured fraction")
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    _layer_axis(ax, names)


def _mass_bars(ax, x: list[int], names: list[str], layers: dict, colours: list, title: str) -> None:
    ax.bar(x, [max(layers[n]["fisher_mass"], 1e-30) for n in names], color=colours)
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel("Fisher mass (log scale)")
    _layer_axis(ax, names)


def _block_grid(names: list[str]) -> tuple[list[int], list[str], dict[str, tuple[int, int]]] | None:
    """(blocks, modules in first-seen order, name → (row, column)) when every name has a block index;
    None when the names do not form such a grid (then bars are drawn)."""
    cells: dict[str, tuple[int, str]] = {}
    for name in names:
        numbers = re.findall(r"\.(\d+)\.", f".{name}.")
        if not numbers:
            return None
        cells[name] = (int(numbers[-1]), _kind(name))
    blocks = sorted({b for b, _ in cells.values()})
    kinds = list(dict.fromkeys(k for _, k in cells.values()))
    row, col = {b: i for i, b in enumerate(blocks)}, {k: j for j, k in enumerate(kinds)}
    return blocks, kinds, {n: (row[b], col[k]) for n, (b, k) in cells.items()}


def _heatmap(
    fig, ax, grid_of: tuple, values: dict[str, float], title: str, label: str, *, log: bool = False,
    vmin: float | None = None, vmax: float | None = None,
) -> None:  # fmt: skip
    """`values` on a module (x) × block (y) grid; cells with no adapted layer stay blank."""
    import matplotlib.colors as mcolors

    blocks, kinds, where = grid_of
    data = torch.full((len(blocks), len(kinds)), float("nan"))
    for name, (i, j) in where.items():
        data[i, j] = values[name]
    norm = mcolors.LogNorm(vmin=vmin, vmax=vmax) if log else mcolors.Normalize(vmin=vmin, vmax=vmax)
    image = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label, fraction=0.05)
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, rotation=45, ha="right", fontsize=9)
    step = max(1, math.ceil(len(blocks) / 16))
    ax.set_yticks(range(0, len(blocks), step))
    ax.set_yticklabels([str(b) for b in blocks[::step]], fontsize=8)
    ax.set_ylabel("block")
    ax.set_title(title)


def _spectra(ax, layers: dict, top: list[str], key: str, groups: dict[str, str] | None, what: str) -> None:
    """Eigenvalues / trace against their index (log y; log x for long spectra); a shared S_A is drawn once."""
    import matplotlib.pyplot as plt

    drawn: dict[str, list[str]] = {}
    for name in top:
        drawn.setdefault(groups[name] if groups else name, []).append(name)
    shades = plt.get_cmap("plasma")
    for i, members in enumerate(drawn.values()):
        layer = layers[members[0]]
        frac = (torch.tensor(layer[key]) / layer[key.replace("eig", "trace")]).clamp_min(1e-12)
        share = sum(layers[n]["mass_share"] for n in members)
        label = f"{', '.join(_short(n) for n in members)} ({share:.0%} of mass)"
        ax.plot(range(1, len(frac) + 1), frac.tolist(), color=shades(0.85 * i / max(1, len(drawn) - 1)), label=label)
    if max((len(layers[m[0]][key]) for m in drawn.values()), default=0) > 64:
        ax.set_xscale("log")  # long spectra: the head and the tail both stay visible
    ax.set_yscale("log")
    ax.set_title(f"eigen-spectrum of {what}, top {len(top)} layers by mass")
    ax.set_xlabel("eigenvalue index (largest first)")
    ax.set_ylabel("eigenvalue / trace")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")


def _layer_axis(ax, names: list[str]) -> None:
    step = max(1, math.ceil(len(names) / 40))
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels([_short(n) for n in names[::step]], rotation=90, fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel("adapted layer (block.module, model order)")


def _spectrum(s: torch.Tensor | FactorSketch) -> list[float]:
    return factor_eigenvalues(s)[:SPECTRUM_KEEP].tolist()


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _short(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` → `3.q_proj` (the block index and the module)."""
    numbers = re.findall(r"\.(\d+)\.", f".{name}.")
    return f"{numbers[-1]}.{_kind(name)}" if numbers else ".".join(name.split(".")[-2:])


def _title(stats: FisherStats, init: dict[str, Any]) -> str:
    head = f"fisher-lora: {stats.fisher_type} Fisher, {stats.num_tokens} tokens, {len(stats)} layers"
    if init.get("selector"):
        head += f"; {init.get('selector')} directions, policy {init.get('policy')}"
    return head


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
