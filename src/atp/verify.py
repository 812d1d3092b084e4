"""Checks of an exported model against the model it was trained as: merge LoRA, slice, save, reload and compare
logits with the masked model (fp32, and float64 where fp32 rounding alone exceeds the tolerance); the exported
sparsity against the target. `cfg` below is the run's ATPConfig."""
from __future__ import annotations

import functools

import torch

from .errors import ATPError
from .export import build_pruned, count_safetensors_params, save_pruned
from .masking import GateController
from .models import load_model


def export_checked(cfg, peft_model, controller, space, decisions, tokenizer, probe, device, out_dir,
                   compacted: bool = False):
    """Merge LoRA, slice the pruned structures out and save; before the saved folder is moved into place,
    reload it and compare its logits on `probe` with the masked model's (fp32). Returns (path, check, model).
    compacted: the structures are gone already (checked against the masked model when they went)."""
    with torch.no_grad():
        if controller is not None:
            controller.set(decisions)
        reference = peft_model(**{k: v.to(device) for k, v in probe.items()}).logits.float().cpu()
        if controller is not None:
            controller.remove()
    if cfg.quantize_base != "none":  # dequantized to fp32, LoRA merged
        from .quantize import dequantize_and_merge

        merged = dense = dequantize_and_merge(peft_model)
    else:
        merged = dense = peft_model.merge_and_unload()
    merged.config.use_cache = True
    if cfg.prune and not compacted:
        merged = build_pruned(merged, space.kept_structure(decisions))
    else:
        dense = None  # no masked dense model left for the float64 recheck
    merged = merged.float()
    check = {}
    verify = functools.partial(verify_export, cfg, space, decisions, dense, probe, reference, check)
    return save_pruned(merged, tokenizer, out_dir, overwrite=True, verify=verify), check, merged


def verify_export(cfg, space, decisions, dense, probe, reference, check: dict, path) -> None:
    """Reload the saved folder at `path` and compare its logits with the masked model's `reference`; the
    result goes into `check`, a mismatch raises ATPError (and the folder is not moved into place). A pruned
    model must also have the target sparsity (within sparsity_tolerance) and finite logits."""
    if cfg.prune:
        measured = exported_sparsity(space, path, cfg.sparsity_of)
        allowed = sparsity_tolerance(cfg, space)
        if not abs(measured - cfg.sparsity) <= allowed:
            raise ATPError(f"refusing to export: the pruned model has {cfg.sparsity_of} sparsity {measured:.4f}, but "
                           f"the target is {cfg.sparsity} (more than {allowed:.3g} apart); the pruning decisions did "
                           "not reach the target (did the generator diverge? see log.jsonl)")
    loaded, _ = load_model(str(path), attn_implementation=cfg.attn_implementation)
    with torch.no_grad():
        logits = loaded(**probe).logits.float()
    real = probe["attention_mask"].bool()
    for what, values in (("masked model", reference), ("exported model", logits)):
        if not torch.isfinite(values[real]).all():
            check.update(passed=False, finite=False)
            raise ATPError(f"refusing to export: the {what}'s logits hold NaN or Inf values on the check texts; "
                           "the weights diverged")
    diff = float((logits - reference)[real].abs().max())
    # fp32 rounding grows with the logits' magnitude, so the tolerance is relative to it (at least 1)
    scale = max(1.0, float(reference[real].abs().max()))
    from .quantize import CHECK_TOLERANCE

    tolerance = max(cfg.check_tolerance, CHECK_TOLERANCE.get(cfg.quantize_base, 0.0))
    allowed = tolerance * scale
    check.update(max_abs_logit_diff=diff, max_abs_logit=scale, tolerance=tolerance, allowed=allowed,
                 passed=diff <= allowed)
    if cfg.quantize_base != "none":  # the masked model computed on the quantized base, the export dequantized
        check["quantize_base"] = cfg.quantize_base
    # (a quantized run is not rechecked: float64 compares the dequantized model with its slices, not the reference)
    if (diff > allowed and cfg.prune and space.exact and dense is not None
            and space.total_params() <= FLOAT64_RECHECK_MAX_PARAMS and cfg.quantize_base == "none"):
        # Damaged models can carry huge hidden states (1e4 seen), where fp32 rounding alone exceeds the
        # tolerance. Slicing is exact, so in float64 the masked dense model and the export must agree
        # (for exact gate kinds only: a non-exact kind's masked model is not the export).
        exact = float64_diff(dense, space, decisions, loaded, probe)
        check.update(float64_diff=exact, passed=exact <= 1e-6 * scale)
    if not check["passed"]:
        exact = f"; in float64 {check['float64_diff']:.3g}" if "float64_diff" in check else ""
        if not space.exact:
            exact = "; no float64 recheck: the pruning space is not exact (its masks are not physical removal)"
        raise ATPError(f"exported model does not match the masked model: max |logit diff| {diff:.3g} > "
                       f"{allowed:.3g} ({tolerance:g} x the largest |logit|, {scale:.3g}){exact}")


def exported_sparsity(space, path, of: str) -> float:
    """Sparsity of a saved model folder over the dense model's decoder blocks ("prunable") or all its parameters."""
    if of == "model":
        return 1 - count_safetensors_params(path) / space.total_params()
    return 1 - count_safetensors_params(path, prefix=space.arch.layers + ".") / space.prunable_params()


FLOAT64_RECHECK_MAX_PARAMS = 2_000_000_000
COMPACTION_TOLERANCE = 1e-3  # the compact model against the masked one, relative to the largest |logit| (fp32 rounding)
SPARSITY_TOLERANCE = 0.05  # most an export's measured sparsity may differ from the target ...


def sparsity_tolerance(cfg, space) -> float:
    """... or two of the coarsest steps the decisions can take (one gate; one per layer with --uniform; a
    --round-to's worth of MLP blocks), where those are larger (small models, coarse blocks)."""
    step = space.largest_step() * (space.num_layers if cfg.uniform else 1) * max(1, cfg.round_to // cfg.mlp_block)
    return max(SPARSITY_TOLERANCE, 2 * step)


def float64_diff(dense, space, decisions, pruned, probe) -> float:
    """Max |logit diff| between the masked dense (merged) model and the pruned one, both in float64 on CPU."""
    import copy

    dense64, pruned64 = copy.deepcopy(dense).to("cpu", torch.float64), copy.deepcopy(pruned).to("cpu", torch.float64)
    dense64.config._attn_implementation = pruned64.config._attn_implementation  # eager softmax runs in fp32
    controller = GateController(dense64, space)
    controller.set({k: v.cpu() for k, v in decisions.items()})
    with torch.no_grad():
        reference, logits = dense64(**probe).logits, pruned64(**probe).logits
    controller.remove()
    return float((logits - reference)[probe["attention_mask"].bool()].abs().max())
