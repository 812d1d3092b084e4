"""Compaction: once the pruning decisions are fixed (ATP's freeze; step 0 of a two-stage baseline), the pruned
structures leave the model being trained. The frozen base is sliced as the export slices it, each LoRA factor
and its AdamW moments are sliced the same way (A by the input columns kept, B by the output rows kept), and
training continues on the smaller model: same function, same gradients for every kept entry, fewer FLOPs."""
from __future__ import annotations

import copy
import warnings

import torch

from .arch import arch_for
from .errors import ATPError
from .export import build_pruned, slice_plan
from .masking import base_model

LORA_FACTORS = {"lora_A": 1, "lora_B": 0}  # which dimension of the weight each factor shares: A inputs, B outputs


def _factor(name: str) -> tuple[str, str] | None:
    """(module path in the base model, factor) of a LoRA parameter name, else None."""
    for factor in LORA_FACTORS:
        marker = f".{factor}."
        if marker in name:
            path = name.split(marker)[0]
            for prefix in ("base_model.model.", "base_model."):
                if path.startswith(prefix):
                    path = path[len(prefix):]
                    break
            return path, factor
    return None


def _slice(tensor: torch.Tensor, steps: list, factor: str) -> torch.Tensor:
    dim = LORA_FACTORS[factor]
    for weight_dim, index in steps:
        if weight_dim == dim:
            tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor


def compact(peft_model, kept_structure: list[dict], prepare_for_lora):
    """The compacted peft model, the dense base model left behind (its original weights, no adapters: the
    self teacher), and {new LoRA parameter: (old parameter, how to slice a tensor of its shape)} for the
    optimizer. `prepare_for_lora(model)` readies a model for LoRA as the run's set-up did."""
    from peft import get_peft_model

    config = copy.copy(peft_model.peft_config["default"])
    old = {name: p for name, p in peft_model.named_parameters() if _factor(name) is not None}
    dense = peft_model.unload()  # the LoRA layers out, the base weights as they were (nothing merged)
    head_dim = getattr(dense.config, "head_dim", None) or dense.config.hidden_size // dense.config.num_attention_heads
    ops, _ = slice_plan(arch_for(dense.config), kept_structure, head_dim)
    pruned = build_pruned(dense, kept_structure).train()
    pruned.requires_grad_(False)
    pruned.config.use_cache = False
    pruned.config._name_or_path = pruned.name_or_path = dense.name_or_path  # the same base, for peft's bookkeeping
    prepare_for_lora(pruned)
    empty = [name for name, module in pruned.named_modules()  # e.g. an MLP with no channels left: nothing to adapt
             if isinstance(module, torch.nn.Linear) and 0 in module.weight.shape]
    if empty:
        config.exclude_modules = sorted(set(config.exclude_modules or []) | set(empty))
    with warnings.catch_warnings():  # peft reads transformers 5's deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        new_model = get_peft_model(pruned, config)
    mapping = {}
    with torch.no_grad():
        for name, param in new_model.named_parameters():
            where = _factor(name)
            if where is None:
                continue
            if name not in old:
                raise ATPError(f"internal error: compaction made a LoRA parameter {name} the model did not have")
            path, factor = where
            steps = ops.get(path, [])
            value = _slice(old[name].detach(), steps, factor)
            if value.shape != param.shape:
                raise ATPError(f"internal error: compaction sliced {name} to {tuple(value.shape)}, but the compact "
                               f"model's is {tuple(param.shape)}")
            param.copy_(value)
            mapping[param] = (old[name], lambda t, steps=steps, factor=factor: _slice(t, steps, factor))
    return new_model, dense, mapping


def compact_optimizer(old_optimizer, mapping: dict, make_optimizer):
    """A new optimizer over the compact model's LoRA parameters (`make_optimizer(params)`), with the old one's
    per-group settings (the current lr included) and each kept entry's state sliced from the old parameter's."""
    params = list(mapping)
    new = make_optimizer(params)
    if len(old_optimizer.param_groups) != 1 or len(new.param_groups) != 1:
        raise ATPError("internal error: compaction expects one LoRA parameter group")
    for key, value in old_optimizer.param_groups[0].items():
        if key != "params":
            new.param_groups[0][key] = value
    for param, (old_param, slicer) in mapping.items():
        state = old_optimizer.state.get(old_param)
        if state:
            new.state[param] = {k: (slicer(v) if v.shape == old_param.shape else v).clone() if torch.is_tensor(v)
                                else v for k, v in state.items()}
    return new


def kept_params(model) -> int:
    return sum(p.numel() for name, p in base_model(model).named_parameters() if "lora_" not in name)
