"""Corpus readers: one per input layout, all following ``sharding.records.Reader``.

``get_reader(fmt, root, cfg=...)`` checks the root folder and returns the reader. Formats:

* ``sa-med2d``: SA-Med2D-16M / SAM-Med2D layout (PNG images, one PNG per mask,
  ``image2label_*.json``), see ``sharding.readers.sa_med2d``.
* ``nifti``: nnU-Net v2 / Medical Segmentation Decathlon (``dataset.json``, ``imagesTr``,
  ``labelsTr``), see ``sharding.readers.nifti``.
* ``dicom``: one DICOM series per case folder, with ``label.nii.gz`` or a DICOM-SEG file, see
  ``sharding.readers.dicom``.
* ``folder``: ``images/`` + label-map ``masks/`` + optional ``classes.json``, see
  ``sharding.readers.folder``.

Errors: an unknown format is a ``ValueError`` naming it and the known ones; a missing root a
``FileNotFoundError``, a root that is a file a ``NotADirectoryError`` and an empty root a
``ValueError``, each naming the path. A layout problem found by ``list_units`` (no
``dataset.json``, no ``images/``, no inputs at all) is a ``ValueError`` naming the path.
"""

from __future__ import annotations

from pathlib import Path

from sharding.config import ShardingConfig
from sharding.records import Reader

__all__ = ["FORMATS", "get_reader"]

FORMATS = ("sa-med2d", "nifti", "dicom", "folder")


def _check_root(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"{root}: input folder does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: input must be a folder, this is a file")
    if not any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise ValueError(f"{root}: input folder is empty")


def get_reader(fmt: str, root: str | Path, *, cfg: ShardingConfig) -> Reader:
    """The reader of corpus format ``fmt`` over the folder ``root``.

    Arguments:
      fmt: one of ``FORMATS``.
      root: the corpus folder.
      cfg: the sharding section (dataset / modality overrides, intensity rules).

    Returns:
      A ``Reader``: ``list_units()`` then ``load(unit)`` per unit. Readers are picklable.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r} (known: {', '.join(FORMATS)})")
    path = Path(root)
    _check_root(path)
    if fmt == "sa-med2d":
        from sharding.readers.sa_med2d import SAMed2DReader

        return SAMed2DReader(path, cfg=cfg)
    if fmt == "nifti":
        from sharding.readers.nifti import NiftiReader

        return NiftiReader(path, cfg=cfg)
    if fmt == "dicom":
        from sharding.readers.dicom import DicomReader

        return DicomReader(path, cfg=cfg)
    from sharding.readers.folder import FolderReader

    return FolderReader(path, cfg=cfg)
