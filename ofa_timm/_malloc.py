"""A steady glibc allocator for the duration of a CPU measurement: the one place that tunes ``malloc``.

By default glibc hands large freed buffers back to the OS, trims the heap, and moves its mmap threshold as a process
frees large blocks. Whether an activation or a gradient is then served from the heap or from fresh, page-faulting
memory depends on what ran before, not on the network: on CPU this alone moved supernet/static ratios between 0.66 and
1.39 from one run to the next, and a block timed alone differs from the same block inside a network. Raising the mmap
and trim thresholds makes every measurement steady, as a serving or training process is after warm-up.
"""
import contextlib
import ctypes
from typing import Iterator

__all__ = ['steady_allocator']

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
_TRIM_THRESHOLD = 1 << 30
_GLIBC_DEFAULT = 128 << 10


@contextlib.contextmanager
def steady_allocator() -> Iterator[bool]:
    """Keep freed buffers below 32 MiB in the heap while the context lasts; glibc's defaults are set again after.

    Yields whether the thresholds were set (False off glibc, where this is a no-op).
    """
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        yield False
        return
    pinned = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    try:
        yield pinned
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_DEFAULT)
        mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT)
