"""``samadapt train CONFIG [key=value ...]``: load the config, launch the ranks, train.

In this process when ``launch.mode=local`` and ``launch.ranks=1``; as N local ranks with
``launch.ranks=N``; through submitit with ``launch.mode=submitit_local|slurm``. Each rank runs
``worker``: join the process group, build the trainer, train, tear down.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.config import load_config

log = logging.getLogger(__name__)

ENTRY = "pipeline.train:worker"
EXIT_NON_FINITE = 3
"""Exit code of a run stopped by a NaN/Inf loss (its last checkpoint is from before it)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samadapt train",
        description="Fine-tune SAM: interactive (SAM-Med2D) or prompt-free (SAMed/MA-SAM/AutoSAM).",
    )
    parser.add_argument("config", help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return parser


def worker(argv: list[str]) -> int:
    """One rank: the torch.distributed variables are in the environment (or absent: 1 rank)."""
    from pipeline.distributed import cleanup, dist_env, init_distributed, setup_logging
    from pipeline.trainer import NonFiniteLoss, Trainer

    args = _parser().parse_args(argv)
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    env = dist_env()
    init_distributed(env)
    try:
        return Trainer(cfg, env).train()
    except NonFiniteLoss as err:
        log.error("stopped: %s", err)
        return EXIT_NON_FINITE
    finally:
        cleanup()


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # fail here, before any process starts
    from pipeline.trainer import check_config

    check_config(cfg)
    if cfg.launch.mode == "local" and cfg.launch.ranks == 1:
        return worker(argv)
    from launch import run

    return run(
        cfg=cfg.launch,
        entry=ENTRY,
        argv=argv,
        run_dir=cfg.run_dir,
        requeue_argv=["train.resume=auto"],
    )
