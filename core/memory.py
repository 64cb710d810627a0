"""Handing freed heap memory back to the operating system."""
from __future__ import annotations

import ctypes
import ctypes.util

_libc = None


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim); a no-op elsewhere. glibc
    keeps freed blocks for reuse otherwise, so a large temporary (a big image's decode, a map
    dropped after a load) would leave the process's RSS high for good."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)
