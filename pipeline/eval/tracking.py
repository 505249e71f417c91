"""The MLflow side of ``samadapt eval``: one new run in the training run's store, tagged as an
evaluation of it, with the summary's means, the Dice/NSD-vs-clicks series and the report files."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from configtree import flatten
from pipeline.config import PipelineConfig

__all__ = ["track_evaluation"]


def track_evaluation(
    cfg: PipelineConfig,
    info: dict[str, Any],
    summary: list[dict[str, Any]],
    files: list[Path],
    out: Path,
) -> str | None:
    """A new MLflow run in the run's store, tagged as an evaluation of the source run.

    Arguments:
      cfg: the run's config (its tracking section and model section are logged).
      info: what was evaluated (model, split, source run id, ...), logged as eval.* params.
      summary: the summary rows (``pipeline.eval.scoring.summary_rows``).
      files: report files under ``out``, logged as artifacts at their relative paths.
      out: the report folder.

    Returns:
      The MLflow run id (None when tracking is disabled).
    """
    from pipeline.tracking import Tracker

    tracking = dataclasses.replace(
        cfg.tracking, run_name=f"eval-{info['split']}-{Path(info['model']).name}"
    )
    tracker = Tracker(main=True)
    tags = {
        "samadapt.kind": "evaluation",
        "samadapt.evaluation_of": info["source_run_id"] or "",
        "samadapt.eval.model": info["model"],
        "samadapt.eval.split": info["split"],
    }
    params = {f"eval.{k}": v for k, v in info.items() if v is not None}
    params.update({f"model.{k}": v for k, v in flatten(cfg.model).items()})
    run_id = tracker.start(cfg=tracking, run_dir=cfg.run_dir, params=params, tags=tags)
    try:
        metrics, curves = {}, []
        for entry in summary:
            if entry["class"] != "all":
                continue
            step = entry["step"].replace(" ", "_")
            base = f"{entry['model']}/{entry['protocol']}/{step}"
            for metric in ("dice", "iou", "hd95", "nsd"):
                value = entry[f"{metric}_mean"]
                if not math.isnan(value) and not math.isinf(value):
                    metrics[f"{base}/{metric}"] = value
            if entry["protocol"] == "cvpr" and entry["index"] >= 0:
                curves.append(entry)
        tracker.log_metrics(metrics, step=0)
        for entry in curves:  # Dice / NSD vs clicks as MLflow series, x = clicks
            tracker.log_metrics(
                {
                    f"{entry['model']}/cvpr/dice_vs_clicks": entry["dice_mean"],
                    f"{entry['model']}/cvpr/nsd_vs_clicks": entry["nsd_mean"],
                },
                step=int(entry["index"]),
            )
        for path in files:
            rel = path.relative_to(out)
            tracker.log_artifact(path, artifact_path=str(rel.parent) if rel.parent.parts else None)
    except Exception:
        tracker.end("FAILED")
        raise
    tracker.end()
    return run_id
