"""The ``data.augment`` section: which transforms the training step applies, how often and how
far (``pipeline/augment/``). Kept free of torch: every config load imports it."""

from __future__ import annotations

from dataclasses import dataclass, field

from configtree import fraction, require

__all__ = ["AugmentConfig"]


def _range(value: list[float], key: str, *, low: float, strict: bool) -> None:
    """``value`` is ``[lo, hi]`` with ``low < lo`` (``low <= lo`` unless strict) and lo <= hi."""
    bound = f"> {low}" if strict else f">= {low}"
    require(
        len(value) == 2
        and (value[0] > low if strict else value[0] >= low)
        and value[0] <= value[1],
        key,
        f"must be [lo, hi] with lo <= hi and lo {bound}, got {value}",
    )


@dataclass
class AugmentConfig:
    """Training augmentation (``pipeline/augment``): each transform is applied to a sample with
    its probability (0 = never, the default; 1 = always), to the image and its masks or label map
    together, on the training device, inside the training step (never in validation). Each
    sample draws its parameters from a generator seeded by (data.seed, epoch, the sample's key),
    so a resumed run draws the same augmentations, whatever the ranks and workers.

    Order: gamma, contrast (image only); rot_flip, hflip, vflip, rot90 (exact: prompts are
    transformed with the masks); rotate and scale (one resampling; prompts are recomputed from
    the transformed masks by the reader's rules)."""

    rot_flip: float = 0.0
    """Probability of SAMed's / MA-SAM's random_rot_flip: a rotation by k * 90 degrees, k
    uniform in {0, 1, 2, 3}, then a flip along rows or columns with equal chance."""
    hflip: float = 0.0
    """Probability of a left-right flip."""
    vflip: float = 0.0
    """Probability of an up-down flip."""
    rot90: float = 0.0
    """Probability of a rotation by k * 90 degrees, k uniform in {1, 2, 3}."""
    rotate: float = 0.0
    """Probability of a rotation by an angle uniform in [-rotate_deg, rotate_deg] about the
    image centre (bilinear image, nearest masks and labels, zeros outside the image)."""
    rotate_deg: float = 0.0
    """The largest rotation angle, in degrees (0..180)."""
    rotate_exclusive: bool = False
    """Rotate only samples that no rot_flip / hflip / vflip / rot90 draw changed, ``rotate`` then
    being the probability among those (SAMed's ``if ... rot_flip elif ... rotate``)."""
    scale: float = 0.0
    """Probability of a scaling about the image centre by a factor from scale_range."""
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    """[lo, hi] of the factor that multiplies the sampling grid (batchgenerators' and PIL's
    convention): > 1 shows more of the image (content shrinks), < 1 zooms in."""
    gamma: float = 0.0
    """Probability of a gamma change: x -> lo + r * ((x - lo) / r) ** g on the sample's intensity
    range (lo, r = its min and max - min), g from gamma_range."""
    gamma_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    gamma_invert: bool = False
    """Apply the exponent 1 / g instead of g (MA-SAM's adjust_light)."""
    contrast: float = 0.0
    """Probability of a contrast change: x -> m + c * (x - m), m the sample's mean, c from
    contrast_range, clipped to 0..255 (PIL's ImageEnhance.Contrast)."""
    contrast_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    split_at_one: bool = False
    """Draw scale and gamma factors as batchgenerators does: below 1 or above 1 with equal
    chance, then uniform in that part of the range; False = uniform over the whole range."""

    PROBABILITIES = ("rot_flip", "hflip", "vflip", "rot90", "rotate", "scale", "gamma", "contrast")

    @property
    def enabled(self) -> bool:
        """Whether any transform can happen."""
        return any(getattr(self, key) > 0 for key in self.PROBABILITIES)

    def __post_init__(self) -> None:
        for key in self.PROBABILITIES:
            fraction(getattr(self, key), key)
        require(
            0 <= self.rotate_deg <= 180,
            "rotate_deg",
            f"must be in [0, 180] degrees, got {self.rotate_deg}",
        )
        require(
            self.rotate == 0 or self.rotate_deg > 0,
            "rotate",
            f"={self.rotate} needs rotate_deg > 0 (the angle is drawn from "
            "[-rotate_deg, rotate_deg])",
        )
        _range(self.scale_range, "scale_range", low=0.0, strict=True)
        _range(self.gamma_range, "gamma_range", low=0.0, strict=True)
        _range(self.contrast_range, "contrast_range", low=0.0, strict=False)
