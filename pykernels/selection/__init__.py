"""Model selection: rank a bank of pretrained models for a target task without fine-tuning
(PARC and the transferability estimators it is compared with)."""

from .correlation import pairwise_corr_distance, parc_spearman, spearman
from .estimators import gbc, hscore, hscore_shrinkage, leep, logme, nce, one_nn_cv, transrate
from .parc import PARC, parc

__all__ = [
    "PARC", "gbc", "hscore", "hscore_shrinkage", "leep", "logme", "nce", "one_nn_cv", "pairwise_corr_distance",
    "parc", "parc_spearman", "spearman", "transrate",
]
