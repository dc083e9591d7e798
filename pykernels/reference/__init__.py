"""Plain-PyTorch reference implementations: the executable specification every
backend is tested against. Written for clarity, any dtype (float64 in tests).

One module per op family (pykernels.backend.OP_FAMILY); each op's reference has
the op's schema name and arguments, e.g. pykernels.reference.flatness.energy."""

from . import flatness, parc, probe_guard, probe_scores

__all__ = ["flatness", "parc", "probe_guard", "probe_scores"]
