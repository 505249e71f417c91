"""Simulated interaction for SAM-Med2D-style training: the step plan and the on-device prompts.

The trainer runs ``n_steps`` decoder passes per batch (SAM-Med2D: 1 + ``iter_point`` = 1 + 8 = 9).
``plan_interaction`` decides, on the host and once per batch, what each step is; the other
functions build the prompts of a step from the previous step's output as batched tensor ops on
the device (no loop over masks, no ``.item()``/``.cpu()``/numpy, no data-dependent shapes), so
the only host work per step is launching kernels.

SAM-Med2D's rules (OpenGVLab/SAM-Med2D at commit bfd2b93; ``train.py::train_one_epoch``,
``utils.py``), with our 0-based step index ``s`` (the issue's "step s+1")::

  s = 0       first prompt (train.py:112-117): ``random.random() > 0.5`` -> box only, else the
              data loader's single point only (a uniform foreground pixel, label 1; a background
              pixel, label 0, when the mask is empty: utils.py:137-146). No mask prompt.
              Trains encoder adapters + prompt encoder + mask decoder (train.py:119-123).
  s = 1..n-1  SAM-Med2D's loop ``for iter in range(iter_point)`` with ``iter = s - 1``
              (train.py:176). Image embeddings detached (train.py:168), image encoder frozen,
              prompt encoder run under no_grad (train.py:68-74): only the mask decoder learns.
              Prompt = k new clicks from the previous step's error region (they replace the old
              points, the box is dropped) + the previous step's best low-res mask as sigmoid
              probabilities (utils.py:192-205). k is drawn by ``random.choice([1, 3, 5, 9])``
              once per step, shared by every mask of the batch (train.py:164, 194).
  mask-only   ``init_mask_num = np.random.randint(1, iter_point - 1)`` (train.py:175), i.e.
              ``iter`` in {1, ..., iter_point - 2} (numpy's upper bound is exclusive), and the
              last ``iter = iter_point - 1`` (train.py:177-178): points and box removed, mask
              prompt kept. In our index: one uniform ``s`` in {2, ..., n-2} and ``s = n - 1``;
              for n = 9: one of {2..7} and 8 (the issue's 1-based: one of {3..8} and 9).
              SAM-Med2D crashes for iter_point = 2 (empty randint range); we then make only the
              last step mask-only.

Clicks (utils.py:69-114) are sampled on the logits UPSCALED to the input size (train.py:100
upsamples before ``generate_point``), i.e. at the resolution of the ground truth, with
prediction = sigmoid > 0.5 and error = prediction != truth; k error pixels uniformly with
replacement; label 1 = missed foreground, 0 = false foreground; a mask with no error gets k
uniform pixels labelled -1 (SAM-Med2D draws them from a hard-coded 256 x 256 grid). Coordinates
are integer pixel indices (x = column, y = row) in that frame; SAM's prompt encoder adds the 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "SAM_MED2D_CLICKS",
    "PromptKind",
    "StepPlan",
    "mask_prompt",
    "plan_interaction",
    "positions_from_uniform",
    "sample_clicks",
]


PromptKind = Literal["box", "point", "clicks", "mask_only"]
SAM_MED2D_CLICKS: tuple[int, ...] = (1, 3, 5, 9)
"""SAM-Med2D's ``point_list``: the numbers of clicks a re-prompt step draws from."""


@dataclass(frozen=True)
class StepPlan:
    """What one step of the interaction loop feeds the model and trains.

    Attributes:
      index (int): 0-based step index in the batch's loop.
      kind (str): "box" (step 0: the box only), "point" (step 0: one point only), "clicks" (k new
        clicks sampled from the previous step's errors), "mask_only" (no points, no box).
      clicks (int): points fed this step: 1 for "point", k for "clicks", else 0.
      train_encoder (bool): the image encoder's adapters get gradients (step 0 only); later steps
        reuse the step-0 embeddings, detached.
      train_prompt_encoder (bool): the prompt encoder gets gradients (step 0 only).
      mask_prompt (bool): feed the previous step's low-res mask as the mask prompt (steps >= 1).
    """

    index: int
    kind: PromptKind
    clicks: int
    train_encoder: bool
    train_prompt_encoder: bool
    mask_prompt: bool

    @property
    def uses_points(self) -> bool:
        """Whether point prompts are fed this step."""
        return self.kind in ("point", "clicks")

    @property
    def uses_box(self) -> bool:
        """Whether the box prompt is fed this step."""
        return self.kind == "box"


def plan_interaction(
    n_steps: int,
    *,
    generator: torch.Generator,
    first_prompt_box_prob: float = 0.5,
    click_choices: Sequence[int] = SAM_MED2D_CLICKS,
    random_mask_only: bool = True,
) -> list[StepPlan]:
    """Draw the prompt schedule of one batch (SAM-Med2D's rules, see the module docstring).

    The plan steers Python control flow, so it is drawn on the host: ``generator`` must be a CPU
    generator (a CUDA one would force a device sync per batch). It consumes exactly
    ``n_steps + 1`` float64 draws: the first-prompt coin, the random mask-only step, and one click
    count per step 1..n-1 (drawn for every step, used by "clicks" steps), so the stream position
    does not depend on the outcomes.

    Arguments:
      n_steps (int): steps per batch, >= 1 (SAM-Med2D: 9 = 1 + iter_point 8).
      generator (torch.Generator): CPU generator.
      first_prompt_box_prob (float): probability that step 0 is a box (else one point).
      click_choices (Sequence[int]): click counts a "clicks" step draws from uniformly.
      random_mask_only (bool): add SAM-Med2D's random mask-only step in {2, ..., n-2}.

    Returns:
      (list[StepPlan]): ``n_steps`` plans, index 0..n-1.
    """
    if n_steps < 1:
        raise ValueError(f"plan_interaction: n_steps must be >= 1, got {n_steps}")
    if not 0.0 <= first_prompt_box_prob <= 1.0:
        raise ValueError(
            "plan_interaction: first_prompt_box_prob must be in [0, 1], "
            f"got {first_prompt_box_prob}"
        )
    choices = tuple(int(c) for c in click_choices)
    if not choices or min(choices) < 1:
        raise ValueError(f"plan_interaction: click_choices must be >= 1, got {click_choices}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"plan_interaction: generator must be on the CPU (got {generator.device}); the plan "
            "drives Python control flow, and a device generator would sync every batch"
        )
    draws = torch.rand(n_steps + 1, generator=generator, dtype=torch.float64).tolist()
    box_first = draws[0] < first_prompt_box_prob
    n_random = n_steps - 3  # our steps 2..n-2 (SAM-Med2D's iter 1..iter_point-2)
    random_step = -1
    if random_mask_only and n_random >= 1:
        random_step = 2 + min(int(draws[1] * n_random), n_random - 1)
    plans = [
        StepPlan(
            index=0,
            kind="box" if box_first else "point",
            clicks=0 if box_first else 1,
            train_encoder=True,
            train_prompt_encoder=True,
            mask_prompt=False,
        )
    ]
    for s in range(1, n_steps):
        mask_only = s in (random_step, n_steps - 1)
        k = choices[min(int(draws[s + 1] * len(choices)), len(choices) - 1)]
        plans.append(
            StepPlan(
                index=s,
                kind="mask_only" if mask_only else "clicks",
                clicks=0 if mask_only else k,
                train_encoder=False,
                train_prompt_encoder=False,
                mask_prompt=True,
            )
        )
    return plans


def _check_masks(pred_logits: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if pred_logits.dim() != 4 or pred_logits.shape[1] != 1:
        raise ValueError(f"{name}: logits must be (P, 1, H, W), got {tuple(pred_logits.shape)}")
    if target.shape != pred_logits.shape:
        raise ValueError(
            f"{name}: target {tuple(target.shape)} must match logits {tuple(pred_logits.shape)} "
            "(upscale the low-res logits to the target size first)"
        )


def _binary_prediction(pred_logits: torch.Tensor) -> torch.Tensor:
    """sigmoid > 0.5 as SAM-Med2D thresholds, in float32 at least (bf16 rounds near 0.5)."""
    x = pred_logits if pred_logits.dtype == torch.float64 else pred_logits.float()
    return torch.sigmoid(x) > 0.5


def positions_from_uniform(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Flat positions, one per uniform draw, uniform among each row's True entries.

    Inverse-CDF sampling on integer counts: exact, sync-free, and rows with no True entry fall
    back to uniform positions over the whole row.

    Arguments:
      weights (torch.Tensor): (P, N) bool, the admissible positions.
      u (torch.Tensor): (P, k) float64 uniforms in [0, 1) on ``weights.device``.

    Returns:
      (torch.Tensor): (P, k) int64 positions in [0, N).
    """
    n = weights.shape[1]
    counts = weights.cumsum(1, dtype=torch.int32 if n < 2**31 else torch.int64)
    total = counts[:, -1:]
    has = total > 0
    pool = torch.where(has, total, torch.full_like(total, n))
    rank = torch.minimum((u * pool).floor().to(counts.dtype), pool - 1)
    # First position whose running count exceeds rank = the (rank+1)-th admissible position.
    position = torch.searchsorted(counts, rank, right=True)
    return torch.where(has, position, rank.long())


def _sample_positions(weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Draw k flat positions per row uniformly among the True entries, with replacement (see
    ``positions_from_uniform``); ``generator`` is on ``weights.device``."""
    u = torch.rand(
        (weights.shape[0], k), generator=generator, device=weights.device, dtype=torch.float64
    )
    return positions_from_uniform(weights, u)


def _to_xy(index: torch.Tensor, width: int) -> torch.Tensor:
    """Flat pixel index (..., k) -> (..., k, 2) float32 (x = column, y = row)."""
    return torch.stack((index % width, torch.div(index, width, rounding_mode="floor")), -1).float()


def sample_clicks(
    pred_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    k: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample k corrective clicks per mask from its error region (SAM-Med2D ``generate_point``).

    Arguments:
      pred_logits (torch.Tensor): (P, 1, H, W) logits of the previous step's chosen mask,
        upscaled to the ground-truth size (SAM-Med2D samples at the input size, e.g. 256).
      target (torch.Tensor): (P, 1, H, W) 0/1 ground truth.
      k (int): clicks per mask (shared by the batch).
      generator (torch.Generator): on the tensors' device.

    Returns:
      coords (torch.Tensor): (P, k, 2) float32 pixel coordinates (x, y) in the H x W frame.
      labels (torch.Tensor): (P, k) int64: 1 = missed foreground (pred 0, truth 1), 0 = false
        foreground (pred 1, truth 0), -1 = no error (only in masks with no error left, whose k
        points are uniform over the image).
    """
    _check_masks(pred_logits, target, "sample_clicks")
    if k < 1:
        raise ValueError(f"sample_clicks: k must be >= 1, got {k}")
    width = pred_logits.shape[-1]
    pred = _binary_prediction(pred_logits).flatten(1)
    truth = (target > 0.5).flatten(1)
    index = _sample_positions(pred != truth, k, generator)
    pred_at, truth_at = pred.gather(1, index), truth.gather(1, index)
    minus_one = torch.full_like(index, -1)
    labels = torch.where(
        truth_at & ~pred_at,
        torch.ones_like(index),
        torch.where(pred_at & ~truth_at, torch.zeros_like(index), minus_one),
    )
    return _to_xy(index, width), labels


def mask_prompt(low_res_logits: torch.Tensor, *, as_probs: bool = True) -> torch.Tensor:
    """The mask prompt for the next step, built from this step's chosen low-res mask.

    SAM-Med2D feeds sigmoid probabilities (utils.py:197-201); SAM's own predictor feeds logits.
    The result is detached: SAM-Med2D runs the prompt encoder under no_grad in steps >= 1, so
    no gradient flows back through the mask prompt.

    Arguments:
      low_res_logits (torch.Tensor): (P, 1, h, w) chosen low-res logits (h = w = S / 4).
      as_probs (bool): sigmoid probabilities (SAM-Med2D) or the raw logits.

    Returns:
      (torch.Tensor): (P, 1, h, w), detached, same dtype.
    """
    if low_res_logits.dim() != 4 or low_res_logits.shape[1] != 1:
        raise ValueError(f"mask_prompt: need (P, 1, h, w), got {tuple(low_res_logits.shape)}")
    x = low_res_logits.detach()
    return torch.sigmoid(x) if as_probs else x
