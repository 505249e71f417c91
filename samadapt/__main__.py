"""``python -m samadapt COMMAND ...``: the same as the ``samadapt`` console script."""

import sys

from samadapt.cli import main

if __name__ == "__main__":
    sys.exit(main())
