"""Jobs through submitit: ``launch.mode=submitit_local`` (this machine) or ``slurm``.

As dinov2 does it: a picklable task with late imports; inside the job, submitit's
``TorchDistributedEnvironment().export()`` sets the torch.distributed variables before the entry
runs; on preemption or time-out (Slurm sends SIGUSR1 ``signal_delay_s`` before the limit)
submitit calls ``checkpoint()``, which resubmits the same task with ``requeue_argv`` appended
(the trainer passes ``train.resume=auto``), so the job continues from its last checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import submitit

from configtree import ConfigError
from launch.config import LaunchConfig
from launch.local import call_entry

log = logging.getLogger(__name__)

SIGNAL_DELAY_S = 120


class Task:
    """One rank of a submitit job: export the distributed environment, run the entry."""

    def __init__(self, entry: str, argv: list[str], requeue_argv: list[str] | None = None):
        self.entry = entry
        self.argv = list(argv)
        self.requeue_argv = list(requeue_argv or [])

    def __call__(self) -> int:
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        return call_entry(self.entry, self.argv)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        argv = self.argv + [a for a in self.requeue_argv if a not in self.argv]
        log.info("requeueing %s with %s", self.entry, " ".join(argv))
        return submitit.helpers.DelayedSubmission(Task(self.entry, argv, self.requeue_argv))


def executor_parameters(cfg: LaunchConfig, *, name: str) -> dict[str, Any]:
    """submitit parameters from the launch section; the only place they are decided."""
    params: dict[str, Any] = dict(
        name=name,
        nodes=cfg.nodes,
        tasks_per_node=cfg.ranks,
        cpus_per_task=cfg.cpus_per_task,
        timeout_min=cfg.time_min,
    )
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    if cfg.mem_gb:
        params["mem_gb"] = cfg.mem_gb
    if cfg.mode == "slurm":
        params["slurm_signal_delay_s"] = SIGNAL_DELAY_S
        for key in ("partition", "account", "qos", "constraint"):
            value = getattr(cfg, key)
            if value:
                params[f"slurm_{key}"] = value
    return params


def make_executor(cfg: LaunchConfig, *, folder: Path, name: str) -> submitit.AutoExecutor:
    cluster = "local" if cfg.mode == "submitit_local" else "slurm"
    if cluster == "local" and cfg.nodes != 1:
        raise ConfigError(f"launch.nodes={cfg.nodes} needs launch.mode=slurm")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(**executor_parameters(cfg, name=name))
    return executor


class Submitted:
    def __init__(self, job: submitit.Job):
        self.job = job

    def wait(self) -> int:
        """Block until the job ends; 0 when every task returned 0."""
        try:
            results = self.job.results()
        except Exception as err:  # submitit re-raises the task's failure with its log path
            log.error("job %s failed: %s", self.job.job_id, err)
            return 1
        return max((int(r or 0) for r in results), default=0)


def submit(
    *,
    cfg: LaunchConfig,
    entry: str,
    argv: list[str],
    run_dir: str | Path,
    requeue_argv: list[str] | None = None,
    name: str = "samadapt",
) -> Submitted:
    folder = Path(cfg.folder) if cfg.folder else Path(run_dir) / "submitit"
    executor = make_executor(cfg, folder=folder, name=name)
    job = executor.submit(Task(entry, argv, requeue_argv))
    log.info("submitted job %s (%s), logs in %s", job.job_id, cfg.mode, folder)
    return Submitted(job)
