"""Test-wide settings: CPU-only DeepSpeed, a persistent extension cache, quiet libraries."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed picks the CPU accelerator (gloo) here; say so explicitly, and keep its one-time
# JIT build of the CPU communication op between runs.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
