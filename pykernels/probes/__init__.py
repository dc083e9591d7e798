"""Activation-probe classifiers (Constitutional Classifiers++): fused scoring of
linear probes over every layer's hidden states, with token smoothing; streaming
scoring inside generation; probe training; the probe + classifier cascade."""

from .cascade import Cascade, CascadeReport
from .scoring import DEFAULT_WINDOW, default_ema_alpha, probe_scores
from .stream import ProbeStream, probe_accumulate_
from .training import LinearProbe, annealed_bce, cumulative_max_bce, softmax_weighted_bce, threshold_for_flag_rate

__all__ = [
    "Cascade",
    "CascadeReport",
    "DEFAULT_WINDOW",
    "LinearProbe",
    "ProbeStream",
    "annealed_bce",
    "cumulative_max_bce",
    "default_ema_alpha",
    "probe_accumulate_",
    "probe_scores",
    "softmax_weighted_bce",
    "threshold_for_flag_rate",
]
