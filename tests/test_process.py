"""The process module: glibc malloc tuning measured in a fresh interpreter.

(Signal handling and the ranks' agreement to stop are tested on two ranks in test_checkpoint.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

_MALLOC_PROBE = r"""
import ctypes, sys, torch
from pipeline.process import keep_freed_host_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
t = torch.empty(24 << 20, dtype=torch.uint8)  # a step's buffer: allocated, written, freed
t.fill_(1)
mapped = libc.mallinfo2().hblkhd
del t
print(mapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.parametrize("mode", ["keep", "default"])
def test_cpu_engine_keeps_freed_host_memory(mode):
    """With ``keep_freed_host_memory`` (CPU engines call it) glibc serves buffers up to 32 MB
    from the heap and keeps them there when freed (reused by the next step without page faults);
    glibc's default maps a fresh 24 MB buffer with mmap and unmaps it when freed."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MALLOC_PROBE, mode],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    mapped, free_in_heap = int(out[0]), int(out[1])
    if mode == "keep":
        assert mapped < 24 << 20 <= free_in_heap
    else:
        assert mapped >= 24 << 20 > free_in_heap
