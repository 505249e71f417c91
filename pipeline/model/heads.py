"""Prompt-free segmentation heads: AutoSAM's progressive upsampler, a UNet-like CNN, a linear head.

All produce ``num_classes + 1`` logit channels (channel 0 = background) for multi-class semantic
segmentation. (The ``auto`` head itself is SAM's mask decoder with one mask token per class, see
``decoder.BatchedMaskDecoder``; ``ProgressiveUpsampler`` is its optional full-resolution stage.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class _UpStage(nn.Module):
    """x2 upsampling: bilinear plus a learned residual (transposed conv, norm, GELU, 1x1 conv
    starting at zero)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2)
        self.norm = LayerNorm2d(channels)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return base + self.proj(self.act(self.norm(self.up(x))))


class ProgressiveUpsampler(nn.Module):
    """Two learned x2 stages from the decoder's 1/4 resolution to the input resolution.

    MA-SAM replaces SAM's x4 output upscaling by four transposed-conv stages (x16) with new,
    narrower hypernetworks. We keep SAM's pretrained x4 upscaling and hypernetworks and add two
    stages whose learned part starts at zero: at initialisation the full-resolution logits equal
    the 1/4-resolution logits upsampled by two bilinear x2 steps (the hypernetwork product is
    linear, so upsampling features or logits is the same), and training refines them.

    Arguments:
      channels (int): channels of the upscaled embedding (transformer_dim // 8 = 32).
    """

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.stages = nn.Sequential(_UpStage(channels), _UpStage(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(P, C, S/4, S/4) -> (P, C, S, S)."""
        return self.stages(x)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.GELU(),
    )


class CnnHead(nn.Module):
    """A light UNet-like decoder on the encoder embedding.

    The embedding (1/16 for a ViT) is upsampled x2 four times; at 1/8, 1/4 and 1/2 it is
    concatenated with features of a three-conv stem run on the (normalised) image, the skip
    connections a UNet gets from its encoder. On a TinyViT's 1/4 embedding (``stride=4``) the
    same head keeps its last two stages and the stem's first conv (the skip at 1/2).

    Arguments:
      num_outputs (int): output channels (num_classes + 1).
      in_chans (int): embedding channels (256).
      widths (tuple(int)): decoder widths at 1/8, 1/4, 1/2, 1/1.
      stride (int): input pixels per embedding cell, a power of 2 from 2 to 16.
    """

    def __init__(
        self,
        num_outputs: int,
        in_chans: int = 256,
        widths: tuple[int, ...] = (128, 64, 32, 16),
        stride: int = 16,
    ) -> None:
        super().__init__()
        ups = stride.bit_length() - 1  # x2 stages from the embedding to the input size
        if stride != 1 << ups or not 1 <= ups <= len(widths):
            raise ValueError(f"CnnHead: stride must be a power of 2 in [2, 16], got {stride}")
        widths = widths[-ups:]
        chans = (16, 32, 64)[: ups - 1]  # stem channels at 1/2, 1/4, 1/8 (those above 1/stride)
        self.stem = nn.ModuleList(_conv(i, o, 2) for i, o in zip((3, *chans), chans, strict=False))
        skips = (*chans[::-1], 0)  # the last stage, at 1/1, has no skip
        ins = [a + b for a, b in zip((in_chans, *widths[:-1]), skips, strict=True)]
        self.stages = nn.ModuleList(_conv(i, o) for i, o in zip(ins, widths, strict=True))
        self.out = nn.Conv2d(widths[-1], num_outputs, kernel_size=1)

    def forward(self, embeddings: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
          embeddings (torch.Tensor): (B, 256, S/stride, S/stride).
          images (torch.Tensor): normalised images (B, 3, S, S).

        Returns:
          torch.Tensor: logits (B, num_outputs, S, S).
        """
        feats = []
        x = images.to(embeddings.dtype)
        for conv in self.stem:
            x = conv(x)
            feats.append(x)  # 1/2, 1/4, 1/8 (as many as the stride needs)
        skips = feats[::-1] + [None]
        y = embeddings
        for stage, skip in zip(self.stages, skips, strict=True):
            y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
            if skip is not None:
                y = torch.cat((y, skip), dim=1)
            y = stage(y)
        return self.out(y)


class LinearHead(nn.Module):
    """A per-pixel linear layer (1x1 conv) on the embedding, bilinearly upsampled to the input
    (x16 for a ViT, x4 for a TinyViT).

    Arguments:
      num_outputs (int): output channels (num_classes + 1).
      in_chans (int): embedding channels (256).
      stride (int): input pixels per embedding cell.
    """

    def __init__(self, num_outputs: int, in_chans: int = 256, stride: int = 16) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_chans, num_outputs, kernel_size=1)
        self.stride = stride

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, 256, S/stride, S/stride) -> logits (B, num_outputs, S, S)."""
        logits = self.linear(embeddings)
        return F.interpolate(logits, scale_factor=self.stride, mode="bilinear", align_corners=False)
