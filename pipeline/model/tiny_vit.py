"""TinyViT image encoder, as MobileSAM uses it and as LiteMedSAM modified it.

Four stages over a patch grid of side P: stage 0 is inverted-residual conv blocks (MBConv), stages
1-3 are transformer blocks with windowed attention and learned per-offset attention biases, a
depthwise 3x3 conv between attention and MLP. A conv "patch merging" between stages halves the
grid into stages 1 and 2; the merge into the last stage keeps it, so the output grid is P/4.
A SAM neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) maps the last stage to the embeddings.

The patch embedding is two conv + BatchNorm layers with a GELU between them: LiteMedSAM's are
1x1, stride 1 (P = S: 256 px in, 64x64 embeddings out); MobileSAM's are 3x3, stride 2 (P = S/4:
1024 px in, 64x64 out). Module names follow the checkpoints (``patch_embed.seq.0.c``,
``layers.i.blocks.j.attn.attention_biases``, ``neck.0`` ...) so their files load strictly.
BatchNorm layers stay in eval mode (running statistics) unless ``train_batchnorm`` is set: a
frozen encoder must give the same embeddings in training as in evaluation.

Where PEFT goes (``pipeline/model/peft/inject.py`` attaches it; ``TinyVitBlock`` runs it): only
into the transformer blocks of stages 1-3, the blocks with attention and an MLP, which is what
every method is defined on. Stage 0 is MBConv (conv maps, no attention, no MLP, no token
LayerNorm) and the patch merges and the neck are convolutions: none gets PEFT.

- LoRA, FacT: low-rank updates of the q and v parts of the fused ``attn.qkv`` (laid out per head
  as [q, k, v], so the parts are interleaved); FacT's shared U, V are per stage, since the stages
  differ in width.
- SAM-Med2D's adapter: beside the MLP, on the MLP's normalised input (``mlp.norm``), as on the
  ViT's ``norm2`` output.
- MSA's adapters: ``space`` on the attention output before its residual add; ``mlp`` beside the
  MLP (x0.5); ``depth`` (model.slices > 1) after the block's attention run across the D slices
  at each token position, without the window's offset biases (they encode 2D offsets inside a
  window, which slices do not have).
- MA-SAM's 3D adapters: before the attention and before the MLP (after the local conv, so the
  MLP's input is what it adapts), as in the ViT block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from pipeline.model.config import TINY_VIT_SHAPES

if TYPE_CHECKING:  # the PEFT modules are attached by pipeline.model.peft.inject
    from pipeline.model.peft.adapter3d import Adapter3d
    from pipeline.model.peft.adapters import Med2dAdapter, MsaAdapters
    from pipeline.model.peft.qkv import FactShared


@dataclass(frozen=True)
class TinyVitShape:
    """Stage widths, depths, heads and attention windows (stage 0 has no attention); the
    defaults are TinyViT-5M's (MobileSAM's, LiteMedSAM's)."""

    widths: tuple[int, ...] = TINY_VIT_SHAPES["tiny_vit"]["widths"]
    depths: tuple[int, ...] = TINY_VIT_SHAPES["tiny_vit"]["depths"]
    heads: tuple[int, ...] = TINY_VIT_SHAPES["tiny_vit"]["heads"]
    windows: tuple[int, ...] = TINY_VIT_SHAPES["tiny_vit"]["windows"]
    mlp_ratio: int = 4
    mbconv_ratio: int = 4

    @classmethod
    def of(cls, arch: str) -> TinyVitShape:
        """The shape of ``model.arch`` (a key of ``TINY_VIT_SHAPES``)."""
        return cls(**TINY_VIT_SHAPES[arch])


class ConvBN(nn.Sequential):
    """A bias-free conv followed by BatchNorm (children ``c`` and ``bn``, as the files name them).

    Arguments:
      cin, cout (int): channels.
      kernel (int): square kernel; padding keeps the size at stride 1.
      stride (int): conv stride.
      groups (int): conv groups (``cin`` for a depthwise conv).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, 1x1 project, added to the input, GELU.

    Arguments:
      dim (int): channels in and out.
      ratio (int): expansion of the hidden width.
    """

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        hidden = dim * ratio
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 conv (stride 2, or 1 into the last stage), 1x1 conv, GELU between.

    Arguments:
      cin, cout (int): channels.
      stride (int): 2 halves the grid, 1 keeps it.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(cin, cout)
        self.conv2 = ConvBN(cout, cout, 3, stride=stride, groups=cout)
        self.conv3 = ConvBN(cout, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C', H', W')."""
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


def offset_index(window: int) -> torch.Tensor:
    """Index of the attention bias of each query/key pair of a window: the pair's offset
    (|dy|, |dx|) numbered dy * window + dx, the order in which the files store the offsets.

    Arguments:
      window (int): the window side w.

    Returns:
      torch.Tensor: (w*w, w*w) int64.
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None]).abs() * window + (xs[:, None] - xs[None]).abs()


class WindowAttention(nn.Module):
    """Multi-head attention over the tokens of one window, with a learned bias per head and
    offset. The LayerNorm is inside (``attn.norm``); qkv is laid out per head as [q, k, v].

    Arguments:
      dim (int): token width.
      heads (int): attention heads (dividing ``dim``).
      window (int): window side w.
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        self.register_buffer("bias_index", offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor, offsets: bool = True) -> torch.Tensor:
        """(N, L, C) tokens of N windows -> (N, L, C); L = w*w, or any L without ``offsets``.

        Arguments:
          x (torch.Tensor): the tokens.
          offsets (bool): add the learned per-offset biases (False: plain attention over any
            sequence, MSA's depth branch across slices).
        """
        n, length, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(n, length, self.heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        if offsets:
            scores = scores + self.attention_biases[:, self.bias_index]
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


def _windowed(attn: WindowAttention, x: torch.Tensor, window: int) -> torch.Tensor:
    """Apply ``attn`` in non-overlapping windows; the map is zero-padded at the bottom and right
    to whole windows first (the padding tokens take part as keys, as in the checkpoints'
    training, so the result depends on it) and cropped after.

    Arguments:
      attn (WindowAttention): the attention.
      x (torch.Tensor): (B, H, W, C).
      window (int): window side w.

    Returns:
      torch.Tensor: (B, H, W, C).
    """
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    nh, nw = (h + pad_h) // window, (w + pad_w) // window
    tiles = x.view(b, nh, window, nw, window, c).transpose(2, 3).reshape(-1, window * window, c)
    out = attn(tiles).view(b, nh, nw, window, window, c).transpose(2, 3)
    return out.reshape(b, nh * window, nw * window, c)[:, :h, :w]


class Mlp(nn.Module):
    """LayerNorm, linear, GELU, linear (children ``norm``, ``fc1``, ``fc2``).

    Arguments:
      dim (int): width in and out.
      hidden (int): hidden width.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C)."""
        return self.body(self.norm(x))

    def body(self, normed: torch.Tensor) -> torch.Tensor:
        """The MLP after its LayerNorm: (..., C) normalised tokens -> (..., C)."""
        return self.fc2(F.gelu(self.fc1(normed)))


class TinyVitBlock(nn.Module):
    """x + windowed attention; depthwise 3x3 conv + BatchNorm (no residual); x + MLP; with the
    PEFT modules attached to it (absent unless enabled; each adds exactly zero at zero init)::

        x = x + adapter3d_attn(x, D)                                     # MA-SAM
        a = windowed attn(x)              (its LayerNorm inside; LoRA/FacT inside attn.qkv)
        a = a + msa.space(a) + msa.depth(attn across the D slices of x)  # MSA
        x = local_conv(x + a)
        x = x + adapter3d_mlp(x, D)                                      # MA-SAM
        n = mlp.norm(x)
        x = x + (mlp.body(n) + med2d_adapter(n) + 0.5 * msa.mlp(n))      # SAM-Med2D, MSA

    Arguments:
      dim, heads, window (int): token width, attention heads, window side.
      mlp_ratio (int): MLP hidden width / dim.
    """

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: int) -> None:
        super().__init__()
        self.dim = dim
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.med2d_adapter: Med2dAdapter | None = None
        self.msa: MsaAdapters | None = None
        self.adapter3d_attn: Adapter3d | None = None
        self.adapter3d_mlp: Adapter3d | None = None

    def _depth_attention(self, x: torch.Tensor, slices: int) -> torch.Tensor:
        """The block's attention across the D slices of each volume at every token position
        (MSA's depth branch), without the window's offset biases: (B*D, H, W, C) -> same."""
        n, h, w, c = x.shape
        b = n // slices
        seq = x.reshape(b, slices, h, w, c).permute(0, 2, 3, 1, 4).reshape(b * h * w, slices, c)
        out = self.attn(seq, offsets=False).reshape(b, h, w, slices, c)
        return out.permute(0, 3, 1, 2, 4).reshape(n, h, w, c)

    def forward(self, x: torch.Tensor, slices: int = 1) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): tokens (B*D, H, W, C).
          slices (int): D, adjacent slices of one volume stacked consecutively in the batch.

        Returns:
          torch.Tensor: (B*D, H, W, C).
        """
        if self.adapter3d_attn is not None:
            x = x + self.adapter3d_attn(x, slices)
        a = _windowed(self.attn, x, self.window)
        if self.msa is not None:
            a = a + self.msa.space(a)
            if self.msa.depth is not None and slices > 1:
                a = a + self.msa.depth(self._depth_attention(x, slices))
        x = x + a
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.adapter3d_mlp is not None:
            x = x + self.adapter3d_mlp(x, slices)
        normed = self.mlp.norm(x)
        out = self.mlp.body(normed)
        if self.med2d_adapter is not None:
            out = out + self.med2d_adapter(normed)
        if self.msa is not None:
            out = out + self.msa.mlp_scale * self.msa.mlp(normed)
        return x + out


class Stage(nn.Module):
    """The blocks of one stage (MBConv or TinyViT blocks), then the merge into the next stage.

    Arguments:
      blocks (list[nn.Module]): the stage's blocks.
      downsample (PatchMerging or None): the merge (None for the last stage).
      channels_last (bool): whether the blocks take (B, H, W, C) tokens (attention stages) or
        (B, C, H, W) maps (the conv stage).
    """

    def __init__(
        self, blocks: list[nn.Module], downsample: PatchMerging | None, channels_last: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.channels_last = channels_last
        # FacT's U and V, shared by the stage's blocks (set by PEFT injection, as ``fact.*``).
        self.fact: FactShared | None = None

    def forward(self, x: torch.Tensor, slices: int = 1) -> torch.Tensor:
        """(B*D, C, H, W) -> (B*D, C', H', W'); ``slices`` = D for the 3D adapters."""
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x, slices) if self.channels_last else block(x)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    """Two conv + BatchNorm layers with a GELU between them (``seq.0``, ``seq.2``).

    Arguments:
      width (int): output channels (the first layer has half).
      kernel (int): 1 (LiteMedSAM: stride 1) or 3 (MobileSAM: stride 2 each, grid S/4).
    """

    def __init__(self, width: int, kernel: int) -> None:
        super().__init__()
        stride = 1 if kernel == 1 else 2
        self.seq = nn.Sequential(
            ConvBN(3, width // 2, kernel, stride),
            nn.GELU(),
            ConvBN(width // 2, width, kernel, stride),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, width, P, P)."""
        return self.seq(x)


def _stage(shape: TinyVitShape, i: int) -> Stage:
    width, last = shape.widths[i], len(shape.widths) - 1
    down = None
    if i < last:  # the merge into the last stage keeps the grid (MobileSAM's 64x64 output)
        down = PatchMerging(width, shape.widths[i + 1], stride=1 if i + 1 == last else 2)
    if i == 0:
        blocks = [MBConv(width, shape.mbconv_ratio) for _ in range(shape.depths[0])]
    else:
        blocks = [
            TinyVitBlock(width, shape.heads[i], shape.windows[i], shape.mlp_ratio)
            for _ in range(shape.depths[i])
        ]
    return Stage(blocks, down, channels_last=i > 0)


class TinyVitEncoder(nn.Module):
    """TinyViT + SAM neck: normalised images -> image embeddings.

    Arguments:
      shape (TinyVitShape): stage sizes (MobileSAM's TinyViT-5M by default, also LiteMedSAM's).
      patch_kernel (int): 1 = LiteMedSAM's patch embedding (embeddings at S/4), 3 = MobileSAM's
        (embeddings at S/16).
      out_chans (int): embedding width (SAM: 256).
    """

    def __init__(
        self, shape: TinyVitShape | None = None, *, patch_kernel: int = 1, out_chans: int = 256
    ) -> None:
        super().__init__()
        shape = shape or TinyVitShape()
        self.stride = 4 if patch_kernel == 1 else 16
        self.train_batchnorm = False
        self.patch_embed = PatchEmbed(shape.widths[0], patch_kernel)
        self.layers = nn.ModuleList(_stage(shape, i) for i in range(len(shape.widths)))
        self.neck = nn.Sequential(
            nn.Conv2d(shape.widths[-1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def train(self, mode: bool = True) -> TinyVitEncoder:
        """Set the mode; BatchNorm layers stay in eval mode unless ``train_batchnorm``."""
        super().train(mode)
        if mode and not self.train_batchnorm:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def transformer_blocks(self) -> list[tuple[Stage, TinyVitBlock]]:
        """The blocks PEFT can go into, in order (``model.peft_blocks`` numbers them): every
        block of stages 1-3, each with its stage."""
        return [
            (stage, block) for stage in self.layers if stage.channels_last for block in stage.blocks
        ]

    def forward(self, x: torch.Tensor, slices: int = 1) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): normalised images (N, 3, S, S); N = B*D for 3D inputs.
          slices (int): D, for the 3D adapters and MSA's depth branch (1 for 2D inputs).

        Returns:
          torch.Tensor: image embeddings (N, out_chans, S/stride, S/stride).
        """
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x, slices)
        return self.neck(x)
