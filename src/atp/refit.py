"""--refit ls: at compaction, a least-squares refit of the kept input columns of each decoder layer's output
projections (the arch's o_proj and down_proj roles), so that the kept columns take over what the pruned ones
contributed, as far as the calibration data allows. The compensation of FLAP / SlimGPT / ZipLM, written here from
the least-squares formula:

With X the projection's inputs in the unmasked model (every structure kept, LoRA included) on the real tokens of
calibration batches, H = XᵀX, K the kept input columns, P the pruned ones and W the effective weight (frozen base
plus the LoRA delta), M = W_K + W_P H_PK H_KK⁻¹ minimises ‖X_K Mᵀ − X Wᵀ‖² (H_KK damped by DAMPING times its mean
diagonal). The correction W_P H_PK H_KK⁻¹ goes into the compact model's frozen base weight; LoRA is untouched.

H of a down_proj holds intermediate_size² floats (0.8 GB for an 8B model), so the layers are taken in chunks whose
H fit BUDGET_BYTES, one pass over the calibration batches per chunk (the pass stops after the chunk's last layer).
With several processes each takes its share of the batches and the H are summed (every process then computes the
same weights)."""
from __future__ import annotations

import dataclasses
import math
import time

import torch

from .arch import arch_for
from .errors import ATPError
from .export import slice_plan
from .masking import base_model

ROLES = ("o", "down")  # the projections whose input columns pruning removes and that write the residual stream
DAMPING = 0.01  # H_KK + DAMPING * mean(diag H_KK) * I
BUDGET_BYTES = 2 << 30  # the fp32 H matrices captured in one pass over the calibration batches


@dataclasses.dataclass(frozen=True)
class Target:
    """One projection to refit."""
    path: str  # module path in the transformers model, e.g. model.layers.3.mlp.down_proj
    role: str  # "o" or "down"
    layer: int
    rows: torch.Tensor | None  # kept output rows (dense indices; None: all)
    cols: torch.Tensor  # kept input columns (dense indices), in the compact model's order
    width: int  # input columns of the dense projection

    @property
    def pruned(self) -> torch.Tensor:
        keep = torch.ones(self.width, dtype=torch.bool)
        keep[self.cols] = False
        return torch.nonzero(keep).flatten()


class _Done(Exception):
    """Raised after the last layer a capture pass needs: the rest of the forward pass is not run."""


def base_layer(module):
    """The frozen linear layer of a projection (peft's base_layer under a LoRA wrapper)."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def targets(model, kept_structure: list[dict]) -> list[Target]:
    """The output projections whose input columns these decisions slice (slice_plan), in layer order; a
    projection with nothing pruned, with no input column left, or in a removed block is left out."""
    dense = base_model(model)
    arch = arch_for(dense.config)
    head_dim = getattr(dense.config, "head_dim", None) or dense.config.hidden_size // dense.config.num_attention_heads
    ops, gone = slice_plan(arch, kept_structure, head_dim)
    found = []
    for layer in range(len(kept_structure)):
        for role in ROLES:
            path = f"{arch.layers}.{layer}.{arch.path(role)}"
            if gone and path.startswith(gone):
                continue
            rows = cols = None
            for dim, index in ops.get(path, []):
                index = index.long().cpu()
                if dim == 0:
                    rows = index if rows is None else rows[index]
                else:
                    cols = index if cols is None else cols[index]
            width = base_layer(dense.get_submodule(path)).weight.shape[1]
            if cols is None or len(cols) in (0, width):
                continue
            found.append(Target(path, role, layer, rows, cols, width))
    return found


def chunks(found: list[Target], budget: int = BUDGET_BYTES) -> list[list[Target]]:
    """Consecutive targets whose fp32 H fit the budget together (a larger one alone)."""
    out, size = [], 0
    for target in found:
        need = 4 * target.width ** 2
        if out and size + need <= budget:
            out[-1].append(target)
            size += need
        else:
            out.append([target])
            size = need
    return out


def capture(model, chunk: list[Target], batches: list[dict], device) -> tuple[dict[str, torch.Tensor], int]:
    """{path: H = XᵀX (fp32)} of the chunk's projections over the real tokens (attention mask) of `batches`, in
    one pass of `model` as it is (the caller turns masks off), and the number of those tokens."""
    dense = base_model(model)
    arch = arch_for(dense.config)
    hessians = {t.path: torch.zeros(t.width, t.width, dtype=torch.float32, device=device) for t in chunk}
    state = {"real": None}

    def hook_for(path):
        def hook(module, args):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            if state["real"] is not None:
                flat = flat[state["real"]]
            flat = flat.float()
            hessians[path].addmm_(flat.t(), flat)

        return hook

    def stop(module, args, output):
        raise _Done

    handles = [dense.get_submodule(t.path).register_forward_pre_hook(hook_for(t.path)) for t in chunk]
    last = max(t.layer for t in chunk)
    handles.append(arch.decoder_layers(dense)[last].register_forward_hook(stop))
    tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                mask = inputs.get("attention_mask")
                state["real"] = mask.reshape(-1).bool() if mask is not None else None
                tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
                try:
                    model(**inputs, use_cache=False)
                except _Done:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians, tokens


def effective_weight(module) -> torch.Tensor:
    """The weight the projection computes with, in fp32: its frozen base plus every active LoRA delta."""
    weight = base_layer(module).weight.detach().float()
    for name in getattr(module, "active_adapters", ()):
        if name in getattr(module, "lora_A", {}):
            weight = weight + module.get_delta_weight(name).float()
    return weight


@torch.no_grad()
def solve(weight: torch.Tensor, hessian: torch.Tensor, target: Target) -> tuple[torch.Tensor, float, float]:
    """The correction D = W_P H_PK (H_KK + λI)⁻¹ (float64, output rows as kept) and the output errors
    ‖X_P W_Pᵀ‖ (plain slicing) and ‖X_K (W_K + D)ᵀ − X Wᵀ‖ (refit), both from H."""
    device = hessian.device if hessian.device.type in ("cpu", "cuda") else torch.device("cpu")  # (float64)
    h = hessian.to(device, torch.float64)
    w = weight.to(device, torch.float64)
    if target.rows is not None:
        w = w.index_select(0, target.rows.to(device))
    kept, pruned = target.cols.to(device), target.pruned.to(device)
    h_kk = h.index_select(0, kept).index_select(1, kept)
    h_kp = h.index_select(0, kept).index_select(1, pruned)
    h_pp = h.index_select(0, pruned).index_select(1, pruned)
    w_p = w.index_select(1, pruned)
    del h
    before = float((w_p @ h_pp * w_p).sum())
    damping = DAMPING * float(h_kk.diagonal().mean())
    if not damping > 0:  # no signal at the kept inputs: nothing to fit
        return torch.zeros(w.shape[0], len(kept), dtype=torch.float64, device=device), before, before
    a = h_kk + damping * torch.eye(len(kept), dtype=torch.float64, device=device)
    rhs = h_kp @ w_p.t()
    factor, info = torch.linalg.cholesky_ex(a)
    d_t = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(a, rhs)
    d = d_t.t()
    after = before - 2 * float((d @ h_kp * w_p).sum()) + float((d @ h_kk * d).sum())
    return d, before, max(after, 0.0)


@torch.no_grad()
def refit_weights(model, kept_structure: list[dict], batches: list[dict], device, reduce=None,
                  budget: int = BUDGET_BYTES) -> tuple[dict[str, torch.Tensor], dict]:
    """The refit compact base weights {"<path>.weight": tensor on the CPU, in the base weight's dtype, shaped as
    the compact model's} of the (unmasked, not yet compacted) `model`, and a summary for report.json. `reduce`
    sums a tensor over processes (None: one process)."""
    started = time.time()
    dense = base_model(model)
    found = targets(model, kept_structure)
    weights, ratios, tokens = {}, {role: [] for role in ROLES}, 0
    passes = chunks(found, budget)
    for chunk in passes:
        hessians, tokens = capture(model, chunk, batches, device)
        if reduce is not None:
            tokens = int(reduce(torch.tensor(float(tokens), device=device)))
        for target in chunk:
            hessian = reduce(hessians.pop(target.path)) if reduce is not None else hessians.pop(target.path)
            module = dense.get_submodule(target.path)
            correction, before, after = solve(effective_weight(module), hessian, target)
            del hessian
            base = base_layer(module).weight.detach()
            if target.rows is not None:
                base = base.index_select(0, target.rows.to(base.device))
            base = base.index_select(1, target.cols.to(base.device))
            new = (base.to(correction.device, torch.float64) + correction).to(base.dtype).cpu()
            if not torch.isfinite(new).all():
                raise ATPError(f"--refit ls: the refit weight of {target.path} holds NaN or Inf values (the model's "
                               "activations on the calibration batches are not finite?); run without --refit")
            weights[f"{target.path}.weight"] = new
            if before > 0:
                ratios[target.role].append(math.sqrt(after / before))
    every = [r for values in ratios.values() for r in values]
    mean = sum(every) / len(every) if every else None
    summary = {"refit": "ls", "refit_modules": len(weights), "refit_calibration_batches": len(batches),
               "refit_calibration_tokens": tokens, "refit_damping": DAMPING,
               # ‖X_K M'ᵀ − X Wᵀ‖ / ‖X_P W_Pᵀ‖ on the calibration data: the output error left, as a fraction of
               # plain slicing's; its mean over the refit modules, overall and per role
               "refit_output_error_ratio": mean,
               "refit_output_error_ratio_by_role": {role: (sum(v) / len(v) if v else None)
                                                    for role, v in ratios.items()},
               "refit_passes": len(passes), "refit_seconds": round(time.time() - started, 2)}
    return weights, summary


def apply(model, weights: dict[str, torch.Tensor]) -> None:
    """Put the refit base weights into the compact model (fresh tensors: nothing shared with another model)."""
    dense = base_model(model)
    for name, value in weights.items():
        path = name.removesuffix(".weight")
        try:
            param = base_layer(dense.get_submodule(path)).weight
        except AttributeError:
            raise ATPError(f"internal error: --refit ls has a weight for {path}, which the compact model does not "
                           "have") from None
        if tuple(param.shape) != tuple(value.shape):
            raise ATPError(f"internal error: the refit weight of {path} has shape {tuple(value.shape)}, the compact "
                           f"model's {tuple(param.shape)}")
        with torch.no_grad():
            param.data = value.to(device=param.device, dtype=param.dtype, copy=True)


def current(model, names) -> dict[str, torch.Tensor]:
    """The compact model's base weights of these names now (what a checkpoint saves)."""
    dense = base_model(model)
    return {name: base_layer(dense.get_submodule(name.removesuffix(".weight"))).weight for name in names}
