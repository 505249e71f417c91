"""Resuming and splitting ``samadapt shard``: a SIGKILLed run finished by a rerun, and a job
array of ``--shard-range`` runs, must give exactly the files of one uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samadapt.cli import main
from sharding import synthetic

ROOT = Path(__file__).resolve().parents[1]


def cli(argv: list[str]) -> int:
    """``samadapt shard ARGV`` in this process."""
    return main(["shard", *argv])


def make_corpus(fmt: str, root: Path) -> Path:
    if fmt == "sa-med2d":
        return synthetic.write_sa_med2d(
            root, n_cases=8, slices_per_case=4, size=320, masks_per_image=(3, 5), seed=11
        )
    return synthetic.write_nifti(root, n_cases=8, shape=(12, 96, 96), seed=12)


def argv(fmt: str, corpus: Path, out: Path, *extra: str, workers: int = 1) -> list[str]:
    per_shard = "4" if fmt == "sa-med2d" else "1"
    return [
        "--format", fmt, str(corpus), str(out), "image_size=64", f"inputs_per_shard={per_shard}",
        "--workers", str(workers), "--no-progress", *extra,
    ]  # fmt: skip


def subprocess_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "samadapt", "shard", *args]


def snapshot(out: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file a finished run leaves (the lock file aside)."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != ".finalize.lock"
    }


@pytest.fixture(scope="module", params=["sa-med2d", "nifti"])
def reference(request, tmp_path_factory):
    """(fmt, corpus, output of one uninterrupted in-process run)."""
    base = tmp_path_factory.mktemp(request.param)
    corpus = make_corpus(request.param, base / "corpus")
    out = base / "reference"
    assert cli(argv(request.param, corpus, out)) == 0
    return request.param, corpus, out


def group_running(pgid: int) -> bool:
    """Whether a process of process group ``pgid`` is still running (zombies aside)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):  # the process ended while we looked
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def _one_cpu() -> None:
    """Child setup: pin the run (and the pool workers it spawns) to one CPU."""
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


def kill_after_first_shard(args: list[str], out: Path, *, group: bool = True) -> int:
    """Run ``samadapt shard ARGS`` in a subprocess, SIGKILL it with all its processes (``group``)
    or the main process alone once a first shard is complete, wait until every process of the
    run is gone, and return how many shards were complete then.

    The run has its own process group (pool workers die with it, as under Slurm or the OOM
    killer) and is pinned to one CPU, so the 5 ms poll here keeps up with it even when the
    machine is busy: the shards left take several writing rounds, the poll a few ms.
    """
    proc = subprocess.Popen(
        subprocess_cmd(args),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_one_cpu,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("*/shard-*.json")):
            assert proc.poll() is None, "the run ended before writing a sidecar"
            assert time.monotonic() < deadline, "no sidecar after 300 s"
            time.sleep(0.005)
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # a killed worker may still finish the system call it was in: count once all are gone
    deadline = time.monotonic() + 60
    while group_running(proc.pid):
        assert time.monotonic() < deadline, "processes of the killed run still running"
        time.sleep(0.01)
    return len(list(out.glob("*/shard-*.json")))


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_then_rerun_matches_uninterrupted_run(reference, tmp_path, workers):
    fmt, corpus, ref = reference
    n_shards = len(json.loads((ref / "plan.json").read_text())["shards"])
    assert n_shards >= 6
    # the kill must land mid-way; should the run ever outpace the poll, start over (fresh folder)
    for attempt in range(3):
        out = tmp_path / f"killed-{attempt}"
        complete = kill_after_first_shard(argv(fmt, corpus, out, workers=workers), out)
        if complete < n_shards:
            break
    assert 1 <= complete < n_shards, "the kill should interrupt the run"
    assert not (out / "manifest.json").exists()
    before = {p: p.read_bytes() for p in out.glob("*/shard-*.tar")}
    assert cli(argv(fmt, corpus, out, workers=workers)) == 0
    # complete shards were kept as they were; stale temp files are gone
    for path, data in before.items():
        assert path.read_bytes() == data
    assert not list(out.rglob("*.tmp-*")) and not (out / "volumes" / ".tmp").exists()
    assert snapshot(out) == snapshot(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


def test_pool_workers_exit_when_only_the_parent_is_killed(reference, tmp_path):
    """kill -9 of the main process alone: its pool workers see it die and exit (none keeps
    writing queued shards or waits forever, racing a rerun); the rerun gives the same set."""
    fmt, corpus, ref = reference
    out = tmp_path / "killed"
    kill_after_first_shard(argv(fmt, corpus, out, workers=2), out, group=False)
    assert cli(argv(fmt, corpus, out, workers=2)) == 0
    assert snapshot(out) == snapshot(ref)


def test_job_array_matches_single_run(reference, tmp_path):
    fmt, corpus, ref = reference
    n = len(json.loads((ref / "plan.json").read_text())["shards"])
    k = n // 2
    out = tmp_path / "array"
    # two tasks of a job array, started together on the same output folder
    procs = [
        subprocess.Popen(
            subprocess_cmd(argv(fmt, corpus, out, "--shard-range", r)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (f"0:{k}", f"{k}:{n + 5}")
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
    assert snapshot(out) == snapshot(ref)


def test_concurrent_runs_with_overlapping_ranges(reference, tmp_path):
    """Two runs on one output whose ranges overlap (a rerun started while the first still runs,
    or job-array tasks with overlapping ranges): each skips the shards the other is writing and
    waits for them at the end; neither deletes the other's temp files, both finish, and the set
    is byte for byte the single run's."""
    fmt, corpus, ref = reference
    n = len(json.loads((ref / "plan.json").read_text())["shards"])
    out = tmp_path / "both"
    procs = [
        subprocess.Popen(
            subprocess_cmd(argv(fmt, corpus, out, "--shard-range", r)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ("0:", f"1:{n}")
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    # the full-range run always ends with the whole set; the other with its range complete
    assert "samples in" in results[0][0]
    assert not list(out.rglob("*.tmp-*"))
    assert snapshot(out) == snapshot(ref)


def test_range_runs_finalize_only_when_all_shards_exist(reference, tmp_path, capsys):
    fmt, corpus, ref = reference
    n = len(json.loads((ref / "plan.json").read_text())["shards"])
    out = tmp_path / "ranges"
    assert cli(argv(fmt, corpus, out, "--shard-range", "2:")) == 0
    assert f"{n - 2} of {n} shards" in capsys.readouterr().out
    assert not (out / "manifest.json").exists()
    assert cli(argv(fmt, corpus, out, "--shard-range", "0:2")) == 0
    assert "samples in" in capsys.readouterr().out
    assert snapshot(out) == snapshot(ref)
    # a rerun with nothing to do rewrites nothing
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert cli(argv(fmt, corpus, out)) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert snapshot(out) == snapshot(ref)


def test_tar_without_sidecar_and_damaged_shards(reference, tmp_path, capsys):
    import shutil

    fmt, corpus, ref = reference
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    manifest = json.loads((ref / "manifest.json").read_text())
    first, second = (out / manifest["shards"][i]["path"] for i in (0, 1))
    # killed between the tar's rename and its sidecar: the rerun checks the tar and keeps it
    first.with_suffix(".json").unlink()
    assert cli(argv(fmt, corpus, out)) == 0
    assert snapshot(out) == snapshot(ref)
    # the same, but the tar differs from what the inputs give: refuse, touch nothing
    data = bytearray(first.read_bytes())
    data[600] ^= 0xFF
    first.write_bytes(bytes(data))
    first.with_suffix(".json").unlink()
    capsys.readouterr()
    assert cli(argv(fmt, corpus, out)) == 1
    assert first.name in capsys.readouterr().err
    assert first.read_bytes() == bytes(data)
    assert not list(out.rglob("*.tmp-*"))
    # a truncated tar whose sidecar exists: named, not rewritten
    second.write_bytes(second.read_bytes()[:1024])
    assert cli(argv(fmt, corpus, out)) == 1
    err = capsys.readouterr().err
    assert second.name in err and "truncated" in err
    assert len(second.read_bytes()) == 1024
