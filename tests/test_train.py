"""``samadapt train`` end to end: 2 CPU ranks, real DeepSpeed (gloo), real shards, real MLflow.

A tiny SAM learns a shape task (irregular textured shapes) from shards made in tmp_path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, SMALL_SIZE
from mlflow.tracking import MlflowClient

SIZE = SMALL_SIZE


def _overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"model.image_size={SIZE}",
        "data.num_workers=1",
        "launch.ranks=2",
        *extra,
    ]


def _train(
    shards: Path, run_dir: Path, *extra: str, timeout: float = 400
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "samadapt", "train", str(ROOT / "configs/debug.yaml")]
    cmd += _overrides(shards, run_dir, *extra)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _history(run_dir: Path, key: str) -> dict[int, float]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = client.search_runs(client.search_experiments()[0].experiment_id)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}


def test_interactive_zero2_learns_and_tracks(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    proc = _train(
        small_shards,
        run_dir,
        "train.steps=40",
        "train.log_every=1",
        "train.lr=1e-3",
        "train.checkpoint_every=20",
        "train.val_every=40",
        "train.zero_stage=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.data.params["train.zero_stage"] == "2"
    assert run.data.params["model.arch"] == "tiny"
    assert run.data.tags["world_size"] == "2"
    for i in range(1, 10):
        assert len(client.get_metric_history(run.info.run_id, f"loss_step{i}")) == 40
    # Every validation scores the model beside the untrained model (validated at step 0, kept)
    # and the trivial answers on the same masks; the run ends with the table of all of them.
    dice = _history(run_dir, "val/dice_box")
    assert sorted(dice) == [0, 40]
    assert _history(run_dir, "val/untrained/dice_box") == {40: dice[0]}
    fill_box = _history(run_dir, "val/baseline/dice_fill_box")
    fill_image = _history(run_dir, "val/baseline/dice_fill_image")
    assert sorted(fill_box) == sorted(fill_image) == [0, 40]
    assert fill_box[0] == fill_box[40] and 0 < fill_image[0] < fill_box[0] < 1
    assert "filling the prompt box" in proc.stderr and "untrained model" in proc.stderr
    loss = _history(run_dir, "loss")
    first = sum(loss[s] for s in range(1, 5)) / 4
    last = sum(loss[s] for s in range(33, 41)) / 8
    # debug.yaml's per-mask BCE + Dice + IoU falls over 40 steps from random weights (the BCE
    # term first); whether the model segments is read from validation, not from this.
    assert last < 0.95 * first, (first, last)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "deepspeed_config.json", "export"} <= artifacts
    overlays = client.list_artifacts(run.info.run_id, "overlays/step-0000040")
    assert len(overlays) == 4, "validation overlays were not logged"
    _check_export(run_dir / "export" / "trainable.pt")


def _check_export(path: Path) -> None:
    """The adapter export holds exactly the trainable tensors and loads onto a fresh model."""
    from pipeline.model import load_exported

    model = load_exported(path)
    assert set(model.trainable_state_dict()) == set(model.trainable_names)
    assert any("adapter" in name.lower() for name in model.trainable_names)


def _check_random_base(run_dir: Path) -> None:
    """The export of a random-base run carries the base the trainer initialised (gathered from
    ZeRO-3 partitions), so loading it never depends on the caller's seed."""
    import torch

    from pipeline.model import build_model
    from samadapt.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    assert cfg.model.checkpoint == ""
    base = torch.load(run_dir / "export" / "trainable.pt", weights_only=True)["base"]["tensors"]
    torch.manual_seed(cfg.seed)  # as Trainer.__init__
    initial = build_model(cfg=cfg.model).state_dict()
    assert base.keys() == initial.keys() - set(build_model(cfg=cfg.model).trainable_names)
    for name, tensor in base.items():
        assert torch.equal(tensor.float(), initial[name].float()), name


def test_interactive_zero3(small_shards, tmp_path):
    """ZeRO-3 on 2 ranks; its validation follows the eval section: point prompts only, with 2
    clicks, on at most 2 samples (one 2-image batch per rank) of the split."""
    run_dir = tmp_path / "run"
    args = ("train.steps=6", "train.log_every=1", "train.lr=1e-3", "train.zero_stage=3")
    evals = ("train.val_every=6", "eval.prompts=[point]", "eval.clicks=2", "data.point_num=2")
    proc = _train(small_shards, run_dir, *args, *evals, "eval.max_samples=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = _history(run_dir, "loss")
    assert sorted(loss) == list(range(1, 7))
    assert loss[6] < loss[1], loss
    _check_export(run_dir / "export" / "trainable.pt")
    _check_random_base(run_dir)
    assert _history(run_dir, "val/dice_point") and not _history(run_dir, "val/dice_box")
    from pipeline.data.stream import build_eval_loader
    from samadapt.config import load_config

    cfg = load_config(ROOT / "configs/debug.yaml", _overrides(small_shards, run_dir))
    batches = list(
        build_eval_loader(
            cfg=cfg.data, image_size=cfg.model.image_size, rank=0, world_size=1, batch_size=1
        )
    )
    per_sample = sorted(int(b["mask_valid"].sum()) for b in batches)
    assert len(per_sample) > 4
    validated = _history(run_dir, "val/masks")[6]  # step 0: the untrained model, same masks
    assert 0 < validated <= sum(per_sample[-4:]) < sum(per_sample)


def test_kill_and_resume_continues_exactly(small_shards, tmp_path):
    args = ("train.steps=8", "train.log_every=1", "train.checkpoint_every=2", "train.zero_stage=2")
    straight = tmp_path / "straight"
    proc = _train(small_shards, straight, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _history(straight, "loss")

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "samadapt", "train", str(ROOT / "configs/debug.yaml")]
    cmd += _overrides(small_shards, killed, *args)
    victim = subprocess.Popen(
        cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = killed / "checkpoints" / "step-0000004" / "COMPLETE"
    deadline = time.monotonic() + 300
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached its step-4 checkpoint"
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both ranks, no chance to clean up
    victim.wait()

    # a later save that was killed half-way: its folder is there, without the COMPLETE marker
    half = killed / "checkpoints" / "step-0000007"
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"half")
    proc = _train(small_shards, killed, *args, "train.resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step-0000007" not in proc.stderr
    resumed = _history(killed, "loss")
    assert sorted(resumed) == list(range(1, 9))
    # bitwise: the same floats, step for step, before and after the kill
    assert [resumed[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]


def test_impossible_combination_fails_at_start(small_shards, tmp_path):
    proc = _train(small_shards, tmp_path / "r", "model.head=auto")
    assert proc.returncode == 2
    assert "model.head=auto" in proc.stderr and "train.mode" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_fresh_start_never_overwrites_a_run(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-0000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-0000002" / "COMPLETE").write_text("2\n")
    before = sorted(p.name for p in run_dir.rglob("*"))
    proc = _train(small_shards, run_dir, "train.steps=4")
    assert proc.returncode == 2
    assert "train.resume=auto" in proc.stderr and "step-0000002" in proc.stderr
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_shards, tmp_path):
    """A base checkpoint whose frozen weights hold a NaN: the first step on it stops the run."""
    import torch

    from pipeline.model import build_model
    from samadapt.config import load_config

    cfg = load_config(
        ROOT / "configs/debug.yaml",
        [f"model.image_size={SIZE}", "model.peft=[]", "model.train_encoder=false"],
    )
    base = build_model(cfg=cfg.model).state_dict()
    torch.save(base, tmp_path / "good.pth")
    base["image_encoder.neck.0.weight"][0, 0] = float("nan")
    torch.save(base, tmp_path / "bad.pth")

    run_dir = tmp_path / "run"
    # the encoder frozen: a resumed checkpoint does not hold it, so the bad base is what runs
    common = (
        "launch.ranks=1",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "model.train_encoder=false",
    )
    good = _train(
        small_shards, run_dir, *common, "train.steps=2", f"model.checkpoint={tmp_path / 'good.pth'}"
    )
    assert good.returncode == 0, good.stderr[-3000:]
    proc = _train(
        small_shards,
        run_dir,
        *common,
        "train.steps=6",
        "train.resume=auto",
        f"model.checkpoint={tmp_path / 'bad.pth'}",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 2: non-finite loss at interaction step 1" in proc.stderr
    assert "SynthAbdomen/" in proc.stderr  # the batch's sample keys
    assert "the last good checkpoint is" in proc.stderr and "step-0000002" in proc.stderr
    complete = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("*/COMPLETE"))
    assert complete == ["step-0000002"]


def test_box_dice_rises_above_the_untrained_model(tmp_path):
    """Learning read from validation, not from the loss: from random weights, box-prompt Dice on
    held-out cases rises clearly above the untrained model's (which fills the image).

    One interaction step per batch, box prompts only: from random weights SAM-Med2D's nine-step
    loop does not learn here (Dice stays at the untrained value; see README, Status). Not above
    filling the prompt box (0.62 on these shapes): from random weights the decoder learns a box
    prior and the encoder no image features in this budget (a frozen random encoder does as
    well), which is the open part of the learning issue.
    """
    from samadapt.config import load_config
    from sharding.run import run_shard
    from sharding.synthetic import write_sa_med2d

    corpus = write_sa_med2d(tmp_path / "corpus", n_cases=40, slices_per_case=4, size=128, seed=0)
    cfg = load_config(
        ROOT / "configs/debug.yaml", ["sharding.image_size=128", "sharding.workers=1"]
    ).sharding
    shards = tmp_path / "shards"
    run_shard("sa-med2d", corpus, shards, cfg=cfg, workers=1)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "samadapt", "train", str(ROOT / "configs/debug.yaml")]
    cmd += [
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        "model.image_size=128",
        "data.num_workers=1",
        "train.steps=700",
        "train.interaction_steps=1",
        "train.first_prompt_box_prob=1",
        "train.val_every=700",
        "train.log_every=100",
        "train.checkpoint_every=0",
        "train.zero_stage=0",
        "eval.overlays=0",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dice = _history(run_dir, "val/dice_box")
    fill_image = _history(run_dir, "val/baseline/dice_fill_image")[700]
    assert abs(dice[0] - fill_image) < 0.02, (dice, fill_image)  # untrained: fills the image
    assert dice[700] > dice[0] + 0.2, dice
