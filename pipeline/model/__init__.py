"""The model: SAM (from ``segment_anything``) + composable PEFT methods + heads.

``build_model(cfg=ModelConfig)`` returns a ``SamAdapt``; see ``wrapper.SamAdapt`` for its API.
The model section itself is ``pipeline.model.config``.

The names below are imported on first use: importing ``pipeline.model.config`` (which every
config load does, also ``samadapt shard``) must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.lazy import lazy_names

if TYPE_CHECKING:  # for type checkers and editors; at run time see __getattr__
    from pipeline.model.build import build_meta_model, build_model
    from pipeline.model.export import export_trainable, load_exported
    from pipeline.model.weights import WeightsError, load_sam_checkpoint
    from pipeline.model.wrapper import SamAdapt

_WHERE = {
    "WeightsError": "pipeline.model.weights",
    "SamAdapt": "pipeline.model.wrapper",
    "build_meta_model": "pipeline.model.build",
    "build_model": "pipeline.model.build",
    "export_trainable": "pipeline.model.export",
    "load_exported": "pipeline.model.export",
    "load_sam_checkpoint": "pipeline.model.weights",
}

__all__ = [
    "WeightsError",
    "SamAdapt",
    "build_meta_model",
    "build_model",
    "export_trainable",
    "load_exported",
    "load_sam_checkpoint",
]

__getattr__ = lazy_names(__name__, _WHERE)
