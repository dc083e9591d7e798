"""Likelihood landscapes and input-space flatness of classifiers.

Under the energy-based reading of a classifier f (Grathwohl et al. 2020),
log p(x) = logsumexp_k f_k(x) - log Z. log Z is unknown but constant in x, so
every input gradient, Hessian and difference of log p is computable. This
package measures them per example, batched: see measures.py for the exact
definition of each measure, hvp.py for the Hessian-vector products,
estimators.py for the estimators, landscape.py for grids and plots,
regularizers.py for training penalties, and ops.py for the kernels.

The flatness formula of Lin et al., "Likelihood Landscapes" (2020) is not
available; none of these measures is presented as theirs.
"""

from .attacks import fgsm, pgd
from .estimators import Estimate
from .hvp import HVP_METHODS, InputHessian, ParameterHessian, hvp
from .landscape import Landscape, landscape, plot_landscape
from .measures import (
    SpectralDensity,
    exact_trace,
    grad_norm,
    hessian_trace,
    log_likelihood,
    neighborhood_drop,
    parameter_hessian_trace,
    parameter_top_eigenvalues,
    spectral_density,
    top_eigenvalues,
)
from .ops import energy, fill_probes_, logsumexp_hvp, probe_dots, probe_vectors
from .regularizers import curvature_penalty, grad_norm_penalty, neighborhood_drop_penalty

__all__ = [
    "Estimate",
    "HVP_METHODS",
    "InputHessian",
    "Landscape",
    "ParameterHessian",
    "SpectralDensity",
    "curvature_penalty",
    "energy",
    "exact_trace",
    "fgsm",
    "fill_probes_",
    "grad_norm",
    "grad_norm_penalty",
    "hessian_trace",
    "hvp",
    "landscape",
    "log_likelihood",
    "logsumexp_hvp",
    "neighborhood_drop",
    "neighborhood_drop_penalty",
    "parameter_hessian_trace",
    "parameter_top_eigenvalues",
    "pgd",
    "plot_landscape",
    "probe_dots",
    "probe_vectors",
    "spectral_density",
    "top_eigenvalues",
]
