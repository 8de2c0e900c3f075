"""Only the optional C extension lives here; everything else is in pyproject.toml.

The Hamming scan (daemon/_hamming.c) is built for the installing machine's CPU
(POPCNT on x86-64, the base NEON CNT on aarch64). It is optional: when no C
compiler is present the install goes on and search uses numpy.
"""

import platform

from setuptools import Extension, setup

flags = ["-O3", "-pthread"] + (["-mpopcnt"] if platform.machine().lower() in ("x86_64", "amd64") else [])

setup(ext_modules=[Extension("pocketembed.daemon._hamming", ["daemon/_hamming.c"], extra_compile_args=flags,
                             extra_link_args=["-pthread"], optional=True)])
