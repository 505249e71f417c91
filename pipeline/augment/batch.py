"""``Augmenter``: a training batch -> the same batch augmented, on the training device.

Each sample's parameters come from its own generator (``params.py``: seeded by data.seed, the
epoch and the sample's key); the transforms run batched on the device (``intensity.py``,
``geometry.py``); the prompts follow the masks (``prompts.py``):

* flips and quarter turns move pixels exactly, so boxes and points are moved with them (a
  jittered box keeps its jitter, transformed);
* a rotation or scaling resamples the masks, so the sample's boxes and points are made again from
  the transformed masks by the reader's rules (largest component or whole mask, exclusive max,
  SAM-Med2D's jitter; points uniform over the foreground), from the sample's own draws;
* a sample whose rotation or scaling would empty one of its masks (the mask leaves the image, or
  a speck vanishes in the resampling) keeps its un-resampled geometry (flips, quarter turns and
  intensity still apply): no mask of a training batch is empty, so no loss needs to skip one;
* masks that are already invalid (``mask_valid`` False: collate padding) stay invalid, with the
  padding prompts (zero box and points, point label -1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.augment.config import AugmentConfig
from pipeline.augment.geometry import apply_dihedral, dihedral_boxes, dihedral_points, resample
from pipeline.augment.intensity import adjust_intensity
from pipeline.augment.params import SampleParams, draw_params, sample_generator
from pipeline.augment.prompts import component_masks, jitter_boxes, mask_boxes, mask_points
from pipeline.config import BoxFrom, DataConfig
from pipeline.data.prompts import component_boxes, tight_boxes

__all__ = ["HOST_COMPONENTS", "Augmenter"]

HOST_COMPONENTS = ("cpu",)
"""Devices where the largest components are found by the reader's own OpenCV code (on CPU it is
far faster than the batched search, and it is the reader's rule by construction)."""


def _stack(params: list[SampleParams], name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=device)


class Augmenter:
    """Augments training batches (``data.augment``).

    Arguments:
      cfg: the ``data.augment`` section.
      seed: ``data.seed``.
      box_from: ``data.box_from``; box_jitter: ``data.box_jitter`` (recomputed boxes).
      device: the training device.
    """

    def __init__(
        self,
        cfg: AugmentConfig,
        *,
        seed: int,
        box_from: BoxFrom,
        box_jitter: int,
        device: torch.device | str,
    ) -> None:
        self.cfg, self.seed = cfg, seed
        self.box_from, self.box_jitter = box_from, box_jitter
        self.device = torch.device(device)

    @classmethod
    def for_data(cls, data: DataConfig, *, device: torch.device | str) -> Augmenter:
        """The augmenter of the data section (``data.augment``, its seed and box rule)."""
        return cls(
            data.augment,
            seed=data.seed,
            box_from=data.box_from,
            box_jitter=data.box_jitter,
            device=device,
        )

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def _params(self, batch: dict[str, Any], **sizes: int) -> list[SampleParams]:
        if "epoch" not in batch or "keys" not in batch:
            raise KeyError("augmentation needs the batch's 'keys' and 'epoch' (set by the task)")
        epoch = int(batch["epoch"])
        return [
            draw_params(self.cfg, sample_generator(self.seed, epoch, key), **sizes)
            for key in batch["keys"]
        ]

    # -- interactive ---------------------------------------------------------------------------

    def interactive(self, batch: dict[str, Any]) -> dict[str, Any]:
        """An interactive batch (``pipeline/data/collate.py``) augmented; its tensors on the
        device. The batch's own tensors are never written to."""
        m, s = batch["masks"].shape[1], batch["masks"].shape[-1]
        params = self._params(batch, masks=m, points=batch["point_coords"].shape[2])
        out = dict(batch)
        dev = self.device
        names = ("image", "masks", "boxes", "point_coords", "point_labels", "mask_valid")
        t = {k: batch[k].to(dev, non_blocking=True) for k in names}
        image = adjust_intensity(
            t["image"], [p.gamma for p in params], [p.contrast for p in params]
        )
        ks, fs = [p.k for p in params], [p.f for p in params]
        masks = apply_dihedral(t["masks"], ks, fs)
        out.update(
            image=apply_dihedral(image, ks, fs),
            masks=masks,
            boxes=dihedral_boxes(t["boxes"], ks, fs, s),
            point_coords=dihedral_points(t["point_coords"], ks, fs, s),
            point_labels=t["point_labels"],
            mask_valid=t["mask_valid"],
        )
        rows = [i for i, p in enumerate(params) if p.affine]
        if rows:
            self._resample_interactive(out, [params[i] for i in rows], rows)
        # padding stays padding, whatever moved
        valid = out["mask_valid"]
        out["boxes"] = out["boxes"] * valid[..., None]
        out["point_coords"] = out["point_coords"] * valid[..., None, None]
        out["point_labels"] = torch.where(valid[..., None], out["point_labels"], -1)
        return out

    def _resample_interactive(
        self, out: dict[str, Any], params: list[SampleParams], rows: list[int]
    ) -> None:
        dev = self.device
        index = torch.tensor(rows, device=dev)
        angles, scales = _stack(params, "angle", dev), _stack(params, "scale", dev)
        image = out["image"].index_select(0, index)
        masks = out["masks"].index_select(0, index)
        valid = out["mask_valid"].index_select(0, index)
        warped = resample(image.float(), angles, scales, mode="bilinear")
        warped = warped.round().clamp(0, 255).to(torch.uint8)
        moved = resample(masks.float(), angles, scales, mode="nearest") > 0.5
        # a sample keeps its geometry if the resampling would empty one of its (valid) masks
        take = (moved.flatten(2).any(2) | ~valid).all(1)  # (R,)
        r, m, s = moved.shape[:3]
        u = torch.from_numpy(np.stack([p.prompt_u for p in params])).to(dev)  # (R, M, 2 + n)
        boxes, coords, labels = self._prompts(moved.reshape(r * m, s, s), u.reshape(r * m, -1))
        new = {
            "image": warped,
            "masks": moved.to(torch.uint8),
            "boxes": boxes.view(r, m, 4),
            "point_coords": coords.view(r, m, -1, 2),
            "point_labels": labels.view(r, m, -1),
        }
        for key, value in new.items():
            old = out[key].index_select(0, index)
            keep = take.view(-1, *([1] * (value.dim() - 1)))
            merged = out[key].clone()
            merged.index_copy_(0, index, torch.where(keep, value, old))
            out[key] = merged

    def _prompts(
        self, masks: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boxes (P, 4) float32 and points (P, n, 2), labels (P, n) of masks (P, S, S) bool, by
        the reader's rules, from the uniforms u (P, 2 + n)."""
        if self.box_from == "whole_mask":
            exact, empty = mask_boxes(masks)
        elif masks.device.type in HOST_COMPONENTS:
            host = masks.cpu().numpy().view(np.uint8)
            tight = tight_boxes(host)
            exact = torch.from_numpy(component_boxes(host, tight=tight)).to(masks.device)
            empty = torch.from_numpy(tight[1]).to(masks.device)
        else:
            exact, empty = mask_boxes(component_masks(masks))
        boxes = jitter_boxes(exact, empty, u[:, :2], jitter=self.box_jitter)
        coords, labels = mask_points(masks, u[:, 2:])
        return boxes, coords, labels

    # -- semantic ------------------------------------------------------------------------------

    def semantic(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A prompt-free batch augmented: image (N, 3, S, S) and label (N, S, S) with N = B * D
        (a sample's D stacked slices consecutive, all transformed alike); tensors on the device.
        """
        params = self._params(batch)
        b = len(params)
        n = batch["image"].shape[0]
        if n % b:
            raise ValueError(f"augment: {n} images for {b} keys (not whole slice stacks)")
        d = n // b
        dev = self.device
        image = batch["image"].to(dev, non_blocking=True)
        label = batch["label"].to(dev, non_blocking=True)
        image = adjust_intensity(image, [p.gamma for p in params], [p.contrast for p in params])
        ks = [p.k for p in params for _ in range(d)]
        fs = [p.f for p in params for _ in range(d)]
        image, label = apply_dihedral(image, ks, fs), apply_dihedral(label, ks, fs)
        rows = [i * d + j for i, p in enumerate(params) if p.affine for j in range(d)]
        if rows:
            chosen = [params[i // d] for i in rows]
            index = torch.tensor(rows, device=dev)
            angles, scales = _stack(chosen, "angle", dev), _stack(chosen, "scale", dev)
            part = resample(image.index_select(0, index).float(), angles, scales, mode="bilinear")
            image = image.clone()
            image.index_copy_(0, index, part.round().clamp(0, 255).to(torch.uint8))
            # class ids are small integers: exact in float32, and nearest sampling keeps them
            part = resample(
                label.index_select(0, index)[:, None].float(), angles, scales, mode="nearest"
            )
            label = label.clone()
            label.index_copy_(0, index, part[:, 0].round().to(label.dtype))
        return {**batch, "image": image, "label": label}
