"""SAM's encoder attention, with an optional fused (scaled_dot_product_attention) path.

``EncoderAttention`` takes over the parameters of a stock ``segment_anything`` ``Attention``
(``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w`` keep their names). The plain path computes what the
stock module computes, op for op. The fused path passes SAM's decomposed relative-position terms
as an additive ``attn_mask`` to ``F.scaled_dot_product_attention``, which on GPUs runs the
memory-efficient kernel (the flash kernel takes no mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos, get_rel_pos
from torch import nn


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position term as an additive attention bias.

    Arguments:
      q (torch.Tensor): queries (B*heads, h*w, head_dim), unscaled.
      rel_pos_h, rel_pos_w (torch.Tensor): the tables (L, head_dim).
      size (tuple(int, int)): (h, w) of the token grid (queries and keys alike).

    Returns:
      torch.Tensor: (B*heads, h*w, h*w), to add to the scaled q.k logits.
    """
    h, w = size
    table_h = get_rel_pos(h, h, rel_pos_h)  # (h, h, head_dim)
    table_w = get_rel_pos(w, w, rel_pos_w)
    bh, _, dim = q.shape
    grid_q = q.reshape(bh, h, w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, table_h.to(q.dtype))
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, table_w.to(q.dtype))
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(bh, h * w, h * w)


class EncoderAttention(nn.Module):
    """Multi-head attention of one encoder block (global or one window).

    Arguments:
      stock (Attention): the block's ``segment_anything`` attention; parameters are taken over.
    """

    def __init__(self, stock: Attention) -> None:
        super().__init__()
        self.num_heads = stock.num_heads
        self.scale = stock.scale
        self.qkv = stock.qkv
        self.proj = stock.proj
        self.use_rel_pos = stock.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = stock.rel_pos_h
            self.rel_pos_w = stock.rel_pos_w
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        return self.proj(self.core(self.qkv(x)))

    def core(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention between projections: (B, H, W, 3C) -> (B, H, W, C), before ``proj``."""
        b, h, w, _ = qkv.shape
        heads = self.num_heads
        qkv = qkv.reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * heads, h * w, -1).unbind(0)
        if self.fused:
            bias = None
            if self.use_rel_pos:
                bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w))
                bias = bias.view(b, heads, h * w, h * w)
            shape = (b, heads, h * w, -1)
            out = F.scaled_dot_product_attention(
                q.view(shape), k.view(shape), v.view(shape), attn_mask=bias, scale=self.scale
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if self.use_rel_pos:
                attn = add_decomposed_rel_pos(
                    attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w)
                )
            out = attn.softmax(dim=-1) @ v
        return out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)

    def windowed(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """Attention within ``window`` x ``window`` windows, as SAM's windowed blocks.

        SAM pads the token grid with zeros up to a multiple of the window and runs the whole
        attention, projections included, on the padded windows: at 256 px (a 16 x 16 grid,
        window 14 -> 28 x 28) that is 3x the tokens in ``qkv`` and ``proj``. A padding token is
        zero, so its q, k and v are ``qkv(0)``, one vector for all of them, and its output is
        dropped. So only the real tokens are projected, the padding is filled with ``qkv(0)``
        (it still takes part as keys and values, as in SAM), and only the real outputs go
        through ``proj``. Same result (``qkv`` is per token: linear, LoRA, FacT).

        Arguments:
          x (torch.Tensor): normalised tokens (B, H, W, C).
          window (int): window side.

        Returns:
          torch.Tensor: (B, H, W, C).
        """
        b, h, w, c = x.shape
        pad_h, pad_w = (-h) % window, (-w) % window
        qkv = self.qkv(x)
        if pad_h or pad_w:
            fill = self.qkv(x.new_zeros(1, 1, 1, c))
            qkv = torch.cat([qkv, fill.expand(b, h, pad_w, -1)], dim=2)
            qkv = torch.cat([qkv, fill.expand(b, pad_h, w + pad_w, -1)], dim=1)
        hp, wp = h + pad_h, w + pad_w
        windows = (
            qkv.view(b, hp // window, window, wp // window, window, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(-1, window, window, qkv.shape[-1])
        )
        out = self.core(windows)
        out = (
            out.view(b, hp // window, wp // window, window, window, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(b, hp, wp, -1)
        )
        return self.proj(out[:, :h, :w].contiguous())
