"""The interaction loop on a real DeepSpeed engine: order, prompts, and who may move when, for
SAM-Med2D's nine steps and for MSA's one click (one mask, frozen prompt encoder, low-res BCE).

A recorder wraps the real engine (it only forwards and writes down): it sees every forward's
prompts and outputs and every update's active phases, and snapshots weights and Adam state after
each update, so the rules of pipeline/steps.py are checked on what actually ran.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from conftest import ROOT, SMALL_SIZE

from launch.local import free_port
from pipeline.distributed import DistEnv
from pipeline.engine import init_distributed
from samadapt.config import load_config

N_STEPS = 9


class Recorder:
    def __init__(self, engine):
        self.engine = engine
        self.forwards: list[dict] = []
        self.updates: list[tuple[str, ...]] = []
        self.snapshots: list[dict[str, dict[str, torch.Tensor]]] = []

    @property
    def device(self):
        return self.engine.device

    def __call__(self, inputs, mode):
        points = inputs.get("points")
        out = self.engine(inputs, mode)
        record = {
            "mode": mode,
            "box": inputs.get("boxes") is not None,
            "points": None if points is None else points[1].clone(),
            "mask": inputs.get("mask_inputs") is not None,
            "frozen_pe": bool(inputs.get("frozen_prompt_encoder", False)),
        }
        if mode in ("prompt", "decode"):  # the decoder's output: (P, K, S/4, S/4) logits, iou
            record["logits"], record["iou"] = out[0].detach().clone(), out[1].detach().clone()
        self.forwards.append(record)
        return out

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self, active, *, step):
        self.updates.append(tuple(sorted(active)))
        self.engine.step(active, step=step)
        self.snapshots.append(self._snapshot())

    def _snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per phase: the fp32 master partition and its Adam moments and step count."""
        inner = self.engine.optimizer
        out = {}
        for group in inner.param_groups:
            flat = torch.cat([p.detach().flatten().clone() for p in group["params"]])
            states = [inner.state.get(p, {}) for p in group["params"]]
            moments = [s["exp_avg"].flatten().clone() for s in states if "exp_avg" in s]
            out[group["phase"]] = {
                "weights": flat,
                "exp_avg": torch.cat(moments) if moments else torch.zeros(0),
                "step": torch.tensor([float(s.get("step", 0)) for s in states]),
            }
        return out


def _worker(rank: int, port: int, shards: str, out: str) -> None:
    from pipeline.data.stream import build_train_loader
    from pipeline.engine import build_engine
    from pipeline.model import build_model
    from pipeline.steps import interactive_step

    env = DistEnv(rank, rank, 1, 1, "127.0.0.1", port, "gloo")
    init_distributed(env)
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        [
            f"data.shards={shards}",
            f"model.image_size={SMALL_SIZE}",
            "data.num_workers=0",
            "train.lr=1e-2",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg=cfg.model)
    groups = model.param_groups()
    engine = build_engine(
        model=model, param_groups=groups, train=cfg.train, batch_size=cfg.data.batch_size, env=env
    )
    loader = build_train_loader(
        cfg=cfg.data, image_size=cfg.model.image_size, rank=0, world_size=1
    )
    batch = next(iter(loader))
    records = []
    for seed in range(3):  # three batches: different plans
        rec = Recorder(engine)
        interactive_step(
            rec,
            batch,
            train=cfg.train,
            step=seed,
            plan_generator=torch.Generator().manual_seed(seed),
            click_generator=torch.Generator().manual_seed(seed),
            phases=tuple(groups),
        )
        records.append(
            {
                "forwards": rec.forwards,
                "updates": rec.updates,
                "snapshots": rec.snapshots,
                "phases": tuple(groups),
            }
        )
    torch.save(records, out)


def test_nine_steps_order_prompts_and_update_rule(small_shards, tmp_path):
    out = tmp_path / "records.pt"
    mp.spawn(_worker, args=(free_port(), str(small_shards), str(out)), nprocs=1, join=True)
    records = torch.load(out, weights_only=False)
    for rec in records:
        fw, updates, snaps = rec["forwards"], rec["updates"], rec["snapshots"]
        phases = rec["phases"]
        assert set(phases) == {"encoder_peft", "prompt_encoder", "mask_decoder"}
        assert len(fw) == N_STEPS and len(updates) == N_STEPS
        assert all(f["logits"].shape[1] == 3 for f in fw)  # model.multimask (SAM-Med2D): 3 masks

        # step 1: encoder + prompt in one forward, a box XOR one foreground point, no mask
        first = fw[0]
        assert first["mode"] == "prompt" and not first["mask"] and not first["frozen_pe"]
        assert first["box"] != (first["points"] is not None)
        if first["points"] is not None:
            assert first["points"].shape[1] == 1 and bool((first["points"] == 1).all())
        assert updates[0] == tuple(sorted(phases))

        # steps 2-9: decoder only, previous mask always fed, never a box
        mask_only = []
        for i, f in enumerate(fw[1:], start=1):
            assert f["mode"] == "decode" and f["mask"] and f["frozen_pe"] and not f["box"]
            assert updates[i] == ("mask_decoder",)
            if f["points"] is None:
                mask_only.append(i)
            else:
                assert f["points"].shape[1] in (1, 3, 5, 9)
                assert set(f["points"].unique().tolist()) <= {-1, 0, 1}
        assert mask_only[-1] == N_STEPS - 1, "the last step is mask-only"
        assert len(mask_only) == 2 and 2 <= mask_only[0] <= N_STEPS - 2

        # the update rule: after step 1, nothing but the mask decoder moves, Adam state included
        for phase in ("encoder_peft", "prompt_encoder"):
            ref = snaps[0][phase]
            for later in snaps[1:]:
                for key in ("weights", "exp_avg", "step"):
                    assert torch.equal(later[phase][key], ref[key]), (phase, key)
        decoder = [s["mask_decoder"]["weights"] for s in snaps]
        assert all(not torch.equal(a, b) for a, b in zip(decoder[:-1], decoder[1:], strict=True))
    # the plan differs between batches (seeded per batch here)
    kinds = {
        (
            r["forwards"][0]["box"],
            tuple(
                i
                for i, f in enumerate(r["forwards"])
                if f["points"] is None and f["mode"] == "decode"
            ),
        )
        for r in records
    }
    assert len(kinds) > 1


# MSA's step (configs/recipes/msa.yaml) on the tiny model: one click, one mask, prompt encoder
# frozen, BCE (pos_weight 2) alone, on the decoder's S/4 grid.
MSA = [
    "model.multimask=false",
    "model.train_prompt_encoder=false",
    "train.interaction_steps=1",
    "train.first_prompt_box_prob=0",
    "train.loss.bce_weight=1",
    "train.loss.dice_weight=0",
    "train.loss.iou_weight=0",
    "train.loss.pos_weight=2",
    "train.loss_resolution=low_res",
]


def _msa_worker(rank: int, port: int, shards: str, out: str) -> None:
    import torch.nn.functional as F

    from pipeline.data.stream import build_eval_loader, build_train_loader
    from pipeline.engine import build_engine
    from pipeline.evaluate import validate_interactive
    from pipeline.model import build_model
    from pipeline.steps import build_loss, interactive_step, prompts_of, to_low_res

    env = DistEnv(rank, rank, 1, 1, "127.0.0.1", port, "gloo")
    init_distributed(env)
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        [f"data.shards={shards}", f"model.image_size={SMALL_SIZE}", "data.num_workers=0", *MSA],
    )
    torch.manual_seed(0)
    model = build_model(cfg=cfg.model)
    groups = model.param_groups()
    engine = build_engine(
        model=model, param_groups=groups, train=cfg.train, batch_size=cfg.data.batch_size, env=env
    )
    loader = build_train_loader(cfg=cfg.data, image_size=cfg.model.image_size, rank=0, world_size=1)
    batch = next(iter(loader))
    target = prompts_of(batch)["target"]
    loss_fn = build_loss(cfg.train)
    records = []
    for seed in range(3):
        rec = Recorder(engine)
        outputs = interactive_step(
            rec,
            batch,
            train=cfg.train,
            step=seed,
            plan_generator=torch.Generator().manual_seed(seed),
            click_generator=torch.Generator().manual_seed(seed),
            phases=tuple(groups),
        )
        (first,) = rec.forwards
        low, iou = first["logits"], first["iou"]
        size = SMALL_SIZE // 4
        full = F.interpolate(low, (SMALL_SIZE, SMALL_SIZE), mode="bilinear", align_corners=False)
        records.append(
            {
                "forwards": rec.forwards,
                "updates": rec.updates,
                "phases": tuple(groups),
                "loss": outputs["loss_steps"],
                "low_res_loss": loss_fn(low, to_low_res(target, size), iou)[0],
                "input_loss": loss_fn(full, target, iou)[0],
                "frozen_pe": all(not p.requires_grad for p in model.prompt_encoder.parameters()),
            }
        )
    rec = Recorder(engine)
    metrics, _ = validate_interactive(
        rec, build_eval_loader(cfg=cfg.data, image_size=cfg.model.image_size, rank=0, world_size=1)
    )
    torch.save({"steps": records, "val_forwards": rec.forwards, "val": metrics}, out)


def test_msa_one_click_single_mask_low_res_bce(small_shards, tmp_path):
    out = tmp_path / "records.pt"
    mp.spawn(_msa_worker, args=(free_port(), str(small_shards), str(out)), nprocs=1, join=True)
    saved = torch.load(out, weights_only=False)
    for rec in saved["steps"]:
        assert set(rec["phases"]) == {"encoder_peft", "mask_decoder"} and rec["frozen_pe"]
        (fw,) = rec["forwards"]  # one forward, one update per batch
        assert fw["mode"] == "prompt" and not fw["box"] and not fw["mask"]
        assert fw["points"].shape[1] == 1 and bool((fw["points"] == 1).all())
        assert fw["logits"].shape[1:] == (1, SMALL_SIZE // 4, SMALL_SIZE // 4)
        assert fw["iou"].shape[1] == 1
        assert rec["updates"] == [("encoder_peft", "mask_decoder")]
        # the loss is the BCE on the S/4 grid against the nearest-resized masks, not the loss of
        # the logits resized up to the masks
        (loss,) = rec["loss"].tolist()
        assert abs(loss - float(rec["low_res_loss"])) < 1e-5
        assert abs(float(rec["low_res_loss"]) - float(rec["input_loss"])) > 1e-4
    # validation scores the single mask too
    decodes = [f for f in saved["val_forwards"] if f["mode"] == "decode"]
    assert decodes and all(f["logits"].shape[1] == 1 for f in decodes)
    assert saved["val"]["val/masks"] > 0
    for kind in ("box", "point"):
        assert 0.0 <= saved["val"][f"val/dice_{kind}"] <= 1.0
