"""Parameter accounting: total / trainable parameters per part of a ``SamAdapt`` model.

``samadapt model-info CONFIG [key=value ...]`` prints the table for a config without loading any
weights (the model is built on the meta device, so even ViT-H costs no memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from torch import nn

from pipeline.config import PEFT_METHODS, load_config
from pipeline.model.build import build_meta_model
from pipeline.model.peft import peft_method_of


@dataclass
class PartCount:
    """Parameters of one part of the model."""

    part: str
    total: int
    trainable: int


def _part_of(name: str) -> str:
    top = name.split(".", 1)[0]
    if top == "image_encoder":
        method = peft_method_of(name)
        return f"peft: {method}" if method else "image_encoder (SAM)"
    return top


def count_parameters(model: nn.Module) -> list[PartCount]:
    """Rows for the encoder's base weights, each PEFT method, the prompt encoder, the mask
    decoder and the head (parts without parameters are left out), then a ``total`` row."""
    order = ["image_encoder (SAM)", *(f"peft: {m}" for m in PEFT_METHODS)]
    order += ["prompt_encoder", "mask_decoder", "head"]
    rows = {part: PartCount(part, 0, 0) for part in order}
    for name, param in model.named_parameters():
        row = rows[_part_of(name)]
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


def cli(argv: list[str]) -> int:
    """``samadapt model-info CONFIG [key=value ...] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="samadapt model-info",
        description="Total / trainable parameters per part for a config (no weights loaded).",
    )
    parser.add_argument("config", help="config YAML")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides).model
    rows = count_parameters(build_meta_model(cfg=cfg))
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=1))
    else:
        spec = cfg.encoder_spec()
        print(
            f"{cfg.arch} (width {spec[0]}, depth {spec[1]}) @ {cfg.image_size} px, "
            f"peft={cfg.peft}, head={cfg.head}"
        )
        print(format_table(rows))
    sys.stdout.flush()
    return 0
