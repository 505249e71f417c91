"""Geometric transforms of a batch on its device: flips and quarter turns (exact), rotation and
scale (one resampling), and the exact map of box and point prompts under the first kind.

Coordinates: a box ``(x0, y0, x1, y1)`` has an exclusive maximum, i.e. its corners are pixel
edges of the continuous frame [0, S]; a point ``(x, y)`` is a pixel index, i.e. the pixel centre
``(x + 0.5, y + 0.5)``. Both are mapped through the same matrix on coordinates centred at S / 2,
so an exact flip or quarter turn of the masks moves boxes and points exactly with them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment.params import dihedral_matrix

__all__ = ["apply_dihedral", "dihedral_points", "dihedral_boxes", "resample"]


def _groups(ks: Sequence[int], fs: Sequence[bool]) -> dict[tuple[int, bool], list[int]]:
    """Sample indices by transform, identity left out (at most 7 groups: one op each)."""
    out: dict[tuple[int, bool], list[int]] = {}
    for i, (k, f) in enumerate(zip(ks, fs, strict=True)):
        if k or f:
            out.setdefault((int(k), bool(f)), []).append(i)
    return out


def apply_dihedral(x: torch.Tensor, ks: Sequence[int], fs: Sequence[bool]) -> torch.Tensor:
    """Flip left-right (if f) then turn by k quarter turns, per sample, on the last two dims.

    Arguments:
      x: (N, ..., S, S) any dtype (images, masks, label maps).
      ks, fs: per sample (N of each); the parameters are on the host, so the samples of each
        distinct transform are gathered with one index and transformed together.

    Returns:
      A new tensor of x's shape (x itself when nothing moves).
    """
    groups = _groups(ks, fs)
    if not groups:
        return x
    out = x.clone()
    for (k, f), rows in groups.items():
        index = torch.tensor(rows, device=x.device)
        part = x.index_select(0, index)
        if f:
            part = part.flip(-1)
        if k:
            part = torch.rot90(part, k, dims=(-2, -1))
        out.index_copy_(0, index, part)
    return out


def _matrices(ks: Sequence[int], fs: Sequence[bool], device: torch.device) -> torch.Tensor:
    mats = np.stack([dihedral_matrix(int(k), bool(f)) for k, f in zip(ks, fs, strict=True)])
    return torch.from_numpy(mats.astype(np.float32)).to(device)


def dihedral_points(
    coords: torch.Tensor, ks: Sequence[int], fs: Sequence[bool], size: int
) -> torch.Tensor:
    """Point prompts (B, M, n, 2) pixel indices -> their pixels after ``apply_dihedral``."""
    mats = _matrices(ks, fs, coords.device)  # (B, 2, 2)
    half = size / 2
    centred = coords + (0.5 - half)
    moved = torch.einsum("bij,bmnj->bmni", mats, centred)
    return moved + (half - 0.5)


def dihedral_boxes(
    boxes: torch.Tensor, ks: Sequence[int], fs: Sequence[bool], size: int
) -> torch.Tensor:
    """Box prompts (B, M, 4) -> the boxes of the moved pixels (maxima exclusive). A jittered box
    moves with its mask: its shift is transformed too."""
    mats = _matrices(ks, fs, boxes.device)
    half = size / 2
    corners = boxes.reshape(*boxes.shape[:-1], 2, 2) - half  # (B, M, 2 corners, xy)
    moved = torch.einsum("bij,bmcj->bmci", mats, corners) + half
    return torch.cat((moved.amin(-2), moved.amax(-2)), -1)


def resample(
    x: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor, *, mode: str
) -> torch.Tensor:
    """Rotate by ``angles`` and scale the sampling grid by ``scales`` about the image centre.

    The output pixel at centred position p samples the input at ``scale * R(angle) p``, zeros
    outside the image (SAMed's and MA-SAM's ``ndimage.rotate`` fill 0).

    Arguments:
      x: (N, C, S, S) float.
      angles, scales: (N,) float32 on x's device.
      mode: "bilinear" (images) or "nearest" (masks, label maps).

    Returns:
      (N, C, S, S) float.
    """
    cos, sin = torch.cos(angles) * scales, torch.sin(angles) * scales
    zero = torch.zeros_like(cos)
    theta = torch.stack((torch.stack((cos, -sin, zero), -1), torch.stack((sin, cos, zero), -1)), -2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
