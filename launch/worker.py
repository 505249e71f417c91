"""``python -m launch.worker MODULE:FUNCTION ARGS...``: one rank of a local launch."""

from __future__ import annotations

import logging
import os
import sys

from launch.local import call_entry

if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(call_entry(sys.argv[1], sys.argv[2:]))
