"""Each sample's augmentation, drawn on the host from a generator of its own.

A sample's generator is seeded by (data.seed, epoch, the sample's key) only, so what a sample gets
does not depend on its batch, rank, worker or position in the epoch, and a resumed run (which
replays the data position exactly) draws the same augmentations. Every sample consumes the same
number of draws whatever its outcomes (``DRAWS`` for the transforms, then its prompt draws), so one
outcome never shifts another's stream.

The flips and quarter turns of a sample are composed into one element of the square's symmetry
group, kept as ``(k, f)``: flip left-right if ``f``, then ``torch.rot90`` by ``k`` quarter turns
(``dims=(-2, -1)``), the order ``geometry.apply_dihedral`` applies them in.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from pipeline.augment.config import AugmentConfig

__all__ = ["DRAWS", "SampleParams", "dihedral_matrix", "draw_params", "sample_generator"]

DRAWS = 17
"""Uniform draws per sample for its transforms (see ``draw_params`` for their use)."""

# Dihedral elements as integer 2x2 matrices on centred continuous coordinates (x right, y down).
# torch.rot90(t, 1, dims=(-2, -1)) moves the pixel at (x, y) to (y, S - 1 - x): (x, y) -> (y, -x).
_R = np.array([[0, 1], [-1, 0]], dtype=np.int64)
_H = np.array([[-1, 0], [0, 1]], dtype=np.int64)  # left-right flip
_V = np.array([[1, 0], [0, -1]], dtype=np.int64)  # up-down flip
_I = np.eye(2, dtype=np.int64)


def dihedral_matrix(k: int, f: bool) -> np.ndarray:
    """The matrix of "flip left-right if f, then k quarter turns" (``torch.rot90`` direction)."""
    return np.linalg.matrix_power(_R, k % 4) @ (_H if f else _I)


_CANONICAL = {dihedral_matrix(k, f).tobytes(): (k, f) for k in range(4) for f in (False, True)}


@dataclass(frozen=True)
class SampleParams:
    """What one sample gets (identity values where a transform is not drawn).

    Attributes:
      k, f: the composed flips and quarter turns (see the module docstring).
      angle: rotation in radians (0 = none).
      scale: the sampling-grid factor (1 = none).
      gamma: the intensity exponent (1 = none; already inverted for ``gamma_invert``).
      contrast: the contrast factor (1 = none).
      prompt_u: (M, 2 + n) float64 uniforms for the recomputed prompts of the sample's M masks
        (2 for the box jitter, n for the points); (0, 0) in prompt-free mode.
    """

    k: int
    f: bool
    angle: float
    scale: float
    gamma: float
    contrast: float
    prompt_u: np.ndarray

    @property
    def affine(self) -> bool:
        """Whether the sample is resampled (rotation or scale): its prompts are recomputed."""
        return self.angle != 0.0 or self.scale != 1.0

    @property
    def intensity(self) -> bool:
        return self.gamma != 1.0 or self.contrast != 1.0


def sample_generator(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one sample's augmentation: a function of (seed, epoch, key) only."""
    return np.random.default_rng([seed % 2**32, epoch % 2**32, zlib.crc32(key.encode()), 0xA06])


def _factor(lo: float, hi: float, u_split: float, u: float, split_at_one: bool) -> float:
    """A factor from [lo, hi]: uniform, or batchgenerators' rule (below or above 1 with equal
    chance: ``augment_gamma`` and ``augment_spatial``'s scale draw)."""
    if split_at_one:
        if u_split < 0.5 and lo < 1:
            hi = 1.0
        else:
            lo = max(lo, 1.0)
    return lo + (hi - lo) * u


def draw_params(
    cfg: AugmentConfig, rng: np.random.Generator, *, masks: int = 0, points: int = 0
) -> SampleParams:
    """Draw one sample's transforms (and its prompt uniforms) from its generator.

    Arguments:
      cfg: the ``data.augment`` section.
      rng: the sample's generator (``sample_generator``).
      masks: M, the sample's masks (interactive mode; 0 for a label map).
      points: n, point prompts per mask.

    Returns:
      The sample's parameters.
    """
    u = rng.random(DRAWS)
    prompt_u = rng.random((masks, 2 + points)) if masks else np.zeros((0, 0))
    m = _I
    changed = False
    if u[0] < cfg.rot_flip:  # SAMed's random_rot_flip: np.rot90 by k in 0..3, then np.flip
        m = (_V if u[2] < 0.5 else _H) @ np.linalg.matrix_power(_R, int(u[1] * 4)) @ m
        changed = True
    if u[3] < cfg.hflip:
        m, changed = _H @ m, True
    if u[4] < cfg.vflip:
        m, changed = _V @ m, True
    if u[5] < cfg.rot90:
        m, changed = np.linalg.matrix_power(_R, 1 + int(u[6] * 3)) @ m, True
    k, f = _CANONICAL[m.tobytes()]
    angle = 0.0
    if u[7] < cfg.rotate and not (cfg.rotate_exclusive and changed):
        angle = math.radians((2 * u[8] - 1) * cfg.rotate_deg)
    scale = 1.0
    if u[9] < cfg.scale:
        scale = _factor(*cfg.scale_range, u[10], u[11], cfg.split_at_one)
    gamma = 1.0
    if u[12] < cfg.gamma:
        gamma = _factor(*cfg.gamma_range, u[13], u[14], cfg.split_at_one)
        gamma = 1.0 / gamma if cfg.gamma_invert else gamma
    contrast = 1.0
    if u[15] < cfg.contrast:
        lo, hi = cfg.contrast_range
        contrast = lo + (hi - lo) * u[16]
    return SampleParams(k, f, angle, scale, gamma, contrast, prompt_u)
