"""What this process does about its own life: preemption signals, the requeue exit status, and
how glibc's malloc keeps freed memory.

Preemption: ``install_signal_handlers()`` returns a flag set on SIGTERM / SIGUSR1 (Slurm sends
one before the time limit with ``--signal``). Ranks may get the signal at different steps, so the
trainer asks ``should_stop(flag)`` (an all-reduce) each step, saves a checkpoint, and exits with
``EXIT_REQUEUE``.
"""

from __future__ import annotations

import ctypes
import logging
import signal
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "EXIT_REQUEUE",
    "StopFlag",
    "install_signal_handlers",
    "keep_freed_host_memory",
    "should_stop",
]

log = logging.getLogger(__name__)

EXIT_REQUEUE = 75
"""Exit status after a checkpoint on SIGTERM/SIGUSR1: EX_TEMPFAIL, "try again" (the launcher
requeues); distinct from success (0), errors (1) and a kill without a save (143, 137)."""


class StopFlag:
    """Set by a signal handler; read by the trainer through ``should_stop``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    def set(self, signum: int) -> None:
        self.signum = signum

    def restore(self) -> None:
        """Put back the handlers that were there before ``install_signal_handlers``."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def install_signal_handlers(
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1),
) -> StopFlag:
    """Make SIGTERM / SIGUSR1 set a flag instead of killing the process (main thread only).

    Returns:
      The ``StopFlag``; pass it to ``should_stop`` once per step.
    """
    flag = StopFlag()

    def handler(signum: int, _frame: Any) -> None:
        # Only set a flag: saving from inside a signal handler would interleave with a step.
        flag.set(signum)
        log.warning("got %s: will checkpoint and stop", signal.Signals(signum).name)

    for signum in signals:
        flag._previous[signum] = signal.signal(signum, handler)
    return flag


def should_stop(flag: StopFlag) -> bool:
    """True on every rank if any rank got a stop signal (collective: all ranks call it).

    One all-reduce of one integer per call: a sync point, cheap next to a training step.
    """
    stop = 1 if flag else 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        on_gpu = "nccl" in str(dist.get_backend())
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
        value = torch.tensor([stop], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        stop = int(value.item())
    return bool(stop)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_host_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    A CPU training step allocates and frees the same multi-MB buffers again and again (weight
    gradients, im2col columns: up to 38 MB for a SAM-Med2D adapter at ViT-B). By default glibc
    serves such sizes with fresh ``mmap`` pages or trims them off the heap when freed, so every
    step pays the page faults and the kernel's zeroing of those pages again: ~13 ms per 38 MB.
    Heap allocations up to 32 MB (glibc's ceiling for the mmap threshold) and no trimming make
    the second and later steps reuse the pages: encoder forward + backward ~7 % faster on CPU.
    Peak memory is the same (freed memory is reused, not added). Linux/glibc only; elsewhere a
    no-op. Returns whether the settings were applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
        ok &= libc.mallopt(_M_TOP_PAD, 256 << 20) == 1
    except (OSError, AttributeError):
        return False
    return bool(ok)
