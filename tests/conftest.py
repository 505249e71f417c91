"""Test-wide settings: CPU-only DeepSpeed, a persistent extension cache, quiet libraries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed picks the CPU accelerator (gloo) here; say so explicitly, and keep its one-time
# JIT build of the CPU communication op between runs.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")


SMALL_SIZE = 64
TINY_MODEL = [
    "model.arch=tiny",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "model.global_attn_indexes=[1]",
    "model.window_size=4",
    "model.prompt_dim=32",
]
"""Overrides that shrink any preset's model to a tiny ViT (a paper preset's ViT-B/H included)."""


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """A learnable shape corpus (irregular textured shapes, SA-Med2D layout), sharded at 64 px."""
    from samadapt.config import load_config
    from sharding.run import run_shard
    from sharding.synthetic import write_sa_med2d

    root = tmp_path_factory.mktemp("small")
    corpus = write_sa_med2d(root / "corpus", n_cases=12, slices_per_case=4, size=96, seed=1)
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        [f"sharding.image_size={SMALL_SIZE}", "sharding.inputs_per_shard=6", "sharding.workers=1"],
    ).sharding
    out = root / "shards"
    run_shard("sa-med2d", corpus, out, cfg=cfg, workers=1)
    return out


@pytest.fixture(scope="session")
def volumes(tmp_path_factory) -> Path:
    """A CT NIfTI corpus (6 cases of 8 slices) sharded at 64 px: its Zarr store of volumes."""
    from samadapt.config import load_config
    from sharding.run import run_shard
    from sharding.synthetic import write_nifti

    root = tmp_path_factory.mktemp("ct")
    corpus = write_nifti(root / "corpus", n_cases=6, shape=(8, 48, 48), modality="CT", seed=2)
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        [f"sharding.image_size={SMALL_SIZE}", "sharding.workers=1", "sharding.val_fraction=0.3"],
    ).sharding
    out = root / "shards"
    run_shard("nifti", corpus, out, cfg=cfg, workers=1)
    (store,) = (out / "volumes").glob("*.zarr")
    return store
