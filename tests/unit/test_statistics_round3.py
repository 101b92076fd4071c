"""Issue 28 (round 3): the statistics are of the objective that is trained — left padding, pixel inputs,
encoder–decoder models, `inputs_embeds` batches — each against plain autograd on the real model."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import tiny_llama
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from fisher_core import FisherConfig, estimate

LLAMA_LAYERS = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj",
    "model.layers.0.mlp.up_proj",
]  # fmt: skip
EOS = 2  # pads are the eos token, as many tokenizers without a pad token do (its embedding is not zero)


def _cfg(**kw) -> FisherConfig:
    return FisherConfig(progress=False, num_batches=1, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _weight_gradients(model: nn.Module, batch: dict, layers: list[str]) -> dict[str, torch.Tensor]:
    """∂L/∂W by plain autograd, L = the model's own loss with labels made a sum (× the supervised count)."""
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for name in layers:
        modules[name].weight.requires_grad_(True)
    out = model(**batch)
    labels = batch["labels"] if model.config.is_encoder_decoder else batch["labels"][:, 1:]  # causal: shifted
    (out.loss * int((labels != -100).sum())).backward()
    return {name: modules[name].weight.grad for name in layers}


def _padded(side: str) -> dict:
    """Four rows padded with 0–3 eos tokens on `side`; labels are the ids with pads set to -100."""
    ids = torch.randint(3, 384, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for i in range(1, 4):
        if side == "left":
            mask[i, :i] = 0
        else:
            mask[i, 10 - i :] = 0
    ids[mask == 0] = EOS
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_gradient_is_the_trained_losss_gradient_whichever_side_the_padding_is_on(side):
    """Left padding: the last pad position predicts the first real token, and the model's loss counts that
    term; its position must count too, or N·Ḡ misses it (was: relative error 0.32 on down_proj)."""
    batch = _padded(side)
    stats = estimate(tiny_llama(layers=2), [batch], target_modules=LLAMA_LAYERS, config=_cfg())
    grads = _weight_gradients(tiny_llama(layers=2).train(), batch, LLAMA_LAYERS)
    for name in LLAMA_LAYERS:
        assert _rel(stats[name].mean_grad * stats[name].num_tokens, grads[name]) < 1e-5, name


def test_inputs_embeds_batches_give_the_trained_losss_gradient():
    """A batch of `inputs_embeds` (no input ids: the embedding module never runs) is rooted at its float input:
    N·Ḡ equals plain autograd's ∂L/∂W (was: "the model has no get_input_embeddings()", false for it)."""
    batch = _padded("right")
    with torch.no_grad():
        embeds = tiny_llama(layers=2).get_input_embeddings()(batch.pop("input_ids"))
    batch["inputs_embeds"] = embeds
    stats = estimate(tiny_llama(layers=2), [batch], target_modules=LLAMA_LAYERS, config=_cfg())
    grads = _weight_gradients(tiny_llama(layers=2).train(), batch, LLAMA_LAYERS)
    for name in LLAMA_LAYERS:
        assert _rel(stats[name].mean_grad * stats[name].num_tokens, grads[name]) < 1e-5, name


def _vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=5,
    )  # fmt: skip
    return ViTForImageClassification(config).eval()


def test_position_fraction_subsamples_pixel_positions_without_a_mask_warning():
    """A ViT batch (`pixel_values`, no attention mask): `position_fraction=0.25` keeps about a quarter of the
    6·65 patch positions, the same ones for every layer, with no warning about a mask the batch does not have
    (was: 390 of 390 kept, and that warning); the classifier's one row per image is kept whole."""
    batch = {"pixel_values": torch.randn(6, 3, 32, 32), "labels": torch.randint(0, 5, (6,))}
    layers = ["vit.layers.0.attention.q_proj", "vit.layers.1.mlp.fc2", "classifier"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = estimate(_vit(), [batch], target_modules=layers, config=_cfg(position_fraction=0.25))
    kept = {stats[name].num_tokens for name in layers[:2]}
    assert len(kept) == 1 and 60 < kept.pop() < 140  # Binomial(390, 0.25): mean 97.5, sd 8.6
    assert stats["classifier"].num_tokens == 6


def _t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0, pad_token_id=0
    )
    return T5ForConditionalGeneration(config).eval()


def _bart() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
    )  # fmt: skip
    return BartForConditionalGeneration(config).eval()


SEQ2SEQ = {
    "t5": (_t5, {
        "encoder.block.0.layer.0.SelfAttention.q": "encoder",
        "decoder.block.0.layer.0.SelfAttention.q": "decoder",
        "decoder.block.1.layer.1.EncDecAttention.q": "decoder",
        "decoder.block.1.layer.1.EncDecAttention.k": "encoder",
        "decoder.block.0.layer.2.DenseReluDense.wo": "decoder",
    }),
    "bart": (_bart, {
        "model.encoder.layers.0.fc1": "encoder",
        "model.decoder.layers.0.self_attn.v_proj": "decoder",
        "model.decoder.layers.0.encoder_attn.q_proj": "decoder",
        "model.decoder.layers.0.encoder_attn.v_proj": "encoder",
        "model.decoder.layers.0.fc2": "decoder",
    }),
}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(SEQ2SEQ))
@pytest.mark.parametrize("decoder_length", [5, 7])
def test_encoder_decoder_statistics_are_of_the_seq2seq_loss(arch, decoder_length):
    """T5 and BART with labels (the model shifts them into its decoder inputs, as in training): N·Ḡ equals plain
    autograd's ∂L/∂W of the model's own loss for encoder, decoder and cross-attention layers, and each layer
    counts its own sequence's positions — encoder ones (cross-attention keys/values too) by the encoder mask,
    decoder ones up to the row's last label. Decoder length 7 equals the encoder's: the decoder must still not
    be masked with the encoder mask (was: a crash, labels stripped; then that silent mix-up)."""
    build, layers = SEQ2SEQ[arch]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = mask[2, 2:] = 0  # encoder padding where the decoder has labels
    labels = torch.randint(3, 64, (3, decoder_length), generator=g)
    labels[0, 3:] = -100  # decoder padding
    batch = {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask, "labels": labels}
    stats = estimate(build(), [batch], target_modules=list(layers), config=_cfg())
    grads = _weight_gradients(build(), batch, list(layers))
    counts = {"encoder": int(mask.sum()), "decoder": int((labels != -100).sum())}
    for name, sequence in layers.items():
        assert stats[name].num_tokens == counts[sequence], name
        assert _rel(stats[name].mean_grad * stats[name].num_tokens, grads[name]) < 1e-5, name


class _TwiceBlock(GradientCheckpointingLayer):
    """A block that calls its one linear layer twice (weight sharing inside a block)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.shared = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.shared(torch.tanh(self.shared(h))))


class _TwiceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.block, self.head = nn.Embedding(11, 8), _TwiceBlock(8), nn.Linear(8, 11)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(input_ids)))


def _summed_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")


def test_a_layer_called_twice_inside_one_checkpointed_block_is_refused_in_one_line():
    """A checkpointed block's replay hands the layer's inputs back in call order while their gradients come in
    reverse: one (x, g) slot cannot pair them (was: a TypeError mid-backward). Refused with what to change,
    the model's checkpointing as it was; without checkpointing N·Ḡ is plain autograd's ∂L/∂W."""
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.roll(1, dims=1)}
    model = _TwiceNet()
    model.block.gradient_checkpointing = True
    with pytest.raises(RuntimeError, match=r"'block\.shared' is called twice inside one checkpointed block.*off"):
        estimate(model, [batch], target_modules=["block.shared"], loss_fn=_summed_loss, config=_cfg())
    assert model.block.gradient_checkpointing and model.training  # as it was
    model.block.gradient_checkpointing = False
    stats = estimate(model, [batch], target_modules=["block.shared"], loss_fn=_summed_loss, config=_cfg())
    weight = model.block.shared.weight
    (want,) = torch.autograd.grad(_summed_loss(model, batch), weight)
    assert _rel(stats["block.shared"].mean_grad * stats["block.shared"].num_tokens, want) < 1e-5
