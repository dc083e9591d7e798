"""Plain-PyTorch reference implementations: the executable specification every
backend is tested against. Written for clarity, any dtype (float64 in tests)."""

from . import probe_guard
from .parc import average_ranks, pairwise_corr_distance, parc_spearman, spearman
from .probe_scores import ema, probe_logits, probe_scores, smoothing_adjoint, swim, window_sum

__all__ = [
    "average_ranks", "ema", "pairwise_corr_distance", "parc_spearman", "probe_guard", "probe_logits", "probe_scores",
    "smoothing_adjoint", "spearman", "swim", "window_sum",
]
