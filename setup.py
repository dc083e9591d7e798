"""Builds pykernels._C, the compiled operator library.

Sources are globbed by folder, the same way CMakeLists.txt does (see csrc/README.md):
  csrc/core/*.cpp, csrc/ops/*.cpp      always (CPU kernels + bindings)
  csrc/core/*.cu, csrc/ops/cuda/*.cpp  when building with CUDA

CUDA is built when the installed torch has CUDA and nvcc is found, or when
PYKERNELS_BUILD_CUDA=1 forces it (=0 disables it). Architectures: a TORCH_CUDA_ARCH_LIST
you set is used as given; otherwise 8.0, 9.0 and every visible GPU's, the newest also as
PTX, which the driver compiles for newer GPUs (Blackwell). Older GPUs (T4 = 7.5,
V100 = 7.0) need their own entry, e.g. TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0+PTX";
`pykernels backends` says when the GPU has no kernel image in the build.
PYKERNELS_NO_EXTENSION=1 installs the pure-Python package only.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns):
    files = []
    for pattern in patterns:
        files += sorted(glob.glob(os.path.join("csrc", pattern)))
    return files


def cuda_arch_list(user_list, visible_capabilities):
    """TORCH_CUDA_ARCH_LIST for the build: the user's as given, else 8.0, 9.0 and the visible
    GPUs' architectures, the newest with +PTX (forward compatible through the driver's JIT)."""
    if user_list:
        return user_list
    archs = sorted({(8, 0), (9, 0), *visible_capabilities})
    names = [f"{major}.{minor}" for major, minor in archs]
    names[-1] += "+PTX"
    return ";".join(names)


def _want_cuda(cpp_extension):
    forced = os.environ.get("PYKERNELS_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extensions():
    if os.environ.get("PYKERNELS_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils import cpp_extension

    # -fopenmp: at::parallel_for is inline and runs serially in a translation unit
    # compiled without OpenMP. The libgomp it links is the one torch already loaded.
    # No -std flag: torch's cpp_extension picks the standard its headers need (C++20 for 2.14).
    cxx = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"]
    link = ["-fopenmp"]
    sources = _sources("core/*.cpp", "ops/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "core")]
    if not _want_cuda(cpp_extension):
        ext = cpp_extension.CppExtension(
            "pykernels._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("PYKERNELS_PYTHON_MODULE", "1")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
        return [ext], {"build_ext": cpp_extension.BuildExtension}

    import torch

    visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"), visible)
    # CUDA wheels of torch ship some toolkit headers (cusparse.h, ...) in site-packages.

    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += sorted(glob.glob(os.path.join(torch_site, "nvidia", "cu*", "include")))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    ext = cpp_extension.CUDAExtension(
        "pykernels._C",
        sources + _sources("core/*.cu", "ops/cuda/*.cpp"),
        include_dirs=include_dirs,
        define_macros=[("PYKERNELS_PYTHON_MODULE", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


if os.environ.get("PYKERNELS_SETUP_IMPORT") != "1":  # set by tests that import cuda_arch_list
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
