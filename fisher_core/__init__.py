"""fisher-lora: initialize LoRA adapters from the Fisher information of the downstream data.

Data flows one way: batches → `estimate` (K-FAC statistics) → `select` (rank-r directions per
layer) → `apply` (written into a PEFT LoRA model); `initialize` runs all three (and
`initialize_lora_fisher_weights` is it in PEFT's calling convention), `export_adapter`
saves an adapter that loads on the original base model, and `to_original_base` turns a trained model
into that base plus that adapter in place.
"""

__version__ = "0.1.0"

from fisher_core.api import InitReport, initialize, initialize_lora_fisher_weights
from fisher_core.config import FisherConfig
from fisher_core.estimate import FisherStats, LayerStats, estimate
from fisher_core.select import Directions, LayerDirections, select
from fisher_core.write import apply, export_adapter, to_original_base

__all__ = [
    "Directions",
    "FisherConfig",
    "FisherStats",
    "InitReport",
    "LayerDirections",
    "LayerStats",
    "__version__",
    "apply",
    "estimate",
    "export_adapter",
    "initialize",
    "initialize_lora_fisher_weights",
    "select",
    "to_original_base",
]
