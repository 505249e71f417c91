"""``samadapt`` console script: one entry point, one subcommand per job.

Each subcommand lives in its own module as ``cli(argv) -> int`` and is imported only when used, so
``samadapt shard`` does not import torch and DeepSpeed.
"""

from __future__ import annotations

import importlib
import logging
import sys

from pipeline.config import ConfigError

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("sharding.run:cli", "corpus -> WebDataset shards + Zarr volumes"),
    "inspect": ("sharding.inspect:cli", "print a shard set's summary, draw a contact sheet"),
    "train": ("pipeline.train:cli", "train SAM (interactive or prompt-free), tracked in MLflow"),
    "model-info": ("pipeline.model.info:cli", "parameters per model part (total / trainable)"),
    "export": ("pipeline.model.export:cli", "write a model's trained tensors + config (small)"),
}


def _usage() -> str:
    lines = ["usage: samadapt COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "samadapt COMMAND -h shows a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"samadapt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except ConfigError as err:
        print(f"samadapt {name}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
