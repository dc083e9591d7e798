"""Model selection: rank a bank of pretrained models for a target task without fine-tuning
(PARC, Bolya et al. NeurIPS 2021, and the transferability estimators it is compared with).

    from pykernels.selection import score_models
    table = score_models("probe_features/", labels, methods=("parc", "logme"))
    print(table)

Scores are not differentiable: inputs that require grad are detached (the ops underneath,
pykernels.pairwise_corr_distance in particular, keep their own autograd).

scipy and scikit-learn (pip install pykernels[selection]) are needed only by
parc(mode="reference") and evaluate(); they are imported when used.
"""

from .bank import METHODS, ScoreTable, load_entry, score_models
from .correlation import pairwise_corr_distance, parc_spearman, spearman
from .estimators import gbc, hscore, hscore_shrinkage, leep, logme, nce, one_nn_cv, transrate
from .evaluation import Evaluation, EvaluationTable, evaluate
from .features import ProbeSet, extract_features
from .parc import PARC, parc

__all__ = [
    "METHODS",
    "PARC",
    "Evaluation",
    "EvaluationTable",
    "ProbeSet",
    "ScoreTable",
    "evaluate",
    "extract_features",
    "gbc",
    "hscore",
    "hscore_shrinkage",
    "leep",
    "load_entry",
    "logme",
    "nce",
    "one_nn_cv",
    "pairwise_corr_distance",
    "parc",
    "parc_spearman",
    "score_models",
    "spearman",
    "transrate",
]
