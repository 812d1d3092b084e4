"""LoRA-aware masked forward: a gate removes a structure from the frozen path and the LoRA path alike.

Head gates multiply each head's attention output just before o_proj; MLP gates multiply each channel's
activation just before down_proj. The hooks sit on the peft LoRA wrapper, whose input feeds both the
frozen base layer and lora_A, so a pruned head or channel contributes nothing through either path.
Zeroing a head's output removes it exactly (softmax is per head), so this is equivalent to deleting it,
with any attention implementation. The cost is one elementwise multiply per layer and kind.
"""
from __future__ import annotations

import torch

from .space import Gates, HeadMLPSpace


def base_model(model):
    """The transformers CausalLM inside a peft or accelerate wrapper."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "model"):
            model = model.module  # DDP
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def decoder_layers(model):
    return base_model(model).model.layers


class GateController:
    def __init__(self, model, space: HeadMLPSpace, mask_lora: bool = True):
        self.space = space
        self.masks: dict[str, torch.Tensor] | None = None
        self.handles = []
        for index, layer in enumerate(decoder_layers(model)):
            for kind, module in (("heads", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
                if not mask_lora and hasattr(module, "base_layer"):
                    module = module.base_layer  # ablation: mask only the frozen path
                self.handles.append(module.register_forward_pre_hook(self._hook(kind, index)))

    def _hook(self, kind: str, index: int):
        def apply(module, args):
            if self.masks is None:
                return None
            x = args[0]
            return (x * self.masks[kind][index].to(x.dtype),) + tuple(args[1:])

        return apply

    def set(self, gates: Gates | None) -> None:
        """Use these gates (0/1, or straight-through) in every following forward; None turns masking off."""
        if gates is None:
            self.masks = None
            return
        self.masks = {
            "heads": gates["heads"].repeat_interleave(self.space.head_dim, dim=-1),
            "mlp": self.space.channel_mask(gates["mlp"]),
        }

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.masks = None
