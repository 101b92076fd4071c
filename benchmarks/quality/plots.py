"""Loss curves per task: one line per method (mean over seeds), small PNGs."""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.quality import tables


def curves(records: list[dict], path: Path, *, title: str, metric: str = "test_loss") -> Path:
    """Plot mean `metric` against step, one line per label (the seeds' min–max shaded); write `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.0), dpi=90)
    groups = sorted(tables.by_label(records).items())
    colors = plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2]  # the saturated ten first
    for k, (label, runs) in enumerate(groups):
        steps = [p["step"] for p in runs[0]["curve"]]
        values = [[r["curve"][i][metric] for r in runs] for i in range(len(steps))]
        style = "-" if label.startswith("fisher") else "--"
        name = label.split(" ")[0]  # PEFT's default init black, ours (default config) red, both thick
        color, width = {"lora": ("black", 2.2), "fisher-natural": ("crimson", 2.2)}.get(
            name, (colors[k % len(colors)], 1.3)
        )
        mean = [statistics.mean(v) for v in values]
        (line,) = ax.plot(steps, mean, style, color=color, lw=width, label=f"{label} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(
                steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.12
            )
    ax.set_xlabel("training step")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
