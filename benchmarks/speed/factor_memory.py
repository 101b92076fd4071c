"""Factor memory on paper: full K-FAC factors vs LoRA-GA's weight gradients vs a sketch.

    python -m benchmarks.speed.factor_memory --rank 16 --sketch-multiple 4

All-linear targets of every decoder block (q, k, v, o, gate, up, down), fp32 statistics:
- full K-FAC: `S_A` (n×n) once per distinct input (q/k/v share one, gate/up share one; o and down
  have their own) and `S_G` (m×m) per layer;
- `Ḡ` (m×n per layer), the mean gradient the `natural` selector needs on top of the factors;
- LoRA-GA: one weight gradient (m×n) per layer, in fp32 and in the model's bf16;
- sketch: every factor kept as a rank-k Nyström sketch (`2·d·k` numbers: the sums and the test matrix,
  plus its trace), and `Ḡ` as a two-sided sketch (sums `m·k/2 + k·n`, test matrices `n·k/2 + m·k`,
  `fisher_core.estimate.sums.CrossSketch`), k = `--sketch-multiple` × r.
A second table gives the multiply-adds per token and block of collecting each representation
against the floor's (forward + input-gradient backward through the linear layers, `2·Σ m·n`):
dense factors cost `Σ d²` (one outer product per distinct factor), `Ḡ` costs `Σ m·n`; a factor sketch
`2·d·k` (`x·Ω`, then `xᵀ(x·Ω)`) and `Ḡ`'s sketch `m·k/2 + k·n` (it reuses the factor sketches'
projections). Pure arithmetic from the shapes; nothing is built.
"""

from __future__ import annotations

import argparse

from benchmarks.speed.workload import PRESETS, Shape

GIB = 2**30
FP32 = 4


def block_numbers(shape: Shape, k: int) -> dict[str, int]:
    """Numbers (not bytes) of one block's statistics in each representation."""
    lin = shape.linears()
    inputs = {
        "q_proj": shape.hidden,
        "o_proj": shape.hidden,
        "gate_proj": shape.hidden,
        "down_proj": shape.intermediate,
    }  # distinct inputs: q/k/v, gate/up share
    outputs = [m for m, _ in lin.values()]
    return {
        "input_factors": sum(n * n for n in inputs.values()),
        "output_factors": sum(m * m for m in outputs),
        "mean_grad": sum(m * n for m, n in lin.values()),
        "sketch_factors": sum(2 * d * k for d in [*inputs.values(), *outputs]),  # Y and the test matrix Ω
        "sketch_mean_grad": sum(m * (k // 2) + k * n + n * (k // 2) + m * k for m, n in lin.values()),  # Y, W, Ω, Ψ
        "sketch_factor_macs": sum(2 * d * k for d in [*inputs.values(), *outputs]),
        "sketch_mean_grad_macs": sum(m * (k // 2) + k * n for m, n in lin.values()),  # reuses x·Ω and g·Ψ
        "largest_factor": max([*inputs.values(), *outputs]) ** 2,
    }


def table(presets: list[str], rank: int, sketch_multiple: int) -> str:
    k = sketch_multiple * rank
    lines = [
        f"| model | blocks | full K-FAC S_A+S_G | + Ḡ (`natural`) | LoRA-GA grads fp32 | LoRA-GA grads bf16 | "
        f"sketch k={k} (factors) | sketch + Ḡ sketch | full per block | largest factor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in presets:
        shape = PRESETS[name]
        b = block_numbers(shape, k)
        layers = shape.layers
        full = (b["input_factors"] + b["output_factors"]) * FP32
        grads = b["mean_grad"]
        sketch = b["sketch_factors"] * FP32
        lines.append(
            f"| {name} | {layers} | {_gib(full * layers)} | {_gib((full + grads * FP32) * layers)} | "
            f"{_gib(grads * FP32 * layers)} | {_gib(grads * 2 * layers)} | {_gib(sketch * layers)} | "
            f"{_gib((sketch + b['sketch_mean_grad'] * FP32) * layers)} | {_gib(full)} | "
            f"{_gib(b['largest_factor'] * FP32)} |"
        )
    return "\n".join(lines)


def cost_table(presets: list[str], rank: int, sketch_multiple: int) -> str:
    """Multiply-adds per token and block: statistics vs the floor's linear layers."""
    k = sketch_multiple * rank
    lines = [
        f"| model | floor 2·Σmn | dense S_A+S_G | Ḡ dense | dense S_A+S_G+Ḡ ÷ floor | sketch k={k}, Ḡ sketch ÷ floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in presets:
        b = block_numbers(PRESETS[name], k)
        floor = 2 * b["mean_grad"]
        dense = b["input_factors"] + b["output_factors"]
        sketch = b["sketch_factor_macs"] + b["sketch_mean_grad_macs"]
        lines.append(
            f"| {name} | {floor / 1e6:.0f}M | {dense / 1e6:.0f}M | {b['mean_grad'] / 1e6:.0f}M | "
            f"{(dense + b['mean_grad']) / floor:.2f} | {sketch / floor:.2f} |"
        )
    return "\n".join(lines)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB / 100 else f"{n_bytes / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["llama3-8b", "llama3-70b"], choices=sorted(PRESETS))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sketch-multiple", type=int, default=4, help="sketch rank k = this × rank")
    args = p.parse_args(argv)
    print(table(args.presets, args.rank, args.sketch_multiple))
    print()
    print(cost_table(args.presets, args.rank, args.sketch_multiple))


if __name__ == "__main__":
    main()
