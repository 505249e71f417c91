"""``samadapt eval`` through the real CLI on a tiny model the real trainer trained for two steps
(one rank, DeepSpeed on gloo), on shards made in tmp_path, with the run's MLflow store."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMALL_SIZE
from mlflow.tracking import MlflowClient

from samadapt.cli import main

FAST = ["--split", "val", "--max-samples", "2", "--clicks", "2", "--iter-point", "2"]


def _train_two_steps(small_shards, run: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "samadapt", "train", str(ROOT / "configs/debug.yaml")]
    cmd += [
        f"run_dir={run}",
        f"data.shards={small_shards}",
        f"model.image_size={SMALL_SIZE}",
        "data.num_workers=0",
        "launch.ranks=1",
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.val_every=0",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def run_dir(small_shards, tmp_path_factory) -> Path:
    return _train_two_steps(small_shards, tmp_path_factory.mktemp("eval") / "run")


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_eval_checkpoint_writes_report_tables_and_mlflow(run_dir, tmp_path):
    out = tmp_path / "out"
    ckpt = run_dir / "checkpoints" / "step-0000002"
    cmd = [sys.executable, "-m", "samadapt", "eval", str(run_dir / "config.yaml"), str(ckpt)]
    proc = subprocess.run(
        [*cmd, *FAST, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "Dice untrained" in report and "Dice baseline" in report
    assert "| cvpr | final |" in report and "dice_vs_clicks.png" in report
    assert (out / "dice_vs_clicks.png").stat().st_size > 1000
    assert list((out / "overlays").glob("*.png"))
    rows = _read(out / "masks.csv")
    seen = {(r["model"], r["protocol"], r["step"]) for r in rows}
    for model in ("trained", "untrained"):
        assert {(model, "cvpr", s) for s in ("box", "click 1", "click 2", "auc", "final")} <= seen
        assert {(model, "sam_med2d_points", s) for s in ("1 pt", "iter 2")} <= seen
    baselines = {(p, s) for m, p, s in seen if m == "baseline"}
    assert baselines == {("sam_med2d_box", "box"), ("sam_med2d_points", "1 pt"), ("cvpr", "box")}
    masks = {(r["key"], r["mask"]) for r in rows}
    assert len(rows) == len(masks) * (2 * (1 + 2 + 3 + 2) + 3)  # steps per model + baselines
    # a filled box scores what fill_box scores: above zero, below one
    fill = [float(r["dice"]) for r in rows if r["model"] == "baseline" and r["step"] == "box"]
    assert 0 < sum(fill) / len(fill) < 1

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = client.search_runs(client.search_experiments()[0].experiment_id)
    (train_run,) = [r for r in runs if r.data.tags.get("samadapt.kind") != "evaluation"]
    (eval_run,) = [r for r in runs if r.data.tags.get("samadapt.kind") == "evaluation"]
    assert eval_run.data.tags["samadapt.evaluation_of"] == train_run.info.run_id
    metrics = eval_run.data.metrics
    for key in (
        "trained/cvpr/final/dice",
        "untrained/cvpr/final/nsd",
        "baseline/sam_med2d_box/box/dice",
        "baseline/sam_med2d_points/1_pt/dice",
        "trained/cvpr/auc/dice",
    ):
        assert key in metrics, sorted(metrics)
    curve = client.get_metric_history(eval_run.info.run_id, "trained/cvpr/dice_vs_clicks")
    assert sorted(m.step for m in curve) == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id)}
    assert {"report.md", "masks.csv", "summary.csv", "summary.json", "overlays"} <= artifacts


def _same_scores(run_dir: Path, tmp_path: Path) -> None:
    from pipeline.eval.run import evaluate
    from samadapt.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    options = dict(split="val", max_samples=2, clicks=2, iter_point=2, track=False)
    ckpt = evaluate(cfg, run_dir / "checkpoints" / "step-0000002", out=tmp_path / "a", **options)
    export = evaluate(cfg, run_dir / "export" / "trainable.pt", out=tmp_path / "b", **options)
    assert [(r.key, r.step, r.dice) for r in ckpt.rows if r.model == "trained"] == [
        (r.key, r.step, r.dice) for r in export.rows if r.model == "trained"
    ]


def test_export_scores_as_its_checkpoint(run_dir, tmp_path):
    """The export and the checkpoint of one step are one model: the same per-mask scores."""
    _same_scores(run_dir, tmp_path)


def test_stage0_checkpoint_scores_as_its_export(small_shards, tmp_path):
    """ZeRO stage 0 (configs/quickstart.yaml) writes no ZeRO partitions: its checkpoint is read
    whole, and scores as the export of the same step."""
    run = _train_two_steps(small_shards, tmp_path / "run", "train.zero_stage=0")
    _same_scores(run, tmp_path)


def _one_line(capsys, argv: list[str]) -> str:
    code = main(["eval", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("samadapt eval:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_inputs_give_one_line(run_dir, tmp_path, capsys):
    config = str(run_dir / "config.yaml")
    missing = tmp_path / "nowhere" / "step-0000009"
    assert str(missing) in _one_line(capsys, [config, str(missing), *FAST])
    ckpt = str(run_dir / "checkpoints" / "step-0000002")
    assert "unknown split 'bogus'" in _one_line(capsys, [config, ckpt, "--split", "bogus"])
    # a checkpoint of another model: the config's decoder is wider than the trained one
    err = _one_line(capsys, [config, ckpt, "model.prompt_dim=64", *FAST])
    assert ckpt in err and "does not match" in err
    export = str(run_dir / "export" / "trainable.pt")
    err = _one_line(capsys, [config, export, "model.prompt_dim=64", *FAST])
    assert export in err and "model.prompt_dim" in err
    half = tmp_path / "step-0000001"
    half.mkdir()
    assert "COMPLETE" in _one_line(capsys, [config, str(half), *FAST])
    # a split the shards do not have: the manifest and the split are named
    err = _one_line(capsys, [config, ckpt, "--split", "test"])
    assert "manifest.json" in err and "'test'" in err
    # a checkpoint with a truncated file: named from the COMPLETE marker's sizes, nothing loaded
    damaged = tmp_path / "damaged" / "step-0000002"
    shutil.copytree(ckpt, damaged)
    optim = next(damaged.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:100])
    err = _one_line(capsys, [config, str(damaged), *FAST])
    assert f"damaged checkpoint: {optim}: 100 bytes" in err
