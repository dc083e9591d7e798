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

The compiled library only loads with the torch release it was built against (the
C++ ABI of torch changes between releases), so a build with the extension pins
that release in its dependencies (torch==2.13.0 for a build against 2.13.0+cpu)
and records the exact version in pykernels/_build_info.py, which pykernels/_ops.py
checks before loading the library.
"""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

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


class BuildPy(build_py):
    """Leaves out a pykernels/_build_info.py that an in-place build left in the source tree:
    build_ext writes the one that belongs to this build (none without the extension)."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if (m[0], m[1]) != ("pykernels", "_build_info")]


def _build_ext_class(cpp_extension, torch_version):
    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, plus the torch version next to the built library."""

        def run(self):
            super().run()
            # Next to the library: in the source tree with --inplace, else in build_lib.
            package_dir = os.path.dirname(self.get_ext_fullpath("pykernels._C"))
            with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
                f.write(
                    "# Written by setup.py when it built pykernels._C; read by pykernels/_ops.py.\n"
                    f"TORCH_VERSION = {torch_version!r}\n"
                )

    return BuildExtension


def _extensions():
    if os.environ.get("PYKERNELS_NO_EXTENSION") == "1":
        return [], {}, ["torch>=2.4"]
    import torch
    from torch.utils import cpp_extension

    # 2.13.0+cpu -> torch==2.13.0, which the CPU and CUDA builds of 2.13.0 both satisfy.
    requires_torch = [f"torch=={torch.__version__.split('+')[0]}"]
    cmdclass = {"build_ext": _build_ext_class(cpp_extension, torch.__version__)}

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
        return [ext], cmdclass, requires_torch

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
    return [ext], cmdclass, requires_torch


if os.environ.get("PYKERNELS_SETUP_IMPORT") != "1":  # set by tests that import cuda_arch_list
    ext_modules, cmdclass, requires_torch = _extensions()
    # pyproject.toml declares dependencies dynamic: the torch requirement depends on the build.
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_py": BuildPy, **cmdclass},
        install_requires=requires_torch + ["numpy>=1.24", "tqdm>=4.62"],
    )
