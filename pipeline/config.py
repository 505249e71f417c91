"""The one typed config tree.

Every setting of samadapt lives in a dataclass below. YAML files in ``configs/`` only store values
for it: a file may name ``defaults: [other.yaml, ...]`` (paths relative to itself) that are merged
first, then its own keys, then ``key=value`` overrides from the command line. Unknown keys, wrong
types and impossible values fail at load time with one line naming the key and where it was set.

Functions take the section they need (``cfg.sharding``, ``cfg.data``...), never the root.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LaunchConfig",
    "ModelConfig",
    "ShardingConfig",
    "TrackingConfig",
    "TrainConfig",
    "flatten",
    "load_config",
    "save_config",
    "to_dict",
]


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible. The message names the key."""


class _FieldError(ValueError):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


def _fraction(value: float, key: str) -> None:
    _require(0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class ShardingConfig:
    """How ``samadapt shard`` turns a corpus into WebDataset shards and Zarr volumes."""

    image_size: int = 256
    """Side of the stored square image and masks (256 as SAM-Med2D trains, 1024 for full SAM)."""
    resize: Literal["square", "letterbox"] = "square"
    """square: stretch to size x size (SAM-Med2D); letterbox: longest side to size, pad
    bottom/right with zeros (SAM's own preprocessing)."""
    inputs_per_shard: int = 0
    """Input units per shard (a 2D image, or a 3D case with all its slices); 0 = estimate from
    shard_size_mb on the first inputs. Fixed once planned (plan.json), so reruns and job arrays
    agree on which input goes to which shard."""
    shard_size_mb: float = 1000.0
    """Target shard size used when inputs_per_shard is 0."""
    keep_empty_ratio: float = 0.1
    """Fraction of slices without any foreground that are kept (chosen by hash, deterministic)."""
    val_fraction: float = 0.1
    """Fraction of cases (patients) assigned to the val split, by hash of the case id."""
    test_fraction: float = 0.1
    """Fraction of cases assigned to the test split."""
    ct_window: list[float] = field(default_factory=lambda: [40.0, 400.0])
    """CT window [level, width] in HU mapped to 0..255 (default abdomen)."""
    mr_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    """MR (and other non-CT) intensity clipping percentiles, mapped to 0..255."""
    min_mask_pixels: int = 1
    """Masks with fewer pixels after resizing are dropped (and reported in rejected.jsonl)."""
    workers: int = 0
    """Worker processes; 0 = all local cores."""
    volumes: bool = True
    """Also write 3D inputs as Zarr v3 stores (one group per case) under volumes/."""
    zstd_level: int = 5
    """Blosc-zstd level for Zarr volumes and the image and mask members of the shards."""
    dataset: str = ""
    """Dataset name; empty = from dataset.json or the input folder's name."""
    modality: str = ""
    """Modality override (ct, mr, us, xray, ...); empty = from the input's metadata."""

    def __post_init__(self) -> None:
        _require(self.image_size >= 16, "image_size", f"must be >= 16, got {self.image_size}")
        _require(self.inputs_per_shard >= 0, "inputs_per_shard", "must be >= 0")
        _require(self.shard_size_mb > 0, "shard_size_mb", "must be > 0")
        _fraction(self.keep_empty_ratio, "keep_empty_ratio")
        _fraction(self.val_fraction, "val_fraction")
        _fraction(self.test_fraction, "test_fraction")
        _require(
            self.val_fraction + self.test_fraction < 1.0,
            "val_fraction",
            f"+ test_fraction ({self.val_fraction} + {self.test_fraction}) must be < 1 "
            "to leave cases for training",
        )
        _require(
            len(self.ct_window) == 2 and self.ct_window[1] > 0,
            "ct_window",
            f"must be [level, width] with width > 0, got {self.ct_window}",
        )
        lo_hi = self.mr_percentiles
        _require(
            len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 100,
            "mr_percentiles",
            f"must be [low, high] with 0 <= low < high <= 100, got {lo_hi}",
        )
        _require(self.min_mask_pixels >= 1, "min_mask_pixels", "must be >= 1")
        _require(self.workers >= 0, "workers", "must be >= 0")
        _require(1 <= self.zstd_level <= 9, "zstd_level", "must be in 1..9")


@dataclass
class DataConfig:
    """The streaming reader: shards -> batches of images, masks and prompts."""

    shards: str = ""
    """Output folder of ``samadapt shard`` (holds manifest.json and train/ val/ test/)."""
    volumes: str = ""
    """Zarr store of one dataset (volumes/NAME.zarr) for the 3D reader; empty = not used."""
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 256
    """Must equal the shards' image size (checked when the reader opens the manifest)."""
    mask_num: int = 5
    """Masks drawn per image, with replacement (SAM-Med2D)."""
    batch_size: int = 2
    """Images per rank per step (each with mask_num masks)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 500
    """Samples held in the shuffle buffer of each worker."""
    box_jitter: int = 5
    """Box prompt noise: each box is shifted by up to this many pixels (SAM-Med2D: 5)."""
    point_num: int = 1
    """Foreground points sampled per mask for the first prompt."""
    slices: int = 1
    """Adjacent slices per stack for the 3D reader (odd; MA-SAM uses 3 or 5)."""
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

    def __post_init__(self) -> None:
        _require(self.image_size >= 16, "image_size", "must be >= 16")
        _require(self.mask_num >= 1, "mask_num", f"must be >= 1, got {self.mask_num}")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.num_workers >= 0, "num_workers", "must be >= 0")
        _require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        _require(self.box_jitter >= 0, "box_jitter", "must be >= 0")
        _require(self.point_num >= 1, "point_num", "must be >= 1")
        _require(self.slices >= 1 and self.slices % 2 == 1, "slices", "must be odd and >= 1")


# SAM encoder shapes: arch -> (embed_dim, depth, num_heads, global_attn_indexes). Meta's values for
# vit_b/l/h (segment_anything/build_sam.py); "tiny" is the CPU test size.
SAM_ARCHS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "tiny": (64, 2, 2, (1,)),
}
PEFT_METHODS = ("sam_med2d_adapter", "msa_adapter", "lora", "fact", "adapter3d")


@dataclass
class ModelConfig:
    """SAM + PEFT methods + head. Built by ``pipeline.model``."""

    arch: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "vit_b"
    """Encoder size: Meta's vit_b / vit_l / vit_h, or tiny (depth 2, width 64) for tests."""
    image_size: int = 256
    """Encoder input size; position embeddings are resized from the checkpoint's."""
    checkpoint: str = ""
    """Path to Meta's sam_vit_{b,l,h}_*.pth; empty = random init (tests)."""
    embed_dim: int = 0
    """Encoder width override (0 = from arch); for tiny test models."""
    depth: int = 0
    """Encoder depth override (0 = from arch)."""
    num_heads: int = 0
    """Encoder heads override (0 = from arch)."""
    global_attn_indexes: list[int] = field(default_factory=list)
    """Global-attention blocks override (empty = from arch)."""
    window_size: int = 14
    """Window of the windowed-attention blocks, in tokens (SAM: 14)."""
    prompt_dim: int = 256
    """Width of the image embeddings, prompt encoder and mask decoder (SAM: 256; Meta's
    checkpoints need 256). Smaller only for tiny test models (debug.yaml: 32)."""
    peft: list[str] = field(default_factory=lambda: ["sam_med2d_adapter"])
    """Any subset of: sam_med2d_adapter, msa_adapter, lora, fact, adapter3d (empty = frozen
    encoder)."""
    peft_blocks: list[int] = field(default_factory=list)
    """Encoder blocks that get PEFT modules (empty = all)."""
    peft_method_blocks: dict[str, list[int]] = field(default_factory=dict)
    """Per-method override of peft_blocks, e.g. {lora: [8, 9, 10, 11]}; methods not named here
    use peft_blocks."""
    lora_rank: int = 4
    """Rank of LoRA on q and v (SAMed: 4)."""
    fact_rank: int = 32
    """Rank of FacT-TT on q and v (MA-SAM: 32)."""
    fact_dropout: float = 0.1
    """Dropout on the FacT core outputs in training (MA-SAM: 0.1)."""
    adapter3d_dim: int = 384
    """Bottleneck width of the 3D adapters (MA-SAM: 384 for ViT-B/H)."""
    slices: int = 1
    """Adjacent slices stacked in the batch for adapter3d / msa depth branch (D)."""
    head: Literal["sam", "auto", "cnn", "linear"] = "sam"
    """sam: promptable (prompt encoder + mask decoder); auto: AutoSAM decoder with one mask token
    per class; cnn: light UNet-like decoder; linear: per-pixel linear layer."""
    num_classes: int = 1
    """Foreground classes of prompt-free heads (auto, cnn, linear); they output num_classes + 1
    channels, channel 0 = background."""
    multimask: bool = True
    """Default of decode(multimask=...): 3 masks + IoU predictions instead of 1."""
    progressive_upsampling: bool = False
    """MA-SAM's progressive upsampling to full resolution (head=auto)."""
    train_prompt_encoder: bool = True
    """Train SAM's prompt encoder (head=sam)."""
    train_mask_decoder: bool = True
    """Train SAM's mask decoder (head=sam, or the AutoSAM decoder for head=auto)."""
    activation_checkpointing: bool = False
    """Recompute encoder blocks in the backward pass instead of storing their activations."""
    activation_checkpointing_blocks: list[int] = field(default_factory=list)
    """Blocks recomputed when activation_checkpointing is on (empty = all)."""
    autocast_bf16: bool = False
    """Run the model under torch.autocast(bfloat16) (weights stay fp32)."""
    compile: bool = False
    """torch.compile the image encoder."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; eager or aot_eager to debug)."""
    fused_attention: bool = False
    """Encoder attention through scaled_dot_product_attention, with SAM's decomposed
    relative-position terms passed as an additive attn_mask."""

    def encoder_spec(self) -> tuple[int, int, int, tuple[int, ...]]:
        """(embed_dim, depth, num_heads, global_attn_indexes) after the overrides."""
        dim, depth, heads, glob = SAM_ARCHS[self.arch]
        if self.global_attn_indexes:
            glob = tuple(self.global_attn_indexes)
        return (self.embed_dim or dim, self.depth or depth, self.num_heads or heads, glob)

    def blocks_for(self, method: str) -> list[int]:
        """Encoder blocks that get ``method`` (sorted)."""
        depth = self.encoder_spec()[1]
        chosen = self.peft_method_blocks.get(method) or self.peft_blocks or range(depth)
        return sorted(set(chosen))

    def __post_init__(self) -> None:
        for name in self.peft:
            _require(
                name in PEFT_METHODS,
                "peft",
                f"unknown PEFT method {name!r} (known: {', '.join(PEFT_METHODS)})",
            )
        _require(len(set(self.peft)) == len(self.peft), "peft", "lists a method twice")
        _require(self.image_size % 16 == 0, "image_size", "must be a multiple of 16")
        _require(self.image_size >= 32, "image_size", "must be >= 32")
        for key in ("embed_dim", "depth", "num_heads"):
            _require(getattr(self, key) >= 0, key, "must be >= 0 (0 = from arch)")
        dim, depth, heads, glob = self.encoder_spec()
        _require(dim % heads == 0, "num_heads", f"({heads}) must divide the encoder width ({dim})")
        _require(
            all(0 <= i < depth for i in glob),
            "global_attn_indexes",
            f"{list(glob)} must be block indexes in [0, {depth}) (depth {depth}; set "
            "global_attn_indexes when overriding depth)",
        )
        _require(self.window_size >= 0, "window_size", "must be >= 0 (0 = global everywhere)")
        _require(
            all(0 <= i < depth for i in self.peft_blocks),
            "peft_blocks",
            f"{self.peft_blocks} must be block indexes in [0, {depth})",
        )
        for name, blocks in self.peft_method_blocks.items():
            _require(
                name in self.peft,
                "peft_method_blocks",
                f"names {name!r}, which is not in peft {self.peft}",
            )
            _require(
                all(0 <= i < depth for i in blocks),
                "peft_method_blocks",
                f"{name}: {blocks} must be block indexes in [0, {depth})",
            )
        _require(
            all(0 <= i < depth for i in self.activation_checkpointing_blocks),
            "activation_checkpointing_blocks",
            f"{self.activation_checkpointing_blocks} must be block indexes in [0, {depth})",
        )
        _require(
            self.prompt_dim >= 16 and self.prompt_dim % 16 == 0,
            "prompt_dim",
            f"must be a multiple of 16, got {self.prompt_dim}",
        )
        _require(self.lora_rank >= 1, "lora_rank", "must be >= 1")
        _require(self.fact_rank >= 1, "fact_rank", "must be >= 1")
        _require(0.0 <= self.fact_dropout < 1.0, "fact_dropout", "must be in [0, 1)")
        _require(self.adapter3d_dim >= 1, "adapter3d_dim", "must be >= 1")
        _require(self.num_classes >= 1, "num_classes", "must be >= 1")
        _require(self.slices >= 1, "slices", "must be >= 1")
        _require(
            not self.progressive_upsampling or self.head == "auto",
            "progressive_upsampling",
            f"is an option of head=auto (head is {self.head!r})",
        )
        _require(bool(self.compile_backend), "compile_backend", "must not be empty")


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
    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    # -- prompt-free training (SAMed: 0.2 CE + 0.8 Dice) ---------------------------------------
    ce_weight: float = 0.2
    semantic_dice_weight: float = 0.8

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps", "must be >= 1")
        _fraction(self.first_prompt_box_prob, "first_prompt_box_prob")
        _require(
            len(self.click_choices) > 0 and all(k >= 1 for k in self.click_choices),
            "click_choices",
            f"must be a non-empty list of click counts >= 1, got {self.click_choices}",
        )
        for key in (
            "focal_weight",
            "dice_weight",
            "iou_weight",
            "ce_weight",
            "semantic_dice_weight",
        ):
            _require(getattr(self, key) >= 0, key, "must be >= 0")
        _require(self.interaction_steps >= 1, "interaction_steps", "must be >= 1")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "adam_betas",
            f"must be [beta1, beta2] each in [0, 1), got {self.adam_betas}",
        )
        _require(self.adam_eps > 0, "adam_eps", "must be > 0")
        _require(
            0 <= self.warmup_steps <= self.steps,
            "warmup_steps",
            f"must be in [0, steps={self.steps}], got {self.warmup_steps}",
        )
        _fraction(self.min_lr_ratio, "min_lr_ratio")
        _require(self.poly_power > 0, "poly_power", "must be > 0")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
        _require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        _require(
            not (self.offload and self.zero_stage == 0),
            "offload",
            "needs zero_stage >= 1 (ZeRO-Offload moves the partitioned optimizer states)",
        )
        _require(self.log_every >= 1, "log_every", "must be >= 1")
        _require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        _require(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 = keep all)")
        _require(self.val_every >= 0, "val_every", "must be >= 0")


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
        _require(self.max_samples >= 0, "max_samples", "must be >= 0 (0 = the whole split)")
        _require(len(self.prompts) > 0, "prompts", "must name at least one prompt kind")
        for kind in self.prompts:
            _require(
                kind in EVAL_PROMPTS,
                "prompts",
                f"unknown prompt kind {kind!r} (known: {', '.join(EVAL_PROMPTS)})",
            )
        _require(len(set(self.prompts)) == len(self.prompts), "prompts", "lists a kind twice")
        _require(self.clicks >= 1, "clicks", f"must be >= 1, got {self.clicks}")
        _require(self.overlays >= 0, "overlays", "must be >= 0 (0 = none)")


@dataclass
class LaunchConfig:
    """Where processes run. Read by ``launch/`` only."""

    mode: Literal["local", "submitit_local", "slurm"] = "local"
    ranks: int = 1
    """Processes per node (one per GPU on a GPU node)."""
    nodes: int = 1
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    time_min: int = 60
    cpus_per_task: int = 2
    mem_gb: int = 0
    """Memory per node; 0 = the scheduler's default (not requested)."""
    gpus_per_node: int = 0
    """0 = none requested."""
    folder: str = ""
    """submitit log folder; empty = RUN_DIR/submitit."""

    def __post_init__(self) -> None:
        _require(self.ranks >= 1, "ranks", "must be >= 1")
        _require(self.nodes >= 1, "nodes", "must be >= 1")
        _require(self.time_min >= 1, "time_min", "must be >= 1")
        _require(
            self.cpus_per_task >= 1, "cpus_per_task", f"must be >= 1, got {self.cpus_per_task}"
        )
        _require(
            self.mem_gb >= 0, "mem_gb", f"must be >= 0 (0 = scheduler default), got {self.mem_gb}"
        )
        _require(
            self.gpus_per_node >= 0,
            "gpus_per_node",
            f"must be >= 0 (0 = none requested), got {self.gpus_per_node}",
        )


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
        _require(bool(self.experiment.strip()), "experiment", "must not be empty")
        _require(len(self.experiment) <= 500, "experiment", "must be at most 500 characters")


@dataclass
class Config:
    """The root of the tree."""

    run_dir: str = "runs/default"
    seed: int = 0
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # Combinations of sections, checked here so that every command (train, model-info,
        # export) stops on them; pipeline.trainer.check_config adds what needs the files.
        _require(
            self.data.image_size == self.model.image_size,
            "data.image_size",
            f"({self.data.image_size}) must equal model.image_size ({self.model.image_size})",
        )
        # Odd like data.slices (a stack is centred on its labelled slice). Checked here, not in
        # ModelConfig, which tests build with D=2, the smallest stack that runs the 3D branches.
        _require(
            self.model.slices % 2 == 1,
            "model.slices",
            f"must be odd and >= 1, got {self.model.slices}",
        )
        head, mode = self.model.head, self.train.mode
        _require(
            mode == "semantic" or head == "sam",
            "model.head",
            f"={head} is prompt-free: it needs train.mode=semantic (train.mode=interactive "
            "trains SAM's promptable decoder, model.head=sam)",
        )
        _require(
            mode == "interactive" or head != "sam",
            "train.mode",
            "=semantic needs a prompt-free head: model.head=auto|cnn|linear",
        )
        _require(
            mode != "interactive" or "point" not in self.eval.prompts
            or self.eval.clicks <= self.data.point_num,
            "eval.clicks",
            f"={self.eval.clicks} needs data.point_num >= {self.eval.clicks} (the reader makes "
            f"data.point_num={self.data.point_num} points per mask)",
        )  # fmt: skip
        _require(
            mode != "interactive"
            or self.train.sum_interaction_losses
            or self.train.grad_accum == 1,
            "train.grad_accum",
            f"={self.train.grad_accum}: each interaction step is its own optimizer step; "
            "accumulate with train.sum_interaction_losses=true or use a larger batch",
        )
        _require(
            not self.data.volumes or mode == "semantic",
            "data.volumes",
            "(3D slice stacks) feeds prompt-free training: set train.mode=semantic or train "
            "from data.shards",
        )
        _require(
            not self.data.volumes or self.data.slices == self.model.slices,
            "data.slices",
            f"={self.data.slices} must equal model.slices={self.model.slices} (the 3D adapters "
            "see the stack depth)",
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_yaml(path: Path, sources: dict[str, str], stack: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: defaults include themselves ({chain})")
    if not path.is_file():
        where = f" (named in defaults of {stack[-1]})" if stack else ""
        raise ConfigError(f"{path}: config file not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    merged: dict = {}
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML paths")
    for name in defaults:
        base = _read_yaml(path.parent / str(name), sources, (*stack, path))
        _merge(merged, base, "", None, sources)
    _merge(merged, data, "", str(path), sources)
    return merged


def _merge(dst: dict, src: dict, prefix: str, source: str | None, sources: dict[str, str]) -> None:
    for key, value in src.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, f"{full}.", source, sources)
        else:
            dst[key] = value
            if source is not None:
                _mark(value, full, source, sources)


def _mark(value: Any, key: str, source: str, sources: dict[str, str]) -> None:
    sources[key] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(v, f"{key}.{k}", source, sources)


def _apply_override(tree: dict, item: str, sources: dict[str, str]) -> None:
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"command line: value of {key} is not valid YAML: {raw!r}") from exc
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line: {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    _mark(value, key, "command line", sources)


def _where(key: str, sources: dict[str, str]) -> str:
    return sources.get(key, "defaults")


def _coerce(value: Any, tp: Any, key: str, sources: dict[str, str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a section (mapping)")
        return _build(tp, value, f"{key}.", sources)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, sources)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{_where(key, sources)}: {key} must be one of {list(args)}, got {value!r}"
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", sources) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", sources) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_where(key, sources)}: {key} must be true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_where(key, sources)}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-3" (no dot) as a string; it is a number to anyone else.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{_where(key, sources)}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict, prefix: str, sources: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"{_where(full, sources)}: unknown key '{full}' (known in this section: "
                f"{', '.join(sorted(names))})"
            )
        kwargs[key] = _coerce(value, hints[key], full, sources)
    try:
        return cls(**kwargs)
    except _FieldError as err:
        full = f"{prefix}{err.key}"
        sep = "" if err.message.startswith("=") else " "  # "model.head=auto is ..."
        raise ConfigError(f"{_where(full, sources)}: {full}{sep}{err.message}") from None


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Load a config: YAML file (with its ``defaults``) <- ``key=value`` overrides.

    Arguments:
      path: a YAML file, or None for the built-in defaults.
      overrides: strings like ``train.steps=10`` or ``model.peft=[lora,fact]``.

    Returns:
      The validated ``Config``. Raises ``ConfigError`` naming the key and the file.
    """
    sources: dict[str, str] = {}
    tree = _read_yaml(Path(path), sources, ()) if path else {}
    for item in overrides or []:
        _apply_override(tree, item, sources)
    return _build(Config, tree, "", sources)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """``{"train.lr": 1e-4, ...}``: for MLflow params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "")
    return out


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def from_dict(values: dict) -> Config:
    """Rebuild a ``Config`` from ``to_dict`` output (e.g. a saved resolved config)."""
    return _build(Config, values, "", {})
