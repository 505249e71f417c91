"""``SamAdapt``: SAM + PEFT + head behind one module with one ``forward``.

Callers (the interaction loop, losses, the DeepSpeed engine) use ``encode`` / ``decode`` /
``semantic``, or ``forward(batch, mode)`` which routes to them, so that under DeepSpeed ZeRO-3 the
whole training forward runs through the engine's module call (its hooks gather partitioned weights;
calling ``engine.module.prompt_encoder`` directly does not work there).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.decoder import BatchedMaskDecoder
from pipeline.model.encoder import AdaptedImageEncoder
from pipeline.model.heads import CnnHead, LinearHead, ProgressiveUpsampler
from pipeline.model.peft import add_peft, merge_qkv_updates
from pipeline.model.tiny_vit import TinyVitEncoder, TinyVitShape
from pipeline.model.weights import first_keys, key_mismatch

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# model.pixel_norm -> (mean, std) on 0..255 pixels. unit: x / 255, what SAMed's encoder sees (its
# images are in [0, 1] and its Sam is built with pixel_mean 0, pixel_std 1).
PIXEL_NORM = {"sam": (PIXEL_MEAN, PIXEL_STD), "unit": ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))}
GROUPS = {
    "image_encoder": "encoder_peft",
    "prompt_encoder": "prompt_encoder",
    "mask_decoder": "mask_decoder",
    "head": "head",
}
MODES = ("encode", "decode", "semantic", "prompt")

Points = tuple[torch.Tensor, torch.Tensor]


def _vit_encoder(cfg: ModelConfig) -> AdaptedImageEncoder:
    """SAM's ViT with ``cfg.peft`` attached, trainable as ``cfg.train_encoder`` says, with the
    fused-attention and activation-checkpointing switches applied."""
    dim, depth, heads, global_attn = cfg.encoder_spec()
    encoder = AdaptedImageEncoder(
        img_size=cfg.encoder_size,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        global_attn_indexes=global_attn,
        window_size=cfg.window_size,
        out_chans=cfg.prompt_dim,
    )
    add_peft(encoder, cfg=cfg)
    if cfg.train_encoder:  # full fine-tuning: the base weights train beside any PEFT module
        encoder.requires_grad_(True)
    encoder.set_fused_attention(cfg.fused_attention)
    if cfg.activation_checkpointing:
        chosen = cfg.activation_checkpointing_blocks or range(depth)
        encoder.checkpoint_blocks = frozenset(chosen)
    return encoder


def _image_encoder(cfg: ModelConfig) -> nn.Module:
    """The image encoder ``cfg.arch`` names: SAM's ViT, or a TinyViT with ``cfg.peft`` in its
    transformer blocks (base frozen unless ``cfg.train_encoder``; its BatchNorm layers then
    follow the module's train/eval mode, else they keep their running statistics)."""
    if not cfg.is_tiny_vit:
        return _vit_encoder(cfg)
    encoder = TinyVitEncoder(TinyVitShape.of(cfg.arch), out_chans=cfg.prompt_dim)
    add_peft(encoder, cfg=cfg)
    if cfg.train_encoder:  # full fine-tuning: the base weights train beside any PEFT module
        encoder.requires_grad_(True)
    encoder.train_batchnorm = cfg.train_encoder
    return encoder


class SamAdapt(nn.Module):
    """SAM's encoder with PEFT modules, SAM's prompt encoder and mask decoder, and a head.

    Built by ``build_model(cfg=...)`` (which also loads the checkpoint and applies the switches).
    Base weights are frozen; trainable: the PEFT modules, the prompt encoder / mask decoder as
    ``cfg.train_*`` say (head=sam; head=auto trains its decoder), and the head's own modules.

    Arguments:
      cfg (ModelConfig): the model section of the config.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        prompt_dim = cfg.prompt_dim
        size = cfg.encoder_size  # the encoder's side; images are resized to it (semantic heads)
        self.image_encoder = _image_encoder(cfg)
        grid = cfg.embedding_size
        self.prompt_encoder = PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(size, size),
            mask_in_chans=16,
        )
        outputs = cfg.num_classes + 1
        self.mask_decoder = BatchedMaskDecoder(
            num_mask_tokens=outputs if cfg.head == "auto" else 4, transformer_dim=prompt_dim
        )
        self.head: nn.Module | None = None
        if cfg.head == "auto" and cfg.progressive_upsampling:
            self.head = ProgressiveUpsampler(prompt_dim // 8)
        elif cfg.head == "cnn":
            self.head = CnnHead(outputs, in_chans=prompt_dim, stride=cfg.embedding_stride)
        elif cfg.head == "linear":
            self.head = LinearHead(outputs, in_chans=prompt_dim, stride=cfg.embedding_stride)
        mean, std = PIXEL_NORM[cfg.pixel_norm]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), False)

        self.prompt_encoder.requires_grad_(cfg.head == "sam" and cfg.train_prompt_encoder)
        self.mask_decoder.requires_grad_(cfg.head in ("sam", "auto") and cfg.train_mask_decoder)
        if cfg.head == "auto":  # AutoSAM predicts no IoU; an unused head would get no gradient
            self.mask_decoder.iou_prediction_head.requires_grad_(False)
        self.trainable_names: tuple[str, ...] = ()
        self._record_trainable()

    # ----------------------------------------------------------------------------------------
    # Bookkeeping
    # ----------------------------------------------------------------------------------------

    def _record_trainable(self) -> None:
        self.trainable_names = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part: ``encoder_peft``, ``prompt_encoder``, ``mask_decoder``,
        ``head`` (only non-empty groups; every trainable parameter in exactly one)."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                groups.setdefault(GROUPS[name.split(".", 1)[0]], []).append(param)
        return groups

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors only (PEFT, trained SAM parts, head), detached, by name.

        Under ZeRO-3 the parameters are partitioned: gather them first
        (``deepspeed.zero.GatheredParameters``) or use the engine's consolidated state dict.
        """
        wanted = set(self.trainable_names)
        return {n: p.detach() for n, p in self.named_parameters() if n in wanted}

    @torch.no_grad()
    def load_trainable_state_dict(
        self, state: dict[str, torch.Tensor], strict: bool = True
    ) -> tuple[list[str], list[str]]:
        """Copy trained tensors into the model.

        Arguments:
          state: name -> tensor, as ``trainable_state_dict`` returns.
          strict: require exactly the trainable names (else load the ones that match).

        Returns:
          (missing, unexpected) key lists (both empty when strict).
        """
        wanted = set(self.trainable_names)
        missing = sorted(wanted - set(state))
        unexpected = sorted(set(state) - wanted)
        if strict and (missing or unexpected):
            raise KeyError(
                "trainable state dict does not match the model (model.peft / model.head / "
                "model.train_* differ?): " + key_mismatch(missing, unexpected)
            )
        params = dict(self.named_parameters())
        bad = [
            f"{k}: {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
            for k in sorted(wanted & set(state))
            if state[k].shape != params[k].shape
        ]
        if bad:
            raise ValueError(f"trainable state dict: shapes differ: {first_keys(bad)}")
        for key in wanted & set(state):
            params[key].copy_(state[key])
        return missing, unexpected

    def merge_peft(self) -> list[str]:
        """Fold LoRA and FacT into the encoder's qkv weights and remove their modules, so
        inference pays no extra latency. ``cfg.peft`` loses the merged methods.

        Returns:
          list[str]: methods merged.
        """
        merged = merge_qkv_updates(self.image_encoder)
        self.cfg = dataclasses.replace(
            self.cfg,
            peft=[m for m in self.cfg.peft if m not in merged],
            peft_method_blocks={
                k: v for k, v in self.cfg.peft_method_blocks.items() if k not in merged
            },
        )
        self._record_trainable()
        return merged

    # ----------------------------------------------------------------------------------------
    # Forward parts
    # ----------------------------------------------------------------------------------------

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = self._encoder_dtype()
        if self.cfg.autocast_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        if dtype in (torch.bfloat16, torch.float16):  # weights cast by DeepSpeed bf16/fp16
            return torch.autocast(device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _encoder_dtype(self) -> torch.dtype:
        """The dtype of the encoder's weights (both encoders have SAM's neck)."""
        return self.image_encoder.neck[0].weight.dtype

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(
                f"images must be (N, 3, {size}, {size}) (model.image_size={size}), "
                f"got {tuple(images.shape)}"
            )
        x = images.to(self.pixel_mean.device, torch.float32)
        return (x - self.pixel_mean.float()) / self.pixel_std.float()

    def _encode_normalized(self, x: torch.Tensor, slices: int | None) -> torch.Tensor:
        d = slices or self.cfg.slices
        if x.shape[0] % d:
            raise ValueError(
                f"batch of {x.shape[0]} images is not a whole number of {d}-slice stacks "
                "(model.slices)"
            )
        weight_dtype = self._encoder_dtype()
        with self._autocast(x.device):
            return self.image_encoder(x.to(weight_dtype), d)

    def _to_encoder_size(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 3, S, S) images -> (N, 3, E, E), E = ``cfg.encoder_size`` (bilinear, as
        AutoSAM resizes its inputs to 1024; per-channel normalisation and bilinear resizing
        commute, so resizing after it is the same)."""
        size = self.cfg.encoder_size
        if x.shape[-1] == size:
            return x
        return F.interpolate(x, (size, size), mode="bilinear", align_corners=False)

    def encode(self, images: torch.Tensor, slices: int | None = None) -> torch.Tensor:
        """Image embeddings.

        Arguments:
          images (torch.Tensor): (N, 3, S, S), uint8 or float in 0..255 (RGB), scaled as
            ``cfg.pixel_norm`` says. For 3D inputs N = B*D with the D adjacent slices of each
            volume consecutive.
          slices (int or None): D; None = ``cfg.slices``.

        Returns:
          torch.Tensor: (N, 256, g, g), g = ``cfg.embedding_size`` (E/16 for a ViT, E/4 for
          tiny_vit), E = ``cfg.encoder_size`` (S unless
          ``model.encoder_input_size`` is set).
        """
        return self._encode_normalized(self._to_encoder_size(self._normalize(images)), slices)

    def decode(
        self,
        embeddings: torch.Tensor,
        *,
        image_index: torch.Tensor | None = None,
        points: Points | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask: bool | None = None,
        frozen_prompt_encoder: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for P prompts over a batch of B images, in one pass.

        Arguments:
          embeddings (torch.Tensor): (B, 256, g, g) from ``encode`` (g = S/16, tiny_vit S/4).
          image_index (torch.Tensor or None): (P,) int64, image of each prompt; None if P == B.
          points (tuple or None): coords (P, n, 2) float (x, y) in input pixels, labels (P, n)
            int64: 1 foreground, 0 background, -1 padding (ignored, as SAM does).
          boxes (torch.Tensor or None): (P, 4) x0, y0, x1, y1 in input pixels.
          mask_inputs (torch.Tensor or None): (P, 1, 4g, 4g) logits of a previous prediction.
          multimask (bool or None): 3 masks (SAM's tokens 1-3) or 1 (token 0); None = cfg.
          frozen_prompt_encoder (bool): run the prompt encoder without gradient (the decoder-only
            re-prompt steps of the interaction loop: nothing but the decoder gets a gradient).

        Returns:
          torch.Tensor: low-resolution mask logits (P, K, 4g, 4g) (S/4; tiny_vit: S), float32;
            K = 3 or 1.
          torch.Tensor: predicted IoU (P, K), float32.
        """
        if self.cfg.head == "auto":
            raise ValueError(
                "decode() needs SAM's promptable decoder; model.head=auto replaces it by an "
                "AutoSAM decoder (use semantic())"
            )
        multimask = self.cfg.multimask if multimask is None else multimask
        b = embeddings.shape[0]
        counts = {
            name: t.shape[0]
            for name, t in (
                ("points", points[0] if points is not None else None),
                ("boxes", boxes),
                ("mask_inputs", mask_inputs),
                ("image_index", image_index),
            )
            if t is not None
        }
        if len(set(counts.values())) > 1:
            raise ValueError(f"decode: prompt counts differ: {counts}")
        p = next(iter(counts.values()), b)
        if image_index is None and p != b:
            raise ValueError(f"decode: {p} prompts for {b} images needs image_index (P,)")
        if image_index is not None:
            # Checked while still on the CPU (no device sync); indexing on a GPU would fail with
            # an opaque device-side assert.
            if image_index.dim() != 1 or (
                image_index.device.type == "cpu"
                and p > 0
                and (int(image_index.min()) < 0 or int(image_index.max()) >= b)
            ):
                raise ValueError(f"decode: image_index must be (P,) in [0, {b}), got {image_index}")
            image_index = image_index.to(embeddings.device, torch.long)
        device = embeddings.device
        if points is not None:
            points = (points[0].to(device, torch.float32), points[1].to(device, torch.long))
        if boxes is not None:
            boxes = boxes.to(device, torch.float32)
        if mask_inputs is not None:
            mask_inputs = mask_inputs.to(device)
        with self._autocast(device):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_prompt_encoder):
                sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
            if sparse.shape[0] != p:  # no prompt at all: the prompt encoder answers batch 1
                sparse = sparse.expand(p, -1, -1)
            masks, iou = self.mask_decoder(
                embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, image_index
            )
        chosen = slice(1, None) if multimask else slice(0, 1)
        return masks[:, chosen].float(), iou[:, chosen].float()

    def semantic(
        self,
        images: torch.Tensor,
        slices: int | None = None,
        *,
        low_res: bool = False,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt-free multi-class logits from the auto / cnn / linear head.

        Arguments:
          images (torch.Tensor): (N, 3, S, S) uint8 or float 0..255 (N = B*D for 3D inputs).
          slices (int or None): D; None = ``cfg.slices``.
          low_res (bool): return the head's own output grid, before the resize to S (head=auto:
            the decoder's S/4, where SAMed takes its loss).
          embeddings (torch.Tensor or None): the images' embeddings from ``encode`` (a frozen
            encoder's cache); None = encode them here.

        The encoder (and the cnn head's image stem) run at ``cfg.encoder_size``; the logits are
        resized to S. head=auto decodes its classes jointly or one pass each
        (``cfg.head_decode``).

        Returns:
          torch.Tensor: (N, num_classes + 1, S, S) float32 logits, channel 0 = background
          ((N, num_classes + 1, h, w) with ``low_res``).
        """
        if self.cfg.head == "sam":
            raise ValueError(
                "semantic() needs a prompt-free head (model.head = auto, cnn or linear); "
                "head=sam is promptable: use encode() + decode()"
            )
        x = self._to_encoder_size(self._normalize(images))
        emb = self._encode_normalized(x, slices) if embeddings is None else embeddings
        with self._autocast(emb.device):
            if self.cfg.head == "auto":
                sparse, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
                logits, _ = self.mask_decoder(
                    emb,
                    self.prompt_encoder.get_dense_pe(),
                    sparse.expand(emb.shape[0], -1, -1),
                    dense,
                    None,
                    upsampler=self.head,
                    with_iou=False,
                    per_class=self.cfg.head_decode == "per_class",
                )
            elif self.cfg.head == "cnn":
                logits = self.head(emb, x)
            else:
                logits = self.head(emb)
        if low_res:
            return logits.float()
        return self.upscale(logits, self.cfg.image_size)

    @staticmethod
    def upscale(low_res_logits: torch.Tensor, size: int) -> torch.Tensor:
        """Bilinear resize of logits to (size, size), as SAM's postprocess (without the crop).

        Arguments:
          low_res_logits (torch.Tensor): (P, K, h, w).
          size (int): output side.

        Returns:
          torch.Tensor: (P, K, size, size) float32.
        """
        logits = low_res_logits.float()
        if tuple(logits.shape[-2:]) == (size, size):
            return logits
        return F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)

    def forward(self, batch: dict[str, Any], mode: str) -> Any:
        """One entry point for every forward (DeepSpeed engines call this).

        Arguments:
          batch (dict): by mode:
            encode:   images, slices (optional)                     -> embeddings
            decode:   embeddings, image_index, points | point_coords + point_labels, boxes,
                      mask_inputs, multimask (all but embeddings optional) -> (logits, iou)
            semantic: images, slices, low_res, embeddings (optional) -> logits (N, C+1, S, S)
            prompt:   images + the decode keys (encode then decode) -> (logits, iou, embeddings)
          mode (str): one of encode, decode, semantic, prompt.
        """
        if mode == "encode":
            return self.encode(batch["images"], slices=batch.get("slices"))
        if mode == "semantic":
            return self.semantic(
                batch["images"],
                slices=batch.get("slices"),
                low_res=bool(batch.get("low_res")),
                embeddings=batch.get("embeddings"),
            )
        if mode == "decode":
            return self.decode(batch["embeddings"], **self._prompts(batch))
        if mode == "prompt":
            embeddings = self.encode(batch["images"], slices=batch.get("slices"))
            logits, iou = self.decode(embeddings, **self._prompts(batch))
            return logits, iou, embeddings
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")

    @staticmethod
    def _prompts(batch: dict[str, Any]) -> dict[str, Any]:
        points = batch.get("points")
        if points is None and batch.get("point_coords") is not None:
            points = (batch["point_coords"], batch["point_labels"])
        return {
            "image_index": batch.get("image_index"),
            "points": points,
            "boxes": batch.get("boxes"),
            "mask_inputs": batch.get("mask_inputs"),
            "multimask": batch.get("multimask"),
            "frozen_prompt_encoder": bool(batch.get("frozen_prompt_encoder", False)),
        }
