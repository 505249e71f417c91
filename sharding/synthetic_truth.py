"""The ground truth of the synthetic corpora: 2D images with organ masks, and 3D CT/MR volumes.

The shapes are made so that a segmentation model has something to learn beyond its prompt:
irregular and concave outlines (lobed blobs, crescents, rings with a hole, branching arms), and
weak contrast (an object differs from its textured background by about two noise standard
deviations). Predicting the filled prompt box (the mask's tight bounding box) scores a mean Dice
well below 0.7 on them (about 0.9 on the discs and ellipses of earlier versions); the tests
measure it. Every function is deterministic in its random generator or seed.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "ORGANS_2D",
    "SPACING",
    "VOLUME_LABELS",
    "fill_box_dice",
    "synthetic_image",
    "synthetic_volume",
    "volume_affine",
]

ORGANS_2D = ("aorta", "gallbladder", "kidney_left", "liver", "spleen", "stomach")
"""Class names of the 2D corpora (underscores on purpose: names are parsed from file names)."""
VOLUME_LABELS = {1: "liver", 2: "kidney", 3: "spleen"}
"""Label ids of the 3D corpora."""
SPACING = (2.5, 0.8, 0.75)
"""(z, y, x) voxel size in mm of the 3D corpora."""

_TWO_PI = 2.0 * np.pi
_PLACEMENT_TRIES = 6
# organ - body intensity and texture amplitude of the volumes: CT in HU, MR in scanner units
_VOLUME_CONTRAST = {True: {1: 35, 2: 60, 3: 25}, False: {1: 120, 2: 220, 3: 90}}
_VOLUME_TEXTURE = {True: 8.0, False: 30.0}


# ------------------------------------------------------------------------------------ 2D


def _field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A smooth random field of about unit amplitude: a ``cells`` x ``cells`` grid of normal
    values, upsampled (bicubic) to (height, width)."""
    grid = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _outline(
    rng: np.random.Generator, cy: float, cx: float, radius: float, wobble: float
) -> np.ndarray:
    """A closed star-shaped polygon: radius modulated by harmonics 2..5 of random phase and
    amplitude up to ``wobble`` (large values give deep concavities). Returns int32 (64, 2) x, y."""
    theta = np.linspace(0.0, _TWO_PI, 64, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 4, 5):
        r += rng.uniform(0.0, wobble) * np.cos(k * theta + rng.uniform(0.0, _TWO_PI))
    r = radius * np.clip(r, 0.3, 1.6)
    return np.rint(np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)).astype(
        np.int32
    )


def _polygon(shape: tuple[int, int], outline: np.ndarray) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [outline], 1)
    return canvas


def _arms(rng: np.random.Generator, shape: tuple[int, int], cy: int, cx: int, radius: int):
    """3-5 thick arms from a small central body, at roughly even angles."""
    canvas = np.zeros(shape, np.uint8)
    n = int(rng.integers(3, 6))
    start = rng.uniform(0.0, _TWO_PI)
    thickness = max(1, int(round(rng.uniform(0.25, 0.4) * radius)))
    for j in range(n):
        angle = start + _TWO_PI * j / n + rng.uniform(-0.3, 0.3)
        length = rng.uniform(0.8, 1.3) * radius
        end = (int(round(cx + length * np.cos(angle))), int(round(cy + length * np.sin(angle))))
        cv2.line(canvas, (cx, cy), end, 1, thickness=thickness)
    cv2.circle(canvas, (cx, cy), max(1, int(0.35 * radius)), 1, thickness=-1)
    return canvas


def _shape(
    rng: np.random.Generator, kind: int, shape: tuple[int, int], cy: int, cx: int, radius: int
) -> np.ndarray:
    """One mask (uint8 0/1) of ``kind``: 0 lobed blob, 1 crescent, 2 ring, 3 arms."""
    if kind == 0:
        return _polygon(shape, _outline(rng, cy, cx, radius, 0.4))
    if kind == 1:
        body = _polygon(shape, _outline(rng, cy, cx, radius, 0.12))
        angle, dist = rng.uniform(0.0, _TWO_PI), rng.uniform(0.45, 0.65) * radius
        bite = _outline(
            rng,
            cy + dist * np.sin(angle),
            cx + dist * np.cos(angle),
            rng.uniform(0.75, 0.9) * radius,
            0.1,
        )
        return body & (1 - _polygon(shape, bite))
    if kind == 2:
        body = _polygon(shape, _outline(rng, cy, cx, radius, 0.15))
        dy, dx = rng.uniform(-0.15, 0.15, size=2) * radius
        hole = _outline(rng, cy + dy, cx + dx, rng.uniform(0.45, 0.6) * radius, 0.15)
        return body & (1 - _polygon(shape, hole))
    return _arms(rng, shape, cy, cx, radius)


def _place(rng: np.random.Generator, taken: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """A new mask, of the tries the one that overlaps the masks already drawn (``taken``) least.
    A shape too small to read at a tiny image size becomes a disc."""
    height, width = taken.shape
    best: tuple[int, np.ndarray] | None = None
    for _ in range(_PLACEMENT_TRIES):
        radius = int(rng.integers(lo, hi))
        cy = int(rng.integers(radius, max(radius + 1, height - radius)))
        cx = int(rng.integers(radius, max(radius + 1, width - radius)))
        mask = _shape(rng, int(rng.integers(0, 4)), (height, width), cy, cx, radius)
        if cv2.countNonZero(mask) < 4:
            cv2.circle(mask, (cx, cy), max(2, radius // 2), 1, thickness=-1)
        overlap = cv2.countNonZero(mask & taken)
        if best is None or overlap < best[0]:
            best = (overlap, mask)
        if overlap == 0:
            break
    assert best is not None
    return best[1]


def synthetic_image(
    rng: np.random.Generator, height: int, width: int, n_masks: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One textured grey image with ``n_masks`` non-empty organ masks.

    The background is a smooth random field (two scales) around a random level; each organ is
    the background shifted by 12-24 grey levels (brighter or darker) plus a finer texture of its
    own, with a soft edge; pixel noise (sd 7) over everything.

    Arguments:
      rng: the random generator (consumed).
      height, width: image size.
      n_masks: number of masks.

    Returns:
      image uint8 (H, W); masks bool (N, H, W) (may overlap: later organs are painted over
      earlier ones, but placements that overlap least are preferred); class names (N,), drawn
      from ``ORGANS_2D`` with repetition.
    """
    side = min(height, width)
    background = rng.uniform(70.0, 130.0) + 14.0 * _field(rng, height, width, 4)
    background += 6.0 * _field(rng, height, width, 10)
    image = background.copy()
    masks = np.zeros((n_masks, height, width), dtype=np.uint8)
    taken = np.zeros((height, width), dtype=np.uint8)
    names = []
    lo = max(3, side // 12)
    hi = max(lo + 1, side // 4)
    for i in range(n_masks):
        masks[i] = _place(rng, taken, lo, hi)
        taken |= masks[i]
        names.append(ORGANS_2D[int(rng.integers(0, len(ORGANS_2D)))])
        contrast = rng.choice((-1.0, 1.0)) * rng.uniform(12.0, 24.0)
        texture = rng.uniform(3.0, 8.0) * _field(rng, height, width, int(rng.integers(12, 24)))
        alpha = cv2.GaussianBlur(masks[i].astype(np.float32), (0, 0), 0.7)
        image += alpha * (background + contrast + texture - image)
    image += rng.normal(0.0, 7.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), masks.astype(bool), names


def fill_box_dice(mask: np.ndarray) -> float:
    """Dice of the trivial answer to a box prompt: the mask's tight bounding box, filled.

    Arguments:
      mask: bool (H, W), non-empty.

    Returns:
      2 |mask| / (|mask| + |box|), since the box holds the whole mask.
    """
    ys, xs = np.nonzero(mask)
    box = (int(ys.max()) - int(ys.min()) + 1) * (int(xs.max()) - int(xs.min()) + 1)
    return 2.0 * len(ys) / (len(ys) + box)


# ------------------------------------------------------------------------------------ 3D


def _field3(rng: np.random.Generator, z, y, x, terms: int = 6) -> np.ndarray:
    """A smooth random field of about unit amplitude on the grid (z, y, x) (coordinates in
    [-1, 1]): a sum of plane waves of random direction and phase, at most ~2 periods across."""
    out = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape))
    for _ in range(terms):
        fz, fy, fx = rng.uniform(-2.0, 2.0, size=3)
        out += np.cos(np.pi * (fz * z + fy * y + fx * x) + rng.uniform(0.0, _TWO_PI))
    return out * np.sqrt(2.0 / terms)


def _organ(rng: np.random.Generator, dy, dx, z, radius: float) -> np.ndarray:
    """An irregular organ around (0, 0): an ellipsoid in z whose cross-section is lobed
    (harmonics 2-4 that turn with z) and bitten on one side (a concave, kidney-like cut)."""
    rho = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    r = np.ones_like(rho)
    for k in (2, 3, 4):
        twist = rng.uniform(-1.0, 1.0)
        r += rng.uniform(0.15, 0.4) * np.cos(k * theta + rng.uniform(0.0, _TWO_PI) + twist * z)
    r = radius * np.clip(r, 0.45, 1.4)
    taper = (z / 1.2) ** 2
    inside = (rho / r) ** 2 + taper <= 1.0
    # the bite stays clear of the centre (0.75 > 0.6), so every slice keeps the organ's middle
    angle = rng.uniform(0.0, _TWO_PI)
    by, bx = 0.75 * radius * np.sin(angle), 0.75 * radius * np.cos(angle)
    bite = ((dy - by) ** 2 + (dx - bx) ** 2) / (0.6 * radius) ** 2 + taper <= 1.0
    return inside & ~bite


def synthetic_volume(
    index: int, shape: tuple[int, int, int], modality: str = "CT", seed: int = 0, quantum: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The canonical (Z, Y, X) ground truth of case ``index``.

    A body ellipse (CT ~20 HU in -1000 HU air; MR ~300 on 0) with a smooth texture, holding three
    irregular organs (labels ``VOLUME_LABELS``, each with its own texture, 25-60 HU above the
    body on CT), with integer-valued noise (CT uniform +-20 HU).

    Returns:
      image float32 (Z, Y, X) of integers that are multiples of ``quantum`` (HU for CT); label
      uint8 (Z, Y, X) with values 0..3 (every label present).
    """
    depth, height, width = shape
    rng = np.random.default_rng([seed, index])
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, depth),
        np.linspace(-1, 1, height),
        np.linspace(-1, 1, width),
        indexing="ij",
    )
    ct = modality.strip().lower() == "ct"
    level, texture = (20.0 if ct else 300.0), _VOLUME_TEXTURE[ct]
    body = (y / 0.9) ** 2 + (x / 0.95) ** 2 <= 1.0
    tissue = level + texture * _field3(rng, z, y, x)
    label = np.zeros(shape, dtype=np.uint8)
    centres = {1: (-0.2, 0.35), 2: (0.3, -0.4), 3: (-0.35, -0.3)}
    for lab, (cy, cx) in centres.items():
        jitter = rng.uniform(-0.08, 0.08, size=2)
        radius = rng.uniform(0.22, 0.3)
        inside = _organ(rng, y - cy - jitter[0], x - cx - jitter[1], z, radius)
        label[inside] = lab
        organ = level + _VOLUME_CONTRAST[ct][lab] + texture * _field3(rng, z, y, x)
        tissue = np.where(inside, organ, tissue)
    body |= label > 0
    image = np.where(body, np.rint(tissue), -1000.0 if ct else 0.0)
    noise = rng.integers(-20, 21, size=shape) if ct else rng.integers(-60, 61, size=shape)
    image = image + np.where(body, noise, 0)
    if quantum > 1:
        image = quantum * np.floor(image / quantum)
    return image.astype(np.float32), label


def volume_affine(index: int, shape: tuple[int, int, int]) -> np.ndarray:
    """The canonical 4x4 affine of case ``index``: (z, y, x, 1) -> RAS mm (axis-aligned)."""
    sz, sy, sx = SPACING
    affine = np.zeros((4, 4))
    affine[0, 2], affine[1, 1], affine[2, 0] = sx, sy, sz
    affine[:3, 3] = (-0.5 * shape[2] * sx + index, -0.5 * shape[1] * sy, -40.0 - 5.0 * index)
    affine[3, 3] = 1.0
    return affine
