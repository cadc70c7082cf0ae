"""Builds the Cython ranking kernel; all other metadata is in setup.cfg (see kernels/README.md)."""

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

rank_cy = Extension(
    "hpc_reid.evaluation._rank_cy",
    ["kernels/rank_cy.pyx"],
    depends=["kernels/rank_count.h"],
    include_dirs=[np.get_include(), "kernels"],  # kernels/rank_count.h
    extra_compile_args=["-O3", "-fopenmp"],  # OpenMP: queries are ranked in parallel threads
    extra_link_args=["-fopenmp"],
    libraries=["m"],  # nextafter in kernels/rank_count.h
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)
# build_dir keeps the generated C out of the source tree.
setup(ext_modules=cythonize([rank_cy], build_dir="build/cython", language_level=3))
