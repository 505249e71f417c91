"""Attach the configured PEFT methods to an image encoder and freeze its base weights.

The encoder is SAM's ViT (``AdaptedImageEncoder``: every block) or a TinyViT
(``TinyVitEncoder``: the transformer blocks of stages 1-3, numbered across them; see
``pipeline/model/tiny_vit.py`` for where each method sits in its blocks and why stage 0 has
none). Parameter names say which method a tensor belongs to (``peft_method_of``); for a TinyViT
``blocks.i`` reads ``layers.s.blocks.j``:

  sam_med2d_adapter  blocks.i.med2d_adapter.*
  msa_adapter        blocks.i.msa.*
  lora               blocks.i.attn.qkv.lora.*
  fact               fact.* (ViT: U, V shared by all blocks; TinyViT: layers.s.fact.*, one pair
                     per stage, whose widths differ) and blocks.i.attn.qkv.fact.* (cores)
  adapter3d          blocks.i.adapter3d_attn.*, blocks.i.adapter3d_mlp.*
"""

from __future__ import annotations

import logging

from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.peft.adapter3d import Adapter3d
from pipeline.model.peft.adapters import Med2dAdapter, MsaAdapters
from pipeline.model.peft.init import AdapterInit, check_init
from pipeline.model.peft.qkv import AdaptedQkv, FactCores, FactShared, LoraQV
from pipeline.model.tiny_vit import TinyVitEncoder

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


def _sites(encoder: nn.Module, cfg: ModelConfig) -> list[tuple[nn.Module, int, nn.Module]]:
    """(block, width, holder of FacT's shared factors) of every block PEFT can go into, in the
    order ``cfg.peft_blocks`` numbers them. FacT's shared factors are created here when
    ``cfg.peft`` has fact: one pair for the ViT, one per TinyViT stage that gets FacT."""
    fact_blocks = set(cfg.blocks_for("fact")) if "fact" in cfg.peft else set()
    if isinstance(encoder, TinyVitEncoder):
        sites = [(b, b.dim, stage) for stage, b in encoder.transformer_blocks()]
        for stage in dict.fromkeys(s for i, (_, _, s) in enumerate(sites) if i in fact_blocks):
            stage.fact = FactShared(stage.blocks[0].dim, cfg.fact_rank)
        return sites
    dim = encoder.patch_embed.proj.out_channels
    if fact_blocks:
        encoder.fact = FactShared(dim, cfg.fact_rank)
    return [(block, dim, encoder) for block in encoder.blocks]


def _qkv(block: nn.Module) -> AdaptedQkv:
    """The block's qkv layer as an ``AdaptedQkv`` (a TinyViT's plain ``nn.Linear`` is taken
    over on first use, with its per-head [q, k, v] layout)."""
    attn = block.attn
    if not isinstance(attn.qkv, AdaptedQkv):
        attn.qkv = AdaptedQkv(attn.qkv, heads=attn.heads)
    return attn.qkv


def _attach(method: str, block: nn.Module, dim: int, holder: nn.Module, cfg: ModelConfig) -> None:
    """Put ``method``'s modules into ``block`` (width ``dim``; FacT's shared factors on
    ``holder``)."""
    init: AdapterInit = cfg.adapter_init
    if method == "sam_med2d_adapter":
        block.med2d_adapter = Med2dAdapter(dim, init=init)
    elif method == "msa_adapter":
        block.msa = MsaAdapters(dim, depth_branch=cfg.slices > 1, init=init)
    elif method == "lora":
        _qkv(block).lora = LoraQV(dim, cfg.lora_rank)
    elif method == "fact":
        _qkv(block).attach_fact(FactCores(cfg.fact_rank, cfg.fact_dropout), holder.fact)
    elif method == "adapter3d":
        block.adapter3d_attn = Adapter3d(dim, cfg.adapter3d_dim, init=init)
        block.adapter3d_mlp = Adapter3d(dim, cfg.adapter3d_dim, init=init)
    else:  # ModelConfig already refuses unknown names
        raise ValueError(f"model.peft: unknown PEFT method {method!r}")


def add_peft(encoder: nn.Module, *, cfg: ModelConfig) -> None:
    """Freeze the encoder's base weights and add ``cfg.peft`` to ``cfg.blocks_for(method)``,
    initialised as ``cfg.adapter_init`` says (see ``init.py``).

    Arguments:
      encoder (AdaptedImageEncoder or TinyVitEncoder): modified in place.
      cfg (ModelConfig): methods, ranks, blocks, slice count and initialisation.
    """
    init = cfg.adapter_init
    check_init(init)
    encoder.requires_grad_(False)
    sites = _sites(encoder, cfg)
    for method in cfg.peft:
        for i in cfg.blocks_for(method):
            block, dim, holder = sites[i]
            _attach(method, block, dim, holder, cfg)
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
      encoder (AdaptedImageEncoder or TinyVitEncoder): modified in place.

    Returns:
      list[str]: the methods merged ("lora", "fact"), in that order, those present.
    """
    merged: set[str] = set()
    for attn in [m for m in encoder.modules() if isinstance(getattr(m, "qkv", None), AdaptedQkv)]:
        qkv: AdaptedQkv = attn.qkv
        if qkv.lora is None and qkv.fact is None:
            continue
        if qkv.lora is not None:
            merged.add("lora")
        if qkv.fact is not None:
            merged.add("fact")
        attn.qkv = AdaptedQkv(qkv.merged_linear(), heads=qkv.heads)
    holders = [m for m in encoder.modules() if isinstance(getattr(m, "fact", None), FactShared)]
    for holder in holders:
        merged.add("fact")
        holder.fact = None
    return [m for m in ("lora", "fact") if m in merged]
