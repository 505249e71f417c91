"""Bottleneck adapters of SAM-Med2D and Medical SAM Adapter (MSA).

Both work on the encoder's token map ``(N, H, W, C)``. Each returns only the *change* it makes, and
its last learned projection starts at zero, so a freshly built adapted encoder computes exactly
what the frozen SAM encoder does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Med2dAdapter(nn.Module):
    """SAM-Med2D's adapter, run beside a block's MLP on the normalised tokens.

    Channel attention (squeeze-excitation: average pool, Linear C -> C*ratio, ReLU, Linear back,
    sigmoid) gates the tokens; a 3x3 stride-2 convolution and a stride-2 transposed convolution
    (kernel 4) with ReLUs give the spatial branch; the input is added back and a LayerNorm closes.
    SAM-Med2D's LayerNorm starts at weight 1; ours starts with weight and bias 0, so the adapter's
    output is exactly zero at initialisation (and trains like any other LayerNorm afterwards).

    Arguments:
      dim (int): token width C.
      ratio (float): bottleneck ratio of the channel attention (SAM-Med2D: 0.25).
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.channel = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, dim, bias=False),
            nn.Sigmoid(),
        )
        self.down = nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.up = nn.ConvTranspose2d(dim, dim, kernel_size=4, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(dim)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): normalised tokens, (N, H, W, C).

        Returns:
          torch.Tensor: the adapter's contribution, (N, H, W, C).
        """
        n, h, w, c = x.shape
        gate = self.channel(x.mean(dim=(1, 2)))
        # (N, C, H, W) in contiguous memory: oneDNN's convolution backward is ~1.5x slower on
        # the permuted (channels-last strided) view.
        maps = (x * gate[:, None, None, :]).permute(0, 3, 1, 2).contiguous()
        spatial = F.relu(self.down(maps))
        spatial = F.relu(self._up(spatial))[:, :, :h, :w]  # odd sizes come back one larger
        return self.norm(x + spatial.permute(0, 2, 3, 1))

    def _up(self, y: torch.Tensor) -> torch.Tensor:
        if y.device.type != "cpu":
            return self.up(y)
        # On the CPU the same transposed convolution as one matrix product and a col2im
        # (``F.fold``) runs forward + backward ~1.5x faster than oneDNN's kernel at these
        # shapes (768 channels, 8x8 -> 16x16). Same weights, same result up to float rounding.
        n, c, hh, ww = y.shape
        weight = self.up.weight  # (C_in, C_out, k, k)
        k, s, p = self.up.kernel_size[0], self.up.stride[0], self.up.padding[0]
        cols = weight.reshape(c, -1).t() @ y.reshape(n, c, hh * ww)  # (N, C_out*k*k, H*W)
        size = ((hh - 1) * s - 2 * p + k, (ww - 1) * s - 2 * p + k)
        return F.fold(cols, size, k, stride=s, padding=p)


class Bottleneck(nn.Module):
    """MSA's adapter: Linear C -> C*ratio, GELU, Linear back (the second starts at zero).

    Arguments:
      dim (int): token width C.
      ratio (float): bottleneck ratio (MSA: 0.25).
    """

    def __init__(self, dim: int, ratio: float = 0.25) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C): the adapter's contribution (no skip; the block adds it)."""
        return self.fc2(self.act(self.fc1(x)))


def depth_grid(slices: int) -> tuple[int, int]:
    """Lay ``slices`` tokens out on the most square (rows, cols) grid, rows <= cols (as MSA)."""
    rows = max(d for d in range(1, int(slices**0.5) + 1) if slices % d == 0)
    return rows, slices // rows


class MsaAdapters(nn.Module):
    """The adapters MSA puts in one block.

    ``space``: after attention, with a skip (the block adds ``space(attn_out)`` to ``attn_out``).
    ``mlp``: beside the MLP, without skip, scaled by ``mlp_scale`` (0.5).
    ``depth`` (only for 3D inputs, ``slices > 1``): the block's frozen attention run across the D
    slices of each token position, then this adapter; added to the attention output.

    Arguments:
      dim (int): token width C.
      depth_branch (bool): build the depth adapter.
      mlp_scale (float): factor on the MLP adapter (MSA: 0.5).
    """

    def __init__(self, dim: int, *, depth_branch: bool, mlp_scale: float = 0.5) -> None:
        super().__init__()
        self.space = Bottleneck(dim)
        self.mlp = Bottleneck(dim)
        self.depth = Bottleneck(dim) if depth_branch else None
        self.mlp_scale = mlp_scale

    def depth_attention(self, attn: nn.Module, x: torch.Tensor, slices: int) -> torch.Tensor:
        """Attend across the slices of each volume at every token position.

        Arguments:
          attn (nn.Module): the block's (frozen) attention, taking (B', h, w, C).
          x (torch.Tensor): normalised tokens, (B*D, H, W, C), D consecutive slices per volume.
          slices (int): D.

        Returns:
          torch.Tensor: the depth adapter's contribution, (B*D, H, W, C).
        """
        n, h, w, c = x.shape
        b = n // slices
        rows, cols = depth_grid(slices)
        seq = x.reshape(b, slices, h, w, c).permute(0, 2, 3, 1, 4)  # (B, H, W, D, C)
        out = attn(seq.reshape(b * h * w, rows, cols, c))
        out = out.reshape(b, h, w, slices, c).permute(0, 3, 1, 2, 4).reshape(n, h, w, c)
        return self.depth(out)
