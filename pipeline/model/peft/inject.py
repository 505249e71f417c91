"""Attach the configured PEFT methods to an ``AdaptedImageEncoder`` and freeze its base weights.

Parameter names say which method a tensor belongs to (``peft_method_of``):

  sam_med2d_adapter  blocks.i.med2d_adapter.*
  msa_adapter        blocks.i.msa.*
  lora               blocks.i.attn.qkv.lora.*
  fact               fact.* (shared U, V) and blocks.i.attn.qkv.fact.* (cores)
  adapter3d          blocks.i.adapter3d_attn.*, blocks.i.adapter3d_mlp.*
"""

from __future__ import annotations

import logging

from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.peft.adapter3d import Adapter3d
from pipeline.model.peft.adapters import Med2dAdapter, MsaAdapters
from pipeline.model.peft.init import check_init
from pipeline.model.peft.qkv import AdaptedQkv, FactCores, FactShared, LoraQV

log = logging.getLogger(__name__)

_MARKERS = (
    (".med2d_adapter.", "sam_med2d_adapter"),
    (".msa.", "msa_adapter"),
    (".lora.", "lora"),
    (".fact.", "fact"),
    (".adapter3d_", "adapter3d"),
)


def peft_method_of(name: str) -> str | None:
    """The PEFT method owning a parameter name (relative to the encoder or to the model), or
    None for a base weight."""
    padded = "." + name
    for marker, method in _MARKERS:
        if marker in padded:
            return method
    return None


def add_peft(encoder: nn.Module, *, cfg: ModelConfig) -> None:
    """Freeze the encoder's base weights and add ``cfg.peft`` to ``cfg.blocks_for(method)``,
    initialised as ``cfg.adapter_init`` says (see ``init.py``).

    Arguments:
      encoder (AdaptedImageEncoder): modified in place.
      cfg (ModelConfig): methods, ranks, blocks, slice count and initialisation.
    """
    init = cfg.adapter_init
    check_init(init)
    encoder.requires_grad_(False)
    dim = encoder.patch_embed.proj.out_channels
    methods = set(cfg.peft)
    if "fact" in methods:
        encoder.fact = FactShared(dim, cfg.fact_rank)
    for method in cfg.peft:
        for i in cfg.blocks_for(method):
            block = encoder.blocks[i]
            qkv: AdaptedQkv = block.attn.qkv
            if method == "sam_med2d_adapter":
                block.med2d_adapter = Med2dAdapter(dim, init=init)
            elif method == "msa_adapter":
                block.msa = MsaAdapters(dim, depth_branch=cfg.slices > 1, init=init)
            elif method == "lora":
                qkv.lora = LoraQV(dim, cfg.lora_rank)
            elif method == "fact":
                qkv.attach_fact(FactCores(cfg.fact_rank, cfg.fact_dropout), encoder.fact)
            elif method == "adapter3d":
                block.adapter3d_attn = Adapter3d(dim, cfg.adapter3d_dim, init=init)
                block.adapter3d_mlp = Adapter3d(dim, cfg.adapter3d_dim, init=init)
            else:  # ModelConfig already refuses unknown names
                raise ValueError(f"model.peft: unknown PEFT method {method!r}")
    for name, param in encoder.named_parameters():
        param.requires_grad_(peft_method_of(name) is not None)
    log.info(
        "encoder PEFT: %s, %s init",
        {m: cfg.blocks_for(m) for m in cfg.peft} or "none (frozen)",
        init,
    )


def merge_qkv_updates(encoder: nn.Module) -> list[str]:
    """Fold LoRA and FacT into the qkv weights and remove their modules (inference).

    Arguments:
      encoder (AdaptedImageEncoder): modified in place.

    Returns:
      list[str]: the methods merged ("lora", "fact"), in that order, those present.
    """
    merged: set[str] = set()
    for block in encoder.blocks:
        qkv: AdaptedQkv = block.attn.qkv
        if qkv.lora is None and qkv.fact is None:
            continue
        if qkv.lora is not None:
            merged.add("lora")
        if qkv.fact is not None:
            merged.add("fact")
        plain = AdaptedQkv(qkv.merged_linear())
        block.attn.qkv = plain
    if encoder.fact is not None:
        merged.add("fact")
        encoder.fact = None
    return [m for m in ("lora", "fact") if m in merged]
