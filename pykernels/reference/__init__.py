"""Plain-PyTorch reference implementations: the executable specification every
backend is tested against. Written for clarity, any dtype (float64 in tests)."""

from .parc import average_ranks, pairwise_corr_distance, parc_spearman, spearman
from .probe_scores import ema, probe_logits, probe_scores, swim

__all__ = [
    "average_ranks", "ema", "pairwise_corr_distance", "parc_spearman", "probe_logits", "probe_scores",
    "spearman", "swim",
]
