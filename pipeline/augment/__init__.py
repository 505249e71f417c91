"""Training augmentation (``data.augment``): flips, quarter turns, rotation, scale, gamma and
contrast, applied to a batch's image and masks (interactive) or label maps (semantic) together,
as batched tensor ops on the training device, inside the task's training step.

* ``params``: each sample's draws, seeded by (data.seed, epoch, key): resume-exact;
* ``intensity``, ``geometry``: the transforms;
* ``prompts``: boxes and points of resampled masks, by the reader's rules, on the device;
* ``batch``: ``Augmenter``, what a task calls;
* ``config``: the ``data.augment`` section (torch-free: the names below load on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.lazy import lazy_names

if TYPE_CHECKING:  # for type checkers and editors; at run time see __getattr__
    from pipeline.augment.batch import Augmenter
    from pipeline.augment.params import SampleParams, draw_params, sample_generator

_WHERE = {
    "Augmenter": "pipeline.augment.batch",
    "SampleParams": "pipeline.augment.params",
    "draw_params": "pipeline.augment.params",
    "sample_generator": "pipeline.augment.params",
}

__all__ = ["Augmenter", "SampleParams", "draw_params", "sample_generator"]

__getattr__ = lazy_names(__name__, _WHERE)
