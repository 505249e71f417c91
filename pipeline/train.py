"""One training rank: join the process group, build the trainer, train, tear down.

``samadapt train`` (``samadapt/cli.py``) loads the config and runs ``run_rank`` in its own process
(``launch.mode=local``, ``launch.ranks=1``) or has ``launch`` start it once per rank (N local
ranks, or submitit). The torch.distributed variables are in the environment (or absent: 1 rank).
"""

from __future__ import annotations

import logging

from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

EXIT_NON_FINITE = 3
"""Exit code of a run stopped by a NaN/Inf loss (its last checkpoint is from before it)."""


def run_rank(cfg: PipelineConfig) -> int:
    """Train this rank's part of the run described by ``cfg``.

    Arguments:
      cfg: the run's config (the root config of ``samadapt/config.py`` is one).

    Returns:
      The rank's exit code: 0 when training finished, ``EXIT_NON_FINITE`` after a NaN/Inf loss,
      ``pipeline.process.EXIT_REQUEUE`` after a checkpoint on a preemption signal.
    """
    from pipeline.distributed import cleanup, dist_env, setup_logging
    from pipeline.engine import init_distributed
    from pipeline.trainer import NonFiniteLoss, Trainer

    setup_logging()
    env = dist_env()
    init_distributed(env)
    try:
        return Trainer(cfg, env).train()
    except NonFiniteLoss as err:
        log.error("stopped: %s", err)
        return EXIT_NON_FINITE
    finally:
        cleanup()
