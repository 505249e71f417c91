"""The trainer runs whatever task ``train.mode`` names: its loop has no mode of its own.

A mode the trainer has never heard of is registered in ``pipeline.tasks.TASKS`` (inside the
worker process) and trained through the real ``Trainer`` on the tiny debug model, real shards,
DeepSpeed on gloo and MLflow: its loader, step, metrics and validation are the only ones that run,
its generator is checkpointed under its own name, and a resumed run continues its draws.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from conftest import ROOT, SMALL_SIZE
from mlflow.tracking import MlflowClient

from launch.local import free_port

SEED = 7


def _probe_class():
    """Built inside the worker (a spawned process imports this module fresh)."""
    from pipeline.data.stream import build_eval_loader, build_train_loader
    from pipeline.tasks import Task

    class ProbeTask(Task):
        """Pulls the encoder's embeddings towards zero; draws one number per step."""

        calls: list[tuple] = []

        def __init__(self, cfg, engine, env):
            self.data, self.engine, self.env = cfg.data, engine, env
            self.image_size = cfg.model.image_size
            self.draws = torch.Generator().manual_seed(SEED)
            self.generators = {"probe": self.draws}

        @classmethod
        def build(cls, cfg, *, engine, env, phases):
            return cls(cfg, engine, env)

        def loader(self, epoch, *, split=None):
            self.calls.append(("loader", epoch, split))
            kwargs: dict[str, Any] = dict(
                cfg=self.data,
                image_size=self.image_size,
                rank=self.env.rank,
                world_size=self.env.world_size,
                mode="semantic",
            )
            if split is not None:
                return build_eval_loader(split=split, **kwargs)
            return build_train_loader(epoch=epoch, **kwargs)

        def step(self, batch, *, step):
            self.calls.append(("step", step))
            embeddings = self.engine({"images": batch["image"]}, "encode")
            loss = embeddings.float().square().mean()
            self.engine.backward(loss)
            self.engine.step(("encoder_peft",), step=step)
            return {"loss": loss.detach(), "draw": torch.rand(1, generator=self.draws)}

        def metrics(self, outputs, batch, *, step):
            self.calls.append(("metrics", step))
            return {"loss": float(outputs["loss"]), "probe_draw": float(outputs["draw"])}

        def validate(self, loader, *, keep):
            self.calls.append(("validate", keep))
            return {"val/probe_images": float(sum(b["image"].shape[0] for b in loader))}, []

    return ProbeTask


def _worker(rank: int, port: int, shards: str, run_dir: str) -> None:
    from pipeline.distributed import DistEnv
    from pipeline.engine import init_distributed
    from pipeline.tasks import TASKS
    from pipeline.trainer import Trainer
    from samadapt.config import load_config

    env = DistEnv(rank, rank, 1, 1, "127.0.0.1", port, "gloo")
    init_distributed(env)
    probe = _probe_class()
    TASKS["probe"] = probe
    results = {}
    for steps, resume in ((2, ""), (3, "auto")):
        cfg = load_config(
            ROOT / "configs/debug.yaml",
            [
                f"run_dir={run_dir}",
                f"data.shards={shards}",
                f"model.image_size={SMALL_SIZE}",
                "data.num_workers=0",
                f"train.steps={steps}",
                "train.log_every=1",
                "train.val_every=2",
                "train.checkpoint_every=2",
                f"train.resume={resume}",
            ],
        )
        # The config's own check lists the modes a user may choose; this one exists only here.
        cfg.train.mode = "probe"
        probe.calls.clear()
        code = Trainer(cfg, env).train()
        results[steps] = {"code": code, "calls": list(probe.calls)}
    torch.save(results, Path(run_dir) / "probe.pt")


def test_trainer_runs_a_registered_task(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mp.spawn(_worker, args=(free_port(), str(small_shards), str(run_dir)), nprocs=1, join=True)
    results = torch.load(run_dir / "probe.pt", weights_only=False)

    # first run: the untrained model validated, 2 steps, validated and checkpointed at step 2,
    # through the task only
    first = results[2]
    assert first["code"] == 0
    assert first["calls"] == [
        ("loader", 0, "val"),
        ("validate", 4),
        ("loader", 0, None),
        ("step", 0),
        ("metrics", 0),
        ("step", 1),
        ("metrics", 1),
        ("loader", 0, "val"),
        ("validate", 4),
    ]
    state = torch.load(
        run_dir / "checkpoints" / "step-0000002" / "rank-00000.pt", weights_only=False
    )
    expected = torch.Generator().manual_seed(SEED)
    torch.rand(2, generator=expected)
    assert set(state["rng"]["generators"]) == {"probe"}
    assert torch.equal(state["rng"]["generators"]["probe"], expected.get_state())
    # resumed: the data position is replayed, the step continues, the draws continue
    second = results[3]
    assert second["code"] == 0
    assert second["calls"][:3] == [("loader", 0, None), ("step", 2), ("metrics", 2)]
    assert ("validate", 4) in second["calls"]  # the last step is validated (3 % val_every != 0)

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    history = {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in run.data.metrics
    }
    draws = torch.rand(3, generator=torch.Generator().manual_seed(SEED)).tolist()
    assert history["probe_draw"] == {1: draws[0], 2: draws[1], 3: draws[2]}
    assert sorted(history["loss"]) == [1, 2, 3]
    assert {"loss_step1", "ce", "focal", "val/dice", "val/dice_box"}.isdisjoint(history)
    manifest = json.loads((small_shards / "manifest.json").read_text())
    val_images = sum(s["samples"] for s in manifest["shards"] if s["split"] == "val")
    assert val_images > 0
    # step 0: the untrained model, validated once, before the first run's first step
    assert history["val/probe_images"] == {0: val_images, 2: val_images, 3: val_images}
    assert (run_dir / "export" / "trainable.pt").is_file()
