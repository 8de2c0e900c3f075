"""The C allocator's settings for a long-lived daemon whose work comes in bursts.

glibc's malloc raises its mmap threshold to the largest block freed so far (up to
32 MB), after which big transient buffers (llama.cpp's output buffers, numpy's
arrays during recalibration) are carved from its heaps and stay resident after
they are freed. Fixed thresholds keep every block of 128 KiB or more in a
mapping of its own, returned to the kernel on free. Measured with
scripts/bench_peers.py (index.add of the 5,574 SMS): RSS after the job 176 MB
-> 122 MB, peak 176 MB -> 165 MB, idle 96 MB.

Only glibc has these knobs; elsewhere (Android's bionic) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("pocketembed.allocator")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024


def tune() -> bool:
    """Fix glibc's mmap and trim thresholds (before the daemon's threads start allocating)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.info("could not set malloc's thresholds; keeping glibc's defaults")
    return ok
