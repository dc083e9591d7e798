"""Triton kernels. Imported lazily (only when the triton backend is chosen), so
`import pykernels` never needs Triton."""
