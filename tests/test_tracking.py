"""MLflow tracking against a real sqlite store on disk, read back with MlflowClient."""

from __future__ import annotations

from pathlib import Path

import pytest

from configtree import flatten
from pipeline.config import TrackingConfig
from pipeline.tracking import Tracker, default_uri
from samadapt.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run logged, ended as preempted, resumed with the same id, then a second sweep run."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = TrackingConfig(experiment="sweep-1", run_name="lora-r4")
    params = flatten(load_config(ROOT / "configs" / "debug.yaml"))
    params.update({f"extra.p{i:03d}": i for i in range(120)})  # > 100: several log_batch calls
    params["extra.long"] = "x" * 7000  # over MLflow's 6000-character limit

    first = Tracker(main=True)
    run_id = first.start(cfg=cfg, run_dir=run_dir, params=params, tags={"sweep": "s1"})
    for step in (0, 5, 10):
        first.log_metrics({"loss": 1.0 / (step + 1), "loss/step_9": float(step)}, step=step)
    artifact = run_dir / "resolved.yaml"
    artifact.write_text("train:\n  steps: 20\n")
    first.log_artifact(artifact)
    first.log_dict({"zero_optimization": {"stage": 2}}, "deepspeed.json")
    first.log_text("hello", "notes/readme.txt")
    first.end("KILLED")

    resumed = Tracker(main=True)
    changed = {**params, "train.resume": "auto"}
    again = resumed.start(
        cfg=cfg, run_dir=run_dir, params=changed, tags={"sweep": "s1"}, resume_run_id=run_id
    )
    for step in (15, 20):
        resumed.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    resumed.end("FINISHED")

    other = Tracker(main=True)
    second = other.start(cfg=cfg, run_dir=run_dir, params={"train.lr": 0.1}, resume_run_id="gone")
    other.end()
    return run_dir, run_id, again, second


def client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=default_uri(run_dir))


def test_params_tags_and_store(tracked):
    run_dir, run_id, _, _ = tracked
    assert (run_dir / "mlflow.db").is_file()
    run = client(run_dir).get_run(run_id)
    params = run.data.params
    assert params["train.zero_stage"] == "2" and params["model.arch"] == "tiny"
    assert params["extra.p119"] == "119"
    assert len(params["extra.long"]) == 6000 and params["extra.long"].endswith("...")
    assert params["train.resume"] == ""  # params are write-once: the first value stays
    tags = run.data.tags
    assert tags["sweep"] == "s1" and tags["world_size"] == "1" and tags["host"]
    if (ROOT / ".git").exists():
        assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["samadapt.params_changed_on_resume"] == "['train.resume']"
    assert run.info.run_name == "lora-r4"


def test_metrics_continue_in_the_same_run(tracked):
    run_dir, run_id, again, _ = tracked
    assert again == run_id
    c = client(run_dir)
    history = c.get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 5, 10, 15, 20]
    assert {m.step: m.value for m in history}[20] == pytest.approx(1 / 21)
    assert [m.value for m in c.get_metric_history(run_id, "loss/step_9")] == [0.0, 5.0, 10.0]
    assert c.get_run(run_id).info.status == "FINISHED"


def test_artifacts_under_run_dir(tracked):
    run_dir, run_id, _, _ = tracked
    c = client(run_dir)
    top = {a.path for a in c.list_artifacts(run_id)}
    assert top == {"resolved.yaml", "deepspeed.json", "notes"}
    assert [a.path for a in c.list_artifacts(run_id, "notes")] == ["notes/readme.txt"]
    experiment = c.get_experiment(c.get_run(run_id).info.experiment_id)
    assert experiment.artifact_location == (run_dir / "mlartifacts").resolve().as_uri()
    stored = list((run_dir / "mlartifacts").rglob("resolved.yaml"))
    assert len(stored) == 1 and stored[0].read_text() == "train:\n  steps: 20\n"


def test_sweep_runs_share_the_experiment(tracked):
    run_dir, run_id, _, second = tracked
    c = client(run_dir)
    assert second != run_id
    experiment = c.get_experiment_by_name("sweep-1")
    runs = c.search_runs([experiment.experiment_id])
    assert {r.info.run_id for r in runs} == {run_id, second}
    # An unknown run id to resume (a moved store) starts a new run and says so.
    assert c.get_run(second).data.tags["samadapt.resumed_from"] == "gone"


def test_other_ranks_and_disabled_do_nothing(tmp_path):
    quiet = Tracker(main=False)
    assert quiet.start(cfg=TrackingConfig(), run_dir=tmp_path, params={"a": 1}) is None
    quiet.log_metrics({"loss": 1.0}, step=0)
    quiet.log_artifact(tmp_path / "missing.txt")
    quiet.end()
    off = Tracker(main=True)
    assert off.start(cfg=TrackingConfig(enabled=False), run_dir=tmp_path, params={}) is None
    off.log_text("x", "x.txt")
    assert not off.active and list(tmp_path.iterdir()) == []


SECRET_URIS = {
    "tracking.uri": "postgresql://user:secret1@db.example:5432/mlflow",
    "tracking.artifact_location": "s3://key:secret2@bucket/runs",
    "note": "pushed to https://user:p@ss-secret3@host.example/x and nowhere else",
}


def test_uri_passwords_are_masked_in_params_tags_logs_and_errors(tmp_path, monkeypatch, capsys):
    """What the tracker writes to MLflow and says in errors and logs never holds a password."""
    import logging

    from pipeline.distributed import setup_logging
    from pipeline.tracking import TrackingError

    tracker = Tracker(main=True)
    run_id = tracker.start(
        cfg=TrackingConfig(),
        run_dir=tmp_path,
        params=SECRET_URIS,
        tags={"note": SECRET_URIS["note"]},
    )
    tracker.end()
    run = client(tmp_path).get_run(run_id)
    assert run.data.params["tracking.uri"] == "postgresql://user:***@db.example:5432/mlflow"
    assert run.data.params["tracking.artifact_location"] == "s3://key:***@bucket/runs"
    assert run.data.tags["note"] == "pushed to https://user:***@host.example/x and nowhere else"
    stored = [*run.data.params.values(), *run.data.tags.values()]
    assert not any("secret" in value for value in stored)

    # A store that cannot be reached: one line, its password masked (MLflow's message has it).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from launch.local import free_port

    uri = f"http://user:secret4@127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as failed:
        Tracker(main=True).start(cfg=TrackingConfig(uri=uri), run_dir=tmp_path, params={})
    message = str(failed.value)
    assert message.startswith(f"tracking.uri={uri.replace('secret4', '***')}: MLflow failed")
    assert "secret" not in message and "\n" not in message

    # Log lines: ours and any library's, through the handler every rank installs.
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        setup_logging()
        logging.getLogger("sqlalchemy.x").warning("cannot reach %s", SECRET_URIS["tracking.uri"])
        err = capsys.readouterr().err
        assert "cannot reach postgresql://user:***@db.example:5432/mlflow" in err
        assert "secret" not in err
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])
