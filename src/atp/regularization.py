"""Objectives: group lasso over the LoRA weights of pruned groups, its proximal step, the ratio loss and the ratio
penalties the generator minimises (`RATIO_PENALTIES`, by --ratio-penalty).

A group is everything LoRA adds to one structure (each gate kind lists its pieces, `GateKind.lora_pieces`):
  head h:     rows of B in q_proj for h, and columns of A in o_proj for h;
  KV head g:  rows of B in k_proj and v_proj for g;
  MLP block:  rows of B in gate_proj and up_proj, and columns of A in down_proj, for its channels;
  attention / MLP block of a layer (--space blocks): all rows of B in q/k/v_proj and all columns of A in
              o_proj, or all rows of B in gate/up_proj and all columns of A in down_proj;
  hidden block, per layer (--space hidden): columns of A in q/k/v/gate/up_proj and rows of B in o/down_proj for
              its channels;
  query/key dimension block (--space qk-dims): rows of B in q_proj and k_proj for its dimensions in every head.
"""
from __future__ import annotations

import math

import torch

from .masking import decoder_layers
from .space import Gates, PruningSpace

RATIO_FLOOR = 1e-3


def ratio_loss(ratio: torch.Tensor, target: float) -> torch.Tensor:
    """log(max(r, p) / min(r, p)): zero at the target, symmetric in log space. Where every structure is pruned
    (possible with whole blocks: no norm has to stay) r is 0; the loss is then taken at RATIO_FLOOR, where it is
    finite and still pushes r up. Above the floor nothing changes."""
    ratio = ratio + (ratio.clamp_min(RATIO_FLOOR) - ratio).detach()
    return torch.abs(torch.log(ratio) - torch.log(torch.as_tensor(target, dtype=ratio.dtype)))


def lagrangian_penalty(ratio: torch.Tensor, target: float, multipliers: torch.Tensor) -> torch.Tensor:
    """Sheared-LLaMA's constraint term l1 * (r - t) + l2 * (r - t)^2. The generator descends on it and the
    multipliers ascend (their gradient is negated before the step), so the pressure grows while r misses t."""
    gap = ratio - target
    return multipliers[0] * gap + multipliers[1] * gap * gap


class LogRatioPenalty:
    """--ratio-penalty log: the generator minimises alpha * ratio loss of its deterministic decisions."""
    multipliers = False  # whether the generator carries Lagrange multipliers

    def __init__(self, alpha: float):
        self.alpha = alpha

    def param_groups(self, generator, lr: float) -> list[dict]:
        """Optimizer groups of its own, besides the generator's search parameters."""
        return []

    def terms(self, ratio: torch.Tensor, target: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The ratio loss (logged) and the term the generator minimises."""
        r_loss = ratio_loss(ratio, target)
        return r_loss, self.alpha * r_loss

    def after_backward(self, generator) -> None:
        """Gradients of its own to turn around before the optimizer step."""

    def logged(self, generator) -> dict:
        return {}


class LagrangianPenalty(LogRatioPenalty):
    """--ratio-penalty lagrangian: Sheared-LLaMA's multipliers, which ascend (at alpha times the generator's
    learning rate: short searches need them to rise fast) while the generator descends."""
    multipliers = True

    def param_groups(self, generator, lr: float) -> list[dict]:
        return [{"params": [generator.lagrange], "lr": self.alpha * lr}]

    def terms(self, ratio: torch.Tensor, target: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
        return ratio_loss(ratio, target), lagrangian_penalty(ratio, target, generator.lagrange)

    def after_backward(self, generator) -> None:
        generator.lagrange.grad.neg_()  # the multipliers ascend

    def logged(self, generator) -> dict:
        return {"lagrange_1": generator.lagrange[0].item(), "lagrange_2": generator.lagrange[1].item()}


RATIO_PENALTIES = {"log": LogRatioPenalty, "lagrangian": LagrangianPenalty}  # by --ratio-penalty


def _lora_pieces(model, space: PruningSpace):
    """Yield (layer, group, weight, axis, group_index) for every LoRA matrix that belongs to a group of a
    selected kind (`GateKind.lora_pieces`)."""
    for index, layer in enumerate(decoder_layers(model)):
        for kind in space.kind_objects:
            for group, role, which, axis in kind.lora_pieces:
                module = space.arch.projection(layer, role)
                adapters = getattr(module, "lora_A" if which == "A" else "lora_B", None)
                if not adapters:
                    continue
                for adapter in adapters.values():
                    weight = adapter.weight
                    groups = kind.lora_groups(space, group, weight.shape[axis])
                    yield index, group, weight, axis, groups.to(weight.device)


def _pruned(space: PruningSpace, gates: Gates) -> dict[str, torch.Tensor]:
    """1 where the group is pruned, per group, shaped [layers, groups]."""
    return {group: pruned for kind in space.kind_objects
            for group, pruned in kind.pruned(space, gates[kind.name]).items()}


def group_sq_norms(model, space: PruningSpace) -> dict[str, torch.Tensor]:
    shapes = {group: count for kind in space.kind_objects for group, (count, _) in kind.groups(space).items()}
    sums: dict[str, torch.Tensor] = {}
    for index, group_name, weight, axis, group in _lora_pieces(model, space):
        per_row = weight.float().pow(2).sum(dim=1 - axis)
        if group_name not in sums:
            sums[group_name] = torch.zeros(space.num_layers, shapes[group_name], device=weight.device)
        sums[group_name] = sums[group_name].index_put((torch.full_like(group, index), group), per_row, accumulate=True)
    return sums


def group_lasso(model, space: PruningSpace, gates: Gates) -> torch.Tensor:
    """Sum of L2 norms of the LoRA groups that the gates prune."""
    pruned = _pruned(space, gates)
    total = torch.zeros(())
    for name, sq in group_sq_norms(model, space).items():
        total = total.to(sq.device) + (torch.sqrt(sq + 1e-12) * pruned[name].to(sq.device)).sum()
    return total


def pruned_norms(model, space: PruningSpace, gates: Gates) -> dict[str, float]:
    """Per group name: the sum and the largest of the LoRA norms of the groups that the gates prune."""
    pruned = _pruned(space, gates)
    out = {}
    with torch.no_grad():
        for name, sq in group_sq_norms(model, space).items():
            norms = sq.sqrt() * pruned[name].to(sq.device)
            out[name] = {"sum": float(norms.sum()), "max": float(norms.max()) if norms.numel() else 0.0}
    return out


@torch.no_grad()
def ramp_proximal_step(model, space: PruningSpace, gates: Gates, fraction: float) -> None:
    """The ramp lasso's proximal step: group soft-thresholding of pruned groups at `fraction` of the largest
    pruned group's norm (per group name: heads, KV heads, MLP blocks). At fraction 1 every pruned group is
    exactly zero. The threshold follows the weights, not the optimizer's step size."""
    if fraction <= 0:
        return
    if fraction >= 1:  # at least the largest norm: every pruned group to exactly zero (no rounding left over)
        proximal_step(model, space, gates, math.inf)
        return
    largest = {name: value["max"] for name, value in pruned_norms(model, space, gates).items()}
    proximal_step(model, space, gates, {name: fraction * value for name, value in largest.items()})


@torch.no_grad()
def exp_ramp_proximal_step(model, space: PruningSpace, gates: Gates, scale: float) -> None:
    """The exp-ramp lasso's proximal step, as the authors' code weighs it: the pruned groups of group name g in
    layer l are soft-thresholded at scale * (pruned groups of g in l) / (pruned groups of every name and layer), so
    layers that prune more are pushed harder. scale: lam * growth * the LoRA learning rate."""
    if scale <= 0:
        return
    pruned = _pruned(space, gates)
    total = sum(float(p.sum()) for p in pruned.values())
    if total == 0:
        return
    proximal_step(model, space, gates, {name: scale * p.sum(dim=1).float() / total for name, p in pruned.items()})


@torch.no_grad()
def proximal_step(model, space: PruningSpace, gates: Gates,
                  threshold: float | dict[str, float] | dict[str, torch.Tensor]) -> None:
    """Group soft-thresholding of pruned groups: w <- w * max(0, 1 - threshold / ||w_g||), giving exact zeros.
    threshold: one for every group, one per group name, or per group name one per layer (a tensor)."""
    pruned = _pruned(space, gates)
    norms = {name: sq.sqrt() for name, sq in group_sq_norms(model, space).items()}
    for index, name, weight, axis, group in _lora_pieces(model, space):
        norm = norms[name][index].to(weight.device)
        tau = threshold[name] if isinstance(threshold, dict) else threshold
        if isinstance(tau, torch.Tensor):
            tau = tau[index].to(weight.device)
        shrink = torch.clamp(1 - tau / norm.clamp_min(1e-12), min=0)
        scale = torch.where(pruned[name][index].to(weight.device) > 0.5, shrink, torch.ones_like(shrink))
        scale = scale[group].to(weight.dtype)
        weight.mul_(scale.unsqueeze(1) if axis == 0 else scale.unsqueeze(0))
