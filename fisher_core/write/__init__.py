"""Adapters: write directions into PEFT LoRA layers and export adapters for the original base."""

from fisher_core.write.export import export_adapter, to_original_base
from fisher_core.write.peft import apply, restore_offsets
from fisher_core.write.record import InitRecord, get_record, load_record, save_record

__all__ = [
    "InitRecord",
    "apply",
    "export_adapter",
    "get_record",
    "load_record",
    "restore_offsets",
    "save_record",
    "to_original_base",
]
