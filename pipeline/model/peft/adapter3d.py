"""MA-SAM's 3D adapter: a bottleneck with a convolution across adjacent slices.

The batch holds D consecutive slices of each volume, ``(B*D, H, W, C)``. The adapter normalises,
projects down, convolves with a (3, 1, 1) kernel over the D axis of each volume (zero padding at
the volume's ends, so slices of different volumes never mix), applies GELU and projects back up.
With D = 1 only the kernel's centre tap sees data: a 2D bottleneck adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.peft.init import AdapterInit, check_init


class Adapter3d(nn.Module):
    """One 3D adapter (MA-SAM puts two in a block: before attention and before the MLP).

    ``init="authors"``: every layer keeps PyTorch's default initialisation, as MA-SAM's blocks
    (segment_anything/modeling/image_encoder.py, ``adapter_*``) do, so the adapter is active from
    the first step; ``"zero"``: the up projection starts at 0 (the adapter adds nothing).

    Arguments:
      dim (int): token width C.
      hidden (int): bottleneck width (MA-SAM: 384).
      eps (float): LayerNorm epsilon (SAM's blocks use 1e-6).
      init (str): "authors" or "zero".
    """

    def __init__(
        self, dim: int, hidden: int, eps: float = 1e-6, *, init: AdapterInit = "authors"
    ) -> None:
        check_init(init)
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.down = nn.Linear(dim, hidden, bias=False)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim, bias=False)
        if init == "zero":
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor, slices: int) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): tokens (B*D, H, W, C), D consecutive slices per volume.
          slices (int): D.

        Returns:
          torch.Tensor: the adapter's contribution, (B*D, H, W, C).
        """
        n, h, w, _ = x.shape
        y = self.down(self.norm(x))
        hidden = y.shape[-1]
        y = y.reshape(n // slices, slices, h, w, hidden).permute(0, 4, 1, 2, 3)
        y = self.conv(y).permute(0, 2, 3, 4, 1).reshape(n, h, w, hidden)
        return self.up(self.act(y))
