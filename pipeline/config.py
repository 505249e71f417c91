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
    """Blosc-zstd level for Zarr volumes and packed masks."""
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

    def __post_init__(self) -> None:
        _require(self.image_size >= 16, "image_size", "must be >= 16")
        _require(self.mask_num >= 1, "mask_num", f"must be >= 1, got {self.mask_num}")
        _require(self.batch_size >= 1, "batch_size", "must be >= 1")
        _require(self.num_workers >= 0, "num_workers", "must be >= 0")
        _require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        _require(self.box_jitter >= 0, "box_jitter", "must be >= 0")
        _require(self.point_num >= 1, "point_num", "must be >= 1")
        _require(self.slices >= 1 and self.slices % 2 == 1, "slices", "must be odd and >= 1")


@dataclass
class ModelConfig:
    """SAM + PEFT methods + head. Built by ``pipeline.model``."""

    arch: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "vit_b"
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
    peft: list[str] = field(default_factory=lambda: ["sam_med2d_adapter"])
    """Any subset of: sam_med2d_adapter, msa_adapter, lora, fact, adapter3d."""
    peft_blocks: list[int] = field(default_factory=list)
    """Encoder blocks that get PEFT modules (empty = all)."""
    lora_rank: int = 4
    fact_rank: int = 32
    adapter3d_dim: int = 384
    slices: int = 1
    """Adjacent slices stacked in the batch for adapter3d / msa depth branch (D)."""
    head: Literal["sam", "auto", "cnn", "linear"] = "sam"
    num_classes: int = 1
    """Foreground classes of prompt-free heads (auto, cnn, linear)."""
    multimask: bool = True
    progressive_upsampling: bool = False
    """MA-SAM's progressive upsampling to full resolution (head=auto)."""
    train_prompt_encoder: bool = True
    train_mask_decoder: bool = True
    activation_checkpointing: bool = False
    compile: bool = False
    fused_attention: bool = False

    def __post_init__(self) -> None:
        known = {"sam_med2d_adapter", "msa_adapter", "lora", "fact", "adapter3d"}
        for name in self.peft:
            _require(name in known, "peft", f"unknown PEFT method {name!r} (known: {sorted(known)})")
        _require(len(set(self.peft)) == len(self.peft), "peft", "lists a method twice")
        _require(self.image_size % 16 == 0, "image_size", "must be a multiple of 16")
        _require(self.lora_rank >= 1, "lora_rank", "must be >= 1")
        _require(self.fact_rank >= 1, "fact_rank", "must be >= 1")
        _require(self.num_classes >= 1, "num_classes", "must be >= 1")
        _require(self.slices >= 1, "slices", "must be >= 1")


@dataclass
class TrainConfig:
    """The training loop (``samadapt train``)."""

    steps: int = 1000
    """Optimizer iterations (batches); streams are endless, so we count steps, not epochs."""
    mode: Literal["interactive", "semantic"] = "interactive"
    interaction_steps: int = 9
    """1 prompt step + (n - 1) decoder-only re-prompt steps (SAM-Med2D: 9)."""
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "poly"] = "constant"
    grad_clip: float = 0.0
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 2
    offload: bool = False
    log_every: int = 10
    checkpoint_every: int = 200
    val_every: int = 0
    resume: str = ""
    """'' = fresh, 'auto' = latest complete checkpoint in run_dir, or a checkpoint path."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps", "must be >= 1")
        _require(self.interaction_steps >= 1, "interaction_steps", "must be >= 1")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        _require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        _require(self.log_every >= 1, "log_every", "must be >= 1")
        _require(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")


@dataclass
class EvalConfig:
    split: str = "test"
    max_samples: int = 0
    """0 = the whole split."""
    prompts: list[str] = field(default_factory=lambda: ["box", "point"])
    clicks: int = 1


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
    gpus_per_node: int = 0
    folder: str = ""
    """submitit log folder; empty = RUN_DIR/submitit."""

    def __post_init__(self) -> None:
        _require(self.ranks >= 1, "ranks", "must be >= 1")
        _require(self.nodes >= 1, "nodes", "must be >= 1")
        _require(self.time_min >= 1, "time_min", "must be >= 1")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""
    """MLflow tracking URI; empty = sqlite store under the run directory (no server needed)."""
    experiment: str = "samadapt"
    run_name: str = ""


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
        _require(
            self.data.image_size == self.model.image_size,
            "data.image_size",
            f"({self.data.image_size}) must equal model.image_size ({self.model.image_size})",
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
        raise ConfigError(f"{_where(full, sources)}: {full} {err.message}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
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
