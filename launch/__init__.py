"""Where processes run: in this process, as N local ranks, or through submitit (local or Slurm).

``launch`` never knows what the model is. It runs an *entry*, a ``"module:function"`` string whose
function takes ``argv: list[str]`` and returns an exit code, once per rank, with the
torch.distributed environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
set. The function reads its rank from the environment like any torchrun script.
"""

from __future__ import annotations

from pathlib import Path

from configtree import ConfigError
from launch.config import LaunchConfig
from launch.local import run_local

__all__ = ["run", "run_local"]


def run(
    *,
    cfg: LaunchConfig,
    entry: str,
    argv: list[str],
    run_dir: str | Path,
    requeue_argv: list[str] | None = None,
) -> int:
    """Run ``entry(argv)`` on ``cfg.nodes`` x ``cfg.ranks`` processes where ``cfg.mode`` says.

    Arguments:
      requeue_argv: appended to ``argv`` when a submitit job is requeued after preemption or
        time-out (e.g. ``["train.resume=auto"]``).

    Returns:
      The exit code: 0 when every rank succeeded (for submitit modes, when the job finished).
    """
    if cfg.mode == "local":
        if cfg.nodes != 1:
            raise ConfigError(f"launch.nodes={cfg.nodes} needs launch.mode=slurm")
        return run_local(entry=entry, argv=argv, ranks=cfg.ranks)
    from launch.submit import submit  # late import: submitit only when used

    job = submit(cfg=cfg, entry=entry, argv=argv, run_dir=run_dir, requeue_argv=requeue_argv)
    return job.wait()
