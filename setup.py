"""Build the Cython data path (fastmesh/_core/*.pyx). No pure-Python fallback."""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTMESH_DEBUG") == "1"  # line tracing for coverage, asserts on

macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []
cflags = ["-O0", "-g"] if DEBUG else ["-O2"]

extensions = [
    Extension(
        "fastmesh._core." + os.path.splitext(os.path.basename(path))[0],
        [path],
        define_macros=macros,
        extra_compile_args=cflags,
    )
    for path in sorted(glob.glob("fastmesh/_core/*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "linetrace": DEBUG,
            "embedsignature": True,
        },
        annotate=os.environ.get("FASTMESH_ANNOTATE") == "1",
    ),
)
