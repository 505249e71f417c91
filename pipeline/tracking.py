"""MLflow tracking, from rank 0 only.

``Tracker`` is the only MLflow code. On ranks other than 0, or with ``tracking.enabled: false``,
every call is a no-op, so the trainer calls it unconditionally. MLflow is imported on ``start``
(it takes seconds), through ``MlflowClient`` (no global active run).

Default store: ``sqlite:///RUN_DIR/mlflow.db`` with artifacts in ``RUN_DIR/mlartifacts``, so no
server is needed (MLflow 3's plain file store refuses to start without MLFLOW_ALLOW_FILE_STORE).
Point ``tracking.uri`` at a shared sqlite file or a server to compare the runs of a sweep; they
share ``tracking.experiment``. A password in the URI is masked (``pipeline.redact``) in every
param, tag, log line and error the tracker writes; a store that cannot be reached or used is one
``TrackingError`` line.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import TrackingConfig
from pipeline.distributed import get_world_size, is_main
from pipeline.redact import redact_uri

__all__ = ["Tracker", "TrackingError", "default_uri"]

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation), spelled out so we need not import it to chunk.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000


def default_uri(run_dir: str | Path) -> str:
    """``sqlite:///<absolute RUN_DIR>/mlflow.db``."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _artifact_location(cfg: TrackingConfig, uri: str, run_dir: Path) -> str | None:
    if cfg.artifact_location:
        return cfg.artifact_location
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None  # a server decides


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip() if out.returncode == 0 else ""
    return commit or None


def _text(value: Any, limit: int) -> str:
    text = redact_uri(value if isinstance(value, str) else str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TrackingError(RuntimeError):
    """The MLflow store of ``tracking.uri`` cannot be reached or used; one line, the URI's
    password masked."""


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Tracker:
    """An MLflow run on rank 0; does nothing elsewhere.

    Arguments:
      main: whether this process tracks (default: global rank 0).
    """

    def __init__(self, *, main: bool | None = None) -> None:
        self._main = is_main() if main is None else main
        self._client: Any = None
        self.run_id: str | None = None
        self.uri: str | None = None

    @property
    def active(self) -> bool:
        """True once ``start`` opened a run on this process."""
        return self._client is not None

    def start(
        self,
        *,
        cfg: TrackingConfig,
        run_dir: str | Path,
        params: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
        resume_run_id: str | None = None,
    ) -> str | None:
        """Open (or reopen) the run and log params and tags.

        Arguments:
          cfg: the tracking section.
          run_dir: the run directory (default store and artifacts live there).
          params: flat ``{"train.lr": 1e-4, ...}`` (``configtree.flatten(cfg)``).
          tags: extra tags; git commit, hostname, world size and SLURM_JOB_ID are added.
          resume_run_id: the run id saved in the checkpoint; its run continues (same id).

        Returns:
          The run id on the tracking rank, None elsewhere.
        """
        if not (self._main and cfg.enabled):
            return None
        _quiet_mlflow()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = cfg.uri or default_uri(run_dir)
        try:
            return self._start(cfg, run_dir, params, tags, resume_run_id)
        except Exception as err:  # MLflow, SQLAlchemy, requests and driver errors alike
            self._client = None
            lines = str(err).strip().splitlines() or [type(err).__name__]
            raise TrackingError(
                redact_uri(f"tracking.uri={self.uri}: MLflow failed: {lines[0]}")
            ) from None

    def _start(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        params: Mapping[str, Any],
        tags: Mapping[str, Any] | None,
        resume_run_id: str | None,
    ) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        all_tags = {**self._default_tags(), **(tags or {})}
        all_tags = {_text(k, _MAX_KEY): _text(v, _MAX_TAG_VALUE) for k, v in all_tags.items()}

        run = None
        if resume_run_id:
            try:
                run = client.get_run(resume_run_id)
            except MlflowException:
                log.warning(
                    "MLflow run %s not found in %s; starting a new run",
                    resume_run_id,
                    redact_uri(self.uri),
                )
                all_tags["samadapt.resumed_from"] = resume_run_id
        if run is None:
            experiment_id = self._experiment(client, cfg, run_dir)
            run = client.create_run(
                experiment_id, tags=all_tags, run_name=cfg.run_name or run_dir.resolve().name
            )
            previous: dict[str, str] = {}
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            for key, value in all_tags.items():
                client.set_tag(run.info.run_id, key, value)
            previous = dict(run.data.params)
        self._client = client
        self.run_id = run.info.run_id
        self._log_params(params, previous)
        log.info("MLflow run %s in %s", self.run_id, redact_uri(self.uri))
        return self.run_id

    @staticmethod
    def _default_tags() -> dict[str, Any]:
        tags: dict[str, Any] = {"host": socket.gethostname(), "world_size": get_world_size()}
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if os.environ.get("SLURM_JOB_ID"):
            tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        return tags

    @staticmethod
    def _experiment(client: Any, cfg: TrackingConfig, run_dir: Path) -> str:
        from mlflow.exceptions import MlflowException

        uri = cfg.uri or default_uri(run_dir)
        found = client.get_experiment_by_name(cfg.experiment)
        if found is None:
            try:
                return client.create_experiment(
                    cfg.experiment, artifact_location=_artifact_location(cfg, uri, run_dir)
                )
            except MlflowException:
                # Another run of the sweep created it first.
                found = client.get_experiment_by_name(cfg.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def _log_params(self, params: Mapping[str, Any], previous: dict[str, str]) -> None:
        from mlflow.entities import Param

        fresh: list[Param] = []
        changed: dict[str, str] = {}
        for key, value in params.items():
            key, text = _text(key, _MAX_KEY), _text(value, _MAX_PARAM_VALUE)
            if key not in previous:
                fresh.append(Param(key, text))
            elif previous[key] != text:
                changed[key] = f"{previous[key]} -> {text}"
        for start in range(0, len(fresh), _PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=fresh[start : start + _PARAMS_PER_BATCH])
        if changed:
            # MLflow params are write-once: the run's first values stay; what is in force now is
            # in RUN_DIR/config.yaml and in one tag per changed key.
            log.info("params changed on resume, recorded as tags: %s", list(changed))
            self._client.set_tag(
                self.run_id,
                "samadapt.params_changed_on_resume",
                _text(list(changed), _MAX_TAG_VALUE),
            )
            for key, text in changed.items():
                self._client.set_tag(
                    self.run_id,
                    _text(f"samadapt.changed_on_resume.{key}", _MAX_KEY),
                    _text(text, _MAX_TAG_VALUE),
                )

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars (floats, ints or 0-d tensors) at a training step."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(_text(k, _MAX_KEY), float(v), now, int(step)) for k, v in metrics.items()]
        for start in range(0, len(rows), _METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=rows[start : start + _METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local file (or folder) into the run's artifacts."""
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """Store a dict as a JSON or YAML artifact (by ``name``'s extension)."""
        if self.active:
            self._client.log_dict(self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        """Store a text artifact."""
        if self.active:
            self._client.log_text(self.run_id, text, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active:
            for key, value in tags.items():
                key, text = _text(key, _MAX_KEY), _text(value, _MAX_TAG_VALUE)
                self._client.set_tag(self.run_id, key, text)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run: FINISHED, FAILED or KILLED (preempted; resume reopens it)."""
        if not self.active:
            return
        self._client.set_terminated(self.run_id, status=status)
        self._client = None
