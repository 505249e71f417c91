"""What a shard set holds, and a picture to check it before training (``samadapt inspect``).

``format_report`` gives the manifest totals and the summary (samples per split / dataset /
modality, masks per class, empty slices kept and dropped, rejections by reason);
``write_contact_sheet`` draws a grid of N samples, each mask blended in its own colour with its
outline, its class name written at the mask's most interior pixel, and the sample key above each
tile. Samples are taken from evenly spaced shards of the manifest, preferring samples that have
masks. The command (``samadapt inspect OUTPUT [--sheet PNG] [--samples N] [--no-sheet]
[--verify]``) is parsed in ``samadapt/cli.py``; ``--verify`` first re-hashes every shard against
the manifest (``sharding.manifest.verify_shards``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from sharding.format import IMAGE_EXT, MASKS_EXT, META_EXT, decode_image, decode_masks
from sharding.manifest import Manifest
from sharding.tar_reader import read_shard

__all__ = [
    "contact_sheet",
    "format_report",
    "iter_samples",
    "pick_samples",
    "render_tile",
    "write_contact_sheet",
]

_TILE = 256
_LABEL_H = 18
_ALPHA = 0.45
# distinct, saturated colours (RGB), cycled per mask
_PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 190),
    (0, 128, 128),
    (170, 110, 40),
]


def iter_samples(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Decoded samples of one tar shard, in order: (key, {"image", "masks", "meta"}).

    image: uint8 (S, S) or (S, S, 3); masks: uint8 (N, S, S) of 0/1; meta: the JSON dict.
    """
    for sample in read_shard(str(path)):
        yield sample["__key__"], _decode(sample)


def _decode(parts: dict[str, bytes]) -> dict:
    return {
        "image": decode_image(parts[IMAGE_EXT]),
        "masks": decode_masks(parts[MASKS_EXT]),
        "meta": json.loads(parts[META_EXT]),
    }


def pick_samples(output: str | Path, manifest: Manifest, n: int) -> list[tuple[str, dict]]:
    """Up to ``n`` samples from evenly spaced shards, samples with masks first (deterministic)."""
    shards = [s for s in manifest.shards if s.samples > 0]
    if not shards or n <= 0:
        return []
    count = min(n, len(shards))
    chosen = [shards[round(i * (len(shards) - 1) / max(count - 1, 1))] for i in range(count)]
    per_shard = math.ceil(n / count)
    with_masks, empty = [], []
    for url in dict.fromkeys(s.url for s in chosen):
        taken = 0
        for key, sample in iter_samples(url):
            if sample["masks"].shape[0]:
                with_masks.append((key, sample))
                taken += 1
            elif len(empty) < n:
                empty.append((key, sample))
            if taken >= per_shard:
                break
    return (with_masks + empty)[:n]


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image.copy()


def render_tile(
    image: np.ndarray, masks: np.ndarray, names: list[str], title: str, *, size: int = _TILE
) -> np.ndarray:
    """One tile: the image with every mask blended in its colour, outlined and named.

    Arguments:
      image: uint8 (S, S) or (S, S, 3).
      masks: (N, S, S) 0/1.
      names: N class names.
      title: written in a strip above the image.
      size: tile side in pixels (the image is scaled with nearest neighbour).

    Returns:
      uint8 RGB (size + label strip, size, 3).
    """
    rgb = cv2.resize(_rgb(image), (size, size), interpolation=cv2.INTER_NEAREST).astype(np.float32)
    scaled = [
        cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for m in masks
    ]
    for i, mask in enumerate(scaled):
        colour = np.array(_PALETTE[i % len(_PALETTE)], dtype=np.float32)
        on = mask.astype(bool)
        rgb[on] = (1 - _ALPHA) * rgb[on] + _ALPHA * colour
    out = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    for i, mask in enumerate(scaled):
        colour = tuple(int(c) for c in _PALETTE[i % len(_PALETTE)])
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, colour, 1)
    for i, mask in enumerate(scaled):
        if not mask.any():
            continue
        colour = tuple(int(c) for c in _PALETTE[i % len(_PALETTE)])
        dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        label = names[i] if i < len(names) and names[i] else f"mask {i}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        org = (
            int(np.clip(x - tw // 2, 1, max(size - tw - 1, 1))),
            int(np.clip(y + th // 2, th, size - 2)),
        )
        cv2.putText(out, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    strip = np.full((_LABEL_H, size, 3), 32, dtype=np.uint8)
    cv2.putText(strip, title[-48:], (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1)
    return np.concatenate([strip, out], axis=0)


def contact_sheet(samples: list[tuple[str, dict]], *, size: int = _TILE) -> np.ndarray:
    """A grid of ``render_tile`` tiles (about square), uint8 RGB."""
    if not samples:
        raise ValueError("no samples to draw")
    cols = math.ceil(math.sqrt(len(samples)))
    rows = math.ceil(len(samples) / cols)
    gap = 4
    tile_h = size + _LABEL_H
    sheet = np.full(
        (rows * (tile_h + gap) + gap, cols * (size + gap) + gap, 3), 255, dtype=np.uint8
    )
    for i, (key, sample) in enumerate(samples):
        r, c = divmod(i, cols)
        tile = render_tile(sample["image"], sample["masks"], sample["meta"]["class_names"], key)
        y, x = gap + r * (tile_h + gap), gap + c * (size + gap)
        sheet[y : y + tile_h, x : x + size] = tile
    return sheet


def _table(title: str, counts: dict) -> list[str]:
    if not counts:
        return [f"  {title}: none"]
    width = max(len(k) for k in counts)
    lines = [f"  {title}:"]
    lines += [f"    {k:<{width}}  {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])]
    return lines


def format_report(output: str | Path, manifest: Manifest, summary: dict) -> str:
    """The text ``samadapt inspect`` prints."""
    totals, document = manifest.totals, manifest.document
    lines = [
        f"{output}: {totals['samples']} samples in {totals['shards']} shards "
        f"({totals['bytes'] / 1e6:.1f} MB), image_size {manifest.image_size} "
        f"({manifest.resize}), input {document['input_format']} {document['input']}",
    ]
    for split, t in totals["by_split"].items():
        lines.append(
            f"  {split:<5} {t['samples']:>8} samples {t['shards']:>5} shards "
            f"{t['bytes'] / 1e6:>9.1f} MB"
        )
    lines.append(
        f"  units {summary.get('units', 0)} ({summary.get('units_rejected', 0)} rejected), "
        f"masks {summary.get('masks', 0)}, empty slices kept {summary.get('empty_kept', 0)} / "
        f"dropped {summary.get('empty_dropped', 0)}"
    )
    lines += _table("samples per dataset", summary.get("by_dataset", {}))
    lines += _table("samples per modality", summary.get("by_modality", {}))
    lines += _table("masks per class", summary.get("by_class", {}))
    if manifest.classes:
        pairs = ", ".join(f"{i}={n}" for i, n in manifest.classes.items())
        lines.append(f"  class ids (model.num_classes >= {max(manifest.classes)}): {pairs}")
    rejected_file = Path(output) / "rejected.jsonl"
    lines.append(f"  rejected: {summary.get('rejected', 0)} (see {rejected_file})")
    if summary.get("rejected_by_reason"):
        lines += _table("rejected by reason", summary["rejected_by_reason"])
    if document.get("volumes"):
        lines.append(f"  volumes: {', '.join(document['volumes'])}")
    return "\n".join(lines)


def write_contact_sheet(
    output: str | Path, manifest: Manifest, *, samples: int, path: Path
) -> int:
    """Draw ``samples`` samples of the shard set at ``output`` as a PNG contact sheet.

    Arguments:
      output: the output folder of ``samadapt shard``.
      manifest: its manifest (``sharding.manifest.load_manifest``).
      samples: at most this many samples on the sheet (>= 1).
      path: the PNG to write (its folder is created).

    Returns:
      The number of samples drawn; 0 (and no file) when the shard set is empty. Raises
      ``OSError`` when the PNG cannot be encoded.
    """
    picked = pick_samples(output, manifest, samples)
    if not picked:
        return 0
    sheet = contact_sheet(picked)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())
    return len(picked)
