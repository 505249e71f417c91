"""N ranks on this machine: one subprocess per rank, torchrun-style environment variables."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger(__name__)

_GRACE_S = 30.0


def call_entry(entry: str, argv: list[str]) -> int:
    """Import ``"module:function"`` and call it with ``argv``."""
    module, _, func = entry.partition(":")
    if not func:
        raise ValueError(f"entry {entry!r} must be 'module:function'")
    return int(getattr(importlib.import_module(module), func)(list(argv)) or 0)


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (the rendezvous of the local ranks; tests use it too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(*, entry: str, argv: list[str], ranks: int) -> int:
    """Run ``entry(argv)`` in this process (ranks == 1) or in ``ranks`` child processes.

    Children get RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT. SIGTERM,
    SIGINT and SIGUSR1 sent to this process are forwarded to every rank (so a preempted parent
    lets the ranks checkpoint). When one rank fails, the others get SIGTERM, then SIGKILL after a
    grace period: a collective would otherwise wait forever.

    Returns:
      0 when every rank exited 0, else the first non-zero exit code.
    """
    if ranks == 1 and "RANK" not in os.environ:
        return call_entry(entry, argv)
    port = free_port()
    procs: list[subprocess.Popen] = []
    # As torchrun: ranks share the cores, so each gets its share of intra-op threads (N ranks x
    # all-core thread pools oversubscribe a CPU machine and run ~2x slower here).
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    for rank in range(ranks):
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", threads)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(ranks),
            LOCAL_WORLD_SIZE=str(ranks),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        cmd = [sys.executable, "-m", "launch.worker", entry, *argv]
        procs.append(subprocess.Popen(cmd, env=env))
    log.info("started %d local ranks (master port %d)", ranks, port)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {s: signal.signal(s, forward) for s in forwarded}
    try:
        return _wait_all(procs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait_all(procs: list[subprocess.Popen]) -> int:
    first_failure = 0
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            break
        failed = [c for c in codes if c not in (None, 0)]
        if failed and not first_failure:
            first_failure = failed[0]
            log.error("a rank exited with code %d; stopping the others", first_failure)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + _GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            deadline = None
        time.sleep(0.1)
    if first_failure:
        return first_failure
    return next((c for c in codes if c != 0), 0)
