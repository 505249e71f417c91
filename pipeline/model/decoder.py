"""SAM's mask decoder, batched over prompts that belong to different images.

The stock ``MaskDecoder.predict_masks`` takes one image embedding and ``repeat_interleave``s it
over the prompts. ``BatchedMaskDecoder`` (a ``MaskDecoder``: same constructor, same state-dict
keys) takes the embeddings of a whole batch plus ``image_index`` (prompt -> image) and runs the
stock submodules (``transformer``, ``output_upscaling``, ``output_hypernetworks_mlps``,
``iou_prediction_head``) once over all P prompts: no Python loop over images.

``per_class=True`` (AutoSAM's decoding, ``model.head_decode=per_class``) runs one sequence per
prompt and mask token instead: [IoU token, mask token k, prompt tokens], each with its own copy of
the image embedding, so no mask token attends to another; mask k is token k's hypernetwork output
times the upscaled embedding of its own sequence. Still one transformer call over P * K sequences.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class BatchedMaskDecoder(MaskDecoder):
    """SAM's mask decoder with per-prompt image embeddings.

    Arguments:
      num_mask_tokens (int): mask tokens (SAM: 4 = 1 single-mask + 3 multimask; AutoSAM: one per
        class, background included).
      transformer_dim (int): 256 for Meta's checkpoints (MLP width 8x and IoU head width 1x
        of it, as SAM's 2048 and 256); smaller for tiny test models.
    """

    def __init__(self, *, num_mask_tokens: int = 4, transformer_dim: int = 256) -> None:
        super().__init__(
            transformer_dim=transformer_dim,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=transformer_dim, mlp_dim=8 * transformer_dim, num_heads=8
            ),
            num_multimask_outputs=num_mask_tokens - 1,
            iou_head_depth=3,
            iou_head_hidden_dim=transformer_dim,
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_index: torch.Tensor | None = None,
        *,
        upsampler: nn.Module | None = None,
        with_iou: bool = True,
        per_class: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict the masks of every mask token for P prompts.

        Arguments:
          image_embeddings (torch.Tensor): (B, C, h, w) from the image encoder.
          image_pe (torch.Tensor): (1, C, h, w) dense positional encoding.
          sparse_prompt_embeddings (torch.Tensor): (P, n, C) point/box embeddings (n may be 0).
          dense_prompt_embeddings (torch.Tensor): (P, C, h, w) or (1, C, h, w) mask embeddings.
          image_index (torch.Tensor or None): (P,) int64, the image of each prompt; None when
            P == B and prompt p belongs to image p.
          upsampler (nn.Module or None): applied to the upscaled embedding (P, C/8, 4h, 4w) before
            the hypernetwork product (progressive upsampling).
          with_iou (bool): also run the IoU head.
          per_class (bool): decode each mask token in a sequence of its own (see the module doc);
            the IoU of mask k is then read from sequence k.

        Returns:
          torch.Tensor: mask logits (P, num_mask_tokens, 4h, 4w) (or the upsampler's size).
          torch.Tensor or None: IoU predictions (P, num_mask_tokens).
        """
        p = sparse_prompt_embeddings.shape[0]
        src = image_embeddings if image_index is None else image_embeddings[image_index]
        if src.shape[0] != p:
            raise ValueError(
                f"decoder: {p} prompts but {src.shape[0]} image embeddings selected "
                "(pass image_index when prompts and images differ in number)"
            )
        k = self.num_mask_tokens
        sparse = sparse_prompt_embeddings.to(self.mask_tokens.weight.dtype)
        src = src + dense_prompt_embeddings
        if per_class:
            # (P, K, 2 + n, C) -> P * K sequences [IoU token, mask token k, prompts], sequence
            # p * K + k; each gets its own copy of prompt p's image embedding.
            iou_token = self.iou_token.weight.expand(k, -1)
            own = torch.stack([iou_token, self.mask_tokens.weight], dim=1)  # (K, 2, C)
            tokens = torch.cat(
                (
                    own.unsqueeze(0).expand(p, -1, -1, -1),
                    sparse.unsqueeze(1).expand(-1, k, -1, -1),
                ),
                dim=2,
            ).flatten(0, 1)
            src = src.repeat_interleave(k, dim=0)
        else:
            output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
            tokens = torch.cat((output_tokens.unsqueeze(0).expand(p, -1, -1), sparse), dim=1)
        b, c, h, w = src.shape
        pos_src = image_pe.expand(b, -1, -1, -1)

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        if per_class:
            mask_tokens_out = hs[:, 1, :].view(p, k, -1)
        else:
            mask_tokens_out = hs[:, 1 : (1 + k), :]

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # (P, K, c')
        if (
            upsampler is None
            and src.device.type == "cpu"
            and _is_stock_upscaling(self.output_upscaling)
        ):
            up = _upscale_tokens(self.output_upscaling, src.view(b, h, w, c))  # (b, 4h, 4w, c')
            size = (4 * h, 4 * w)
            features = up.flatten(1, 2).transpose(1, 2)  # (b, c', 16hw)
        else:
            upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
            if upsampler is not None:
                upscaled = upsampler(upscaled)
            size = tuple(upscaled.shape[-2:])
            features = upscaled.flatten(2)  # (b, c', H*W)
        if per_class:  # mask k from sequence k's own features
            features = features.reshape(p, k, *features.shape[1:])
            masks = (hyper_in.unsqueeze(2) @ features).view(p, k, *size)
        else:
            masks = (hyper_in @ features).view(p, k, *size)
        iou_pred = None
        if with_iou:
            iou_pred = self.iou_prediction_head(iou_token_out)
            if per_class:  # sequence k's prediction for its own mask
                iou_pred = iou_pred.view(p, k, k).diagonal(dim1=1, dim2=2)
        return masks, iou_pred


def _is_stock_upscaling(seq: nn.Module) -> bool:
    kinds = (nn.ConvTranspose2d, LayerNorm2d, nn.GELU, nn.ConvTranspose2d, nn.GELU)
    return (
        isinstance(seq, nn.Sequential)
        and len(seq) == len(kinds)
        and all(type(m) is k for m, k in zip(seq, kinds, strict=True))
        and all(
            m.kernel_size == (2, 2) and m.stride == (2, 2) and m.padding == (0, 0)
            for m in (seq[0], seq[3])
        )
    )


def _up2x(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    # A 2x2 stride-2 transposed convolution touches each output pixel once: per input pixel it
    # is a Linear C_in -> 4 C_out, then a pixel shuffle. (B, H, W, C_in) -> (B, 2H, 2W, C_out).
    b, h, w, c = x.shape
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c, -1)  # (C_in, 2*2*C_out), di, dj, o
    y = (x.reshape(-1, c) @ weight).view(b, h, w, 2, 2, -1)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, -1)
    return y if conv.bias is None else y + conv.bias


def _upscale_tokens(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """SAM's ``output_upscaling`` on channels-last tokens (B, h, w, C) -> (B, 4h, 4w, C/8).

    The same computation as the stock (B, C, h, w) modules, in the layout the transformer hands
    over: on the CPU ~3x less time for forward + backward than the oneDNN transposed
    convolutions and SAM's hand-written channel LayerNorm (same weights, float rounding aside).
    """
    conv1, norm, act1, conv2, act2 = seq
    y = _up2x(conv1, x)
    y = torch.nn.functional.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps)
    return act2(_up2x(conv2, act1(y)))
