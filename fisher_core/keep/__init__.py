"""Keep mode: learn the task at the least Fisher cost on data whose behaviour should be kept (docs/design.md §7)."""

from fisher_core.keep.data import KeepData, keep_data
from fisher_core.keep.mode import KeepMode, keep_mode
from fisher_core.keep.stats import keep_cache_path, keep_relative, keep_statistics

__all__ = ["KeepData", "KeepMode", "keep_cache_path", "keep_data", "keep_mode", "keep_relative", "keep_statistics"]
