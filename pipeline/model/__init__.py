"""The model: SAM (from ``segment_anything``) + composable PEFT methods + heads.

``build_model(cfg=ModelConfig)`` returns a ``SamAdapt``; see ``wrapper.SamAdapt`` for its API.
"""

from pipeline.model.build import build_meta_model, build_model
from pipeline.model.checkpoint import CheckpointError, load_sam_checkpoint
from pipeline.model.export import export_trainable, load_exported
from pipeline.model.wrapper import SamAdapt

__all__ = [
    "CheckpointError",
    "SamAdapt",
    "build_meta_model",
    "build_model",
    "export_trainable",
    "load_exported",
    "load_sam_checkpoint",
]
