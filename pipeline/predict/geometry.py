"""Between a plane of the input and the model's S x S input, both ways.

Forward, a plane is resized as the shard writer resized the training images
(``sharding.transform.resize_image`` with the shards' ``resize``): ``square`` stretches it to
S x S, ``letterbox`` scales its longest side to S and pads the bottom and right with zeros. The
content then fills the top-left ``(h, w) = sharding.transform.target_shape(H, W)`` pixels, so a
pixel edge at x in the plane is at ``x * w / W`` in the model's input (y likewise):

* a box (pixel edges, max exclusive) scales edge by edge, as the box of a mask resized by the
  writer would;
* a point (a pixel index, whose centre is at index + 0.5) goes to ``(x + 0.5) * w / W - 0.5``.

Back, logits at S x S are cropped to the content (h, w) and resized bilinearly to (H, W), as
SAM's ``postprocess_masks`` does (upscale, crop the padding, resize to the original size); a
mask is where the logit is > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sharding.transform import resize_image, target_shape

__all__ = ["PlaneGeometry", "model_image"]


@dataclass(frozen=True)
class PlaneGeometry:
    """The resize of one (H, W) plane to the model's S x S input."""

    height: int
    width: int
    size: int
    mode: str

    @property
    def content(self) -> tuple[int, int]:
        """(h, w): the part of the S x S input the plane fills (the rest is letterbox padding)."""
        return target_shape(self.height, self.width, size=self.size, mode=self.mode)

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): plane pixel edges -> model pixel edges."""
        h, w = self.content
        return w / self.width, h / self.height

    def box(self, box: tuple[float, float, float, float]) -> list[float]:
        """A box x0, y0, x1, y1 (pixel edges, max exclusive) in the model's input."""
        sx, sy = self.scale
        return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]

    def points(self, points: np.ndarray) -> np.ndarray:
        """(n, 2) x, y pixel indices -> the model input's pixel indices."""
        sx, sy = self.scale
        return (points + 0.5) * np.array([sx, sy]) - 0.5

    def logits_back(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) logits -> (N, C, H, W) on the plane's grid (crop, bilinear resize)."""
        h, w = self.content
        crop = logits[..., :h, :w].float()
        if (h, w) == (self.height, self.width):
            return crop
        return F.interpolate(crop, (self.height, self.width), mode="bilinear", align_corners=False)


def model_image(plane: np.ndarray, geometry: PlaneGeometry) -> np.ndarray:
    """A uint8 plane (H, W) or (H, W, 3) -> the model's (3, S, S) uint8 input (grey repeated on
    the three channels, as the training reader does)."""
    resized = resize_image(plane, size=geometry.size, mode=geometry.mode)
    if resized.ndim == 2:
        return np.broadcast_to(resized[None], (3, *resized.shape))
    return resized.transpose(2, 0, 1)
