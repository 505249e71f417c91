"""Frozen-encoder speed: each distinct input image is encoded once (``train.embedding_cache``).

When no encoder parameter trains (no PEFT, ``model.train_encoder=false``), the image encoder is a
fixed function of the input pixels, and on a CPU or small GPU it is most of a step's time
(LiteMedSAM's TinyViT: ~2 s per 256 px slice on 2 cores, its decoder step a fraction of that).
The cache keys every image (or D-slice stack) by a digest of its exact pixels, dtype and shape:

* a repeated image (the next epoch, validation's fixed split) is served from the cache;
* an augmented image hits only when the augmentation repeats exactly (flips, rot90), and
  continuous augmentations simply miss; no stale embedding can be served for other pixels, so a
  changed shard set needs no invalidation rule;
* on disk, entries live under ``RUN_DIR/embedding_cache/<encoder fingerprint>/`` (sha256 of the
  encoder's weights and the settings that change its output), so a resumed run reuses them and
  other weights never do. Files are plain ``.npy`` (read without pickle), written to a temp
  name and renamed.

Misses of one batch are encoded together, without gradient, through the engine's ``encode``
forward (under ZeRO-3 a rank must not skip a forward, so the config refuses the cache there).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

# Settings of the model section that change what the encoder outputs for the same pixels.
_ENCODER_SETTINGS = ("arch", "image_size", "encoder_input_size", "pixel_norm", "autocast_bf16",
                     "slices")  # fmt: skip


def cache_mode(cfg: PipelineConfig) -> str:
    """What ``train.embedding_cache`` means for this config: ``memory``, ``disk`` or ``none``
    (``auto`` = memory when the encoder is frozen and ZeRO stage < 3)."""
    mode = cfg.train.embedding_cache
    if mode != "auto":
        return mode
    frozen = not cfg.model.peft and not cfg.model.train_encoder
    return "memory" if frozen and cfg.train.zero_stage < 3 else "none"


def encoder_fingerprint(state: dict[str, torch.Tensor], settings: dict[str, Any]) -> str:
    """sha256 over the encoder's tensors (names, shapes, dtypes, bytes) and ``settings``.

    Arguments:
      state: ``image_encoder.*`` tensors by state-dict name.
      settings: the model settings that change the encoder's output (``_ENCODER_SETTINGS``).

    Returns:
      str: 64 hex digits.
    """
    h = hashlib.sha256(repr(sorted(settings.items())).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EmbeddingCache:
    """Image embeddings by pixel digest, in memory or on disk, filled through the engine.

    Arguments:
      engine: the ``pipeline.engine.Engine`` (or a ``SamAdapt``: anything called as
        ``engine(batch, mode)``) whose ``encode`` forward makes the embeddings; they are
        returned on its device.
      max_bytes: the most bytes held; later misses are encoded every time they come.
      root: the folder of the disk cache (None = memory). Entries are stored there as
        float32 (which holds bf16 and fp16 values exactly) and come back in the encoder's
        output dtype, recorded in ``root/dtype`` by the first write.
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_bytes: int,
        root: Path | None = None,
    ) -> None:
        self.engine = engine
        self.max_bytes = max_bytes
        self.root = root
        self.entries: dict[str, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._full_logged = False
        self.dtype: torch.dtype | None = None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
            self.bytes = sum(f.stat().st_size for f in root.glob("*/*.npy"))
            marker = root / "dtype"
            if marker.exists():
                self.dtype = getattr(torch, marker.read_text().strip().removeprefix("torch."))

    @property
    def hit_rate(self) -> float:
        """Hits over lookups so far (0 before the first)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @staticmethod
    def digest(images: torch.Tensor) -> str:
        """The key of one image or stack: blake2b of its exact pixels, dtype and shape."""
        host = images.detach().to("cpu").contiguous()
        h = hashlib.blake2b(f"{host.dtype}:{tuple(host.shape)}".encode(), digest_size=20)
        h.update(host.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.npy"

    def _get(self, key: str) -> torch.Tensor | None:
        if self.root is None:
            return self.entries.get(key)
        path = self._path(key)
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (FileNotFoundError, ValueError, OSError):  # absent, or cut short by a crash
            return None

    def _put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if self.bytes + size > self.max_bytes:
            if not self._full_logged:
                log.info(
                    "embedding cache full (%.2f GB, train.embedding_cache_gb): further images are "
                    "encoded each time they come", self.bytes / 1e9,
                )  # fmt: skip
                self._full_logged = True
            return
        self.bytes += size
        if self.root is None:
            self.entries[key] = value
            return
        if self.dtype is None:
            self.dtype = value.dtype
            (self.root / "dtype").write_text(str(value.dtype))
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, value.float().numpy(), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __call__(self, images: torch.Tensor, slices: int = 1) -> torch.Tensor:
        """The embeddings of ``images``, encoding only the ones not cached.

        Arguments:
          images (torch.Tensor): (N, 3, S, S) as the model's ``encode`` takes them; N = B*D
            with each D-slice stack consecutive.
          slices (int): D (a stack is one entry: a 3D encoder sees its slices together).

        Returns:
          torch.Tensor: (N, C, g, g) on the engine's device, without gradient.
        """
        d = slices
        groups = [images[i : i + d] for i in range(0, images.shape[0], d)]
        keys = [self.digest(g) for g in groups]
        found = [self._get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(groups) - len(missing)
        self.misses += len(missing)
        if missing:
            batch = torch.cat([groups[i] for i in missing])
            with torch.no_grad():
                made = self.engine({"images": batch, "slices": d}, "encode")
            for j, i in enumerate(missing):
                value = made[j * d : (j + 1) * d].detach().to("cpu").clone()
                self._put(keys[i], value)
                found[i] = value
        device = getattr(self.engine, "device", None) or next(self.engine.parameters()).device
        return torch.cat([f.to(device, self.dtype or f.dtype) for f in found])


def _settings(cfg: PipelineConfig) -> dict[str, Any]:
    settings = {k: getattr(cfg.model, k) for k in _ENCODER_SETTINGS}
    settings["precision"] = cfg.train.precision
    return settings


def _root(cfg: PipelineConfig, fingerprint: str) -> Path:
    return Path(cfg.run_dir) / "embedding_cache" / fingerprint[:16]


def model_encoders(cfg: PipelineConfig, models: dict[str, Any]) -> dict[str, Callable[..., Any]]:
    """``encode`` callables for the models of ``samadapt eval`` (one process, no engine).

    Models whose frozen encoders hold the same weights (a trained decoder and its untrained
    base) share one cache, so each image is encoded once for all of them; with
    ``train.embedding_cache=disk`` it is the training run's own folder (the same fingerprint),
    so a split the run validated on is not encoded again.

    Arguments:
      cfg: the run's config.
      models: ``SamAdapt`` models by name, in eval mode on their device.

    Returns:
      dict: name -> ``encode(images, slices=1)`` (the model's own ``encode`` when the cache is
      off for this config).
    """
    mode = cache_mode(cfg)
    if mode == "none":
        return {name: model.encode for name, model in models.items()}
    shared: dict[str, EmbeddingCache] = {}
    out: dict[str, Callable[..., Any]] = {}
    for name, model in models.items():
        state = {k: v for k, v in model.state_dict().items() if k.startswith("image_encoder.")}
        fingerprint = encoder_fingerprint(state, _settings(cfg))
        if fingerprint not in shared:
            root = _root(cfg, fingerprint) if mode == "disk" else None
            max_bytes = int(cfg.train.embedding_cache_gb * 1e9)
            shared[fingerprint] = EmbeddingCache(model, max_bytes=max_bytes, root=root)
        out[name] = shared[fingerprint]
    return out


def build_embedding_cache(cfg: PipelineConfig, engine: Any) -> EmbeddingCache | None:
    """The cache ``train.embedding_cache`` asks for (None = none), logging what it chose.

    Collective on the disk path (the fingerprint gathers the frozen weights on every rank).
    """
    mode = cache_mode(cfg)
    if mode == "none":
        return None
    max_bytes = int(cfg.train.embedding_cache_gb * 1e9)
    root = None
    if mode == "disk":
        state = {k: v for k, v in engine.frozen_state_dict().items()
                 if k.startswith("image_encoder.")}  # fmt: skip
        root = _root(cfg, encoder_fingerprint(state, _settings(cfg)))
    log.info(
        "embedding cache: %s%s (the encoder is frozen: each distinct image is encoded once; "
        "train.embedding_cache=none to encode every time)",
        mode, f" at {root}" if root else "",
    )  # fmt: skip
    return EmbeddingCache(engine, max_bytes=max_bytes, root=root)
