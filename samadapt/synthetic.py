"""``python -m samadapt.synthetic --format FMT OUT [--cases N] [--slices K] [--size S]``: write a
small synthetic corpus (``sharding.synthetic``) for the quickstart, tests and benchmarks."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sharding.synthetic import WRITERS, write_corpus


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, write the corpus (a non-empty OUT is kept unless ``--force``)."""
    parser = argparse.ArgumentParser(
        prog="python -m samadapt.synthetic", description="Write a small synthetic corpus."
    )
    parser.add_argument("out", type=Path, help="output folder (replaced when --force)")
    parser.add_argument("--format", choices=WRITERS, default="sa-med2d")
    parser.add_argument("--cases", type=int, default=8, help="cases (default 8)")
    parser.add_argument("--slices", type=int, default=4, help="2D images per case (default 4)")
    parser.add_argument("--size", type=int, default=256, help="2D image side (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="delete OUT first if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cases < 1 or args.slices < 1 or args.size < 16:
        parser.error("--cases and --slices must be >= 1 and --size >= 16")
    write_corpus(
        args.out,
        fmt=args.format,
        cases=args.cases,
        slices=args.slices,
        size=args.size,
        seed=args.seed,
        force=args.force,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
