"""LoRA (SAMed) and FacT-TT (MA-SAM) on the q and v projections of a fused qkv layer.

``AdaptedQkv`` takes over the stock ``nn.Linear(dim, 3 * dim)`` (its ``weight`` and ``bias`` keep
their names, so state-dict keys stay Meta's / LiteMedSAM's) and adds low-rank updates to its q
and v outputs: the first and last thirds for SAM's ViT (q | k | v), or the q and v slice of each
head for TinyViT, whose output is laid out per head as [q, k, v] (``heads``):

  LoRA:  dq = B_q A_q x,            A (dim -> r, Kaiming-uniform), B (r -> dim, zeros)
  FacT:  dq = s V drop(C_q U x),    U (dim -> r) and V (r -> dim, zeros) shared by all blocks,
                                     C_q (r x r) per block (the "tensor-train" core)

and the same for v. Both start at zero, as their authors' code starts them (SAMed's
``LoRA_Sam.reset_parameters``, MA-SAM's ``Fact_tt_Sam``): ``model.adapter_init`` does not change
them. Both fold into ``weight`` for inference (``merge``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FactShared(nn.Module):
    """FacT's factors shared across blocks: U (dim -> r) and V (r -> dim, zero-initialised)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.v.weight)


class LoraQV(nn.Module):
    """LoRA factors for q and v of one block."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.a_q = nn.Linear(dim, rank, bias=False)
        self.b_q = nn.Linear(rank, dim, bias=False)
        self.a_v = nn.Linear(dim, rank, bias=False)
        self.b_v = nn.Linear(rank, dim, bias=False)
        for a in (self.a_q, self.a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.b_q.weight)
        nn.init.zeros_(self.b_v.weight)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b_q(self.a_q(x)), self.b_v(self.a_v(x))

    def delta_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW_q, dW_v), each (dim, dim)."""
        return self.b_q.weight @ self.a_q.weight, self.b_v.weight @ self.a_v.weight


class FactCores(nn.Module):
    """FacT's per-block r x r cores for q and v."""

    def __init__(self, rank: int, dropout: float, scale: float = 1.0) -> None:
        super().__init__()
        self.core_q = nn.Linear(rank, rank, bias=False)
        self.core_v = nn.Linear(rank, rank, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor, shared: FactShared) -> tuple[torch.Tensor, torch.Tensor]:
        ux = shared.u(x)
        dq = shared.v(self.dropout(self.core_q(ux)))
        dv = shared.v(self.dropout(self.core_v(ux)))
        return dq * self.scale, dv * self.scale

    def delta_weights(self, shared: FactShared) -> tuple[torch.Tensor, torch.Tensor]:
        """(dW_q, dW_v), each (dim, dim), for inference (no dropout)."""
        u, v = shared.u.weight, shared.v.weight
        return (
            self.scale * (v @ self.core_q.weight @ u),
            self.scale * (v @ self.core_v.weight @ u),
        )


class AdaptedQkv(nn.Module):
    """A fused qkv projection with optional LoRA and FacT updates of q and v.

    Arguments:
      stock (nn.Linear): the block's ``attn.qkv``; its parameters are taken over, not copied.
      heads (int or None): None = SAM's layout, q | k | v; a head count = TinyViT's, the output
        of each head laid out as [q, k, v].
    """

    def __init__(self, stock: nn.Linear, heads: int | None = None) -> None:
        super().__init__()
        self.in_features = stock.in_features
        self.out_features = stock.out_features
        self.dim = stock.in_features
        self.heads = heads
        self.weight = stock.weight
        self.bias = stock.bias
        self.lora: LoraQV | None = None
        self.fact: FactCores | None = None
        # Not a child module (it belongs to the encoder); a tuple keeps nn.Module from
        # registering it twice. It is *called* here, so ZeRO-3 gathers it like any module.
        self._fact_shared: tuple[FactShared, ...] = ()

    def attach_fact(self, cores: FactCores, shared: FactShared) -> None:
        self.fact = cores
        self._fact_shared = (shared,)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., 3 * dim) in this layer's layout -> q, k, v, each (..., dim)."""
        if self.heads is None:
            return out.split(self.dim, dim=-1)
        q, k, v = out.unflatten(-1, (self.heads, 3, -1)).unbind(-2)
        return q.flatten(-2), k.flatten(-2), v.flatten(-2)

    def join(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v, each (..., dim) -> (..., 3 * dim) in this layer's layout (``split``'s
        inverse)."""
        if self.heads is None:
            return torch.cat((q, k, v), dim=-1)
        parts = [t.unflatten(-1, (self.heads, -1)) for t in (q, k, v)]
        return torch.stack(parts, dim=-2).flatten(-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., 3 * dim), q, k, v in this layer's layout."""
        out = F.linear(x, self.weight, self.bias)
        if self.lora is None and self.fact is None:
            return out
        q, k, v = self.split(out)
        if self.lora is not None:
            dq, dv = self.lora(x)
            q, v = q + dq, v + dv
        if self.fact is not None:
            dq, dv = self.fact(x, self._fact_shared[0])
            q, v = q + dq, v + dv
        return self.join(q, k, v)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight includes the LoRA/FacT updates (dropout off)."""
        weight = self.weight.detach().clone()
        parts = []
        if self.lora is not None:
            parts.append(self.lora.delta_weights())
        if self.fact is not None:
            parts.append(self.fact.delta_weights(self._fact_shared[0]))
        for dq, dv in parts:
            # the weight's rows are the outputs: place dW_q and dW_v as the outputs are placed
            delta = self.join(dq.t(), torch.zeros_like(dq.t()), dv.t()).t()
            weight += delta.to(weight.dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear
