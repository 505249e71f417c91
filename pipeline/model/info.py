"""Parameter accounting: total / trainable parameters per part of a ``SamAdapt`` model.

``parameter_table(cfg)`` counts them for a config without loading any weights (the model is built
on the meta device, so even ViT-H costs no memory); ``samadapt model-info`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pipeline.model.build import build_meta_model
from pipeline.model.config import PEFT_METHODS, ModelConfig
from pipeline.model.peft import peft_method_of


@dataclass
class PartCount:
    """Parameters of one part of the model."""

    part: str
    total: int
    trainable: int


def _part_of(name: str, encoder: str) -> str:
    top = name.split(".", 1)[0]
    if top == "image_encoder":
        method = peft_method_of(name)
        return f"peft: {method}" if method else encoder
    return top


def count_parameters(model: nn.Module) -> list[PartCount]:
    """Rows for the encoder's base weights (``image_encoder (SAM)``, or ``(TinyViT)``), each
    PEFT method, the prompt encoder, the mask decoder and the head (parts without parameters are
    left out), then a ``total`` row."""
    cfg = getattr(model, "cfg", None)
    encoder = "image_encoder (TinyViT)" if cfg and cfg.is_tiny_vit else "image_encoder (SAM)"
    order = [encoder, *(f"peft: {m}" for m in PEFT_METHODS)]
    order += ["prompt_encoder", "mask_decoder", "head"]
    rows = {part: PartCount(part, 0, 0) for part in order}
    for name, param in model.named_parameters():
        row = rows[_part_of(name, encoder)]
        row.total += param.numel()
        row.trainable += param.numel() if param.requires_grad else 0
    out = [row for row in rows.values() if row.total]
    out.append(PartCount("total", sum(r.total for r in out), sum(r.trainable for r in out)))
    return out


def format_table(rows: list[PartCount]) -> str:
    """A plain-text table with parameter counts in millions and exact numbers."""
    lines = [f"{'part':<28} {'total':>14} {'trainable':>14}"]
    for row in rows:
        if row.part == "total":
            lines.append("-" * 60)
        lines.append(f"{row.part:<28} {row.total / 1e6:>12.3f} M {row.trainable / 1e6:>12.3f} M")
    total = rows[-1]
    lines.append(
        f"trainable: {total.trainable:,} parameters ({100 * total.trainable / total.total:.2f}%),"
        f" export ~{total.trainable * 4 / 2**20:.1f} MB fp32 / "
        f"{total.trainable * 2 / 2**20:.1f} MB bf16"
    )
    return "\n".join(lines)


def parameter_table(cfg: ModelConfig) -> list[PartCount]:
    """``count_parameters`` of the model ``cfg`` builds, built on the meta device (no memory,
    no weights read)."""
    return count_parameters(build_meta_model(cfg=cfg))


def describe(cfg: ModelConfig) -> str:
    """One line naming the model: arch, width and depth (ViT) or embedding grid (TinyViT),
    input size, PEFT methods and head."""
    if cfg.is_tiny_vit:
        grid = cfg.embedding_size
        shape = f"TinyViT, {grid}x{grid} embeddings"
    else:
        spec = cfg.encoder_spec()
        shape = f"width {spec[0]}, depth {spec[1]}"
    encoder = f" (encoder {cfg.encoder_size} px)" if cfg.encoder_size != cfg.image_size else ""
    return (
        f"{cfg.arch} ({shape}) @ {cfg.image_size} px{encoder}, "
        f"peft={cfg.peft}, head={cfg.head}"
    )
