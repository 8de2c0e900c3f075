"""pocketembed.daemon: the long-lived process and what it runs (engine, models)."""

import os

# One thread for numpy's bundled OpenBLAS (and for llama.cpp's, in a build made with
# BLAS): the daemon runs its own parallelism, and every OpenBLAS thread keeps a ~4 MB
# buffer resident (measured with scripts/bench_peers.py: RSS after indexing the 5,574
# SMS 122 -> 115 MB). OpenBLAS reads it once, when numpy loads: the daemon package is
# imported before anything of the daemon imports numpy, so it is set here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
