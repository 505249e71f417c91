"""``python -m launch.worker MODULE:FUNCTION ARGS...``: one rank of a local launch.

The entry sets up its own logging (rank-aware); nothing is configured here.
"""

from __future__ import annotations

import sys

from launch.local import call_entry

if __name__ == "__main__":
    sys.exit(call_entry(sys.argv[1], sys.argv[2:]))
