"""QLoRA base weights (`--quantize-base nf4|int8`): the frozen decoder projections become bitsandbytes layers.

As in peft's QLoRA recipe, the base is frozen and quantized (NF4 with double-quantised scales, or LLM.int8) and
peft puts its LoRA wrappers around the bitsandbytes layers (the model says `is_loaded_in_4bit` / `_8bit`, as
transformers' loader would). The embeddings, norms and LM head stay in the model's dtype. bitsandbytes >= 0.49
runs both on CPU, so the same code runs in the tests here and on CUDA. The gate hooks sit on the LoRA wrappers or
their `base_layer`, which is the bitsandbytes layer: they work unchanged.

At export every LoRA layer's base weight is dequantized (fp32), its LoRA delta added, and the wrapper replaced by
a plain nn.Linear (`dequantize_and_merge`), so that the export slices ordinary weights. The masked reference is
the quantized model, whose matmuls use the same dequantized weights: they differ by rounding only.
"""
from __future__ import annotations

import torch

from .errors import ATPError

QUANTIZE_BASE = ("none", "nf4", "int8")
NF4_BLOCK = 64  # weights per absmax (bitsandbytes' default); atp.plan counts the same
# The export's logits check, as a fraction of the largest |logit| (the larger of this and --check-tolerance).
# NF4 matmuls use the dequantized weight, as the export does: measured 7e-7 (fp32 rounding, as without
# quantization). LLM.int8 also quantizes the activations in its matmuls: measured 1.4-1.6e-2 on the tiny test
# models (tests/test_qlora.py), so 5e-2.
CHECK_TOLERANCE = {"nf4": 1e-3, "int8": 5e-2}


def bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ATPError("--quantize-base needs bitsandbytes (pip install 'bitsandbytes>=0.49')") from None
    return bnb


def check_options(cfg) -> None:
    """What --quantize-base cannot go with, said before any work."""
    from .baselines import SCORED

    if cfg.quantize_base not in QUANTIZE_BASE:
        raise ATPError(f"--quantize-base must be one of {', '.join(QUANTIZE_BASE)}, got {cfg.quantize_base!r}")
    if cfg.quantize_base == "none":
        return
    if cfg.recovery == "full":
        raise ATPError("--recovery full trains the base weights, which --quantize-base freezes in 4 or 8 bits; "
                       "use --recovery lora or --quantize-base none")
    if cfg.prune and cfg.method in SCORED:
        raise ATPError(f"--method {cfg.method} scores the dense base weights, which --quantize-base replaces; use "
                       "--method atp or frozen-generator with a quantized base")
    bitsandbytes()


def quantize_base(model, kind: str, device=None) -> int:
    """Replace every linear layer of the decoder blocks by a frozen bitsandbytes layer holding its weight
    quantized on `device` (default: where the weight is); matmuls in the weight's dtype. Returns how many."""
    from .arch import arch_for

    bnb = bitsandbytes()
    arch = arch_for(model.config)
    layers = arch.decoder_layers(model)
    replaced = 0
    for layer in layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, _quantized(bnb, module, kind, module.weight.dtype, device or module.weight.device))
            replaced += 1
    if kind == "nf4":
        model.is_loaded_in_4bit = True  # peft wraps bitsandbytes layers in its bnb LoRA classes
    else:
        model.is_loaded_in_8bit = True
    model.requires_grad_(False)
    return replaced


def _quantized(bnb, linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype, device):
    bias = linear.bias is not None
    weight = linear.weight.detach().to(torch.float32)
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=NF4_BLOCK).to(device)
        # bitsandbytes repacks the weight in place for its AVX512-bf16 CPU kernel in no-grad eval forwards, and
        # only for widths that are multiples of 32: keep one layout, which the export dequantizes
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return layer


def is_quantized(module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params")


def dequantized_weight(module) -> torch.Tensor:
    """The fp32 weight a bitsandbytes layer multiplies by (or a plain layer's weight)."""
    if not is_quantized(module):
        return module.weight.detach().float()
    bnb = bitsandbytes()
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()


def dequantize_and_merge(peft_model):
    """The plain transformers model with every LoRA layer replaced by an fp32 nn.Linear holding its dequantized
    base weight plus its LoRA delta (what peft's merge_and_unload does for unquantized layers)."""
    from peft.tuners.lora import LoraLayer

    from .masking import base_model

    model = base_model(peft_model)
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not isinstance(module, LoraLayer):
                continue
            base = module.get_base_layer()
            weight = dequantized_weight(base)
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).float()
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=base.bias is not None,
                                     device=weight.device, dtype=torch.float32)
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias.float())
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
        for module in list(model.modules()):  # projections without LoRA
            for child, sub in list(module.named_children()):
                if is_quantized(sub):
                    linear = torch.nn.Linear(sub.in_features, sub.out_features, bias=sub.bias is not None,
                                             device=sub.weight.device, dtype=torch.float32)
                    linear.weight.copy_(dequantized_weight(sub))
                    if sub.bias is not None:
                        linear.bias.copy_(sub.bias.float())
                    setattr(module, child, linear)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if flag in vars(model):
            delattr(model, flag)
    return model.float().requires_grad_(False)
