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
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


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
        """Global attention: (B, H, W, C) -> (B, H, W, C)."""
        qkv = self.qkv(x)
        c = x.shape[-1]
        return self.proj(self._attend(qkv[..., :c], qkv[..., c:]))

    def windowed(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """Attention within ``window`` x ``window`` windows, as SAM's windowed blocks.

        SAM pads the token grid with zeros up to a multiple of the window and runs the whole
        attention, projections included, on the padded windows: at 256 px (a 16 x 16 grid,
        window 14 -> 28 x 28) that is 3x the tokens. A padding token is zero, so its q, k and v
        are ``qkv(0)``, one vector for all of them, and its output is dropped. So only the real
        tokens are projected, the padding is filled with ``qkv(0)`` (it still takes part as
        keys and values, as in SAM), and only the real tokens are queries: the real part of a
        window is its top-left rectangle, so windows are attended in at most four groups (full,
        last row, last column, corner) with the rows of the relative-position tables of their
        query rectangle. Same result (``qkv`` is per token: linear, LoRA, FacT).

        Arguments:
          x (torch.Tensor): normalised tokens (B, H, W, C).
          window (int): window side.

        Returns:
          torch.Tensor: (B, H, W, C).
        """
        b, h, w, c = x.shape
        pad_h, pad_w = (-h) % window, (-w) % window
        qkv_all = self.qkv(x)  # (B, H, W, 3C): one matrix product for all real tokens
        fill = self.qkv(x.new_zeros(1, 1, 1, c))[..., c:] if pad_h or pad_w else None
        bands = []
        for rows, real_h in _window_groups(h, window):
            band = []
            for cols, real_w in _window_groups(w, window):
                # the windows of one kind: their real tokens' q, k, v as (N, real_h, real_w, 3C)
                whole = (rows.start, rows.stop, cols.start, cols.stop) == (0, h, 0, w)
                part = qkv_all if whole else qkv_all[:, rows, cols]
                n_r, n_c = part.shape[1] // real_h, part.shape[2] // real_w
                qkv = part.reshape(b, n_r, real_h, n_c, real_w, -1)
                qkv = qkv.permute(0, 1, 3, 2, 4, 5).reshape(-1, real_h, real_w, 3 * c)
                kv = qkv[..., c:]
                if real_w < window:
                    kv = torch.cat([kv, fill.expand(kv.shape[0], real_h, window - real_w, -1)], 2)
                if real_h < window:
                    kv = torch.cat([kv, fill.expand(kv.shape[0], window - real_h, window, -1)], 1)
                out = self._attend(qkv[..., :c], kv)  # (N, real_h, real_w, C)
                out = out.view(b, n_r, n_c, real_h, real_w, c).permute(0, 1, 3, 2, 4, 5)
                band.append(out.reshape(b, n_r * real_h, n_c * real_w, c))
            bands.append(torch.cat(band, dim=2) if len(band) > 1 else band[0])
        out = torch.cat(bands, dim=1) if len(bands) > 1 else bands[0]
        return self.proj(out)

    def _attend(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Attention of a top-left block of query positions to all key positions of a grid.

        Arguments:
          q (torch.Tensor): queries, (N, real_h, real_w, C): the whole grid (global attention)
            or the real part of a padded window.
          kv (torch.Tensor): keys and values of the whole grid or window, (N, kh, kw, 2C).

        Returns:
          torch.Tensor: (N, real_h, real_w, C), before ``proj``.
        """
        n, real_h, real_w, c = q.shape
        kh, kw, heads = kv.shape[1], kv.shape[2], self.num_heads
        lq, lk = real_h * real_w, kh * kw
        # (N*heads, L, head_dim) in contiguous memory, laid out as SAM's ``Attention`` has them
        q = q.reshape(n, lq, heads, -1).transpose(1, 2).reshape(n * heads, lq, -1)
        kv = kv.reshape(n, lk, 2, heads, -1).permute(2, 0, 3, 1, 4)
        k, v = kv.reshape(2, n * heads, lk, -1).unbind(0)
        rel_h = rel_w = None
        if self.use_rel_pos:
            table_h = get_rel_pos(kh, kh, self.rel_pos_h)[:real_h].to(q.dtype)
            table_w = get_rel_pos(kw, kw, self.rel_pos_w)[:real_w].to(q.dtype)
            grid_q = q.reshape(n * heads, real_h, real_w, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, table_h)[:, :, :, :, None]
            rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, table_w)[:, :, :, None, :]
        shape = (n * heads, real_h, real_w, kh, kw)
        if self.fused:
            bias = None
            if rel_h is not None:
                bias = (rel_h + rel_w).reshape(n, heads, lq, lk)
            out = F.scaled_dot_product_attention(
                q.view(n, heads, lq, -1), k.view(n, heads, lk, -1), v.view(n, heads, lk, -1),
                attn_mask=bias, scale=self.scale,
            ).reshape(n * heads, lq, -1)  # fmt: skip
        else:  # SAM's order of operations, so the result is SAM's to the bit
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if rel_h is not None:
                attn = (attn.view(shape) + rel_h + rel_w).view(attn.shape)
            out = attn.softmax(dim=-1) @ v
        return out.view(n, heads, lq, -1).transpose(1, 2).reshape(n, real_h, real_w, c)


def _window_groups(size: int, window: int) -> list[tuple[slice, int]]:
    """Split ``size`` tokens along one axis into runs of windows with the same number of real
    tokens: ``[(token slice, real tokens per window)]`` (the last window may be partial)."""
    full, last = divmod(size, window)
    groups = [(slice(0, full * window), window)] if full else []
    return [*groups, (slice(full * window, size), last)] if last else groups
