"""Objectives: group lasso over the LoRA weights of pruned groups, its proximal step, and the ratio loss.

A group is everything LoRA adds to one structure:
  head h:     rows of B in q_proj for h, and columns of A in o_proj for h;
  KV head g:  rows of B in k_proj and v_proj for g;
  MLP block:  rows of B in gate_proj and up_proj, and columns of A in down_proj, for its channels.
"""
from __future__ import annotations

import torch

from .masking import decoder_layers
from .space import Gates, HeadMLPSpace

# projection -> (group kind, LoRA matrix, axis of that matrix that indexes the structure)
PIECES = {
    "q_proj": ("heads", "B", 0),
    "o_proj": ("heads", "A", 1),
    "k_proj": ("kv", "B", 0),
    "v_proj": ("kv", "B", 0),
    "gate_proj": ("mlp", "B", 0),
    "up_proj": ("mlp", "B", 0),
    "down_proj": ("mlp", "A", 1),
}


def ratio_loss(ratio: torch.Tensor, target: float) -> torch.Tensor:
    """log(max(r, p) / min(r, p)): zero at the target, symmetric in log space."""
    return torch.abs(torch.log(ratio) - torch.log(torch.as_tensor(target, dtype=ratio.dtype)))


def _group_index(space: HeadMLPSpace, kind: str, length: int, device) -> torch.Tensor:
    unit = space.mlp_block if kind == "mlp" else space.head_dim
    return torch.arange(length, device=device) // unit


def _lora_pieces(model, space: HeadMLPSpace):
    """Yield (layer, kind, weight, axis, group_index) for every LoRA matrix that belongs to a group."""
    for index, layer in enumerate(decoder_layers(model)):
        for name, (kind, which, axis) in PIECES.items():
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            module = getattr(parent, name)
            adapters = getattr(module, "lora_A" if which == "A" else "lora_B", None)
            if not adapters:
                continue
            for adapter in adapters.values():
                weight = adapter.weight
                yield index, kind, weight, axis, _group_index(space, kind, weight.shape[axis], weight.device)


def _pruned(space: HeadMLPSpace, gates: Gates) -> dict[str, torch.Tensor]:
    """1 where the group is pruned, per kind, shaped [layers, groups]."""
    heads = gates["heads"].detach()
    return {"heads": 1 - heads, "kv": 1 - space.kv_gates(heads), "mlp": 1 - gates["mlp"].detach()}


def group_sq_norms(model, space: HeadMLPSpace) -> dict[str, torch.Tensor]:
    shapes = {"heads": space.num_heads, "kv": space.num_kv_heads, "mlp": space.num_mlp_blocks}
    sums: dict[str, torch.Tensor] = {}
    for index, kind, weight, axis, group in _lora_pieces(model, space):
        per_row = weight.float().pow(2).sum(dim=1 - axis)
        if kind not in sums:
            sums[kind] = torch.zeros(space.num_layers, shapes[kind], device=weight.device)
        sums[kind] = sums[kind].index_put((torch.full_like(group, index), group), per_row, accumulate=True)
    return sums


def group_lasso(model, space: HeadMLPSpace, gates: Gates) -> torch.Tensor:
    """Sum of L2 norms of the LoRA groups that the gates prune."""
    pruned = _pruned(space, gates)
    total = torch.zeros(())
    for kind, sq in group_sq_norms(model, space).items():
        total = total.to(sq.device) + (torch.sqrt(sq + 1e-12) * pruned[kind].to(sq.device)).sum()
    return total


@torch.no_grad()
def proximal_step(model, space: HeadMLPSpace, gates: Gates, threshold: float) -> None:
    """Group soft-thresholding of pruned groups: w <- w * max(0, 1 - threshold / ||w_g||), giving exact zeros."""
    pruned = _pruned(space, gates)
    norms = {kind: sq.sqrt() for kind, sq in group_sq_norms(model, space).items()}
    for index, kind, weight, axis, group in _lora_pieces(model, space):
        norm = norms[kind][index].to(weight.device)
        shrink = torch.clamp(1 - threshold / norm.clamp_min(1e-12), min=0)
        scale = torch.where(pruned[kind][index].to(weight.device) > 0.5, shrink, torch.ones_like(shrink))
        scale = scale[group].to(weight.dtype)
        weight.mul_(scale.unsqueeze(1) if axis == 0 else scale.unsqueeze(0))
