"""launch/: local ranks and submitit's local executor run an entry with a working process group."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from configtree import ConfigError
from launch import run
from launch.config import LaunchConfig
from launch.submit import Task, executor_parameters


def allreduce_entry(argv: list[str]) -> int:
    """Join the process group from the environment, all-reduce the rank, write what was seen."""
    import torch
    import torch.distributed as dist

    out = Path(argv[0])
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    record = {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "sum": value.item(),
        "argv": argv[1:],
    }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()
    return 0


def failing_entry(argv: list[str]) -> int:
    return 3 if os.environ.get("RANK") == "1" else 0


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


def test_local_ranks_form_a_process_group(tmp_path):
    code = run(
        cfg=LaunchConfig(mode="local", ranks=2),
        entry="tests.test_launch:allreduce_entry",
        argv=[str(tmp_path), "x=1"],
        run_dir=tmp_path,
    )
    assert code == 0
    records = _records(tmp_path)
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["argv"] == ["x=1"] for r in records)


def test_local_rank_failure_is_reported(tmp_path):
    code = run(
        cfg=LaunchConfig(mode="local", ranks=2),
        entry="tests.test_launch:failing_entry",
        argv=[],
        run_dir=tmp_path,
    )
    assert code == 3


def test_submitit_local_executor_runs_two_tasks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = run(
        cfg=LaunchConfig(mode="submitit_local", ranks=2, time_min=5, cpus_per_task=1),
        entry="tests.test_launch:allreduce_entry",
        argv=[str(out)],
        run_dir=tmp_path,
    )
    assert code == 0
    records = _records(out)
    assert [(r["rank"], r["world"], r["sum"]) for r in records] == [(0, 2, 3.0), (1, 2, 3.0)]


def test_requeue_appends_resume_once():
    task = Task("m:f", ["cfg.yaml", "a=1"], requeue_argv=["train.resume=auto"])
    again = task.checkpoint().function.checkpoint().function
    assert again.argv == ["cfg.yaml", "a=1", "train.resume=auto"]


def test_executor_parameters_for_slurm():
    cfg = LaunchConfig(mode="slurm", ranks=8, nodes=4, gpus_per_node=8, partition="gpu", mem_gb=0)
    params = executor_parameters(cfg, name="job")
    assert params["nodes"] == 4 and params["tasks_per_node"] == 8
    assert params["gpus_per_node"] == 8 and params["slurm_partition"] == "gpu"
    assert params["slurm_signal_delay_s"] > 0 and "mem_gb" not in params


def test_multi_node_needs_slurm(tmp_path):
    with pytest.raises(ConfigError, match="launch.nodes"):
        run(cfg=LaunchConfig(mode="local", nodes=2), entry="m:f", argv=[], run_dir=tmp_path)
