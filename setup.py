"""Build hook for the compiled twins in core_ext (everything else is in pyproject.toml).

RMIOT_NO_EXT=1 skips the Cython build; the pure-Python twins then serve, and
asking for the compiled ones (RMIOT_PURE=0) is an error at import time.
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("RMIOT_NO_EXT") != "1":
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [Extension("rmiot.core_ext._frame", ["core_ext/_frame.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
        quiet=True,
    )

setup(ext_modules=ext_modules)
