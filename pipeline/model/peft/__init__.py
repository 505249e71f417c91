"""PEFT methods injected into SAM's image encoder (see ``inject.add_peft``)."""

from pipeline.model.peft.inject import add_peft, merge_qkv_updates, peft_method_of

__all__ = ["add_peft", "merge_qkv_updates", "peft_method_of"]
