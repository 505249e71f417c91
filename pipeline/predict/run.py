"""``samadapt predict``: a trained model on NIfTI files, DICOM series and images.

The model is loaded once, as ``samadapt eval`` loads it (``pipeline.eval.models.load_trained``:
a training checkpoint folder or an export), on one device (a GPU when there is one). Each input
is then read (``inputs.py``), its prompts resolved on it (``prompts.py``; promptable heads), the
model run over its slices (``infer.py``) and its label written in its own geometry
(``outputs.py``). An input that fails (unreadable, wrong dimensionality, a prompt outside it, no
prompt for a promptable head) is skipped with one line naming it; the others go on, and the
failures are listed at the end and in ``OUT/predict.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import PipelineConfig
from pipeline.predict.geometry import PlaneGeometry
from pipeline.predict.infer import predict_prompted, predict_semantic
from pipeline.predict.inputs import Input, Scan, Settings, list_inputs, read_scan, settings
from pipeline.predict.outputs import output_path, write_label, write_overlays
from pipeline.predict.prompts import PromptError, PromptSpec, load_prompts, resolve
from sharding.config import ShardingConfig
from sharding.files import atomic_write_text
from sharding.records import RejectedInput

__all__ = ["Failure", "PredictResult", "check_classes", "predict", "predict_inputs"]

log = logging.getLogger(__name__)

SUMMARY = "predict.json"


@dataclass
class Failure:
    """An input that was skipped, and why (one line naming the file or prompt)."""

    input: str
    message: str


@dataclass
class PredictResult:
    """What ``predict`` wrote."""

    out: Path
    written: list[dict[str, Any]] = field(default_factory=list)
    """Per input done: ``input``, ``output``, ``shape``, ``labels`` (values present)."""
    failures: list[Failure] = field(default_factory=list)


def check_classes(classes: list[int] | None, *, head: str, num_classes: int) -> None:
    """``--classes`` against the head: ``ValueError`` naming the option for a promptable head
    or a class id outside 1..num_classes."""
    if classes is None:
        return
    if head == "sam":
        raise ValueError("--classes: model.head=sam is promptable (its labels are prompt ids)")
    bad = [c for c in classes if not 1 <= c <= num_classes]
    if bad:
        raise ValueError(
            f"--classes: class {bad[0]} is outside the head (model.num_classes={num_classes}: "
            f"classes 1..{num_classes})"
        )


def predict(
    cfg: PipelineConfig,
    model_path: str | Path,
    inputs: list[str],
    *,
    sharding: ShardingConfig,
    out: str | Path,
    prompts: str | Path | None = None,
    overlays: bool = False,
    classes: list[int] | None = None,
    modality: str = "",
    batch_size: int = 8,
    device: str | None = None,
    progress: bool = True,
) -> PredictResult:
    """Load a trained model and label every input.

    Arguments:
      cfg: the run's config (``model`` and ``seed`` rebuild a checkpoint's base; ``data.shards``
        is where the intensity and resize rules are read, ``inputs.settings``).
      model_path: a checkpoint folder (``RUN_DIR/checkpoints/step-N``) or an export file.
      inputs: INPUT arguments: NIfTI files, DICOM series folders, images, folders of those.
      sharding: the config's sharding section (rules when the shards have no manifest).
      out: output folder.
      prompts: the prompts JSON (``prompts.py``); required by a promptable head, refused by a
        prompt-free one.
      overlays: also write overlay PNGs.
      classes: prompt-free heads: class ids to write (others background); None = all.
      modality: ``--modality`` for inputs that state none ("" = the shards').
      batch_size: slices per forward pass.
      device: "cpu", "cuda"...; None = a GPU when there is one.

    Returns:
      PredictResult. Raises ``WeightsError`` (the model), ``PromptError`` (the prompts file) or
      ``ValueError`` (options) with one line before any input is read; failures of single
      inputs are in the result.
    """
    from pipeline.eval.models import load_trained

    head = cfg.model.head
    check_classes(classes, head=head, num_classes=cfg.model.num_classes)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if head != "sam" and prompts is not None:
        raise ValueError(f"--prompts: model.head={head} is prompt-free (it takes no prompts)")
    if head == "sam" and prompts is None:
        raise ValueError("--prompts: model.head=sam is promptable: give a prompts JSON")
    items = list_inputs(inputs)
    specs = load_prompts(prompts, items) if prompts is not None else []
    rules = settings(sharding, cfg.data.shards, modality=modality)
    log.info("intensity and resize rules from %s (resize %s)", rules.source, rules.sharding.resize)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_trained(cfg, model_path)
    model = loaded.model.to(dev)
    log.info("%s %s on %s; %d inputs", loaded.kind, model_path, dev, len(items))
    result = predict_inputs(
        model,
        items,
        specs,
        rules=rules,
        out=Path(out),
        overlays=overlays,
        classes=classes,
        batch_size=batch_size,
        device=dev,
        progress=progress,
    )
    _write_summary(result, model_path, rules)
    return result


def predict_inputs(
    model: Any,
    items: list[Input],
    specs: list[PromptSpec],
    *,
    rules: Settings,
    out: Path,
    overlays: bool = False,
    classes: list[int] | None = None,
    batch_size: int = 8,
    device: torch.device | None = None,
    progress: bool = True,
) -> PredictResult:
    """Label each input with a loaded model (``predict`` without the loading); a failing input
    is recorded and skipped."""
    device = device or torch.device("cpu")
    result = PredictResult(out=out)
    taken: dict[Path, str] = {}
    for item in items:
        try:
            scan = read_scan(item, rules)
            target = output_path(scan, out)
            if target in taken or target.resolve() == item.path.resolve():
                raise RejectedInput(
                    str(item.path), f"its output {target} would overwrite {taken.get(target, 'it')}"
                )
            label = _label(model, scan, specs, rules, classes, batch_size, device, progress)
            taken[target] = str(item.path)
            path = write_label(scan, label, out)
            if overlays:
                write_overlays(scan, label, out)
        except (RejectedInput, PromptError) as err:
            result.failures.append(Failure(str(item.path), str(err)))
            log.error("skipped: %s", err)
            continue
        values = sorted(int(v) for v in set(label.ravel().tolist()) if v)
        result.written.append(
            {
                "input": str(item.path),
                "output": str(path),
                "shape": list(label.shape),
                "labels": values,
            }
        )
        log.info("%s -> %s (labels %s)", item.path, path, values or "none")
    return result


def _label(
    model: Any,
    scan: Scan,
    specs: list[PromptSpec],
    rules: Settings,
    classes: list[int] | None,
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> Any:
    k, h, w = scan.planes.shape[:3]
    geometry = PlaneGeometry(h, w, model.cfg.image_size, rules.sharding.resize)
    options = dict(geometry=geometry, batch_size=batch_size, device=device, progress=progress)
    if model.cfg.head != "sam":
        return predict_semantic(model, scan, classes=classes, **options)
    prompts = [resolve(spec, scan) for spec in specs if spec.matches(scan.source)]
    if not prompts:
        raise PromptError(f"{scan.source.path}: no prompt in the prompts file is for this input")
    return predict_prompted(model, scan, prompts, **options)


def _write_summary(result: PredictResult, model_path: str | Path, rules: Settings) -> None:
    document = {
        "model": str(model_path),
        "rules": {
            "source": rules.source,
            "resize": rules.sharding.resize,
            "ct_window": list(rules.sharding.ct_window),
            "mr_percentiles": list(rules.sharding.mr_percentiles),
            "modality": rules.modality,
            "fallback_modality": rules.fallback,
        },
        "written": result.written,
        "failures": [{"input": f.input, "error": f.message} for f in result.failures],
    }
    atomic_write_text(result.out / SUMMARY, json.dumps(document, indent=1) + "\n", fsync=False)
