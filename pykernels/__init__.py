"""pykernels: fused kernels for activation probes, model selection and
likelihood-landscape flatness, with a plain-PyTorch reference for every op.

Importing never needs a GPU, Triton or the compiled extension; see
`pykernels.backends()` for what can run here.
"""

from . import flatness, selection
from ._ops import ExtensionWarning
from .backend import backends
from .flatness.ops import energy, fill_probes_, logsumexp_hvp, probe_dots, probe_vectors
from .probes.scoring import probe_scores
from .probes.stream import probe_accumulate_
from .selection.correlation import pairwise_corr_distance, parc_spearman, spearman

# Semantic versioning (CHANGELOG.md); pyproject.toml reads it from here.
__version__ = "0.1.0"
__all__ = [
    "ExtensionWarning",
    "backends",
    "energy",
    "fill_probes_",
    "flatness",
    "logsumexp_hvp",
    "pairwise_corr_distance",
    "parc_spearman",
    "probe_accumulate_",
    "probe_dots",
    "probe_scores",
    "probe_vectors",
    "selection",
    "spearman",
]
