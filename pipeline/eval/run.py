"""``samadapt eval`` for promptable 2D models on shards: protocols, baselines, tables, report.

One process, one device (a GPU when there is one). The split is read once in manifest order
(``build_eval_loader``: every mask once, boxes without jitter); each batch is encoded once per
model, and every protocol of ``pipeline/eval/protocols.py`` runs on its masks:

* models: ``trained`` (the checkpoint or export), ``untrained`` (the run's base: Meta's weights
  or the seeded random init, ``pipeline/eval/models.py``), and ``baseline`` (fill the box for box
  steps, a disc at the first click for the first point step);
* protocols: ``sam_med2d_box``, ``sam_med2d_points`` (1 point, then ``iter_point - 1`` random
  error clicks), ``cvpr`` (box + ``clicks`` clicks, with its ``auc`` and ``final`` rows).

A second pass over the same batches redraws the trained model's CVPR predictions of the chosen
overlay masks (worst, median and best final Dice per class), so no image is held in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import PipelineConfig
from pipeline.embedding_cache import EmbeddingCache, model_encoders
from pipeline.eval.models import Loaded, base_model, load_trained
from pipeline.eval.protocols import (
    Trace,
    click_disc,
    run_cvpr,
    run_sam_med2d_points,
)
from pipeline.eval.report import Overlay, write_report
from pipeline.eval.scoring import Row, auc_rows, score_masks, shard_spacing, summary_rows
from pipeline.eval.tracking import track_evaluation
from pipeline.evaluate import fill_box

__all__ = ["SPLITS", "EvalResult", "evaluate"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
"""``--split`` names: train and val are ``data.train_split`` / ``data.val_split``."""


@dataclass
class EvalResult:
    """What ``evaluate`` wrote."""

    out: Path
    report: Path
    rows: list[Row]
    summary: list[dict[str, Any]]
    run_id: str | None = None
    files: list[Path] = field(default_factory=list)


def _split_name(cfg: PipelineConfig, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"--split: unknown split {split!r} (known: {', '.join(SPLITS)})")
    return {"train": cfg.data.train_split, "val": cfg.data.val_split}.get(split, split)


def _batches(cfg: PipelineConfig, split: str, max_samples: int) -> Iterator[dict]:
    from pipeline.data.stream import build_eval_loader

    loader = build_eval_loader(
        cfg=cfg.data, image_size=cfg.model.image_size, rank=0, world_size=1, split=split
    )
    seen = 0
    for batch in loader:
        if max_samples and seen >= max_samples:  # whole batches, as validation counts them
            return
        seen += batch["image"].shape[0]
        yield batch


def _mask_infos(batch: dict, valid: torch.Tensor, *, size: int, resize: str) -> list[dict]:
    """Key, mask index, class and spacing of each valid mask, in the flattened (P) order."""
    b, m = batch["masks"].shape[:2]
    infos = []
    for flat in torch.nonzero(valid).flatten().tolist():
        i, j = divmod(flat, m)
        meta = batch["meta"][i]
        spacing, in_mm = shard_spacing(meta, size=size, resize=resize)
        class_id = int(batch["class_ids"][i, j])
        names = dict(zip(meta.get("class_ids", []), meta.get("class_names", []), strict=False))
        infos.append(
            dict(
                key=batch["keys"][i],
                mask=j,
                class_id=class_id,
                class_name=str(names.get(class_id, f"class {class_id}")),
                spacing=spacing,
                spacing_mm=in_mm,
            )
        )
    return infos


def _traces(
    model: Any,
    data: dict,
    *,
    clicks: int,
    iter_point: int,
    generator: torch.Generator,
    encode: Callable[..., torch.Tensor],
    mask_as_probs: bool,
) -> list[Trace]:
    embeddings = encode(data["image"])
    truth = data["truth"]
    cvpr = run_cvpr(
        model,
        embeddings,
        data["image_index"],
        data["boxes"],
        truth,
        clicks=clicks,
        mask_as_probs=mask_as_probs,
    )
    # SAM-Med2D's box prompt is the CVPR protocol's first pass (box only): not decoded twice
    box = Trace("sam_med2d_box")
    box.add("box", cvpr.preds[0])
    points = run_sam_med2d_points(
        model,
        embeddings,
        data["image_index"],
        (data["point_coords"][:, :1], data["point_labels"][:, :1]),
        truth,
        iter_point=iter_point,
        generator=generator,
    )
    return [box, points, cvpr]


def _device_batch(batch: dict, device: torch.device) -> tuple[dict, torch.Tensor]:
    b, m, s, _ = batch["masks"].shape
    valid = batch.get("mask_valid", torch.ones(b, m, dtype=torch.bool)).reshape(-1)
    keep = torch.nonzero(valid).flatten()
    data = {
        "image": batch["image"].to(device),
        "truth": batch["masks"].reshape(b * m, s, s)[keep].to(device) > 0,
        "image_index": torch.arange(b).repeat_interleave(m)[keep].to(device),
        "boxes": batch["boxes"].reshape(b * m, 4)[keep].to(device),
        "point_coords": batch["point_coords"].reshape(b * m, -1, 2)[keep].to(device),
        "point_labels": batch["point_labels"].reshape(b * m, -1)[keep].to(device),
    }
    return data, valid


def _baseline_traces(data: dict) -> list[Trace]:
    size = data["truth"].shape[-1]
    boxes = Trace("sam_med2d_box")
    boxes.add("box", fill_box(data["boxes"], size))
    disc = Trace("sam_med2d_points")
    disc.add("1 pt", click_disc(data["point_coords"], size))
    cvpr = Trace("cvpr")
    cvpr.add("box", fill_box(data["boxes"], size))
    return [boxes, disc, cvpr]


def evaluate(
    cfg: PipelineConfig,
    model_path: str | Path,
    *,
    split: str = "test",
    out: str | Path | None = None,
    max_samples: int = 0,
    clicks: int = 5,
    iter_point: int = 5,
    tolerance: float = 2.0,
    track: bool = True,
    device: str | None = None,
) -> EvalResult:
    """Evaluate a trained promptable model on a shard split, beside its base and the baselines.

    Arguments:
      cfg: the run's config (``RUN_DIR/config.yaml``, with overrides such as ``data.shards``).
      model_path: a checkpoint folder (``RUN_DIR/checkpoints/step-N``) or an export file.
      split: "train", "val" or "test".
      out: output folder; default ``RUN_DIR/eval/<model name>-<split>``.
      max_samples: images to evaluate, in whole batches (0 = the whole split).
      clicks: corrective clicks of the CVPR protocol (the challenge: 5).
      iter_point: passes of SAM-Med2D's point protocol (its test.py default is 1; 5 here so the
        correction curve exists).
      tolerance: NSD tolerance in mm (the challenge's ``compute_multi_class_nsd``: 2.0).
      track: log to MLflow (``tracking`` section; default store: the run's).
      device: "cpu", "cuda"...; None = a GPU when there is one.

    Returns:
      EvalResult. Raises ``ValueError`` / ``WeightsError`` / ``ConfigError`` with one line for
      an unknown split, a bad model file, or shards that do not fit.
    """
    from pipeline.data.shards import read_manifest
    from sharding.manifest import load_manifest

    if cfg.model.head != "sam":
        raise ValueError(
            f"samadapt eval scores promptable models (model.head=sam); model.head="
            f"{cfg.model.head} is prompt-free (per-volume 3D evaluation is not built yet)"
        )
    if clicks < 1 or iter_point < 1:
        raise ValueError(f"--clicks and --iter-point must be >= 1, got {clicks}, {iter_point}")
    name = _split_name(cfg, split)
    read_manifest(cfg.data.shards, split=name, image_size=cfg.model.image_size)  # fail early
    resize = load_manifest(cfg.data.shards).resize
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trained = load_trained(cfg, model_path)
    models = {"trained": trained.model.to(dev), "untrained": base_model(cfg).to(dev)}
    # a frozen encoder shared by both models runs once per image (and not at all for images
    # the training run already encoded into its disk cache)
    encoders = model_encoders(cfg, models)
    model_path = Path(model_path)
    out = Path(out) if out else Path(cfg.run_dir) / "eval" / f"{model_path.stem}-{split}"

    rows, images = _score_split(
        cfg,
        models,
        name,
        max_samples,
        clicks=clicks,
        iter_point=iter_point,
        tolerance=tolerance,
        resize=resize,
        dev=dev,
        encoders=encoders,
    )
    if not rows:
        raise ValueError(f"split {split!r} ({name}) of {cfg.data.shards} holds no masks")
    rows += auc_rows([r for r in rows if r.model != "baseline"])
    summary = summary_rows(rows)
    overlays = _overlays(
        cfg,
        models["trained"],
        rows,
        name,
        max_samples,
        clicks=clicks,
        dev=dev,
        encode=encoders["trained"],
    )
    caches = {id(e): e for e in encoders.values() if isinstance(e, EmbeddingCache)}
    for cache in caches.values():
        log.info(
            "image embeddings: %d computed, %d from the cache (%s)",
            cache.misses, cache.hits, cache.root or "memory",
        )  # fmt: skip
    info = _info(cfg, trained, model_path, split, name, images, rows, clicks, iter_point, tolerance)
    result = EvalResult(out=out, report=out / "report.md", rows=rows, summary=summary)
    result.files = write_report(out, rows=rows, summary=summary, info=info, overlays=overlays)
    if track:
        result.run_id = track_evaluation(cfg, info, summary, result.files, out)
    log.info("evaluation report: %s", result.report)
    return result


def _score_split(
    cfg: PipelineConfig,
    models: dict[str, Any],
    split: str,
    max_samples: int,
    *,
    clicks: int,
    iter_point: int,
    tolerance: float,
    resize: str,
    dev: torch.device,
    encoders: dict[str, Callable[..., torch.Tensor]],
) -> tuple[list[Row], int]:
    """First pass: every protocol of every model, and the baselines, scored per mask.

    Returns:
      (rows, images read).
    """
    size = cfg.model.image_size
    rows: list[Row] = []
    images = 0
    generators = {k: torch.Generator(device=dev).manual_seed(cfg.data.seed) for k in models}
    with torch.no_grad():
        for batch in _batches(cfg, split, max_samples):
            data, valid = _device_batch(batch, dev)
            images += batch["image"].shape[0]
            if data["truth"].shape[0] == 0:
                continue
            infos = _mask_infos(batch, valid, size=size, resize=resize)
            truth = data["truth"].cpu().numpy()
            runs = {
                k: _traces(
                    m,
                    data,
                    clicks=clicks,
                    iter_point=iter_point,
                    generator=generators[k],
                    encode=encoders[k],
                    mask_as_probs=cfg.train.mask_prompt_as_probs,
                )
                for k, m in models.items()
            }
            runs["baseline"] = _baseline_traces(data)
            for model_name, traces in runs.items():
                for trace in traces:
                    for index, (step, pred) in enumerate(
                        zip(trace.steps, trace.preds, strict=True)
                    ):
                        rows += score_masks(
                            pred.numpy(),
                            truth,
                            model=model_name,
                            protocol=trace.protocol,
                            step=step,
                            index=index,
                            masks=infos,
                            tolerance=tolerance,
                        )
    return rows, images


def _info(
    cfg: PipelineConfig,
    trained: Loaded,
    model_path: Path,
    split: str,
    name: str,
    images: int,
    rows: list[Row],
    clicks: int,
    iter_point: int,
    tolerance: float,
) -> dict[str, Any]:
    masks = {(r.key, r.mask): r.spacing_mm for r in rows}
    return {
        "model": str(model_path),
        "model_kind": trained.kind,
        "source_run_id": trained.run_id,
        "step": trained.step,
        "shards": str(cfg.data.shards),
        "split": split,
        "split_name": name,
        "images": images,
        "masks": len(masks),
        "masks_spacing_mm": sum(masks.values()),
        "image_size": cfg.model.image_size,
        "cvpr_clicks": clicks,
        "sam_med2d_iter_point": iter_point,
        "nsd_tolerance": tolerance,
        "base": cfg.model.checkpoint or f"random init, seed {cfg.seed}",
        # the base is a named pretrained model: its scores are zero-shot
        "untrained_name": "zero-shot" if cfg.model.checkpoint else "untrained",
    }


def _chosen(rows: list[Row]) -> dict[tuple[str, int], str]:
    """(key, mask) -> title for the worst, median and best final CVPR Dice of each class."""
    final: dict[str, list[Row]] = {}
    for r in rows:
        if r.model == "trained" and r.protocol == "cvpr" and r.step == "final":
            final.setdefault(r.class_name, []).append(r)
    chosen = {}
    for cls, members in sorted(final.items()):
        members.sort(key=lambda r: (-math.inf if math.isnan(r.dice) else r.dice, r.key, r.mask))
        picks = {"worst": members[0], "median": members[len(members) // 2], "best": members[-1]}
        for label, r in picks.items():
            chosen.setdefault((r.key, r.mask), f"{cls} {label} dice {r.dice:.3f}")
    return chosen


def _overlays(
    cfg: PipelineConfig,
    model: Any,
    rows: list[Row],
    split: str,
    max_samples: int,
    *,
    clicks: int,
    dev: torch.device,
    encode: Callable[..., torch.Tensor],
) -> list[Overlay]:
    """Second pass: the trained model's final CVPR prediction of the chosen masks."""
    chosen = _chosen(rows)
    wanted = {key for key, _ in chosen}
    found: list[Overlay] = []
    with torch.no_grad():
        for batch in _batches(cfg, split, max_samples):
            if not wanted & set(batch["keys"]):
                continue
            data, valid = _device_batch(batch, dev)
            infos = _mask_infos(batch, valid, size=cfg.model.image_size, resize="square")
            embeddings = encode(data["image"])
            trace = run_cvpr(
                model,
                embeddings,
                data["image_index"],
                data["boxes"],
                data["truth"],
                clicks=clicks,
                mask_as_probs=cfg.train.mask_prompt_as_probs,
            )
            for p, info in enumerate(infos):
                title = chosen.get((info["key"], info["mask"]))
                if title is None:
                    continue
                image = data["image"][data["image_index"][p]].permute(1, 2, 0).cpu()
                found.append(
                    Overlay(
                        image=image,
                        truth=data["truth"][p].cpu(),
                        pred=trace.preds[-1][p],
                        clicks=trace.clicks[-1][0][p],
                        labels=trace.clicks[-1][1][p],
                        title=title,
                    )
                )
    return found
