"""Checkpoints: exact resume (bitwise on CPU, fp32), the COMPLETE marker, retention, signals.

Two CPU ranks run the gated toy of test_engine.py with every kind of randomness a trainer has
(python, numpy, torch global RNG, a registered torch.Generator for the data). Run A trains 7 steps
and checkpoints at 2, 3, 4; run B builds a fresh engine with other weights and scrambled RNGs,
resumes from the latest complete checkpoint in the same run directory, finishes, and must end
bit-identical to A.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_engine import (
    BATCH,
    PLAN,
    WORLD,
    groups,
    make_toy,
    spawn_env,
    train_cfg,
)

from configtree import ConfigError
from launch.local import free_port
from pipeline.checkpoint import (
    COMPLETE,
    CheckpointError,
    checkpoint_dir,
    latest_complete,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from pipeline.checkpoint_marker import Marker, read_marker
from pipeline.distributed import barrier
from pipeline.engine import build_engine
from pipeline.process import install_signal_handlers, should_stop
from sharding.files import file_sha256

STEPS = 7
SAVE_AT = {2, 3, 4}
KEEP = 2
RUN_ID = "0123456789abcdef"


def seed_all(rank: int) -> torch.Generator:
    random.seed(7)  # draws the step plan: the same on every rank (collectives must match)
    np.random.seed(rank)
    torch.manual_seed(rank)
    return torch.Generator().manual_seed(1000 + rank)


def run_steps(
    engine,
    start: int,
    stop: int,
    data: dict,
    gen: torch.Generator,
    run_dir: Path,
    save_at: set[int],
) -> list[float]:
    """A miniature trainer: every RNG source feeds the batch or the plan."""
    rank = torch.distributed.get_rank()
    losses = []
    for step in range(start, stop):
        x = torch.randn(BATCH, 4, generator=gen) + 0.01 * torch.randn(BATCH, 4)
        y = torch.randn(BATCH, 2, generator=gen) * float(np.random.uniform(0.5, 1.5))
        plan = PLAN if random.random() < 0.5 else PLAN[:2]
        for mode, active in plan:
            loss = engine.forward(x, y, mode)
            engine.backward(loss)
            engine.step(active, step=step)
            losses.append(float(loss.detach()))
        data["samples"] += BATCH
        data["workers"][0] += BATCH
        if step + 1 in save_at:
            save_checkpoint(
                engine,
                run_dir=run_dir,
                step=step + 1,
                data_state={"samples": data["samples"], "workers": dict(data["workers"])},
                run_id=RUN_ID if rank == 0 else None,
                generators={"data": gen},
                extra={"best": 0.5},
                keep=KEEP,
            )
    return losses


def weights(engine) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in engine.module.parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)  # None at stage 0: the parameter is the master
            out.append((engine._stage0_master(p) if full is None else full).detach().clone())
    return out


# C resumes B's checkpoint with other optimizer settings: the config's apply, not the saved ones.
CHANGED = {"lr": 0.2, "weight_decay": 0.3, "adam_eps": 1e-6, "adam_betas": [0.8, 0.9]}


def _resume_worker(rank: int, port: int, root: str, stages: list[int]) -> None:
    env = spawn_env(rank, port)
    # Signals first: only rank 1 is told to stop, and every rank must agree to.
    flag = install_signal_handlers()
    assert not should_stop(flag)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    assert should_stop(flag) and (bool(flag) == (rank == 1))
    flag.restore()

    for stage in stages:
        run_dir = Path(root) / f"zero{stage}"
        train = train_cfg(zero_stage=stage, steps=STEPS, warmup_steps=2)

        # A: uninterrupted, checkpointing on the way.
        gen = seed_all(rank)
        model = make_toy()
        engine = build_engine(
            model=model, param_groups=groups(model), train=train, batch_size=BATCH, env=env
        )
        data = {"samples": 0, "workers": {0: 0}}
        losses_a = run_steps(engine, 0, STEPS, data, gen, run_dir, SAVE_AT)
        final_a = weights(engine)

        # A save killed half-way leaves a folder without COMPLETE: never picked, then replaced.
        if rank == 0:
            junk = checkpoint_dir(run_dir, STEPS)
            junk.mkdir()
            (junk / "half-written").write_text("x")
        barrier()

        # B: other weights, scrambled RNGs, then resume=auto.
        gen = torch.Generator().manual_seed(99)
        random.seed(99)  # scrambled, but alike on every rank (a failed restore must not hang)
        np.random.seed(99)
        torch.manual_seed(99)
        model = make_toy()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        engine = build_engine(
            model=model, param_groups=groups(model), train=train, batch_size=BATCH, env=env
        )
        path = resolve_resume("auto", run_dir)
        resumed = load_checkpoint(engine, path, generators={"data": gen})
        loaded_b = weights(engine)
        data = {
            "samples": resumed.data_state["samples"],
            "workers": dict(resumed.data_state["workers"]),
        }
        losses_b = run_steps(engine, resumed.step, STEPS, data, gen, run_dir, {STEPS})
        final_b = weights(engine)
        # The same step again (a stop signal right after a periodic save): kept as it is.
        again = save_checkpoint(engine, run_dir=run_dir, step=STEPS, data_state={}, keep=KEEP)
        assert again == checkpoint_dir(run_dir, STEPS)

        # C: B's checkpoint with other optimizer settings: the weights are the checkpoint's, the
        # hyper-parameters the config's (DeepSpeed alone would restore the saved ones).
        model = make_toy()
        engine_c = build_engine(
            model=model,
            param_groups=groups(model),
            train=train_cfg(zero_stage=stage, steps=STEPS, warmup_steps=2, **CHANGED),
            batch_size=BATCH,
            env=env,
        )
        load_checkpoint(engine_c, path, generators={"data": torch.Generator()})
        same_state = all(
            torch.equal(a, b) for a, b in zip(weights(engine_c), loaded_b, strict=True)
        )
        hyper_c = [
            {k: g[k] for k in ("phase", "base_lr", "weight_decay", "betas", "eps")}
            for g in engine_c.optimizer.param_groups
        ]
        if rank == 0:
            torch.save(
                {
                    "losses_a": losses_a,
                    "losses_b": losses_b,
                    "final_a": final_a,
                    "final_b": final_b,
                    "path": str(path),
                    "step": resumed.step,
                    "data": resumed.data_state,
                    "run_id": resumed.run_id,
                    "extra": resumed.extra,
                    "same_state_c": same_state,
                    "hyper_c": hyper_c,
                },
                Path(root) / f"zero{stage}.pt",
            )


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    root = tmp_path_factory.mktemp("ckpt")
    mp.spawn(_resume_worker, args=(free_port(), str(root), STAGES), nprocs=WORLD, join=True)
    return root, {stage: torch.load(root / f"zero{stage}.pt") for stage in STAGES}


STAGES = [0, 2, 3]


@pytest.mark.parametrize("stage", STAGES)
def test_resume_is_bitwise_exact(resumed_runs, stage):
    root, runs = resumed_runs
    run = runs[stage]
    assert run["path"] == str(checkpoint_dir(root / f"zero{stage}", 4))
    assert run["step"] == 4
    assert run["data"] == {"samples": 4 * BATCH, "workers": {0: 4 * BATCH}}
    assert run["run_id"] == RUN_ID and run["extra"] == {"best": 0.5}
    # The tail of A's loss curve is B's, bit for bit, and so are the final weights.
    tail = len(run["losses_b"])
    assert tail >= 2 * (STEPS - 4)
    assert run["losses_a"][-tail:] == run["losses_b"]
    for a, b in zip(run["final_a"], run["final_b"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stage", STAGES)
def test_optimizer_settings_changed_on_resume_apply(resumed_runs, stage):
    """train.lr, weight decay, betas and eps changed on resume are the ones in force; the
    weights still come from the checkpoint."""
    _, runs = resumed_runs
    run = runs[stage]
    assert run["same_state_c"]
    betas = tuple(CHANGED["adam_betas"])
    assert run["hyper_c"] == [
        {"phase": phase, "base_lr": 0.2, "weight_decay": 0.3, "betas": betas, "eps": 1e-6}
        for phase in ("a", "b")
    ]


@pytest.mark.parametrize("stage", STAGES)
def test_retention_and_half_written(resumed_runs, stage):
    root, _ = resumed_runs
    run_dir = root / f"zero{stage}"
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    # keep=2: step 2 and 3 pruned; the junk folder of step 7 was replaced by B's real save.
    assert names == ["step-0000004", "step-0000007"]
    last = checkpoint_dir(run_dir, 7)
    # The marker names the step and vouches for every file of the folder (size, sha256).
    marker = read_marker(last)
    assert isinstance(marker, Marker) and marker.step == 7
    on_disk = sorted(p.name for p in last.iterdir() if p.name != COMPLETE)
    assert sorted(marker.files) == on_disk
    for name, entry in marker.files.items():
        assert entry["bytes"] == (last / name).stat().st_size
        assert entry["sha256"] == file_sha256(last / name)
    assert not (last / "half-written").exists()
    assert sorted(p.name for p in last.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    assert json.loads((last / "meta.json").read_text())["world_size"] == WORLD
    # plain values and tensors only: readable without running code
    own = torch.load(last / "rank-00001.pt", weights_only=True)
    assert own["data"] == {"samples": STEPS * BATCH, "workers": {0: STEPS * BATCH}}

    # Take B's marker away: a half-written checkpoint is never picked.
    (last / COMPLETE).unlink()
    assert latest_complete(run_dir) == checkpoint_dir(run_dir, 4)
    assert resolve_resume("auto", run_dir) == checkpoint_dir(run_dir, 4)
    with pytest.raises(ConfigError, match=r"train\.resume: .*step-0000007 has no COMPLETE"):
        resolve_resume(str(last), run_dir)
    with pytest.raises(CheckpointError, match="no COMPLETE marker"):
        load_checkpoint(None, last)
    # This process is one rank; the checkpoint was written by two.
    with pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 1"):
        load_checkpoint(None, checkpoint_dir(run_dir, 4))


def test_resolve_resume_plain(tmp_path):
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing saved yet: fresh start
    with pytest.raises(ConfigError, match=r"train\.resume: .*nope is not a checkpoint folder"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    for step in (5, 10, 15, 20):
        folder = checkpoint_dir(tmp_path, step)
        folder.mkdir(parents=True)
        if step != 20:
            (folder / COMPLETE).write_text(f"{step}\n")
    stale = checkpoint_dir(tmp_path, 1)
    stale.mkdir()  # incomplete and older than a complete one: a dead save
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step-0000001", "step-0000005"]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    # step 20 has no marker but is newer than every complete one: maybe a save in progress.
    assert left == ["step-0000010", "step-0000015", "step-0000020"]
    assert latest_complete(tmp_path) == checkpoint_dir(tmp_path, 15)
