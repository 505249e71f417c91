"""DeepSpeed engine from the config tree, and the phase gate under ZeRO-2 / ZeRO-3.

Two CPU ranks over gloo run a toy model whose group "a" is trained only in phase 1 and group "b"
in every phase; the inactive steps must leave "a"'s weights and Adam state bit-identical, and the
whole run must match a plain PyTorch loop with the same gating.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from configtree import ConfigError
from launch.local import free_port
from pipeline.config import TrainConfig
from pipeline.distributed import DistEnv, dist_env, setup_logging
from pipeline.engine import build_engine, deepspeed_config, init_distributed
from pipeline.optim import PhaseGatedAdamW, build_optimizer, lr_factor
from samadapt.config import load_config

WORLD = 2
BATCH = 4
# One "batch" is three optimizer steps, like the interaction loop: a prompt step that trains
# everything, then re-prompt steps that train "b" only (once with "a" detached, once with "a"
# still receiving gradients that must be ignored).
PLAN = [("all", {"a", "b"}), ("detached", {"b"}), ("all", {"b"})]
BATCHES = 2
# The engine settings compared against plain PyTorch (ZeRO-3 is the slow one: keep it tiny).
RUNS = {
    "zero0": {"zero_stage": 0},
    "zero0_bf16": {"zero_stage": 0, "precision": "bf16"},
    "zero2": {"zero_stage": 2},
    "zero2_noclip": {"zero_stage": 2, "grad_clip": 0.0},  # no ZeRO gradient norm at all
    "zero3": {"zero_stage": 3},
    "zero2_offload": {"zero_stage": 2, "offload": True},
    "zero3_offload": {"zero_stage": 3, "offload": True},
    "zero3_accum2": {"zero_stage": 3, "grad_accum": 2},
}


class Toy(nn.Module):
    """frozen -> a -> b; the loss comes out of forward (one forward through the engine)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(4, 8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
        x = x.to(self.frozen.weight.dtype)  # bf16 engines hold bf16 weights
        h = torch.tanh(self.a(torch.tanh(self.frozen(x))))
        if mode == "detached":
            h = h.detach()
        return ((self.b(h).float() - y) ** 2).mean()


def make_toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


def groups(model: Toy) -> dict[str, list[nn.Parameter]]:
    return {"a": list(model.a.parameters()), "b": list(model.b.parameters())}


def batch(rank: int, step: int, *, generator: torch.Generator | None = None):
    gen = generator if generator is not None else torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, 4, generator=gen), torch.randn(BATCH, 2, generator=gen)


def train_cfg(**kw) -> TrainConfig:
    base = dict(
        steps=BATCHES,
        lr=0.05,
        weight_decay=0.1,
        warmup_steps=2,  # lr factor 0.5 in batch 0, 1.0 in batch 1
        schedule="cosine",
        min_lr_ratio=0.1,
        grad_clip=0.05,  # small enough to clip: stale gradients would change the result
    )
    base.update(kw)
    return TrainConfig(**base)


def spawn_env(rank: int, port: int) -> DistEnv:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    env = dist_env()
    init_distributed(env, timeout_s=120)  # a test bug fails, not hangs
    return env


def full_state(engine, params: list[nn.Parameter]) -> dict[str, list[torch.Tensor]]:
    """Full fp32 weights and Adam moments of some parameters (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, list[torch.Tensor]] = {"w": [], "exp_avg": [], "exp_avg_sq": []}
    for p in params:
        if safe_get_full_fp32_param(p) is None:
            # Stage 0 has no ZeRO mapping: the fp32 master is the parameter itself, or its copy
            # in DeepSpeed's (un)fused mixed-precision optimizer.
            master = engine._stage0_master(p)
            state = engine.optimizer.state.get(master, {})
            out["w"].append(master.detach().clone())
            for key in ("exp_avg", "exp_avg_sq"):
                out[key].append(state[key].clone() if key in state else None)
            continue
        out["w"].append(safe_get_full_fp32_param(p).detach().clone())
        for key in ("exp_avg", "exp_avg_sq"):
            value = safe_get_full_optimizer_state(p, key)
            out[key].append(None if value is None else value.detach().clone())
    return out


def same(x: dict, y: dict) -> bool:
    for key in x:
        for u, v in zip(x[key], y[key], strict=True):
            if (u is None) != (v is None) or (u is not None and not torch.equal(u, v)):
                return False
    return True


def _gating_worker(rank: int, port: int, out_dir: str, runs: list[str]) -> None:
    env = spawn_env(rank, port)
    for name in runs:
        model = make_toy()
        engine = build_engine(
            model=model,
            param_groups=groups(model),
            train=train_cfg(**RUNS[name]),
            batch_size=BATCH,
            env=env,
        )
        a_params = list(engine.module.a.parameters())
        b_params = list(engine.module.b.parameters())
        frozen_in_inactive: list[bool] = []
        losses = []
        accum = RUNS[name].get("grad_accum", 1)
        for step in range(BATCHES):
            for k, (mode, active) in enumerate(PLAN):
                # (Adam state exists only after the first update, which trains "a".)
                before = full_state(engine, a_params) if "a" not in active else None
                for micro in range(accum):
                    x, y = batch(rank, (step * len(PLAN) + k) * accum + micro)
                    loss = engine.forward(x, y, mode)
                    engine.backward(loss)
                    # True only on the last micro-batch: that one updates.
                    assert engine.step(active, step=step) == (micro == accum - 1)
                    losses.append(float(loss.detach()))
                if before is not None:
                    frozen_in_inactive.append(same(before, full_state(engine, a_params)))
        counts = sorted(float(s["step"]) for s in engine.optimizer.state.values() if "step" in s)
        exported = engine.trainable_state_dict()
        assert sorted(exported) == ["a.bias", "a.weight", "b.bias", "b.weight"]
        result = {
            "exported": exported,
            "a": full_state(engine, a_params),
            "b": full_state(engine, b_params),
            "frozen_in_inactive": frozen_in_inactive,
            "step_counts": counts,
            "lr": engine.lr,
            "losses": losses,
        }
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{name}.pt")


def reference(train: TrainConfig) -> dict:
    """The same gated run in plain PyTorch: one process, both ranks' batches, mean of losses."""
    model = make_toy()
    opt = build_optimizer(groups(model), train=train)
    losses = []
    accum = train.grad_accum
    for step in range(BATCHES):
        for k, (mode, active) in enumerate(PLAN):
            for micro in range(accum):
                index = (step * len(PLAN) + k) * accum + micro
                parts = [model(*batch(r, index), mode) for r in range(WORLD)]
                (torch.stack(parts).mean() / accum).backward()
                losses.append(float(parts[0].detach()))
            if train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.grad is not None], train.grad_clip
                )
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, train=train)
            opt.set_active(active)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def state(params):
        params = list(params)
        return {
            "w": [p.detach() for p in params],
            "exp_avg": [opt.state[p]["exp_avg"] for p in params],
            "exp_avg_sq": [opt.state[p]["exp_avg_sq"] for p in params],
            "step": [float(opt.state[p]["step"]) for p in params],
        }

    return {"a": state(model.a.parameters()), "b": state(model.b.parameters()), "losses": losses}


@pytest.fixture(scope="module")
def gated_runs(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("gating")
    mp.spawn(_gating_worker, args=(free_port(), str(out), list(RUNS)), nprocs=WORLD, join=True)
    return {name: torch.load(out / f"{name}.pt") for name in RUNS}


@pytest.mark.parametrize("name", list(RUNS))
def test_inactive_phase_does_not_move(gated_runs, name):
    run = gated_runs[name]
    # 2 batches x 2 re-prompt steps in which "a" is inactive: weights and moments bit-identical.
    assert run["frozen_in_inactive"] == [True] * (BATCHES * 2)
    # Adam step counts: "a" stepped once per batch, "b" every step; one state per flat
    # partition under ZeRO, per parameter (weight, bias) at stage 0.
    copies = 2 if name.startswith("zero0") else 1
    assert run["step_counts"] == [float(BATCHES)] * copies + [float(BATCHES * len(PLAN))] * copies
    last = 0.05 * lr_factor(BATCHES - 1, train=train_cfg())
    assert run["lr"] == pytest.approx({"a": last, "b": last})


@pytest.mark.parametrize("name", list(RUNS))
def test_matches_plain_pytorch(gated_runs, name):
    run, ref = gated_runs[name], reference(train_cfg(**RUNS[name]))
    # fp32: summation order only; bf16: the forward runs in bf16 (fp32 master weights).
    atol = 3e-2 if "bf16" in name else 1e-4
    assert run["losses"] == pytest.approx(ref["losses"], abs=atol / 10)
    for group in ("a", "b"):
        for key in ("w", "exp_avg", "exp_avg_sq"):
            for got, want in zip(run[group][key], ref[group][key], strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert ref["a"]["step"] == [float(BATCHES)] * 2
    assert torch.equal(run["exported"]["a.weight"], run["a"]["w"][0].float())
    assert torch.equal(run["exported"]["b.bias"], run["b"]["w"][1].float())
    # The run really moved: a gate that froze everything would also pass the checks above.
    assert not torch.allclose(run["a"]["w"][0], make_toy().a.weight, atol=1e-3)


def test_gated_adamw_plain():
    model = make_toy()
    opt = PhaseGatedAdamW(
        [
            {"params": list(model.a.parameters()), "phase": "a"},
            {"params": list(model.b.parameters()), "phase": "b"},
        ],
        lr=0.1,
        weight_decay=0.1,
    )
    x, y = batch(0, 0)
    model(x, y, "all").backward()
    opt.step()
    saved = {k: v.clone() for k, v in opt.state[model.a.weight].items()}
    weight = model.a.weight.detach().clone()
    opt.set_active({"b"})
    for _ in range(3):
        model(x, y, "all").backward()  # "a" has a gradient, and is still not updated
        opt.step()
    assert torch.equal(model.a.weight, weight)
    for key, value in opt.state[model.a.weight].items():
        assert torch.equal(value, saved[key]), key
    assert float(opt.state[model.b.weight]["step"]) == 4
    with pytest.raises(ValueError, match="unknown phase"):
        opt.set_active({"decoder"})
    with pytest.raises(ValueError, match="'phase' name"):
        PhaseGatedAdamW([{"params": list(model.a.parameters())}])


def test_lr_schedule():
    warm = TrainConfig(steps=10, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, train=warm) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, train=warm) == pytest.approx(1.0)
    assert lr_factor(7, train=warm) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, train=warm) == pytest.approx(0.1)
    poly = TrainConfig(steps=10, schedule="poly", poly_power=0.9)
    assert lr_factor(5, train=poly) == pytest.approx(0.5**0.9)
    assert lr_factor(3, train=TrainConfig(steps=10)) == 1.0
    # SAMed: poly over decay_steps counted from the end of warm-up, longer than the run, which
    # stops part-way down (configs/recipes/samed.yaml: a quarter of the peak at its last step)
    samed = TrainConfig(steps=14880, warmup_steps=250, schedule="poly", decay_steps=18600)
    assert lr_factor(250, train=samed) == 1.0
    assert lr_factor(1250, train=samed) == pytest.approx((1 - 1000 / 18600) ** 0.9)
    assert lr_factor(14879, train=samed) == pytest.approx((1 - 14629 / 18600) ** 0.9)
    assert 0.24 < lr_factor(14879, train=samed) < 0.26


def test_deepspeed_config_values():
    cfg = deepspeed_config(
        train=TrainConfig(
            zero_stage=3, grad_accum=2, grad_clip=1.0, offload=True, precision="bf16"
        ),
        batch_size=4,
        world_size=8,
        on_gpu=True,
    )
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 64
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"]["enabled"] is False
    assert cfg["zero_allow_untested_optimizer"] is True
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["wall_clock_breakdown"] is False and cfg["steps_per_print"] > 10**9
    assert "optimizer" not in cfg and "scheduler" not in cfg

    cpu = deepspeed_config(
        train=TrainConfig(zero_stage=2), batch_size=2, world_size=2, on_gpu=False
    )
    assert cpu["zero_optimization"] == {
        "stage": 2,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "compute_grad_norm": False,  # nothing to clip
    }
    clipped = deepspeed_config(
        train=TrainConfig(zero_stage=2, grad_clip=1.0), batch_size=2, world_size=2, on_gpu=False
    )
    assert "compute_grad_norm" not in clipped["zero_optimization"]
    assert cpu["bf16"]["enabled"] is False and cpu["fp16"]["enabled"] is False
    assert cpu["train_batch_size"] == 4 and cpu["gradient_clipping"] == 0.0

    zero0 = deepspeed_config(
        train=TrainConfig(zero_stage=0, precision="fp16"), batch_size=1, world_size=1, on_gpu=True
    )
    assert zero0["zero_optimization"] == {"stage": 0} and zero0["fp16"]["enabled"] is True
    # bf16 runs on DeepSpeed's CPU accelerator (slowly), so it is allowed there.
    assert deepspeed_config(
        train=TrainConfig(precision="bf16"), batch_size=1, world_size=1, on_gpu=False
    )["bf16"]["enabled"]


def test_impossible_combinations():
    with pytest.raises(ConfigError, match=r"train\.precision=fp16 needs a GPU"):
        deepspeed_config(
            train=TrainConfig(precision="fp16"), batch_size=2, world_size=1, on_gpu=False
        )
    with pytest.raises(ConfigError, match=r"command line: train\.offload needs zero_stage >= 1"):
        load_config(None, ["train.zero_stage=0", "train.offload=true"])
    with pytest.raises(ConfigError, match=r"train\.warmup_steps must be in \[0, steps=10\]"):
        load_config(None, ["train.steps=10", "train.warmup_steps=11"])
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        deepspeed_config(train=TrainConfig(), batch_size=0, world_size=1, on_gpu=False)
    env = DistEnv(0, 0, 1, 1, "127.0.0.1", 1, "gloo")
    model = make_toy()
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match=r"train\.zero_stage=3 needs trainable parameters"):
        build_engine(
            model=model,
            param_groups={"a": [], "b": []},
            train=TrainConfig(zero_stage=3),
            batch_size=2,
            env=env,
        )


def test_phase_groups_checked():
    env = DistEnv(0, 0, 1, 1, "127.0.0.1", 1, "gloo")
    model = make_toy()
    with pytest.raises(ValueError, match=r"in no phase group, e\.g\. b\.weight"):
        build_engine(
            model=model,
            param_groups={"a": list(model.a.parameters())},
            train=TrainConfig(),
            batch_size=2,
            env=env,
        )
    with pytest.raises(ValueError, match=r"a\.weight is in phases 'a' and 'b'"):
        build_engine(
            model=model,
            param_groups={"a": list(model.a.parameters()), "b": [model.a.weight]},
            train=TrainConfig(),
            batch_size=2,
            env=env,
        )
    with pytest.raises(ValueError, match=r"frozen\.weight in phase 'f' has requires_grad=False"):
        build_engine(
            model=model,
            param_groups={**groups(model), "f": [model.frozen.weight]},
            train=TrainConfig(),
            batch_size=2,
            env=env,
        )


def test_dist_env_sources():
    torchrun = dist_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "1234",
        }
    )
    assert (torchrun.rank, torchrun.local_rank, torchrun.world_size) == (3, 1, 8)
    assert torchrun.local_world_size == 2
    assert (torchrun.master_addr, torchrun.master_port) == ("n1", 1234)
    slurm = dist_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_TASKS_PER_NODE": "4(x2)",
            "SLURM_JOB_NODELIST": "gpu[07-08,11],cpu1",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (slurm.rank, slurm.local_rank, slurm.world_size, slurm.local_world_size) == (5, 1, 8, 4)
    assert slurm.master_addr == "gpu07" and slurm.master_port == 20000 + 123456 % 20000
    alone = dist_env({})
    assert (alone.rank, alone.world_size, alone.master_addr) == (0, 1, "127.0.0.1")
    assert alone.master_port > 0 and alone.backend in ("gloo", "nccl")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='x' is not an integer"):
        dist_env({"RANK": "0", "WORLD_SIZE": "x"})


def test_logging_is_quiet_on_other_ranks(monkeypatch, capsys):
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        setup_logging()
        setup_logging()  # idempotent: one handler
        ours = [h for h in root.handlers if getattr(h, "_samadapt", False)]
        assert len(ours) == 1
        monkeypatch.setenv("RANK", "1")
        logging.getLogger("samadapt.x").info("hidden line")
        logging.getLogger("samadapt.x").warning("shown line")
        monkeypatch.setenv("RANK", "0")
        logging.getLogger("samadapt.x").info("main line")
        err = capsys.readouterr().err
        assert "hidden line" not in err
        assert "WARNING [rank 1] samadapt.x: shown line" in err
        assert "INFO samadapt.x: main line" in err
    finally:
        root.handlers[:] = before[0]
        root.setLevel(before[1])


def _listening_worker(rank: int, port: int, out: str) -> None:
    import psutil  # DeepSpeed's dependency

    spawn_env(rank, port)  # the process group, as every training rank joins it
    torch.distributed.barrier()  # every connection made: all sockets are open now
    sockets = [
        [c.laddr.ip, c.laddr.port]
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    Path(out, f"rank{rank}.json").write_text(json.dumps(sockets))
    torch.distributed.barrier()


def test_rendezvous_listens_on_the_master_address_only(tmp_path):
    """Local ranks (MASTER_ADDR=127.0.0.1): the store's server and gloo's sockets listen on the
    loopback address, never on every interface (torch's env:// store would bind "::")."""
    port = free_port()
    mp.spawn(_listening_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    seen = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)}
    assert [ip for ip, p in seen[0] if p == port] == ["127.0.0.1"]  # the store, on rank 0
    for rank, sockets in seen.items():
        assert sockets and all(ip == "127.0.0.1" for ip, _ in sockets), (rank, sockets)
