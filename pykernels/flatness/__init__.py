"""Likelihood landscapes and input-space flatness of classifiers."""

from .ops import energy, fill_probes_, logsumexp_hvp, probe_dots, probes

__all__ = ["energy", "fill_probes_", "logsumexp_hvp", "probe_dots", "probes"]
