"""How PEFT modules start (``model.adapter_init``): as their authors' code starts them, or silent.

``"authors"``, per method (read from each method's public code):

  sam_med2d_adapter  Kaiming-normal convolutions and linears, LayerNorm weight 1 / bias 0
                     (SAM-Med2D, ``Adapter_Layer``): active from the first step
  msa_adapter        PyTorch's default ``nn.Linear`` init for both layers (MSA, ``Adapter``):
                     active from the first step
  adapter3d          PyTorch's defaults for LayerNorm, both linears and the 3D convolution
                     (MA-SAM, ``adapter_*`` of its blocks): active from the first step
  lora               A Kaiming-uniform, B zero (SAMed, ``LoRA_Sam.reset_parameters``): silent
  fact               U default, V zero, cores default (MA-SAM, ``Fact_tt_Sam``): silent

``"zero"``: every method's last learned layer starts at zero (for SAM-Med2D's adapter, its
closing LayerNorm), so a freshly built model computes exactly what SAM computes; the other layers
are drawn as for "authors" (the two choices draw the same random numbers). LoRA and FacT are the
same under both.
"""

from __future__ import annotations

from pipeline.model.config import ADAPTER_INITS, AdapterInit

__all__ = ["ADAPTER_INITS", "AdapterInit", "check_init"]


def check_init(init: str) -> None:
    """Raise ``ValueError`` unless ``init`` is one of ``ADAPTER_INITS``."""
    if init not in ADAPTER_INITS:
        raise ValueError(f"adapter init must be one of {', '.join(ADAPTER_INITS)}, got {init!r}")
