"""LoRA-aware masked forward: gates remove structures from the forward pass, where `atp.kinds.MASK_MODES` says.

"both" (the default): head gates multiply each head's attention output just before o_proj, MLP gates each
channel's activation just before down_proj. The hooks sit on the peft LoRA wrapper, whose input feeds both
the frozen base layer and lora_A, so a pruned head or channel contributes nothing through either path.
Zeroing a head's output removes it exactly (softmax is per head), so this is equivalent to deleting it,
with any attention implementation. The cost is one elementwise multiply per layer and kind.
"frozen": the gates multiply only the frozen weights (outputs of q/k/v and gate/up, input of o_proj and
down_proj, on peft's `base_layer`); LoRA is left alone, so a pruned structure is removed exactly once group
lasso has driven its LoRA pieces to zero. "frozen-qkv": the frozen outputs of q/k/v and gate/up only, so a pruned
structure's LoRA activation still reaches the residual stream through the frozen o_proj / down_proj (the authors'
forward). "frozen-output": only the frozen path of o_proj / down_proj.
Block gates (`--space blocks`) multiply the output of o_proj / down_proj, biases included, in "both" and
"frozen-output", and the frozen outputs of all the block's projections in "frozen". Hidden-channel gates
(`--space hidden`) act on the residual stream and its norms in every mode (`atp.kinds.hidden`). Query/key dimension
gates (`--space qk-dims`) multiply the outputs of q_proj / k_proj (at the wrapper in "both", on the frozen path
otherwise), and make per-head q/k norms normalise over the kept dimensions in every mode.
"""
from __future__ import annotations

import contextlib

import torch

from .arch import arch_for
from .errors import ATPError
from .kinds import MASK_MODES
from .space import Gates, PruningSpace


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
    base = base_model(model)
    return arch_for(base.config).decoder_layers(base)


class GateController:
    """Forward hooks that apply gates to a model. It can hold hooks for several MASK_MODES and switch between
    them (`use`): ATP's LoRA steps mask the frozen path only, its generator steps and everything after the
    generator freezes mask both paths."""

    def __init__(self, model, space: PruningSpace, mask_lora: bool = True, mode: str | None = None,
                 modes: tuple[str, ...] = ()):
        """mode: the active one of MASK_MODES; by default "both", or "frozen-output" when mask_lora is False.
        modes: further modes to hook, for switching with `use`."""
        mode = mode or ("both" if mask_lora else "frozen-output")
        for m in (mode, *modes):
            if m not in MASK_MODES:
                raise ATPError(f"unknown mask mode '{m}'; choices: {', '.join(MASK_MODES)}")
        self.space, self.mode = space, mode
        self.modes = tuple(dict.fromkeys((mode, *modes)))
        self.masks: dict[str, torch.Tensor] | None = None
        self.handles = []
        self.needed = {kind.name: {mask for m in self.modes for _, _, mask in kind.hooks[m]}
                       for kind in space.kind_objects}
        for index, layer in enumerate(decoder_layers(model)):
            for hooked in self.modes:
                for kind in space.kind_objects:
                    for role, where, mask in kind.hooks[hooked]:
                        module = space.arch.projection(layer, role)
                        if hooked != "both" and hasattr(module, "base_layer"):
                            module = module.base_layer  # the frozen path only
                        if where == "input":
                            hook = module.register_forward_pre_hook(self._on_input(hooked, mask, index))
                        else:
                            hook = module.register_forward_hook(self._on_output(hooked, mask, index))
                        self.handles.append(hook)
        for kind in space.kind_objects:  # hooks outside the projections, the same in every mode (e.g. atp.kinds.hidden)
            self.handles += kind.extra_hooks(space, base_model(model), lambda: self.masks)

    def use(self, mode: str) -> None:
        """Switch the active mask mode (one of those hooked)."""
        if mode not in self.modes:
            raise ATPError(f"mask mode '{mode}' is not hooked here; hooked: {', '.join(self.modes)}")
        self.mode = mode

    @contextlib.contextmanager
    def disabled(self):
        """No masking inside the block (e.g. for the dense teacher's forward pass)."""
        masks, self.masks = self.masks, None
        try:
            yield
        finally:
            self.masks = masks

    def _on_input(self, mode: str, name: str, index: int):
        def apply(module, args):
            if self.masks is None or self.mode != mode:
                return None
            x = args[0]
            return (x * self.masks[name][index].to(x.dtype),) + tuple(args[1:])

        return apply

    def _on_output(self, mode: str, name: str, index: int):
        def apply(module, args, output):
            if self.masks is None or self.mode != mode:
                return None
            return output * self.masks[name][index].to(output.dtype)

        return apply

    def set(self, gates: Gates | None) -> None:
        """Use these gates (0/1, or straight-through) in every following forward; None turns masking off."""
        if gates is None:
            self.masks = None
            return
        if self.space.containers:  # blocks: what the export keeps, block gates folded into the finer kinds'
            gates = self.space.effective_gates(gates)
        masks = {}
        for kind in self.space.kind_objects:
            masks.update(kind.masks(self.space, gates[kind.name], self.needed[kind.name]))
        self.masks = masks

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.masks = None
