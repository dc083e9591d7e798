"""Triton kernels. Imported lazily (only when the triton backend is chosen, by
pykernels.backend.resolve), so `import pykernels` never needs Triton. Importing
the package imports every family, which registers its ops."""

from . import flatness, parc, probe_guard, probe_scores  # noqa: F401
