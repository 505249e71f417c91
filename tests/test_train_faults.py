"""``samadapt train`` on bad inputs and faults: one line naming the file, key or step, nothing
run from a file, nothing lost (issue 13, the training side).

Real shards (the project's synthetic writer and shard code), real DeepSpeed (gloo, one rank),
real MLflow (sqlite). One short trained run (``trained``) is copied for each fault.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL_SIZE
from mlflow.tracking import MlflowClient

from pipeline.checkpoint_marker import find_damage, hash_files, read_marker, write_marker
from samadapt.cli import main
from samadapt.config import load_config

STEP_1 = "step-0000001"
STEP_2 = "step-0000002"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def _overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.shards={shards}",
        f"model.image_size={SMALL_SIZE}",
        "data.num_workers=1",
        "launch.ranks=1",
        "train.interaction_steps=1",  # one optimizer step per batch: the fastest real step
        "train.log_every=1",
        "train.val_every=0",
        *extra,
    ]


def _train(shards: Path, run_dir: Path, *extra: str, env: dict | None = None, timeout=600):
    cmd = [sys.executable, "-m", "samadapt", "train", str(ROOT / "configs/debug.yaml")]
    cmd += _overrides(shards, run_dir, *extra)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    """The one ERROR line of a failed run (and no traceback anywhere)."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _config_error(capsys, shards: Path, run_dir: Path, *extra: str, kind="config error:") -> str:
    """``samadapt train`` stopping before anything is built: one line, exit 2."""
    code = main(["train", str(ROOT / "configs/debug.yaml"), *_overrides(shards, run_dir, *extra)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"samadapt train: {kind}") and "\n" not in err, err
    return err


def _entries(run_dir: Path, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def _history(run_dir: Path, key: str) -> dict[int, float]:
    return dict(_entries(run_dir, key))


@pytest.fixture(scope="module")
def trained(small_shards, tmp_path_factory) -> Path:
    """Two steps on one rank at ZeRO-2 with a checkpoint after each."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = _train(small_shards, run_dir, "train.steps=2", "train.checkpoint_every=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


@pytest.fixture(scope="module")
def half_rejected(tmp_path_factory) -> Path:
    """A shard set whose val split lost every input (corrupt files): its shards hold 0 samples."""
    from sharding.run import run_shard
    from sharding.synthetic import write_sa_med2d

    root = tmp_path_factory.mktemp("half")
    corpus = write_sa_med2d(root / "corpus", n_cases=6, slices_per_case=2, size=64, seed=3)
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        [
            f"sharding.image_size={SMALL_SIZE}",
            "sharding.workers=1",
            "sharding.val_fraction=0.3",
            "sharding.test_fraction=0",
        ],
    ).sharding
    run_shard("sa-med2d", corpus, root / "first", cfg=cfg, workers=1)
    val_sources = []
    for tar in sorted((root / "first" / "val").glob("*.tar")):
        with tarfile.open(tar) as members:
            for member in members.getmembers():
                if member.name.endswith(".json"):
                    val_sources.append(json.loads(members.extractfile(member).read())["source"])
    assert val_sources
    for source in val_sources:
        Path(source).write_bytes(b"not a png")
    out = root / "shards"
    run_shard("sa-med2d", corpus, out, cfg=cfg, workers=1)
    totals = json.loads((out / "manifest.json").read_text())["totals"]["by_split"]
    assert totals["val"]["samples"] == 0 and totals["val"]["shards"] >= 1
    assert totals["train"]["samples"] > 0
    return out


# --------------------------------------------------------------------------------------------
# Bad inputs stop before anything is built
# --------------------------------------------------------------------------------------------


def test_bad_inputs_stop_at_start_in_one_line(half_rejected, tmp_path, capsys):
    run_dir = tmp_path / "run"
    err = _config_error(capsys, half_rejected, run_dir, "data.train_split=val")
    assert "data.train_split=val" in err and "has no samples" in err and str(half_rejected) in err
    err = _config_error(capsys, half_rejected, run_dir, "data.val_split=test", "train.val_every=2")
    assert "data.val_split=test" in err and "no shards for split 'test'" in err
    err = _config_error(capsys, half_rejected, run_dir, "data.val_split=val", "train.val_every=2")
    assert "data.val_split=val" in err and "has no samples" in err

    # a base checkpoint is named as the file it is (pipeline/model/weights.py)
    missing = tmp_path / "nowhere.pth"
    args = (capsys, half_rejected, run_dir)
    err = _config_error(*args, f"model.checkpoint={missing}", kind="")
    assert err == f"samadapt train: {missing}: checkpoint file not found"
    err = _config_error(*args, f"model.checkpoint={tmp_path}", kind="")
    assert err.startswith(f"samadapt train: {tmp_path} is a folder, not a weights file")
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    err = _config_error(*args, f"model.checkpoint={text}", kind="")
    assert err.startswith(f"samadapt train: {text}: not a readable PyTorch checkpoint")
    assert not run_dir.exists()


def test_resume_changes_that_cannot_apply_stop_at_start(trained, small_shards, capsys):
    before = sorted(str(p) for p in trained.rglob("*"))
    err = _config_error(capsys, small_shards, trained, "train.resume=auto", "launch.ranks=2")
    assert f"{trained / 'checkpoints' / STEP_2} was saved by 1 ranks, this run has 2" in err
    err = _config_error(capsys, small_shards, trained, "train.resume=auto", "train.zero_stage=3")
    assert "train.zero_stage=3, but checkpoint" in err and "train.zero_stage=2" in err
    assert sorted(str(p) for p in trained.rglob("*")) == before


# --------------------------------------------------------------------------------------------
# Checkpoints: nothing runs from them, damage is found and skipped
# --------------------------------------------------------------------------------------------


class _Payload:
    """Unpickled, it runs a shell command that writes ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo ran > {self.target}",))


def _plant(ckpt: Path, name: str, target: Path) -> None:
    """Replace one file of a checkpoint by a crafted one, and vouch for it in the marker (as an
    attacker would), so that only the code in it can refuse it."""
    torch.save({"step": 2, "rank": 0, "data": {}, "rng": _Payload(target)}, ckpt / name)
    write_marker(ckpt, 2, hash_files(ckpt))


@pytest.mark.parametrize("name", ["rank-00000.pt", MODEL])
def test_crafted_checkpoint_is_refused_and_runs_nothing(trained, small_shards, tmp_path, name):
    # The payload is live: loaded the old way, it runs.
    probe, proof = tmp_path / "probe.pt", tmp_path / "proof"
    torch.save({"x": _Payload(proof)}, probe)
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.load({str(probe)!r}, weights_only=False)"],
        check=True,
    )
    assert proof.is_file()

    run_dir = _copy(trained, tmp_path / "run")
    ckpt, target = run_dir / "checkpoints" / STEP_2, tmp_path / "target"
    _plant(ckpt, name, target)
    proc = _train(small_shards, run_dir, "train.steps=3", f"train.resume={ckpt}")
    line = _error_line(proc, 2)
    assert f"{ckpt / name}: refused: loading it would run code (posix.system)" in line
    assert not target.exists()


def test_damaged_checkpoint_falls_back_and_changed_lr_applies(trained, small_shards, tmp_path):
    run_dir = _copy(trained, tmp_path / "run")
    damaged = run_dir / "checkpoints" / STEP_2 / OPTIM
    size = damaged.stat().st_size
    with damaged.open("r+b") as f:
        f.truncate(size // 2)
    proc = _train(
        small_shards,
        run_dir,
        "train.steps=3",
        "train.resume=auto",
        "train.lr=0.002",
        "train.checkpoint_every=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one line names the file and the step, one says where it went instead
    (named,) = [line for line in proc.stderr.splitlines() if "is damaged" in line]
    assert f"checkpoint {STEP_2} (step 2) is damaged: {damaged}: {size // 2} bytes" in named
    assert f"falling back to checkpoint {run_dir / 'checkpoints' / STEP_1} (step 1)" in proc.stderr
    assert f"resumed from {run_dir / 'checkpoints' / STEP_1}" in proc.stderr
    assert "train.lr changed on resume: 0.001 -> 0.002, in force from step 1" in proc.stderr
    # the lost step was trained again and saved intact; the lr in force is the new one
    marker = read_marker(run_dir / "checkpoints" / STEP_2)
    assert marker is not None and marker.files and OPTIM in marker.files
    assert find_damage(run_dir / "checkpoints" / STEP_2, marker) is None
    assert sorted(_history(run_dir, "loss")) == [1, 2, 3]
    # step 2 was logged twice: before the damage (0.001) and when trained again (0.002)
    lr = {(step, round(value, 6)) for step, value in _entries(run_dir, "lr/mask_decoder")}
    assert lr == {(1, 0.001), (2, 0.001), (2, 0.002), (3, 0.002)}
    assert load_config(run_dir / "config.yaml").train.lr == 0.002
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.data.params["train.lr"] == "0.001"  # write-once: the first value
    assert run.data.tags["samadapt.changed_on_resume.train.lr"] == "0.001 -> 0.002"

    # Every complete checkpoint damaged: one line, nothing trained.
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        with (ckpt / OPTIM).open("r+b") as f:
            f.truncate(100)
    proc = _train(small_shards, run_dir, "train.steps=5", "train.resume=auto")
    line = _error_line(proc, 2)
    assert "no intact checkpoint in" in line and STEP_2 in line and "step-0000003" in line


# --------------------------------------------------------------------------------------------
# No loop spins; a stop signal is honoured
# --------------------------------------------------------------------------------------------


def test_a_split_without_batches_stops_the_loop(half_rejected, tmp_path):
    """With the start checks taken away, an empty split still cannot spin: the loop stops."""
    script = (
        "import sys\n"
        "import pipeline.trainer as trainer\n"
        "trainer.check_config = lambda cfg, **kw: None  # what would refuse this split first\n"
        "from pipeline.train import run_rank\n"
        "from samadapt.config import load_config\n"
        f"cfg = load_config({str(ROOT / 'configs/debug.yaml')!r}, sys.argv[1:])\n"
        "sys.exit(run_rank(cfg))\n"
    )
    args = _overrides(half_rejected, tmp_path / "run", "data.train_split=val", "train.steps=5")
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = _error_line(proc, 4)
    assert "3 epochs in a row" in line and "gave no batch from split 'val'" in line
    assert "at step 0" in line


def test_sigterm_checkpoints_and_stops(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "samadapt", "train", str(ROOT / "configs/debug.yaml")]
    cmd += _overrides(small_shards, run_dir, "train.steps=1000", "train.checkpoint_every=0")
    log_path = tmp_path / "stderr.txt"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 500
        while "step 1/1000" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
    stderr = log_path.read_text()
    assert code == 75, stderr[-3000:]
    assert "got SIGTERM" in stderr and "Traceback" not in stderr
    (ckpt,) = (run_dir / "checkpoints").glob("step-*/COMPLETE")
    step = read_marker(ckpt.parent).step
    assert 1 <= step < 1000 and f"checkpoint written at step {step}" in stderr


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------


def test_tracking_password_is_never_written(small_shards, tmp_path):
    """A store that cannot be reached, with a password in tracking.uri: the run stops in one
    line, and neither that line, nor any log line, nor RUN_DIR/config.yaml holds the password."""
    from launch.local import free_port

    run_dir = tmp_path / "run"
    uri = f"http://user:s3cr3t@127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = _train(small_shards, run_dir, "train.steps=2", f"tracking.uri={uri}", env=env)
    line = _error_line(proc, 2)
    assert "tracking.uri=http://user:***@127.0.0.1:" in line and "MLflow failed" in line
    assert "s3cr3t" not in proc.stderr + proc.stdout
    assert "uri: http://user:***@127.0.0.1:" in (run_dir / "config.yaml").read_text()
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and b"s3cr3t" in p.read_bytes()]
    assert not leaked
