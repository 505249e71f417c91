"""Intensity transforms of uint8 images on their device: gamma and contrast (the image only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["adjust_intensity"]


def adjust_intensity(
    image: torch.Tensor, gamma: Sequence[float], contrast: Sequence[float]
) -> torch.Tensor:
    """Gamma, then contrast, per sample; a sample is N / len(gamma) consecutive images (a slice
    stack, whose slices share the transform and the statistics it is taken on).

    * gamma g: ``lo + r * ((x - lo) / r) ** g`` with lo, r the sample's minimum and range
      (batchgenerators' ``augment_gamma``; MA-SAM's lookup table on its [0, 1] image);
    * contrast c: ``m + c * (x - m)`` with m the sample's mean, clipped to 0..255 (PIL's
      ``ImageEnhance.Contrast``).

    The result is rounded back to uint8, the batch's image type.

    Arguments:
      image: (N, C, S, S) uint8, N a multiple of the number of samples.
      gamma, contrast: per sample (1 = unchanged); parameters are on the host, so only the
        samples that change are computed.

    Returns:
      A new (N, C, S, S) uint8 tensor (``image`` itself when no sample changes).
    """
    rows = [i for i, (g, c) in enumerate(zip(gamma, contrast, strict=True)) if g != 1 or c != 1]
    if not rows:
        return image
    b = len(gamma)
    if image.shape[0] % b:
        raise ValueError(f"adjust_intensity: {image.shape[0]} images for {b} samples")
    per_sample = image.reshape(b, -1)
    index = torch.tensor(rows, device=image.device)
    x = per_sample.index_select(0, index).float()
    g = torch.tensor([gamma[i] for i in rows], device=image.device)[:, None]
    c = torch.tensor([contrast[i] for i in rows], device=image.device)[:, None]
    lo = x.amin(1, keepdim=True)
    span = (x.amax(1, keepdim=True) - lo).clamp(min=1e-7)
    x = torch.where(g != 1, lo + span * ((x - lo) / span).pow(g), x)
    mean = x.mean(1, keepdim=True)
    x = torch.where(c != 1, (mean + c * (x - mean)).clamp(0, 255), x)
    out = per_sample.clone()
    out.index_copy_(0, index, x.round().clamp(0, 255).to(torch.uint8))
    return out.view_as(image)
