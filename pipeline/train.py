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
EXIT_BAD_INPUT = 2
"""Exit code of a run stopped by a bad input named in one line: config, checkpoint, weights,
shards, an unusable tracking store (the CLI's config errors exit 2 too)."""
EXIT_STALLED = 4
"""Exit code of a run whose data gave no batches (``TrainingStalled``)."""


def run_rank(cfg: PipelineConfig) -> int:
    """Train this rank's part of the run described by ``cfg``.

    Arguments:
      cfg: the run's config (the root config of ``samadapt/config.py`` is one).

    Returns:
      The rank's exit code: 0 when training finished, ``EXIT_NON_FINITE`` after a NaN/Inf loss,
      ``EXIT_BAD_INPUT`` after a bad input, ``EXIT_STALLED`` when the data gave no batches,
      ``pipeline.process.EXIT_REQUEUE`` after a checkpoint on a preemption signal. Each
      failure is one logged line naming the file, key or step, not a traceback.
    """
    from configtree import ConfigError
    from pipeline.checkpoint import CheckpointError
    from pipeline.data.samples import SampleError
    from pipeline.distributed import cleanup, dist_env, setup_logging
    from pipeline.engine import init_distributed
    from pipeline.model.weights import WeightsError
    from pipeline.tracking import TrackingError
    from pipeline.trainer import NonFiniteLoss, Trainer, TrainingStalled

    setup_logging()
    env = dist_env()
    init_distributed(env)
    try:
        return Trainer(cfg, env).train()
    except NonFiniteLoss as err:
        log.error("stopped: %s", err)
        return EXIT_NON_FINITE
    except TrainingStalled as err:
        log.error("stopped: %s", err)
        return EXIT_STALLED
    except ConfigError as err:
        log.error("stopped: config error: %s", err)
        return EXIT_BAD_INPUT
    except (CheckpointError, WeightsError, SampleError, TrackingError) as err:
        log.error("stopped: %s", err)
        return EXIT_BAD_INPUT
    finally:
        cleanup()
