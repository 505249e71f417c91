"""The sections of the config tree that ``pipeline/`` owns, and ``PipelineConfig`` over them.

``data`` (the streaming reader), ``train`` (loop, optimizer, engine, checkpoints), ``eval``
(validation) and ``tracking`` (MLflow) live here; ``model`` lives with the model
(``pipeline/model/config.py``), ``data.augment`` with the augmentation
(``pipeline/augment/config.py``) and ``train.loss`` with the losses
(``pipeline/losses/config.py``). ``PipelineConfig`` composes them with the checks that span
sections; the root config of a run (``samadapt/config.py``) adds the ``sharding`` and ``launch``
sections. Loading, overrides and the config error are ``configtree``'s.

Each value is set in one place: the input size and the slice count of a stack are the model's
(``model.image_size``, ``model.slices``); the readers check them against the shards they open.
Functions take the section they need (``cfg.data``, ``cfg.train``...), never the root.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from configtree import fraction, require
from pipeline.augment.config import AugmentConfig
from pipeline.losses.config import LossConfig
from pipeline.model.config import ModelConfig

__all__ = [
    "BOX_FROM",
    "EMBEDDING_CACHE_MODES",
    "LOSS_RESOLUTIONS",
    "AugmentConfig",
    "BoxFrom",
    "DataConfig",
    "EvalConfig",
    "LossResolution",
    "PipelineConfig",
    "TrackingConfig",
    "TrainConfig",
]


# Which pixels a box prompt bounds (pipeline/data/prompts.py): the mask's largest 8-connected
# component (SAM-Med2D) or all of them.
BoxFrom = Literal["largest_component", "whole_mask"]
BOX_FROM: tuple[str, ...] = typing.get_args(BoxFrom)
# Where the training loss compares prediction and truth (pipeline/steps.py): at the input size
# (the logits resized up) or on the decoder's low-resolution grid, S/4 (the truth resized down).
LossResolution = Literal["input", "low_res"]
LOSS_RESOLUTIONS: tuple[str, ...] = typing.get_args(LossResolution)
# Where image embeddings of a frozen encoder are kept between uses (pipeline/embedding_cache.py).
EmbeddingCacheMode = Literal["auto", "none", "memory", "disk"]
EMBEDDING_CACHE_MODES: tuple[str, ...] = typing.get_args(EmbeddingCacheMode)


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
    decay_steps: int = 0
    """Length of the cosine / poly decay, counted from the end of warm-up (0 = steps -
    warmup_steps: it ends at the last step). Longer than the run, training stops before the
    decay ends (SAMed decays over 200 epochs and stops after 160)."""
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
    loss_resolution: LossResolution = "input"
    """Where the loss is taken, in both modes: input = the decoder's logits resized
    (bilinear) to the input size, against the full-size truth; low_res = on the decoder's own
    S/4 grid, against the truth resized to it (nearest, pixel centres): SAMed's low_res_logits
    vs low_res_label, MSA's out_size 256 at a 1024 input. Needs model.head=sam, or auto without
    progressive_upsampling."""
    # -- prompt-free training (SAMed: 0.2 CE + 0.8 Dice) ---------------------------------------
    ce_weight: float = 0.2
    semantic_dice_weight: float = 0.8
    semantic_dice_background: bool = True
    """Class 0 (background) in the mean of the per-class Dice terms (SAMed, MA-SAM); false =
    foreground classes only (AutoSAM's do_bg=False)."""
    semantic_dice_smooth: float = 1e-5
    """Smoothing of each class's Dice (SAMed, MA-SAM: 1e-5; AutoSAM: 1)."""
    # -- frozen-encoder speed (pipeline/embedding_cache.py) ------------------------------------
    embedding_cache: EmbeddingCacheMode = "auto"
    """Keep the image embeddings of a frozen encoder (no PEFT, model.train_encoder=false) so
    each distinct input image is encoded once per run: memory (this process), disk
    (RUN_DIR/embedding_cache, kept across resumes, keyed by the encoder's weights), none, or
    auto = memory when the encoder is frozen and ZeRO stage < 3, else none. Entries are keyed
    by the exact input pixels, so augmented images only hit when an augmentation repeats
    (flips) and a changed shard set cannot be served stale embeddings."""
    embedding_cache_gb: float = 4.0
    """Most gigabytes the cache holds (memory or disk); further embeddings are computed each
    time they are needed."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", "must be >= 1")
        fraction(self.first_prompt_box_prob, "first_prompt_box_prob")
        require(
            len(self.click_choices) > 0 and all(k >= 1 for k in self.click_choices),
            "click_choices",
            f"must be a non-empty list of click counts >= 1, got {self.click_choices}",
        )
        for key in ("ce_weight", "semantic_dice_weight", "semantic_dice_smooth"):
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
        require(self.decay_steps >= 0, "decay_steps", "must be >= 0 (0 = steps - warmup_steps)")
        require(
            self.loss_resolution in LOSS_RESOLUTIONS,
            "loss_resolution",
            f"must be one of {', '.join(LOSS_RESOLUTIONS)}, got {self.loss_resolution!r}",
        )
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
        require(
            self.embedding_cache in EMBEDDING_CACHE_MODES,
            "embedding_cache",
            f"must be one of {', '.join(EMBEDDING_CACHE_MODES)}, got {self.embedding_cache!r}",
        )
        require(self.embedding_cache_gb > 0, "embedding_cache_gb", "must be > 0")


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
            self.train.loss_resolution == "input"
            or (head in ("sam", "auto") and not self.model.progressive_upsampling),
            "train.loss_resolution",
            f"=low_res is the S/4 grid of SAM's decoder (model.head=sam, or auto without "
            f"progressive_upsampling), but model.head={head}"
            f"{' with progressive_upsampling' if self.model.progressive_upsampling else ''} "
            "predicts at the input size: use train.loss_resolution=input",
        )
        require(
            self.train.loss_resolution == "input" or not self.model.is_tiny_vit,
            "train.loss_resolution",
            f"=low_res is the S/4 grid of a ViT's decoder; model.arch={self.model.arch}'s "
            "decoder predicts at S already: use train.loss_resolution=input",
        )
        encoder_trains = bool(self.model.peft) or self.model.train_encoder
        require(
            self.train.embedding_cache in ("auto", "none") or not encoder_trains,
            "train.embedding_cache",
            f"={self.train.embedding_cache} keeps a frozen encoder's embeddings, but the encoder "
            f"trains (model.peft={self.model.peft}, model.train_encoder="
            f"{str(self.model.train_encoder).lower()}): use train.embedding_cache=auto or none",
        )
        require(
            self.train.embedding_cache in ("auto", "none") or self.train.zero_stage < 3,
            "train.embedding_cache",
            f"={self.train.embedding_cache} needs train.zero_stage < 3: ZeRO-3 gathers the "
            "encoder's weights in every rank's forward together, so no rank may skip one",
        )
        require(
            not self.data.volumes or mode == "semantic",
            "data.volumes",
            "(3D slice stacks) feeds prompt-free training: set train.mode=semantic or train "
            "from data.shards",
        )
