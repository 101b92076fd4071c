"""Statistics: stream batches through the frozen model and collect K-FAC factors (DESIGN §2)."""

from fisher_core.estimate.collect import estimate
from fisher_core.estimate.factors import FisherStats, LayerStats

__all__ = ["FisherStats", "LayerStats", "estimate"]
