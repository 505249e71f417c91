"""Where this process sits in the job, and the process group.

Pure functions over the environment, in the order launchers set it:

- torchrun, the ``deepspeed`` launcher and submitit's ``TorchDistributedEnvironment().export()``
  set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
  ``MASTER_PORT``;
- a plain ``srun`` sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
  ``SLURM_NTASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` and ``SLURM_JOB_NODELIST``;
- nothing: one process, rank 0 of 1.

Nothing here imports submitit (that is ``launch/``'s job) or DeepSpeed: the process group is
joined through DeepSpeed, by ``pipeline.engine.init_distributed``, on the rendezvous store that
``rendezvous_store`` makes. That store's server (rank 0) listens on the master address only,
not on every interface as torch's ``env://`` rendezvous does; with a loopback master (local
runs) the gloo / NCCL sockets stay on the loopback interface too (``keep_to_loopback``).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.utils.distributed import get_free_port

from pipeline.redact import RedactFilter

__all__ = [
    "DistEnv",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "cleanup",
    "device",
    "dist_env",
    "get_rank",
    "get_world_size",
    "is_main",
    "keep_to_loopback",
    "rendezvous_store",
    "setup_logging",
]

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Rank and rendezvous of this process."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    backend: str
    """"nccl" when a GPU is visible, else "gloo"."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        if default is None:
            raise RuntimeError(f"environment variable {key} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"environment variable {key}={raw!r} is not an integer") from None


def _first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return "127.0.0.1"
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def _tasks_on_first_node(value: str) -> int:
    """``SLURM_TASKS_PER_NODE`` such as ``4(x2),3`` -> 4."""
    match = re.match(r"(\d+)", value.strip())
    return int(match.group(1)) if match else 1


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read rank, world size and rendezvous from the launcher's environment variables.

    Arguments:
      environ: the variables to read (default ``os.environ``).

    Returns:
      A ``DistEnv``. With no launcher variables: rank 0 of 1 on 127.0.0.1 with ``MASTER_PORT``
      or a free port (torch's ``get_free_port``; ``launch`` picks the port of the ranks it
      starts itself).
    """
    env = os.environ if environ is None else environ
    backend = _backend()
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", _int(env, "SLURM_NTASKS_PER_NODE", world))
        return DistEnv(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK", 0),
            world_size=world,
            local_world_size=local_world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
            backend=backend,
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
        job_id = _int(env, "SLURM_JOB_ID", 0)
        # One port per job, so two jobs sharing a node do not collide.
        port = _int(env, "MASTER_PORT", 20000 + job_id % 20000)
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=world,
            local_world_size=_tasks_on_first_node(per_node),
            master_addr=env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST", "")),
            master_port=port,
            backend=backend,
        )
    return DistEnv(
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(env, "MASTER_PORT", 0) or get_free_port(),
        backend=backend,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def keep_to_loopback(env: DistEnv, environ: dict[str, str] | None = None) -> bool:
    """With a loopback master address (every rank on this machine), have gloo and NCCL open
    their sockets on the loopback interface (``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``,
    unless already set) instead of the interface of the host name.

    Returns:
      Whether the master address is a loopback address.
    """
    if not _is_loopback(env.master_addr):
        return False
    environ = os.environ if environ is None else environ
    # Linux names the loopback interface "lo" (BSD and macOS "lo0")
    names = [name for _, name in socket.if_nameindex() if name in ("lo", "lo0")]
    if names:
        environ.setdefault("GLOO_SOCKET_IFNAME", names[0])
        environ.setdefault("NCCL_SOCKET_IFNAME", names[0])
    return True


def rendezvous_store(env: DistEnv, *, timeout_s: float) -> dist.TCPStore:
    """The key-value store the ranks meet on: a ``TCPStore`` whose server (rank 0) listens on
    ``MASTER_ADDR:MASTER_PORT`` only (torch's own would listen on every interface).

    Arguments:
      env: this process's ``DistEnv``.
      timeout_s: how long a rank waits for the others (and for store operations).

    Returns:
      The store, for ``torch.distributed.init_process_group(store=...)``.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.rank != 0:
        return dist.TCPStore(
            env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout
        )
    family, _, _, _, address = socket.getaddrinfo(
        env.master_addr, env.master_port, type=socket.SOCK_STREAM
    )[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as err:
        listener.close()
        raise RuntimeError(
            f"cannot listen on MASTER_ADDR={env.master_addr} port {env.master_port}: {err}"
        ) from None
    listener.listen(max(128, env.world_size))
    # The store serves on this socket from now on; detach() hands the descriptor over, so
    # Python never closes it under the store.
    return dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=True,
        timeout=timeout,
        master_listen_fd=listener.detach(),
    )


def device(env: DistEnv) -> torch.device:
    """``cuda:LOCAL_RANK`` with the nccl backend, else the CPU."""
    return torch.device("cuda", env.local_rank) if env.backend == "nccl" else torch.device("cpu")


def get_rank() -> int:
    """Rank in the process group; before it exists, ``RANK`` or 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)


def is_main() -> bool:
    """True on global rank 0 (the one that logs, tracks and writes markers)."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (collective); ``[obj]``
    without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (collective); ``obj`` itself without a group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    """Leave the process group (end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _MainRankFilter(logging.Filter):
    """Rank 0 logs everything; other ranks only warnings and errors, tagged with their rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = get_rank()
        record.where = f"[rank {rank}] " if rank else ""
        return rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: int = logging.INFO) -> None:
    """One stderr handler on the root logger that is quiet on non-zero ranks.

    Info and debug lines come from rank 0 only (every rank would repeat them); warnings and
    errors come from every rank, prefixed ``[rank N]``, since they may differ. Idempotent.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_samadapt", False):
            root.setLevel(level)
            return
        root.removeHandler(handler)  # e.g. the CLI's basicConfig: one line per record, not two
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(where)s%(name)s: %(message)s", "%H:%M:%S")
    )
    handler.addFilter(_MainRankFilter())
    handler.addFilter(RedactFilter())  # no URI password in any line (MLflow's own included)
    handler._samadapt = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # DeepSpeed logs every config key at INFO on every rank.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
