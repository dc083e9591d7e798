"""Model selection (PARC and transferability estimators)."""

from .correlation import pairwise_corr_distance, parc_spearman, spearman

__all__ = ["pairwise_corr_distance", "parc_spearman", "spearman"]
