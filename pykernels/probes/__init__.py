"""Activation-probe classifiers (Constitutional Classifiers++): fused scoring of
linear probes over every layer's hidden states, with token smoothing."""

from .scoring import DEFAULT_WINDOW, default_ema_alpha, probe_scores

__all__ = ["DEFAULT_WINDOW", "default_ema_alpha", "probe_scores"]
