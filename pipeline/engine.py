"""The only DeepSpeed code: the process group, the engine config generated from the config tree,
a thin engine, and reading DeepSpeed checkpoints back.

``init_distributed`` joins the process group through DeepSpeed. The DeepSpeed JSON is never kept
by hand: ``deepspeed_config`` derives it from ``TrainConfig`` and the data batch size, so batch
size, precision and ZeRO stage are defined once. ``build_engine``
wraps ``deepspeed.initialize`` around the model with a ``PhaseGatedAdamW`` client optimizer (one
group per training phase) and returns an ``Engine`` with the five calls a trainer needs:
``forward``, ``backward``, ``step``, ``save``, ``load``.

Same code path on one CPU process, CPU ranks over gloo, and GPUs over nccl.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from configtree import ConfigError
from pipeline.config import TrainConfig
from pipeline.distributed import DistEnv, device, keep_to_loopback, rendezvous_store
from pipeline.model.weights import WeightsError
from pipeline.optim import PhaseGatedAdamW, build_optimizer, lr_factor
from pipeline.process import keep_freed_host_memory
from pipeline.safe_load import (
    UnsafeFileError,
    refuse_code,
    refused,
    safe_torch_load,
    weights_only_loads,
)

__all__ = [
    "Engine",
    "build_engine",
    "deepspeed_config",
    "deepspeed_globals",
    "init_distributed",
    "read_zero_checkpoint",
]

log = logging.getLogger(__name__)

# DeepSpeed would print a throughput line every this many steps; we log our own.
_NEVER = 2**31 - 1
# Optimizer group keys set from the config (pipeline/optim.py), kept over a checkpoint load.
_HYPER = ("base_lr", "lr", "weight_decay", "betas", "eps")


def deepspeed_globals() -> list[Any]:
    """The plain classes DeepSpeed 0.19 pickles into its checkpoint files, beside tensors and
    builtins (read from real checkpoints at ZeRO 0-3, fp32 / bf16, with and without offload):
    the loss scalers (``DynamicLossScaler`` with fp16), ``ZeroStageEnum`` and
    ``fragment_address`` (two ints). The allow-list of ``weights_only`` loads of its files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def init_distributed(env: DistEnv, *, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group (gloo on CPU, nccl on GPU) through DeepSpeed.

    Exports the ``DistEnv`` as the torchrun variables (DeepSpeed and WebDataset's
    ``split_by_node`` read them), pins the GPU of this local rank, and is a no-op when the group
    already exists. The ranks meet on ``rendezvous_store``, whose server listens on the master
    address only (loopback for local runs), and DeepSpeed wraps that group.

    Arguments:
      env: from ``dist_env()``.
      timeout_s: how long a collective waits for the other ranks before failing (long enough
        for a slow checkpoint save or validation on rank 0).

    Returns:
      The device this rank computes on.
    """
    for key, value in (
        ("RANK", env.rank),
        ("LOCAL_RANK", env.local_rank),
        ("WORLD_SIZE", env.world_size),
        ("LOCAL_WORLD_SIZE", env.local_world_size),
        ("MASTER_ADDR", env.master_addr),
        ("MASTER_PORT", env.master_port),
    ):
        os.environ[key] = str(value)
    if env.backend == "gloo":
        # DeepSpeed reads this once, when it first picks an accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dev = device(env)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        import deepspeed

        # Our store (its server on the master address only) and group; DeepSpeed then wraps
        # the group it finds instead of making its own on torch's env:// rendezvous.
        keep_to_loopback(env)
        store = rendezvous_store(env, timeout_s=timeout_s)
        extra = {"device_id": dev} if dev.type == "cuda" and env.world_size > 1 else {}
        tdist.init_process_group(
            backend=env.backend,
            store=store,
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **extra,
        )
        deepspeed.init_distributed(
            dist_backend=env.backend,
            auto_mpi_discovery=False,
            distributed_port=env.master_port,
            verbose=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            rank=env.rank,
            world_size=env.world_size,
        )
    return dev


def deepspeed_config(
    *, train: TrainConfig, batch_size: int, world_size: int, on_gpu: bool
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run.

    Arguments:
      train: ZeRO stage, offload, precision, clipping, accumulation.
      batch_size: images per rank per micro-step (``data.batch_size``).
      world_size: number of ranks.
      on_gpu: whether ranks compute on GPUs (mixed precision needs them, except bf16).

    Returns:
      A dict for ``deepspeed.initialize(config=...)``. Raises ``ConfigError`` naming the key for
      combinations that cannot run.
    """
    if batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
    if world_size < 1:
        raise ConfigError(f"launch.ranks: world size must be >= 1, got {world_size}")
    if train.offload and train.zero_stage == 0:
        raise ConfigError("train.offload=true needs train.zero_stage >= 1")
    if train.precision == "fp16" and not on_gpu:
        raise ConfigError(
            "train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
            "use fp32 or bf16 on CPU"
        )
    if (
        train.precision == "bf16"
        and on_gpu
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        raise ConfigError("train.precision=bf16 is not supported by this GPU; use fp16 or fp32")

    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=on_gpu)
    if train.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    elif (
        train.zero_stage == 2 or (train.zero_stage == 1 and train.precision != "bf16")
    ) and train.grad_clip == 0:
        # Nothing to clip: skip ZeRO's global gradient norm, a pass over every trainable
        # parameter in each optimizer step (in the 8 decoder-only steps of the interaction loop
        # too). grad_norm is then not reported; a non-finite loss still stops the run.
        zero["compute_grad_norm"] = False

    config: dict[str, Any] = {
        "train_batch_size": batch_size * train.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {
            "enabled": train.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
        },
        # Our optimizer is a torch AdamW subclass (the phase gate), not a DeepSpeed one: allow
        # it under ZeRO and under ZeRO-Offload. No "optimizer" section, so no fused Adam build
        # (``torch_adam`` would only matter there).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }
    return config


def _check_groups(model: nn.Module, param_groups: dict[str, list[nn.Parameter]]) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for phase, params in param_groups.items():
        if not isinstance(phase, str) or not phase:
            raise ValueError(f"phase names must be non-empty strings, got {phase!r}")
        for p in params:
            name = names.get(id(p))
            if name is None:
                raise ValueError(f"phase {phase!r} holds a parameter that is not in the model")
            if id(p) in seen:
                raise ValueError(f"parameter {name} is in phases {seen[id(p)]!r} and {phase!r}")
            if not p.requires_grad:
                raise ValueError(f"parameter {name} in phase {phase!r} has requires_grad=False")
            seen[id(p)] = phase
    loose = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if loose:
        raise ValueError(
            f"{len(loose)} trainable parameter(s) are in no phase group, e.g. {loose[0]}; "
            "freeze them (requires_grad=False) or add them to a phase"
        )


class Engine:
    """A DeepSpeed engine driven by phase names. Build it with ``build_engine``."""

    def __init__(
        self, ds_engine: Any, optimizer: PhaseGatedAdamW, *, train: TrainConfig, config: dict
    ) -> None:
        self._ds = ds_engine
        self.optimizer = optimizer
        self.train_cfg = train
        self.config = config
        """The generated DeepSpeed config (log it as an artifact)."""
        self._stepped: set[str] = set()
        # At stage 0 with fp32 DeepSpeed steps our optimizer itself. Its backward all-reduce
        # would flatten and reduce a gradient for every trainable parameter after each backward
        # (creating zeros where there is none): in the eight decoder-only steps of the
        # interaction loop that is 185M values for 4M that train (ViT-B + SAM-Med2D adapters).
        # We reduce the active phases' gradients ourselves in ``step`` (none with one rank).
        self._own_reduce = ds_engine.optimizer is optimizer and not ds_engine.zero_optimization()
        if self._own_reduce:
            ds_engine.enable_backward_allreduce = False

    # -- the training calls ------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module's forward through the engine.

        Under ZeRO-3 the engine gathers partitioned weights around the module's forward only,
        so the whole training forward (encoder, prompt encoder, decoder) must be this one call.
        """
        return self._ds(*args, **kwargs)

    __call__ = forward

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a scalar loss (scaled for fp16, averaged over accumulation steps)."""
        self._ds.backward(loss)

    def step(self, active: Iterable[str], *, step: int) -> bool:
        """Update the parameters of the ``active`` phases; the others do not move at all.

        Arguments:
          active: phase names to update (e.g. ``{"mask_decoder"}`` in re-prompt steps).
          step: the trainer's step counter (0-based, in batches); the learning rate of this
            update is ``base_lr * lr_factor(step)``, so several optimizer steps per batch (the
            interaction loop) share one point of the schedule and resume needs no scheduler
            state.

        Returns:
          True when an optimizer update happened (the last micro-step of gradient accumulation).
        """
        factor = lr_factor(step, train=self.train_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.optimizer.set_active(active)
        boundary = self._ds.is_gradient_accumulation_boundary()
        if boundary and self._own_reduce:
            self._reduce_gradients(self.optimizer.active)
        self._ds.step()
        if boundary:
            self._clear_stale_gradients()
            first = set(active) - self._stepped
            if first:
                self._stepped |= first
                self._relink_optimizer_state()
        return boundary

    def _reduce_gradients(self, active: frozenset[str]) -> None:
        # Average over the ranks every gradient that exists on some rank (they all enter the
        # clipping norm), with zeros where a rank has none, as DeepSpeed's own reduction does
        # for every parameter. What is skipped: parameters of inactive phases that have no
        # gradient on any rank (the detached encoder in re-prompt steps). One small all-reduce
        # of "has a gradient" flags makes the lists line up across ranks.
        if self._ds.dp_world_size == 1:
            return
        params = [
            (p, group["phase"] in active)
            for group in self.optimizer.param_groups
            for p in group["params"]
        ]
        flags = torch.tensor(
            [float(on or p.grad is not None) for p, on in params], device=self._ds.device
        )
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        grads = []
        for (p, _), needed in zip(params, flags.tolist(), strict=True):
            if needed:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad.data)
        if grads:
            self._ds.buffered_allreduce_fallback(grads=grads)

    def _relink_optimizer_state(self) -> None:
        # ZeRO-1/2 and the bf16 optimizer link each parameter to its slice of the Adam state
        # once, after the first update; a group that was inactive then has no state yet and
        # would stay unlinked (deepspeed.utils.safe_get_full_optimizer_state fails on it).
        # Link again after the first update of each phase.
        zero_opt = self._ds.optimizer
        if hasattr(zero_opt, "_hp_optimizer_states_linked"):
            zero_opt._hp_optimizer_states_linked = False
            zero_opt._lazy_init_hp_params_optimizer_state()

    def _clear_stale_gradients(self) -> None:
        # ZeRO-3 copies each reduced gradient into a persistent flat partition buffer and only
        # overwrites the slots of parameters that got a gradient. A parameter with none in the
        # next step (a detached encoder in a re-prompt step) would keep its old gradient, which
        # enters the clipping norm (and a step, if its phase is active). Zero it after each
        # update (with offload, ZeRO-3 refills its CPU gradients every step: tested clean).
        # Internal attribute: setup.cfg pins deepspeed>=0.16,<0.20 and
        # tests/test_engine.py checks the result against a plain PyTorch loop.
        zero_opt = self._ds.optimizer
        buffer = getattr(zero_opt, "grad_partitions_flat_buffer", None)
        if buffer is not None:
            buffer.zero_()

    # -- checkpoints -------------------------------------------------------------------------

    def save(self, ckpt_dir: str | Path, client_state: dict[str, Any]) -> None:
        """Write weights and optimizer state into ``ckpt_dir`` (collective: every rank calls).

        Arguments:
          ckpt_dir: the checkpoint folder (``.../checkpoints/step-0000200``).
          client_state: small picklable dict stored with rank 0's model file.
        """
        ckpt_dir = Path(ckpt_dir)
        self._ds.save_checkpoint(
            str(ckpt_dir.parent),
            tag=ckpt_dir.name,
            client_state=client_state,
            save_latest=False,
            exclude_frozen_parameters=not self.train_cfg.save_frozen,
        )

    def load(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """Restore weights and optimizer state written by ``save`` (collective), running no
        code from the files: a file naming anything outside ``deepspeed_globals()`` is refused
        by name before loading starts, and DeepSpeed's own loads are held to ``weights_only``.
        The optimizer's hyper-parameters stay the config's.

        Returns:
          The ``client_state`` given to ``save``. Raises ``UnsafeFileError`` naming a file that
          would run code.
        """
        ckpt_dir = Path(ckpt_dir)
        allowed = deepspeed_globals()
        refuse_code(ckpt_dir, allowed)
        # The optimizer's hyper-parameters are the config's, not the checkpoint's: DeepSpeed
        # restores the saved param groups (lr, weight decay, betas, eps), which would silently
        # undo a train.lr changed on resume. Its state (moments, step counts) is the checkpoint's.
        keep = [
            {key: group[key] for key in _HYPER if key in group}
            for group in self.optimizer.param_groups
        ]
        try:
            with weights_only_loads(allowed):
                path, client_state = self._ds.load_checkpoint(
                    str(ckpt_dir.parent),
                    tag=ckpt_dir.name,
                    # Frozen weights are not in the file unless train.save_frozen; they come
                    # from the model build (model.checkpoint).
                    load_module_strict=self.train_cfg.save_frozen,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                )
        except pickle.UnpicklingError as err:  # what the static check could not see
            raise refused(ckpt_dir, err) from None
        if path is None:
            raise FileNotFoundError(f"{ckpt_dir}: DeepSpeed found no checkpoint to load there")
        for group, ours in zip(self.optimizer.param_groups, keep, strict=True):
            group.update(ours)
        return dict(client_state or {})

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 copies of the trainable weights, by name, on the CPU (collective).

        Under ZeRO the weights are gathered from the optimizer's fp32 partitions; at stage 0
        they are the parameters themselves. For exporting adapters and heads.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                full = safe_get_full_fp32_param(param)
                full = self._stage0_master(param) if full is None else full
                out[name] = full.detach().float().cpu().clone()
        return out

    def frozen_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of every untrained state tensor (frozen weights, buffers), by name
        (collective: under ZeRO-3 the frozen weights are gathered from their partitions).

        For an export whose base was randomly initialised (no checkpoint file holds it).

        Returns:
          dict[str, torch.Tensor]: by state-dict name, in the module's dtype.
        """
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        frozen = [p for p in self.module.parameters() if not p.requires_grad]
        trained = {n for n, p in self.module.named_parameters() if p.requires_grad}
        # modifier_rank=None: read-only gather on every rank (a no-op below ZeRO-3)
        with GatheredParameters(frozen, modifier_rank=None):
            state = self.module.state_dict()
            return {k: v.detach().cpu().clone() for k, v in state.items() if k not in trained}

    def _stage0_master(self, param: nn.Parameter) -> torch.Tensor:
        # Stage 0 has no ZeRO mapping: the fp32 master is the parameter itself, or its copy in
        # DeepSpeed's mixed-precision optimizer (fp16_groups[i][j] -> fp32_groups[i][j]).
        opt = self._ds.optimizer
        low_groups, high_groups = getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])
        for low, high in zip(low_groups, high_groups, strict=False):
            for lp, hp in zip(low, high, strict=False):
                if lp is param:
                    return hp
        return param

    # -- read-only views ---------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """The wrapped model (under ZeRO-3 its parameters are partitioned outside forward)."""
        return self._ds.module

    @property
    def device(self) -> torch.device:
        return self._ds.device

    @property
    def ds_engine(self) -> Any:
        """The DeepSpeed engine itself, for what this class does not wrap."""
        return self._ds

    @property
    def phases(self) -> tuple[str, ...]:
        return self.optimizer.phases

    @property
    def lr(self) -> dict[str, float]:
        """Current learning rate per phase (for logging)."""
        return {g["phase"]: float(g["lr"]) for g in self.optimizer.param_groups}

    @property
    def grad_norm(self) -> float | None:
        """Global gradient norm of the last update, before clipping (None if unknown)."""
        norm = self._ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self, mode: bool = True) -> Engine:
        self._ds.train(mode)
        return self

    def eval(self) -> Engine:
        return self.train(False)


def build_engine(
    *,
    model: nn.Module,
    param_groups: dict[str, list[nn.Parameter]],
    train: TrainConfig,
    batch_size: int,
    env: DistEnv,
    lr_scale: dict[str, float] | None = None,
) -> Engine:
    """Wrap the model in a DeepSpeed engine with a phase-gated AdamW.

    Call ``init_distributed(env)`` first; the model may still be on the CPU (DeepSpeed moves it).

    Arguments:
      model: the one module whose forward runs the whole training step.
      param_groups: phase name -> trainable parameters, e.g. ``{"encoder_peft": [...],
        "prompt_encoder": [...], "mask_decoder": [...]}``; disjoint, every parameter with
        ``requires_grad`` in exactly one phase. A phase may be empty.
      train: the training section.
      batch_size: images per rank per micro-step.
      env: this process's ``DistEnv``.
      lr_scale: optional phase -> factor on ``train.lr``.

    Returns:
      The ``Engine``. Raises ``ConfigError`` naming the key for impossible combinations.
    """
    _check_groups(model, param_groups)
    n_trainable = sum(p.numel() for params in param_groups.values() for p in params)
    if n_trainable == 0:
        if train.zero_stage == 3:
            raise ConfigError(
                "train.zero_stage=3 needs trainable parameters, but every phase group is empty "
                "(check model.peft and model.train_*)"
            )
        raise ConfigError(
            "model: no trainable parameters (every phase group is empty; check model.peft and "
            "model.train_*)"
        )
    on_gpu = env.backend == "nccl"
    if not on_gpu:
        keep_freed_host_memory()
    config = deepspeed_config(
        train=train, batch_size=batch_size, world_size=env.world_size, on_gpu=on_gpu
    )
    if train.precision == "bf16" and not on_gpu:
        log.warning("train.precision=bf16 on CPU runs, but slower than fp32")

    import deepspeed

    optimizer = build_optimizer(param_groups, train=train, lr_scale=lr_scale)
    # DeepSpeed's stage-0 fp16/bf16 optimizers run one step on zero gradients at construction
    # to create the Adam state: weight decay and the step count would move before training.
    # With no phase active that step does nothing; the state is created at the first update.
    optimizer.set_active(())
    ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    optimizer.set_active(optimizer.phases)
    if train.zero_stage == 3 and not isinstance(
        getattr(ds_engine.optimizer, "grad_partitions_flat_buffer", None), torch.Tensor
    ):
        raise RuntimeError(
            f"deepspeed {deepspeed.__version__}: ZeRO-3 has no grad_partitions_flat_buffer, so "
            "stale gradients cannot be cleared between phases; use a version that setup.cfg "
            "allows (tested: 0.19)"
        )
    log.info(
        "DeepSpeed engine: ZeRO-%d%s, %s, %d ranks x %d images x %d accumulation; "
        "%d trainable parameters in phases %s",
        train.zero_stage,
        " + CPU offload" if train.offload else "",
        train.precision,
        env.world_size,
        batch_size,
        train.grad_accum,
        n_trainable,
        list(optimizer.phases),
    )
    return Engine(ds_engine, optimizer, train=train, config=config)


def _stage0_module(path: Path) -> dict[str, torch.Tensor] | None:
    """The weights of a ZeRO stage-0 checkpoint tag folder, else None.

    Stage 0 partitions nothing: DeepSpeed keeps the module's state dict whole in
    ``mp_rank_00_model_states.pt`` and writes no ZeRO files for ``zero_to_fp32`` to read.
    """
    states = path / "mp_rank_00_model_states.pt"
    # ZeRO 1-3 write per-rank partitions beside it: leave those to zero_to_fp32 without loading
    # the (possibly large) model states file twice
    if not states.is_file() or any(path.glob("*zero_pp_rank_*")):
        return None
    saved = safe_torch_load(states, allowed=deepspeed_globals())
    zero = (saved.get("ds_config") or {}).get("zero_optimization") or {}
    if int(zero.get("stage", 0)) != 0 or not saved.get("module"):
        return None
    return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}


def read_zero_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint, consolidated from its ZeRO partitions (or
    read whole from a stage-0 checkpoint).

    Arguments:
      path: a checkpoint tag folder (``RUN_DIR/checkpoints/step-0000200``) or the folder holding
        tags and DeepSpeed's ``latest`` file.

    Returns:
      The tensors by parameter name. Raises ``WeightsError`` naming the folder when DeepSpeed
      cannot read it either way.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(path)
    allowed = deepspeed_globals()
    try:
        refuse_code(path, allowed)  # names the file before DeepSpeed opens any
        unpartitioned = _stage0_module(path)
    except UnsafeFileError as err:
        raise WeightsError(str(err)) from None
    if unpartitioned is not None:
        return unpartitioned
    errors = []
    for folder, tag in ((path, None), (path.parent, path.name)):
        try:
            with weights_only_loads(allowed):
                state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
            return {k: v for k, v in state.items()}
        except pickle.UnpicklingError as exc:
            raise WeightsError(str(refused(path, exc))) from None
        except Exception as exc:  # DeepSpeed raises several kinds
            errors.append(f"{folder} tag={tag}: {exc}")
    raise WeightsError(f"{path}: not a DeepSpeed checkpoint ({'; '.join(errors)})")
