"""Statistics: stream batches through the frozen model and collect K-FAC factors (docs/design.md §1, §4–§5)."""

from fisher_core.estimate.collect import estimate
from fisher_core.estimate.factors import FisherStats, LayerStats

__all__ = ["FisherStats", "LayerStats", "estimate"]
