"""Bottleneck adapters of SAM-Med2D and Medical SAM Adapter (MSA).

Both work on the encoder's token map ``(N, H, W, C)`` and return only the *change* they make.
Their initialisation (``init``, ``model.adapter_init``; see ``init.py``): "authors" as each
method's code does it, so SAM-Med2D's and MSA's adapters start active; "zero": their last
learned layer starts at zero, so a freshly built adapted encoder computes exactly what the frozen
SAM encoder does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.peft.init import AdapterInit, check_init


class Med2dAdapter(nn.Module):
    """SAM-Med2D's adapter, run beside a block's MLP on the normalised tokens.

    Channel attention (squeeze-excitation: average pool, Linear C -> C*ratio, ReLU, Linear back,
    sigmoid) gates the tokens; a 3x3 stride-2 convolution and a stride-2 transposed convolution
    (kernel 4) with ReLUs give the spatial branch; the input is added back and a LayerNorm closes.
    Linear and convolution weights: Kaiming normal (fan out, ReLU), as SAM-Med2D's
    ``Adapter_Layer`` (segment_anything/modeling/image_encoder.py). The LayerNorm: ``init=
    "authors"`` weight 1, bias 0 (SAM-Med2D's, PyTorch's default), so the adapter adds
    ``LayerNorm(x + spatial)`` to the block from the first step; ``"zero"`` weight and bias 0, so
    its output is exactly zero at initialisation (it trains like any other LayerNorm afterwards).

    Arguments:
      dim (int): token width C.
      ratio (float): bottleneck ratio of the channel attention (SAM-Med2D: 0.25).
      init (str): "authors" or "zero".
    """

    def __init__(self, dim: int, ratio: float = 0.25, *, init: AdapterInit = "authors") -> None:
        check_init(init)
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
        if init == "zero":
            nn.init.zeros_(self.norm.weight)
            nn.init.zeros_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): normalised tokens, (N, H, W, C).

        Returns:
          torch.Tensor: the adapter's contribution, (N, H, W, C).
        """
        gate = self.channel(x.mean(dim=(1, 2)))
        gated = x * gate[:, None, None, :]
        if x.device.type == "cpu":
            spatial = self._spatial_gemm(gated)
        else:
            maps = gated.permute(0, 3, 1, 2)
            spatial = F.relu(self.up(F.relu(self.down(maps))))
            spatial = spatial[:, :, : x.shape[1], : x.shape[2]].permute(0, 2, 3, 1)
        return self.norm(x + spatial)

    def _spatial_gemm(self, maps: torch.Tensor) -> torch.Tensor:
        """The conv / transposed-conv branch on (N, H, W, C) tokens as two matrix products.

        On the CPU oneDNN's convolution backward at these shapes (768 channels, 16 x 16 -> 8 x 8)
        runs at ~40 % of the matmul peak; as im2col + GEMM (and GEMM + col2im for the transposed
        convolution), on the channels-last tokens with no layout change, the stride-2
        convolution's forward + backward takes about half the time and a ViT-B's 12 adapters
        ~0.85x. Same weights, same result up to float rounding.
        """
        _, h, w, c = maps.shape
        k, s, p = self.down.kernel_size[0], self.down.stride[0], self.down.padding[0]
        cols = _Unfold.apply(maps, k, s, p)  # (N, h2, w2, C*k*k)
        hidden = F.relu(cols @ self.down.weight.reshape(c, -1).t())  # (N, h2, w2, C)
        _, h2, w2, _ = hidden.shape
        k, s, p = self.up.kernel_size[0], self.up.stride[0], self.up.padding[0]
        cols = hidden @ self.up.weight.reshape(c, -1)  # (N, h2, w2, C*k*k)
        size = ((h2 - 1) * s - 2 * p + k, (w2 - 1) * s - 2 * p + k)
        up = _Fold.apply(cols, size, k, s, p)  # (N, 2*h2, 2*w2, C): odd sizes come back one larger
        return F.relu(up[:, :h, :w])


def _unfold(x: torch.Tensor, k: int, s: int, p: int) -> torch.Tensor:
    """im2col on channels-last maps: (N, H, W, C) -> (N, Ho, Wo, C*k*k), (C, ki, kj) order."""
    n = x.shape[0]
    patches = F.pad(x, (0, 0, p, p, p, p)).unfold(1, k, s).unfold(2, k, s)  # (N,Ho,Wo,C,k,k)
    return patches.reshape(n, patches.shape[1], patches.shape[2], -1)


def _fold(cols: torch.Tensor, size: tuple[int, int], k: int, s: int, p: int) -> torch.Tensor:
    """col2im, the adjoint of ``_unfold``: (N, Ho, Wo, C*k*k) -> (N, H, W, C), overlaps summed."""
    n, ho, wo, _ = cols.shape
    h, w = size
    cols = cols.reshape(n, ho, wo, -1, k, k)
    out = cols.new_zeros(n, max(h + 2 * p, (ho - 1) * s + k), max(w + 2 * p, (wo - 1) * s + k),
                         cols.shape[3])  # fmt: skip
    for i in range(k):
        for j in range(k):
            out[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s] += cols[..., i, j]
    return out[:, p : p + h, p : p + w]


class _Unfold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k, s, p):  # type: ignore[override]
        ctx.size, ctx.geometry = (x.shape[1], x.shape[2]), (k, s, p)
        return _unfold(x, k, s, p)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _fold(grad, ctx.size, *ctx.geometry), None, None, None


class _Fold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cols, size, k, s, p):  # type: ignore[override]
        ctx.geometry = (k, s, p)
        return _fold(cols, size, k, s, p)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _unfold(grad.contiguous(), *ctx.geometry), None, None, None, None


class Bottleneck(nn.Module):
    """MSA's adapter: Linear C -> C*ratio, GELU, Linear back.

    ``init="authors"``: both layers keep PyTorch's default initialisation, as MSA's ``Adapter``
    (models/common/adapter.py) does; ``"zero"``: the second layer's weight and bias start at 0.

    Arguments:
      dim (int): token width C.
      ratio (float): bottleneck ratio (MSA: 0.25).
      init (str): "authors" or "zero".
    """

    def __init__(self, dim: int, ratio: float = 0.25, *, init: AdapterInit = "authors") -> None:
        check_init(init)
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        if init == "zero":
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
      init (str): "authors" or "zero" (see ``Bottleneck``).
    """

    def __init__(
        self,
        dim: int,
        *,
        depth_branch: bool,
        mlp_scale: float = 0.5,
        init: AdapterInit = "authors",
    ) -> None:
        super().__init__()
        self.space = Bottleneck(dim, init=init)
        self.mlp = Bottleneck(dim, init=init)
        self.depth = Bottleneck(dim, init=init) if depth_branch else None
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
