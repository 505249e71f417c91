"""What ``samadapt predict`` writes for one input, each file through a temp file and a rename.

* a volume (NIfTI or DICOM input): ``OUT/NAME.nii.gz``, the (K, H, W) label put back in the
  input's (x, y, k) = (i, j, k) array order with the input's affine: for a NIfTI input its shape,
  affine and qform/sform codes (so its orientation), for a DICOM series its (column, row, slice)
  grid and the series' affine (sform and qform code 1, scanner);
* a 2D image: ``OUT/NAME.png``, the label map at the image's size;
* with overlays: ``OUT/overlays/NAME.png`` (an image) or ``NAME_kNNN.png`` per labelled slice of
  a volume (at most ``MAX_OVERLAYS``, evenly spread): the plane with each label outlined and
  lightly filled in its own colour.

Label values are the prompt ids or class ids: uint8 when they fit, else uint16.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np

from pipeline.predict.inputs import Scan
from sharding.files import atomic_write_bytes

__all__ = ["MAX_OVERLAYS", "output_path", "write_label", "write_overlays"]

MAX_OVERLAYS = 16
"""Overlay pictures per volume."""

_ALPHA = 0.35


def output_path(scan: Scan, out: Path) -> Path:
    """Where the label of ``scan`` goes."""
    return out / (f"{scan.name}.nii.gz" if scan.is_volume else f"{scan.name}.png")


def _dtype(label: np.ndarray) -> type:
    return np.uint8 if int(label.max(initial=0)) <= 255 else np.uint16


def _nifti_bytes(scan: Scan, label: np.ndarray) -> bytes:
    data = np.ascontiguousarray(label.transpose(2, 1, 0)).astype(_dtype(label))  # (k,j,i)->(i,j,k)
    img = nib.Nifti1Image(data, scan.affine)
    if scan.header is not None:  # the input's codes: its frame (scanner, aligned...) stays
        img.set_qform(scan.header.get_qform(), code=int(scan.header["qform_code"]))
        img.set_sform(scan.header.get_sform(), code=int(scan.header["sform_code"]))
        img.header.set_xyzt_units(*scan.header.get_xyzt_units())
    else:
        img.set_qform(scan.affine, code=1)
        img.set_sform(scan.affine, code=1)
    img.set_data_dtype(data.dtype)
    return gzip.compress(img.to_bytes(), compresslevel=6)


def write_label(scan: Scan, label: np.ndarray, out: Path) -> Path:
    """Write the (K, H, W) label of ``scan`` (module docstring); returns the file."""
    path = output_path(scan, out)
    if scan.is_volume:
        atomic_write_bytes(path, _nifti_bytes(scan, label), fsync=False)
        return path
    ok, png = cv2.imencode(".png", label[0].astype(_dtype(label)))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, png.tobytes(), fsync=False)
    return path


def _colour(value: int) -> tuple[int, int, int]:
    """A distinct RGB colour per label value (golden-angle hues)."""
    hue = int((value * 137.508) % 180)
    hsv = np.array([[[hue, 220, 255]]], dtype=np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


def _render(plane: np.ndarray, label: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the plane with each label filled lightly and outlined."""
    canvas = plane if plane.ndim == 3 else np.repeat(plane[:, :, None], 3, axis=2)
    canvas = np.ascontiguousarray(canvas, dtype=np.uint8)
    for value in np.unique(label):
        if value == 0:
            continue
        mask = label == value
        colour = np.array(_colour(int(value)), dtype=np.float32)
        canvas[mask] = (canvas[mask] * (1 - _ALPHA) + colour * _ALPHA).astype(np.uint8)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, _colour(int(value)), 1)
    return canvas


def write_overlays(scan: Scan, label: np.ndarray, out: Path) -> list[Path]:
    """Overlay PNGs of ``scan`` under ``out/overlays`` (module docstring); returns the files."""
    folder = out / "overlays"
    labelled = [k for k in range(label.shape[0]) if label[k].any()]
    if len(labelled) > MAX_OVERLAYS:
        picks = np.linspace(0, len(labelled) - 1, MAX_OVERLAYS).round().astype(int)
        labelled = [labelled[i] for i in picks]
    if not scan.is_volume:
        labelled = [0]
    paths = []
    for k in labelled:
        name = f"{scan.name}_k{k:03d}.png" if scan.is_volume else f"{scan.name}.png"
        bgr = cv2.cvtColor(_render(scan.planes[k], label[k]), cv2.COLOR_RGB2BGR)
        ok, png = cv2.imencode(".png", bgr)
        if ok:
            atomic_write_bytes(folder / name, png.tobytes(), fsync=False)
            paths.append(folder / name)
    return paths
