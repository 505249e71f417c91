"""SAM's image encoder with PEFT hooks in every block.

``AdaptedImageEncoder`` *is* a ``segment_anything`` ``ImageEncoderViT`` (same constructor, same
state-dict keys). Its blocks are replaced by ``AdaptedBlock``s that take over the stock children
(``norm1``, ``attn``, ``norm2``, ``mlp``) and carry the PEFT modules of that block, and its forward
adds the slice count D (for the 3D adapters) and per-block activation checkpointing.
"""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.attention import EncoderAttention
from pipeline.model.peft.adapter3d import Adapter3d
from pipeline.model.peft.adapters import Med2dAdapter, MsaAdapters
from pipeline.model.peft.qkv import AdaptedQkv, FactShared


class AdaptedBlock(nn.Module):
    """One ViT block of SAM plus the PEFT modules attached to it.

    Computation (modules absent unless enabled; each contributes exactly zero at init)::

        x = x + adapter3d_attn(x, D)                                     # MA-SAM
        a = attn(norm1(x))            (windowed or global; LoRA/FacT inside attn.qkv)
        a = a + msa.space(a) + msa.depth(depth_attn(norm1(x), D))        # MSA
        x = x + a
        x = x + adapter3d_mlp(x, D)                                      # MA-SAM
        n = norm2(x)
        x = x + (mlp(n) + med2d_adapter(n) + 0.5 * msa.mlp(n))           # SAM-Med2D, MSA

    Arguments:
      stock (Block): a ``segment_anything`` block; its children are taken over.
    """

    def __init__(self, stock: Block) -> None:
        super().__init__()
        self.norm1 = stock.norm1
        self.attn = EncoderAttention(stock.attn)
        self.attn.qkv = AdaptedQkv(stock.attn.qkv)
        self.norm2 = stock.norm2
        self.mlp = stock.mlp
        self.window_size = stock.window_size
        self.med2d_adapter: Med2dAdapter | None = None
        self.msa: MsaAdapters | None = None
        self.adapter3d_attn: Adapter3d | None = None
        self.adapter3d_mlp: Adapter3d | None = None

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.window_size > 0:
            return self.attn.windowed(x, self.window_size)
        return self.attn(x)

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
        normed = self.norm1(x)
        a = self._attention(normed)
        if self.msa is not None:
            a = a + self.msa.space(a)
            if self.msa.depth is not None and slices > 1:
                a = a + self.msa.depth_attention(self.attn, normed, slices)
        x = x + a
        if self.adapter3d_mlp is not None:
            x = x + self.adapter3d_mlp(x, slices)
        normed = self.norm2(x)
        out = self.mlp(normed)
        if self.med2d_adapter is not None:
            out = out + self.med2d_adapter(normed)
        if self.msa is not None:
            out = out + self.msa.mlp_scale * self.msa.mlp(normed)
        return x + out


class AdaptedImageEncoder(ImageEncoderViT):
    """SAM's ViT image encoder (Meta's hyper-parameters) with PEFT-ready blocks.

    Arguments:
      img_size (int): input side S (multiple of 16).
      embed_dim, depth, num_heads (int): ViT shape.
      global_attn_indexes (tuple(int)): blocks with global attention.
      window_size (int): window of the other blocks.
      out_chans (int): neck output channels (256).
    """

    def __init__(
        self,
        *,
        img_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: tuple[int, ...],
        window_size: int,
        out_chans: int = 256,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=16,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            out_chans=out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
        )
        self.blocks = nn.ModuleList(AdaptedBlock(block) for block in self.blocks)
        self.fact: FactShared | None = None
        self.checkpoint_blocks: frozenset[int] = frozenset()

    def set_fused_attention(self, enabled: bool) -> None:
        for block in self.blocks:
            block.attn.fused = enabled

    def forward(self, x: torch.Tensor, slices: int = 1) -> torch.Tensor:
        """
        Arguments:
          x (torch.Tensor): normalised images (B*D, 3, S, S).
          slices (int): D (1 for 2D inputs).

        Returns:
          torch.Tensor: image embeddings (B*D, 256, S/16, S/16).
        """
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for i, block in enumerate(self.blocks):
            if i in self.checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(block, x, slices, use_reentrant=False)
            else:
                x = block(x, slices)
        return self.neck(x.permute(0, 3, 1, 2))
