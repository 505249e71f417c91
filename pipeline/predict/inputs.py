"""What ``samadapt predict`` reads: NIfTI files, DICOM series folders, PNG/JPEG images.

Every input becomes a ``Scan``: its planes as uint8, in the input's own grid, never reoriented,
so that the label volume written back has the input's shape, affine and orientation:

* NIfTI (``.nii``, ``.nii.gz``; channel 0 of a 4D file, as ``samadapt shard`` reads it): the
  planes are taken along the stored array's third axis k; plane k is ``data[:, :, k]`` with rows
  = j and columns = i, the layout of ``sharding.readers.common.to_zyx`` (for a file stored RAS,
  these are exactly the slices the model was trained on; any other orientation gives the same
  planes flipped or transposed, as the file stores them);
* a DICOM series folder: the slices sorted along their normal, (rows, columns) as stored
  (``sharding.readers.dicom.read_series``); the affine from ImagePositionPatient,
  ImageOrientationPatient and PixelSpacing, as the DICOM reader computes it;
* a PNG/JPEG (or TIFF) image: one plane, grey (H, W) or colour (H, W, 3) RGB.

In every case a plane pixel has coordinates x = column (NIfTI i), y = row (NIfTI j) and slice
k, and ``Scan.affine`` maps (x, y, k, 1) to RAS mm (None for images). Intensities become uint8
by the shard writer's rules (``sharding.intensity``, with the training shards' settings: see
``settings``), the whole volume at once as ``sharding.transform.volume_slices`` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from sharding.config import ShardingConfig
from sharding.intensity import is_ct, to_uint8
from sharding.manifest import SUMMARY_FILE, load_manifest
from sharding.readers.common import (
    IMAGE_SUFFIXES,
    decode_image_file,
    modality_name,
    to_uint8_2d,
    to_zyx,
)
from sharding.records import RejectedInput

__all__ = ["NIFTI_SUFFIXES", "Input", "Scan", "Settings", "list_inputs", "read_scan", "settings"]

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SNIFF = 8  # extension-less files opened to look for the DICOM preamble


@dataclass(frozen=True)
class Settings:
    """How inputs become the model's planes: the training shards' rules."""

    sharding: ShardingConfig
    """ct_window, mr_percentiles and resize (the shards' own when their manifest is found)."""
    modality: str
    """The modality of every input ("" = each input's own): ``--modality``, else the shards'
    ``sharding.modality`` override."""
    fallback: str
    """For inputs that state none (NIfTI, images): the shards' one modality, "" = unknown (the
    percentile rule)."""
    source: str
    """Where the rules came from, for the log and predict.json."""


@dataclass(frozen=True)
class Input:
    """One input of the command line, before reading."""

    path: Path
    kind: str
    """"nifti", "dicom", "image", or "unknown" (reading it fails, naming the file)."""
    given: str
    """The INPUT argument it came from (a folder for the images in it)."""


@dataclass
class Scan:
    """One input read: planes in its own grid (module docstring)."""

    source: Input
    planes: np.ndarray
    """uint8 (K, H, W), or (1, H, W, 3) for a colour image."""
    affine: np.ndarray | None
    """4x4 (x, y, k, 1) -> RAS mm; None for a 2D image."""
    header: nib.Nifti1Header | None = None
    """The NIfTI input's header (its qform/sform codes go to the output)."""
    modality: str = ""

    @property
    def name(self) -> str:
        """The input's name without its suffix: the stem of the output files."""
        name = self.source.path.name
        for suffix in (*NIFTI_SUFFIXES, *IMAGE_SUFFIXES):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name

    @property
    def is_volume(self) -> bool:
        return self.source.kind != "image"


def settings(sharding: ShardingConfig, shards: str, *, modality: str = "") -> Settings:
    """The intensity and resize rules of the shards the model was trained on.

    Arguments:
      sharding: the config's sharding section (used when ``shards`` has no manifest).
      shards: ``data.shards``; its ``manifest.json`` records the settings the shards were
        written with, and its ``summary.json`` their modalities.
      modality: ``--modality``: the modality of every input. Without it, the shards'
        ``sharding.modality`` when set (an override there too), else a DICOM series' Modality
        tag, else the shards' one modality when they hold only one, else unknown.

    Returns:
      Settings.
    """
    source = "the config's sharding section"
    recorded: dict = {}
    if shards:
        try:
            recorded = load_manifest(shards).document.get("sharding", {})
            source = f"{shards}/manifest.json"
        except (OSError, ValueError):
            log.info(
                "no readable manifest in %r: intensity and resize rules from the config", shards
            )
    keys = ("ct_window", "mr_percentiles", "resize")
    chosen = dataclasses.replace(sharding, **{k: recorded[k] for k in keys if k in recorded})
    override = modality_name(modality) or modality_name(
        str(recorded.get("modality", sharding.modality))
    )
    fallback = _single_modality(Path(shards) / SUMMARY_FILE) if shards else ""
    return Settings(sharding=chosen, modality=override, fallback=fallback, source=source)


def _single_modality(summary: Path) -> str:
    """The one modality of a shard set's summary.json, or "" (none, several, unreadable)."""
    try:
        counts = json.loads(summary.read_text()).get("by_modality", {})
    except (OSError, ValueError, AttributeError):
        return ""
    names = [m for m in counts if m and m != "unknown"]
    return modality_name(names[0]) if len(names) == 1 and len(counts) == 1 else ""


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    return "unknown"


def _holds_dicom(folder: Path) -> bool:
    """Whether a folder holds DICOM files: a ``.dcm`` file among the files the DICOM reader
    would read, or one of the first few with the ``DICM`` preamble."""
    from sharding.readers.dicom import series_files

    files = series_files(folder)
    if any(f.lower().endswith(".dcm") for f in files):
        return True
    for name in files[:_SNIFF]:
        try:
            with open(name, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    return True
        except OSError:
            continue
    return False


def list_inputs(given: list[str]) -> list[Input]:
    """The inputs of the INPUT arguments, in their order.

    A file is a NIfTI or an image by its suffix. A folder that holds DICOM files is one series
    (a ``label.nii.gz`` beside them, as ``samadapt shard`` takes it, is not an input); another
    folder gives each of its NIfTI and image files (sorted by name, hidden files skipped). A path
    that does not exist or has another suffix becomes an ``unknown`` input, whose reading fails
    naming it (the other inputs go on).
    """
    out: list[Input] = []
    for arg in given:
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            members = [p for p in files if _kind(p) != "unknown"]
            if not members or _holds_dicom(path):
                out.append(Input(path, "dicom", arg))
            else:
                out += [Input(p, _kind(p), arg) for p in members]
        else:
            out.append(Input(path, _kind(path), arg))
    return out


def read_scan(item: Input, cfg: Settings) -> Scan:
    """Read one input into a ``Scan`` (module docstring).

    Raises ``RejectedInput`` naming the file or folder when it is missing, unreadable, of the
    wrong dimensionality, or not an input ``samadapt predict`` reads.
    """
    if not item.path.exists():
        raise RejectedInput(str(item.path), "no such file or folder")
    if item.kind == "nifti":
        return _nifti(item, cfg)
    if item.kind == "dicom":
        return _dicom(item, cfg)
    if item.kind == "image":
        return _image(item, cfg)
    suffixes = ", ".join((*NIFTI_SUFFIXES, *IMAGE_SUFFIXES))
    raise RejectedInput(
        str(item.path),
        f"not an input samadapt predict reads ({suffixes}, or a DICOM series folder)",
    )


def _volume_uint8(image: np.ndarray, modality: str, cfg: Settings, path: Path) -> np.ndarray:
    if not modality:
        log.warning(
            "%s: modality unknown, intensities mapped by the percentile rule (give --modality ct "
            "for CT in HU)",
            path,
        )
    elif is_ct(modality):
        log.info("%s: CT window %s", path, cfg.sharding.ct_window)
    return to_uint8(image, modality=modality, cfg=cfg.sharding)


def _nifti(item: Input, cfg: Settings) -> Scan:
    from sharding.readers.nifti import read_stored

    data, img = read_stored(item.path)
    planes, _, _ = to_zyx(data, img.affine)  # (k, j, i): the plane layout, no flips
    modality = cfg.modality or cfg.fallback
    planes = _volume_uint8(planes, modality, cfg, item.path)
    return Scan(item, planes, np.asarray(img.affine, dtype=np.float64), img.header, modality)


def _dicom(item: Input, cfg: Settings) -> Scan:
    from sharding.readers.dicom import read_series

    series = read_series(item.path)
    modality = cfg.modality or series.modality or cfg.fallback
    planes = _volume_uint8(series.pixels, modality, cfg, item.path)
    return Scan(item, planes, series.affine, None, modality)


def _image(item: Input, cfg: Settings) -> Scan:
    raw = decode_image_file(item.path)
    try:
        plane = to_uint8_2d(raw, percentiles=tuple(cfg.sharding.mr_percentiles))
    except ValueError as err:
        raise RejectedInput(str(item.path), f"{err} (expected grey or RGB)") from None
    return Scan(item, plane[None], None, None, cfg.modality or cfg.fallback)
