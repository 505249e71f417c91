"""The sections of the config tree that ``pipeline/`` owns, and ``PipelineConfig`` over them.

``data`` (the streaming reader), ``train`` (loop, optimizer, engine, checkpoints), ``eval``
(validation) and ``tracking`` (MLflow) live here; ``model`` lives with the model
(``pipeline/model/config.py``). ``PipelineConfig`` composes them with the checks that span
sections; the root config of a run (``samadapt/config.py``) adds the ``sharding`` and ``launch``
sections. Loading, overrides and the config error are ``configtree``'s.

Each value is set in one place: the input size and the slice count of a stack are the model's
(``model.image_size``, ``model.slices``); the readers check them against the shards they open.
Functions take the section they need (``cfg.data``, ``cfg.train``...), never the root.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from configtree import fraction, require
from pipeline.losses.options import LossOptionError
from pipeline.losses.specs import resolve_interactive
from pipeline.model.config import ModelConfig

__all__ = [
    "BOX_FROM",
    "AugmentConfig",
    "BoxFrom",
    "DataConfig",
    "EvalConfig",
    "PipelineConfig",
    "TrackingConfig",
    "TrainConfig",
]


# Which pixels a box prompt bounds (pipeline/data/prompts.py): the mask's largest 8-connected
# component (SAM-Med2D) or all of them.
BoxFrom = Literal["largest_component", "whole_mask"]
BOX_FROM: tuple[str, ...] = typing.get_args(BoxFrom)


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


@dataclass
class DataConfig:
    """The streaming reader: shards -> batches of images, masks and prompts. The image size and
    the stack depth of the 3D reader are the model's (``model.image_size``, ``model.slices``)."""

    shards: str = ""
    """Output folder of ``samadapt shard`` (holds manifest.json and train/ val/ test/)."""
    volumes: str = ""
    """Zarr store of one dataset (volumes/NAME.zarr) for the 3D reader; empty = not used."""
    train_split: str = "train"
    val_split: str = "val"
    mask_num: int = 5
    """Masks drawn per image, with replacement (SAM-Med2D)."""
    batch_size: int = 2
    """Images per rank per step (each with mask_num masks)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 500
    """Samples held in the shuffle buffer of each worker."""
    open_shards: int = 4
    """Shards each training worker reads at once, one sample of each in turn (random order per
    round), before the shuffle buffer; 1 = one shard after another."""
    box_from: BoxFrom = "largest_component"
    """What a box prompt bounds, in training and validation: largest_component = the mask's
    largest 8-connected component (SAM-Med2D's get_boxes_from_mask); whole_mask = all of its
    pixels. Maxima exclusive either way (x1 - x0 = width in pixels)."""
    box_jitter: int = 5
    """Box prompt noise in training: the box is shifted by up to this many pixels per axis
    (SAM-Med2D's max_pixel: 5), and by at most half its shorter side; not clipped."""
    point_num: int = 1
    """Foreground points sampled per mask for the first prompt."""
    seed: int = 0
    resampled: bool = False
    """Training draws shards with replacement, epoch = ceil(samples / (batch_size * ranks))
    batches per rank (open_clip's --dataset-resampled); False = each sample once per epoch, with
    a resampled top-up so that every rank takes the same number of steps (pipeline/data/stream.py).
    """
    foreground_only: bool = False
    """3D reader: only slices whose (centre) label has foreground."""
    verify_checksums: bool = True
    """Hash every shard as it streams (sha256, no extra read) and compare it with the manifest at
    the shard's end: a damaged or rewritten shard stops the run with an error naming it."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation (off by default)."""

    def __post_init__(self) -> None:
        require(self.mask_num >= 1, "mask_num", f"must be >= 1, got {self.mask_num}")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")
        require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        require(self.open_shards >= 1, "open_shards", f"must be >= 1, got {self.open_shards}")
        require(
            self.box_from in BOX_FROM,
            "box_from",
            f"must be one of {', '.join(BOX_FROM)}, got {self.box_from!r}",
        )
        require(self.box_jitter >= 0, "box_jitter", "must be >= 0")
        require(self.point_num >= 1, "point_num", "must be >= 1")


@dataclass
class LossConfig:
    """The loss of promptable training (``pipeline/losses``): a name and its options.

    An option left empty takes the named loss's default (``pipeline/losses/specs.py`` lists them).
    """

    name: str = "sam_med2d"
    """sam_med2d: SAM-Med2D's 20 focal + Dice + IoU-MSE over the whole batch (made for a
    pretrained SAM; from random weights it collapses to empty masks); bce_dice: BCE + Dice per
    mask; focal_dice: 20 focal + Dice per mask."""
    focal_weight: float | None = None
    """Weight of the focal term (sam_med2d, focal_dice)."""
    bce_weight: float | None = None
    """Weight of the BCE term (bce_dice)."""
    dice_weight: float | None = None
    iou_weight: float | None = None
    """Weight of the MSE between the predicted IoU and the mask's IoU."""
    reduction: str = ""
    """mask: each mask's Dice on its own pixels, averaged over masks (small structures weigh as
    much as large ones); batch: one Dice over every pixel of the batch (SAM-Med2D)."""
    iou_target: str = ""
    """detached: the IoU regression target carries no gradient; live: it does (SAM-Med2D)."""
    pos_weight: float | None = None
    """BCE weight of foreground pixels (bce_dice; MSA: 2)."""
    gamma: float | None = None
    alpha: float | None = None
    smooth: float | None = None

    def options(self) -> dict[str, Any]:
        """The options set here (the rest take the loss's defaults)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) not in (None, "")
        }

    def __post_init__(self) -> None:
        try:
            resolve_interactive(self.name, self.options())
        except LossOptionError as err:
            message = err.message
            require(False, err.option, f"is an {message}" if message.startswith("un") else message)


@dataclass
class TrainConfig:
    """The training loop (``samadapt train``), its optimizer, DeepSpeed engine and checkpoints."""

    steps: int = 1000
    """Optimizer iterations (batches); streams are endless, so we count steps, not epochs."""
    mode: Literal["interactive", "semantic"] = "interactive"
    interaction_steps: int = 9
    """1 prompt step + (n - 1) decoder-only re-prompt steps (SAM-Med2D: 9)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW (reached after warm-up)."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up (SAMed): the rate is lr * (step + 1) / warmup_steps for the first steps."""
    schedule: Literal["constant", "cosine", "poly"] = "constant"
    """Decay after warm-up, over the remaining steps down to lr * min_lr_ratio."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine / poly decay, as a fraction of lr."""
    poly_power: float = 0.9
    """Exponent of the poly decay (SAMed: 0.9)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0 = off)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (DeepSpeed gradient_accumulation_steps)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """bf16/fp16 mixed precision (fp16 needs a GPU; bf16 also runs on CPU, slowly)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1, 2 or 3. 0 (default): every rank keeps the whole trainable
    state and only gradients are all-reduced, the fastest choice when it fits (SAM-Med2D's
    185M adapter parameters: ~3 GB with Adam). 1/2 partition the optimizer state (and
    gradients) over ranks, 3 the weights too; they pay a pass over all trainable parameters in
    every optimizer step, also in the decoder-only steps of the interaction loop."""
    offload: bool = False
    """Keep optimizer states on the CPU (ZeRO-Offload); needs zero_stage >= 1."""
    log_every: int = 10
    checkpoint_every: int = 200
    """Save a checkpoint every this many steps (0 = only at the end and on SIGTERM/SIGUSR1)."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept in RUN_DIR/checkpoints (older ones are deleted; 0 = keep all)."""
    save_frozen: bool = False
    """Also store frozen weights in checkpoints (default: trainable only; frozen weights come
    from model.checkpoint, so the model must be built the same way on resume)."""
    val_every: int = 0
    """Validate on data.val_split every this many steps (0 = never during training)."""
    resume: str = ""
    """'' = fresh, 'auto' = latest complete checkpoint in run_dir, or a checkpoint path."""
    # -- the interaction loop (SAM-Med2D defaults; pipeline/steps.py) --------------------------
    first_prompt_box_prob: float = 0.5
    """Probability that step 1 prompts with a box (else one foreground point)."""
    click_choices: list[int] = field(default_factory=lambda: [1, 3, 5, 9])
    """k, the clicks of a re-prompt step, is drawn from these once per step."""
    random_mask_only: bool = True
    """One random step among iterations 2..n-1 is mask-only (as the last step always is)."""
    mask_prompt_as_probs: bool = True
    """Feed the previous mask as sigmoid probabilities (SAM-Med2D) instead of logits."""
    sum_interaction_losses: bool = False
    """Sum the n step losses into one update (SAM-Med3D) instead of n optimizer steps."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The interactive loss (train.mode=interactive), by name with its options."""
    # -- prompt-free training (SAMed: 0.2 CE + 0.8 Dice) ---------------------------------------
    ce_weight: float = 0.2
    semantic_dice_weight: float = 0.8

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", "must be >= 1")
        fraction(self.first_prompt_box_prob, "first_prompt_box_prob")
        require(
            len(self.click_choices) > 0 and all(k >= 1 for k in self.click_choices),
            "click_choices",
            f"must be a non-empty list of click counts >= 1, got {self.click_choices}",
        )
        for key in ("ce_weight", "semantic_dice_weight"):
            require(getattr(self, key) >= 0, key, "must be >= 0")
        require(self.interaction_steps >= 1, "interaction_steps", "must be >= 1")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "adam_betas",
            f"must be [beta1, beta2] each in [0, 1), got {self.adam_betas}",
        )
        require(self.adam_eps > 0, "adam_eps", "must be > 0")
        require(
            0 <= self.warmup_steps <= self.steps,
            "warmup_steps",
            f"must be in [0, steps={self.steps}], got {self.warmup_steps}",
        )
        fraction(self.min_lr_ratio, "min_lr_ratio")
        require(self.poly_power > 0, "poly_power", "must be > 0")
        require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        require(
            not (self.offload and self.zero_stage == 0),
            "offload",
            "needs zero_stage >= 1 (ZeRO-Offload moves the partitioned optimizer states)",
        )
        require(self.log_every >= 1, "log_every", "must be >= 1")
        require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        require(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 = keep all)")
        require(self.val_every >= 0, "val_every", "must be >= 0")


# Prompt kinds that pipeline.evaluate.validate_interactive scores: one box, or one point, per mask.
EVAL_PROMPTS = ("box", "point")


@dataclass
class EvalConfig:
    """Validation during training (``pipeline/evaluate.py``), on ``data.val_split``."""

    max_samples: int = 0
    """Samples per validation, over all ranks (0 = the whole split)."""
    prompts: list[str] = field(default_factory=lambda: ["box", "point"])
    """Prompt kinds scored per mask, each in its own metric (val/dice_box, val/dice_point)."""
    clicks: int = 1
    """Foreground points per point prompt (at most data.point_num, what the reader makes)."""
    overlays: int = 4
    """Prediction-vs-truth overlay PNGs logged to MLflow at each validation (0 = none)."""

    def __post_init__(self) -> None:
        require(self.max_samples >= 0, "max_samples", "must be >= 0 (0 = the whole split)")
        require(len(self.prompts) > 0, "prompts", "must name at least one prompt kind")
        for kind in self.prompts:
            require(
                kind in EVAL_PROMPTS,
                "prompts",
                f"unknown prompt kind {kind!r} (known: {', '.join(EVAL_PROMPTS)})",
            )
        require(len(set(self.prompts)) == len(self.prompts), "prompts", "lists a kind twice")
        require(self.clicks >= 1, "clicks", f"must be >= 1, got {self.clicks}")
        require(self.overlays >= 0, "overlays", "must be >= 0 (0 = none)")


@dataclass
class TrackingConfig:
    """MLflow tracking, done by rank 0 only."""

    enabled: bool = True
    uri: str = ""
    """MLflow tracking URI; empty = sqlite store under the run directory (no server needed)."""
    experiment: str = "samadapt"
    """Experiment name; the runs of a sweep share one, so the MLflow UI compares them."""
    run_name: str = ""
    """Run name shown in the UI; empty = the run directory's name."""
    artifact_location: str = ""
    """Artifact root of a new experiment; empty = RUN_DIR/mlartifacts for the default store,
    the folder of the database + /mlartifacts for another sqlite URI, the server's otherwise."""

    def __post_init__(self) -> None:
        require(bool(self.experiment.strip()), "experiment", "must not be empty")
        require(len(self.experiment) <= 500, "experiment", "must be at most 500 characters")


@dataclass
class PipelineConfig:
    """What the library needs to train: the sections ``pipeline/`` reads, and the checks that
    span them. The root config (``samadapt/config.py``) adds the ``sharding`` and ``launch``
    sections of the other packages; a saved run config holds them all."""

    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # Combinations of sections, checked here so that every command (train, model-info,
        # export) stops on them; pipeline.trainer.check_config adds what needs the files, and
        # the readers check model.image_size against the shards they open.
        # Odd: a stack is centred on its labelled slice. Checked here, not in ModelConfig, which
        # tests build with D=2, the smallest stack that runs the 3D branches.
        require(
            self.model.slices % 2 == 1,
            "model.slices",
            f"must be odd and >= 1, got {self.model.slices}",
        )
        self._check_mode()

    def _check_mode(self) -> None:
        head, mode = self.model.head, self.train.mode
        require(
            mode == "semantic" or head == "sam",
            "model.head",
            f"={head} is prompt-free: it needs train.mode=semantic (train.mode=interactive "
            "trains SAM's promptable decoder, model.head=sam)",
        )
        require(
            mode == "interactive" or head != "sam",
            "train.mode",
            "=semantic needs a prompt-free head: model.head=auto|cnn|linear",
        )
        require(
            mode != "interactive" or "point" not in self.eval.prompts
            or self.eval.clicks <= self.data.point_num,
            "eval.clicks",
            f"={self.eval.clicks} needs data.point_num >= {self.eval.clicks} (the reader makes "
            f"data.point_num={self.data.point_num} points per mask)",
        )  # fmt: skip
        require(
            mode != "interactive"
            or self.train.sum_interaction_losses
            or self.train.grad_accum == 1,
            "train.grad_accum",
            f"={self.train.grad_accum}: each interaction step is its own optimizer step; "
            "accumulate with train.sum_interaction_losses=true or use a larger batch",
        )
        require(
            not self.data.volumes or mode == "semantic",
            "data.volumes",
            "(3D slice stacks) feeds prompt-free training: set train.mode=semantic or train "
            "from data.shards",
        )
