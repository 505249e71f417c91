"""Validation Dice against training steps and minutes, beside the three baselines.

A synthetic corpus (SA-Med2D layout, the irregular weak-contrast organs of
``sharding/synthetic_truth.py``) is sharded with ``samadapt shard`` and a preset is trained on it
with ``samadapt train`` (the real trainer: DeepSpeed, the task's loop, validation every
``--val-every`` steps). The curve is read back from the run's MLflow store, so it is what a user
sees in the MLflow UI:

* the model's Dice with one box prompt and with one point prompt per mask (``val/dice_box``,
  ``val/dice_point``), on the held-out cases;
* the untrained model's (``val/untrained/dice_box``, validated before the first step);
* filling the prompt box, and filling the image (``val/baseline/dice_fill_box``,
  ``.../dice_fill_image``), on the same masks.

It prints a table (step, minutes since the run started, the Dice figures and the model's ratio to
filling the box) and draws both curves into one PNG (``--png``; the README shows
``bench/figures/quality.png``).

    python bench/quality.py                       # configs/quickstart.yaml, 3000 steps
    python bench/quality.py --steps 400 --val-every 100 train.lr=2e-3    # any override
    python bench/quality.py --corpus brain_mri --steps 80 --val-every 10  # make quickstart's

``--corpus brain_mri`` trains ``configs/brain_mri.yaml`` (LiteMedSAM) on the real-MRI corpus of
``make quickstart`` (``python -m samadapt.brain_mri``) instead, at its own 256 px; there the
untrained model is LiteMedSAM zero-shot.

Corpora and shards are cached in ``.bench/``; each call trains a new run in ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CACHE, REPO, ensure_corpus, setup_logging, shard_with_cli, write_json  # noqa: E402

log = logging.getLogger("bench.quality")

MODEL = {"box": "val/dice_box", "point": "val/dice_point"}
BASELINES = {
    "untrained model (box)": "val/untrained/dice_box",
    "fill the box": "val/baseline/dice_fill_box",
    "fill the image": "val/baseline/dice_fill_image",
}


def train(preset: str, shards: Path, run_dir: Path, args: argparse.Namespace) -> float:
    """Train ``preset`` on ``shards`` with the real CLI; returns the wall seconds."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "samadapt", "train", preset, f"data.shards={shards}"]
    cmd += [f"run_dir={run_dir}", f"train.steps={args.steps}"]
    if args.corpus == "synthetic":
        cmd.append(f"model.image_size={args.size}")
    cmd += [f"train.val_every={args.val_every}", f"train.checkpoint_every={args.steps}"]
    cmd += list(args.overrides)
    log.info("training: %s", " ".join(cmd[1:]))
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return time.perf_counter() - start


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """metric -> [(step, minutes since the run started, value)] from the run's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no MLflow run in {run_dir}")
    run = runs[0]
    start_ms = run.info.start_time
    curves = {}
    for key in [*MODEL.values(), *BASELINES.values()]:
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        curves[key] = [(m.step, (m.timestamp - start_ms) / 60000.0, m.value) for m in history]
    return curves


def table(curves: dict[str, list[tuple[int, float, float]]]) -> list[dict[str, float]]:
    """One row per validation: step, minutes, the model's and the baselines' Dice.

    The untrained model is validated once, before the first step (its Dice is the model's at
    step 0) and logged again beside every later validation: one value for every row.
    """
    by_step = {key: {step: value for step, _, value in points} for key, points in curves.items()}
    untrained = BASELINES["untrained model (box)"]
    first = next(iter(by_step[untrained].values()), None)
    rows = []
    for step, minutes, box in curves[MODEL["box"]]:
        row = {"step": step, "minutes": round(minutes, 2), "dice_box": box}
        if step in by_step[MODEL["point"]]:
            row["dice_point"] = by_step[MODEL["point"]][step]
        for name, key in BASELINES.items():
            value = by_step[key].get(step, first if key == untrained else None)
            if value is not None:
                row[name] = value
        rows.append(row)
    return rows


def log_table(rows: list[dict[str, float]]) -> None:
    names = list(BASELINES)
    head = f"{'step':>6} {'min':>6} {'box':>6} {'point':>6} " + " ".join(
        f"{n[:14]:>14}" for n in names
    )
    log.info("%s %s", head, "box / fill-box")
    for r in rows:
        cells = " ".join(f"{r.get(n, float('nan')):14.3f}" for n in names)
        ratio = r["dice_box"] / r["fill the box"] if r.get("fill the box") else float("nan")
        log.info(
            "%6d %6.1f %6.3f %6.3f %s %14.2fx",
            r["step"], r["minutes"], r["dice_box"], r.get("dice_point", float("nan")), cells, ratio,
        )  # fmt: skip


def draw(rows: list[dict[str, float]], png: Path, title: str) -> None:
    """Dice against steps (left) and minutes (right), the baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    styles = {
        "untrained model (box)": ("tab:gray", ":"),
        "fill the box": ("tab:red", "--"),
        "fill the image": ("tab:brown", "-."),
    }
    for ax, x_key, x_label in ((axes[0], "step", "training step"), (axes[1], "minutes", "minutes")):
        xs = [r[x_key] for r in rows]
        ax.plot(xs, [r["dice_box"] for r in rows], "o-", color="tab:blue", label="model, box")
        if all("dice_point" in r for r in rows):
            ax.plot(xs, [r["dice_point"] for r in rows], "s-", color="tab:green",
                    label="model, 1 point")  # fmt: skip
        for name, (color, style) in styles.items():
            values = [r[name] for r in rows if name in r]
            if values:
                ax.axhline(values[-1], color=color, linestyle=style, label=name)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation Dice (held-out cases)")
    axes[0].set_ylim(0, 1)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    log.info("curve drawn to %s", png)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides for samadapt train")
    parser.add_argument("--corpus", choices=("synthetic", "brain_mri"), default="synthetic")
    parser.add_argument("--preset", default=None, help="default: configs/quickstart.yaml, or "
                        "configs/brain_mri.yaml with --corpus brain_mri")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--cases", type=int, default=40, help="synthetic cases (default 40)")
    parser.add_argument("--slices", type=int, default=4, help="images per case (default 4)")
    parser.add_argument("--size", type=int, default=128, help="image side (default 128)")
    parser.add_argument("--out", type=Path, default=CACHE / "quality", help="run folder")
    parser.add_argument("--png", type=Path, default=None, help="curve (default OUT/quality.png)")
    parser.add_argument("--json", default=None, help="also write the table to this JSON file")
    args = parser.parse_args()
    setup_logging()
    log.info("load average at start: %s", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.corpus == "brain_mri":
        args.preset = args.preset or "configs/brain_mri.yaml"
        corpus = CACHE / "brain_mri" / "corpus"
        if not (corpus / "dataset.json").exists():
            from sharding.brain_mri import write_brain_mri

            write_brain_mri(corpus)
        shards = shard_with_cli(
            corpus, CACHE / "brain_mri" / "shards", ["--config", args.preset], fmt="nifti"
        )
        data = "real brain MRI (deepmriprep template), held-out slabs"
    else:
        args.preset = args.preset or "configs/quickstart.yaml"
        corpus = ensure_corpus(cases=args.cases, slices=args.slices, size=args.size)
        shards = shard_with_cli(
            corpus,
            CACHE / f"{corpus.name}-shards",
            ["--config", args.preset, f"sharding.image_size={args.size}"],
        )
        data = f"synthetic {args.cases}x{args.slices} @ {args.size} px"
    seconds = train(args.preset, shards, args.out / "run", args)
    rows = table(read_curves(args.out / "run"))
    if not rows:
        raise SystemExit("the run logged no validation (is --val-every above --steps?)")
    log_table(rows)
    title = (
        f"{args.preset} {' '.join(args.overrides)} | {data} | {args.steps} steps, "
        f"{seconds / 60:.1f} min"
    )
    draw(rows, args.png or args.out / "quality.png", title)
    log.info("load average at end: %s", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    write_json(args.json, {"title": title, "seconds": seconds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
