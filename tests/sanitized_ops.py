"""`./dev.sh sanitize` runs the CPU op tests against the operator library built with
AddressSanitizer + UndefinedBehaviorSanitizer (CMake, build/sanitize). With
PYKERNELS_SANITIZED_OPS=<path to libpykernels_ops.so> set, `load()` registers that
library's ops and stands it in for pykernels._C (the same sources and op schemas, without
the empty Python module), so `import pykernels` runs the sanitized kernels. Subprocesses
started by the tests call it too."""

import os
import sys
import types


def load() -> None:
    path = os.environ.get("PYKERNELS_SANITIZED_OPS")
    if not path or "pykernels._C" in sys.modules:
        return
    import torch

    torch.ops.load_library(path)
    sys.modules["pykernels._C"] = types.ModuleType("pykernels._C")
