"""``build_model``: a ready ``SamAdapt`` from the model section of the config."""

from __future__ import annotations

import logging

import torch

from pipeline.model.config import ModelConfig
from pipeline.model.weights import load_sam_checkpoint
from pipeline.model.wrapper import SamAdapt

log = logging.getLogger(__name__)


def build_model(*, cfg: ModelConfig, load_checkpoint: bool = True) -> SamAdapt:
    """Build SAM at ``cfg.encoder_size`` with the configured PEFT methods and head.

    Loads ``cfg.checkpoint`` (Meta's SAM weights, resized to the input size) unless it is empty or
    ``load_checkpoint`` is False; empty means random base weights (tests, ``model-info``). Then
    applies ``cfg.compile``. The model is in train mode and on the CPU (the caller moves it).

    Arguments:
      cfg (ModelConfig): the model section.
      load_checkpoint (bool): False to skip the checkpoint (e.g. building on the meta device).

    Returns:
      SamAdapt: base frozen; trainable parameters as ``model.param_groups()`` lists them.
    """
    model = SamAdapt(cfg)
    if cfg.checkpoint and load_checkpoint:
        load_sam_checkpoint(model, cfg.checkpoint)
    elif not cfg.checkpoint:
        log.info("model.checkpoint is empty: base weights are random")
    if cfg.compile and model.pixel_mean.device.type != "meta":
        model.image_encoder.compile(backend=cfg.compile_backend)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "model %s @ %d px (encoder %d px), peft=%s, head=%s: %.2fM trainable of %.2fM parameters",
        cfg.arch,
        cfg.image_size,
        cfg.encoder_size,
        cfg.peft,
        cfg.head,
        n_train / 1e6,
        n_all / 1e6,
    )
    return model


def build_meta_model(*, cfg: ModelConfig) -> SamAdapt:
    """The model on the meta device (shapes only, no memory, no checkpoint): for counting."""
    with torch.device("meta"):
        return SamAdapt(cfg)
