"""Declares the Cython extensions and their OpenMP flags; metadata is in pyproject.toml.

Environment switches:

- ``SKLEARN_HASH_NO_OPENMP=1`` builds without OpenMP (single-threaded kernels);
  OpenMP is also left out, with a warning, when the compiler cannot use it.
- ``SKLEARN_HASH_DEBUG=1`` compiles the kernels with bounds checking on.
"""

import glob
import os
import platform
import sys
import tempfile
import textwrap
import warnings

from Cython.Build import cythonize
from setuptools import Extension, setup

KERNELS = ["_openmp", "_hamming", "_adc", "_nearest", "_refine", "_fastscan", "_mih", "_imi"]


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _openmp_flags():
    """Compile and link flags for OpenMP, or none if the compiler lacks it."""
    if _env_flag("SKLEARN_HASH_NO_OPENMP"):
        return [], []
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    flag = "/openmp" if compiler.compiler_type == "msvc" else "-fopenmp"
    link = [] if compiler.compiler_type == "msvc" else [flag]
    program = textwrap.dedent(
        """
        #include <omp.h>
        int main(void) { return omp_get_max_threads() < 1; }
        """
    )
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "check_openmp.c")
        with open(source, "w") as f:
            f.write(program)
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(
                objects, os.path.join(tmp, "check_openmp"), extra_postargs=link
            )
        except Exception:  # any compiler or linker failure means no OpenMP
            warnings.warn(
                "The C compiler cannot build OpenMP programs: sklearn_hash kernels "
                "are built single-threaded.",
                stacklevel=1,
            )
            return [], []
    return [flag], link


def _extensions():
    compile_args, link_args = _openmp_flags()
    if sys.platform != "win32":
        compile_args = compile_args + ["-O3"]
        if platform.machine().lower() in {"x86_64", "amd64"}:
            # Hardware popcount: every x86-64 processor since 2008 has it.
            compile_args.append("-mpopcnt")
    return [
        Extension(
            f"sklearn_hash._kernels.{name}",
            [f"sklearn_hash/_kernels/{name}.pyx"],
            include_dirs=["sklearn_hash/_kernels"],
            depends=glob.glob("sklearn_hash/_kernels/*.h"),
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
        for name in KERNELS
    ]


debug = _env_flag("SKLEARN_HASH_DEBUG")
setup(
    ext_modules=cythonize(
        _extensions(),
        build_dir="build/cython",
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": False,
            "initializedcheck": debug,
            "cdivision": True,
            "nonecheck": False,
        },
    ),
)
