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
        b, h, w, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
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
        out = out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)
