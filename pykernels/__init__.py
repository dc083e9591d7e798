"""pykernels: fused kernels for activation probes, model selection and
likelihood-landscape flatness, with a plain-PyTorch reference for every op.

Importing never needs a GPU, Triton or the compiled extension; see
`pykernels.backends()` for what can run here.
"""

from . import selection
from .backend import backends
from .probes.scoring import probe_scores
from .selection.correlation import pairwise_corr_distance, parc_spearman, spearman

__version__ = "0.1.0"
__all__ = ["backends", "pairwise_corr_distance", "parc_spearman", "probe_scores", "selection", "spearman"]
