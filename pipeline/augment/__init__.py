"""Training augmentation (``data.augment``): flips, quarter turns, rotation, scale, gamma and
contrast, applied to a batch's image and masks (interactive) or label maps (semantic) together,
as batched tensor ops on the training device, inside the task's training step.

* ``params``: each sample's draws, seeded by (data.seed, epoch, key): resume-exact;
* ``intensity``, ``geometry``: the transforms;
* ``prompts``: boxes and points of resampled masks, by the reader's rules, on the device;
* ``batch``: ``Augmenter``, what a task calls.
"""

from pipeline.augment.batch import Augmenter
from pipeline.augment.params import SampleParams, draw_params, sample_generator

__all__ = ["Augmenter", "SampleParams", "draw_params", "sample_generator"]
