"""A small trainer that counts steps, not epochs.

``Trainer(cfg, env).train()`` builds the model, the DeepSpeed engine, the task of ``train.mode``
(``pipeline/tasks``: its loader, step, metrics and validation) and the MLflow run, then loops:
``train_step`` -> log -> validate -> checkpoint, all called by name. The loop is the same for
every mode. The data position (epoch, batches taken in it), the step, the RNG streams (the
task's generators included) and the MLflow run id are in every checkpoint, so
``train.resume=auto`` continues exactly where a killed run was.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from configtree import dump_config, flatten
from pipeline.checkpoint import (
    latest_complete,
    load_checkpoint,
    read_meta,
    resolve_resume,
    save_checkpoint,
)
from pipeline.config import PipelineConfig
from pipeline.distributed import DistEnv
from pipeline.engine import build_engine
from pipeline.model import build_model, export_trainable
from pipeline.model.base import needs_frozen
from pipeline.overlay import write_overlays
from pipeline.preflight import check_config
from pipeline.process import EXIT_REQUEUE, install_signal_handlers, should_stop
from pipeline.redact import redact_uri
from pipeline.resume import Change, compare, resume_record
from pipeline.tasks import NonFiniteLoss, build_task
from pipeline.tracking import Tracker
from sharding.files import atomic_write_text

log = logging.getLogger(__name__)


__all__ = ["NonFiniteLoss", "Trainer", "TrainingStalled", "check_config"]


class TrainingStalled(RuntimeError):
    """The data stream gives no batches: training cannot make progress."""


# Epochs in a row that may give no batch before the run stops: with equal batches per rank
# (pipeline/data/stream.py) one is already a split without samples, but a loop must not spin.
EMPTY_EPOCHS = 3


class Trainer:
    def __init__(self, cfg: PipelineConfig, env: DistEnv):
        # build_model loads model.checkpoint right after, with the same checks
        check_config(cfg, world_size=env.world_size, weights=False)
        self.cfg = cfg
        self.env = env
        self.run_dir = Path(cfg.run_dir)
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg=cfg.model)
        groups = self.model.param_groups()
        self.phases = tuple(groups)
        self.engine = build_engine(
            model=self.model,
            param_groups=groups,
            train=cfg.train,
            batch_size=cfg.data.batch_size,
            env=env,
        )
        self.task = build_task(cfg, engine=self.engine, env=env, phases=self.phases)
        # saved in every checkpoint by name, restored on resume
        self.generators = self.task.generators

        self.tracker = Tracker(main=env.is_main)
        self.run_id: str | None = None
        self.stop_flag = install_signal_handlers()
        # Validation of the model before its first step ("val/dice_box", ... -> Dice), kept in
        # checkpoints: every later validation logs it again beside the model's own figures.
        self.untrained: dict[str, float] = {}

    # -- data ----------------------------------------------------------------------------------

    def _batches(self):
        """Endless batches; (epoch, batches_in_epoch) is the exact data position. Raises
        ``TrainingStalled`` after ``EMPTY_EPOCHS`` epochs in a row without a batch (sooner
        after a stop signal: no step would come to notice it)."""
        empty = 0
        while True:
            loader = self.task.loader(self.epoch)
            it = iter(loader)
            for _ in range(self.batches_in_epoch):  # resume: replay the consumed part
                next(it)
            fresh = self.batches_in_epoch == 0
            for batch in it:
                self.batches_in_epoch += 1
                yield batch
            if fresh and self.batches_in_epoch == 0:
                empty += 1
                if empty >= EMPTY_EPOCHS or self.stop_flag:
                    raise TrainingStalled(
                        f"{empty} epochs in a row (up to epoch {self.epoch}) gave no batch from "
                        f"split {self.cfg.data.train_split!r} of "
                        f"{self.cfg.data.shards or self.cfg.data.volumes} at step {self.step}: "
                        "nothing to train on"
                    )
            else:
                empty = 0
            self.epoch += 1
            self.batches_in_epoch = 0

    def data_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "untrained": dict(self.untrained),
        }

    # -- the loop ------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.task.step(batch, step=self.step)

    def _metrics(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, float]:
        metrics = self.task.metrics(out, batch, step=self.step)
        metrics.update({f"lr/{k}": v for k, v in self.engine.lr.items()})
        return metrics

    def train(self) -> int:
        cfg = self.cfg
        resumed = self._resume()
        if self.env.is_main:
            # What is in force, credentials of URIs masked (the same in MLflow's params)
            atomic_write_text(self.run_dir / "config.yaml", redact_uri(dump_config(cfg)))
        self.run_id = self.tracker.start(
            cfg=cfg.tracking,
            run_dir=self.run_dir,
            params=flatten(cfg),  # the tracker masks URI passwords in params and tags
            resume_run_id=resumed,
        )
        if self.tracker.active and self.step == 0:
            self.tracker.log_artifact(self.run_dir / "config.yaml")
            self.tracker.log_dict(self.engine.config, "deepspeed_config.json")

        images_per_step = cfg.data.batch_size * self.env.world_size
        batches = self._batches()
        window_start, window_images = time.perf_counter(), 0
        # Rank 0 only; tqdm's rate is batches/s, the postfix images/s, and it gives the ETA.
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not self.env.is_main or None,  # None: off when stderr is not a terminal
        )
        status = "FINISHED"
        try:
            if cfg.train.val_every and self.step == 0:
                # The untrained model is the first baseline every later figure is read against.
                self.untrained = _dice_only(self.validate())
            last = {}
            while self.step < cfg.train.steps:
                batch = next(batches)
                out = self.train_step(batch)
                metrics = self._metrics(out, batch)
                self.step += 1
                bar.update(1)
                window_images += images_per_step
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    metrics["images_per_s"] = window_images / max(elapsed, 1e-9)
                    window_start, window_images = time.perf_counter(), 0
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}"
                    )
                    self.tracker.log_metrics(metrics, step=self.step)
                    self._log_line(metrics)
                if cfg.train.val_every and self.step % cfg.train.val_every == 0:
                    last = self.validate()
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    self.checkpoint()
                if should_stop(self.stop_flag):
                    self.checkpoint()
                    status = "KILLED"
                    return self._preempted()
            if cfg.train.val_every and self.step % cfg.train.val_every != 0:
                last = self.validate()
            self._summary(last)
            if not (cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0):
                self.checkpoint()
            self._export()
            return 0
        except NonFiniteLoss as err:
            status = "FAILED"
            kept = latest_complete(self.run_dir)
            raise NonFiniteLoss(f"{err}; the last good checkpoint is {kept}") from None
        except BaseException:
            status = "FAILED"
            raise
        finally:
            bar.close()
            self.tracker.end(status)

    # -- called by name ------------------------------------------------------------------------

    def _log_line(self, metrics: dict[str, float]) -> None:
        if not self.env.is_main:
            return
        main = "loss" if "loss" in metrics else next(iter(metrics))
        log.info(
            "step %d/%d  %s %.4f  %.2f img/s  epoch %d",
            self.step,
            self.cfg.train.steps,
            main,
            metrics[main],
            metrics.get("images_per_s", math.nan),
            self.epoch,
        )

    def validate(self) -> dict[str, float]:
        cfg = self.cfg
        loader = self.task.loader(0, split=cfg.data.val_split)
        if cfg.eval.max_samples:  # this rank's share, in whole batches
            share = math.ceil(cfg.eval.max_samples / self.env.world_size)
            loader = islice(loader, math.ceil(share / cfg.data.batch_size))
        self.engine.eval()
        try:
            keep = cfg.eval.overlays if self.env.is_main else 0
            metrics, examples = self.task.validate(loader, keep=keep)
            if self.step > 0:
                metrics.update(
                    {
                        f"val/untrained/{k.removeprefix('val/')}": v
                        for k, v in self.untrained.items()
                    }
                )
            if examples and self.tracker.active:
                name = f"overlays/step-{self.step:07d}"
                for path in write_overlays(examples, self.run_dir / name):
                    self.tracker.log_artifact(path, artifact_path=name)
        finally:
            self.engine.train()
        self.tracker.log_metrics(metrics, step=self.step)
        if self.env.is_main:
            log.info("validation at step %d: %s", self.step, _short(metrics))
        return metrics

    def checkpoint(self) -> Path:
        return save_checkpoint(
            self.engine,
            run_dir=self.run_dir,
            step=self.step,
            data_state=self.data_state(),
            run_id=self.run_id,
            generators=self.generators,
            config=resume_record(self.cfg.train),
            keep=self.cfg.train.keep_checkpoints,
        )

    def _resume(self) -> str | None:
        path = resolve_resume(self.cfg.train.resume, self.run_dir)  # verified (collective)
        if path is None:
            return None
        # A key the checkpoint's files depend on must not change: refused before loading.
        changes = compare(read_meta(path).get("config", {}), self.cfg.train, where=path)
        resumed = load_checkpoint(self.engine, path, generators=self.generators)
        self.step = resumed.step
        self.epoch = int(resumed.data_state["epoch"])
        self.batches_in_epoch = int(resumed.data_state["batches_in_epoch"])
        self.untrained = dict(resumed.data_state.get("untrained", {}))
        self._log_changes(changes)
        return resumed.run_id

    def _log_changes(self, changes: list[Change]) -> None:
        """Say which optimisation keys differ from the checkpoint's: they apply from here on."""
        if not self.env.is_main:
            return
        for change in changes:
            log.warning(
                "%s changed on resume: %s -> %s, in force from step %d",
                change.key,
                change.saved,
                change.now,
                self.step,
            )

    def _summary(self, metrics: dict[str, float]) -> None:
        """The last lines of a run: the model's validation Dice beside the trivial answers'."""
        if not self.env.is_main or not metrics:
            return
        model = _dice_only(metrics)
        kinds = [k.removeprefix("val/dice").lstrip("_") or "dice" for k in model]
        rows = [(f"model at step {self.step}", list(model.values()))]
        if self.untrained:
            # a named base checkpoint (Meta's SAM, LiteMedSAM) untrained is its zero-shot score
            label = "zero-shot base" if self.cfg.model.checkpoint else "untrained model"
            rows.append((label, [self.untrained.get(k, math.nan) for k in model]))
        fill_box = metrics.get("val/baseline/dice_fill_box")
        if fill_box is not None:
            rows.append(
                ("filling the prompt box", [fill_box if k == "box" else math.nan for k in kinds])
            )
        fill_image = metrics.get("val/baseline/dice_fill_image")
        if fill_image is not None:
            rows.append(("filling the image", [fill_image] * len(kinds)))
        lines = ["validation Dice  " + " " * 16 + "".join(f"{k:>8}" for k in kinds)]
        for label, values in rows:
            cells = "".join("       -" if math.isnan(v) else f"{v:8.3f}" for v in values)
            lines.append(f"  {label:<31}{cells}")
        log.info("\n".join(lines))

    def _export(self) -> None:
        tensors = self.engine.trainable_state_dict()  # collective: gathers ZeRO-3 partitions
        # A random base is in no file: the export carries it (collective too, same on all ranks)
        frozen = (
            self.engine.frozen_state_dict() if needs_frozen(self.cfg.model.checkpoint) else None
        )
        if not self.env.is_main:
            return
        path = self.run_dir / "export" / "trainable.pt"
        meta = {"step": self.step, "run_id": self.run_id}
        export_trainable(self.engine.module, path, tensors=tensors, frozen=frozen, meta=meta)
        self.tracker.log_artifact(path, artifact_path="export")

    def _preempted(self) -> int:
        """After the checkpoint: hand the signal to whoever handled it before us (submitit
        requeues the job on SIGUSR1), else exit as if killed by it."""
        signum = self.stop_flag.signum or signal.SIGTERM
        self.stop_flag.restore()
        log.warning("checkpoint written at step %d; stopping on %s", self.step, signum)
        if signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signum)
        return EXIT_REQUEUE


def _dice_only(metrics: dict[str, float]) -> dict[str, float]:
    """The model's own Dice figures of a validation (``val/dice``, ``val/dice_box``, ...)."""
    return {k: v for k, v in metrics.items() if k.startswith("val/dice")}


def _short(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items())
