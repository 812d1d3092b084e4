"""MLP intermediate channels, in blocks of `mlp_block` (the last block may be shorter)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ATPError
from .base import GateKind, as_float, chunk_sums, keep_top, option


@dataclass
class MLPOptions:
    mlp_block: int = option(32, "MLP channels per gate (kept MLP widths are multiples of it)", at_least=1)


class MLPChannelKind(GateKind):
    name = "mlp"
    description = "MLP channel blocks of --mlp-block channels"
    options = MLPOptions
    space_options = {"mlp_block": 1}
    block = "mlp"
    rounds = True
    hooks = {
        "both": (("down", "input", "mlp"),),
        "frozen-output": (("down", "input", "mlp"),),
        "frozen": (("gate", "output", "mlp"), ("up", "output", "mlp"), ("down", "input", "mlp")),
        "frozen-qkv": (("gate", "output", "mlp"), ("up", "output", "mlp")),
    }
    lora_pieces = (("mlp", "gate", "B", 0), ("mlp", "up", "B", 0), ("mlp", "down", "A", 1))
    score_roles = ("gate", "up", "down")
    output_roles = ("down",)

    @staticmethod
    def num_blocks(space) -> int:
        return math.ceil(space.intermediate_size / space.mlp_block)

    def width(self, space):
        return self.num_blocks(space)

    def block_sizes(self, space) -> torch.Tensor:
        sizes = torch.full((self.num_blocks(space),), space.mlp_block, dtype=torch.float32)
        sizes[-1] = space.intermediate_size - space.mlp_block * (self.num_blocks(space) - 1)
        return sizes

    def channel_mask(self, space, gates: torch.Tensor) -> torch.Tensor:
        """Expand [..., blocks] gates to [..., intermediate_size] channel gates."""
        return gates.repeat_interleave(space.mlp_block, dim=-1)[..., : space.intermediate_size]

    @staticmethod
    def _per_channel(space):
        return 2 * (space.hidden_size + space.mlp_bias) + space.hidden_size

    def count(self, space, gates, factors):
        mlp = as_float(gates)
        return [(mlp * self.block_sizes(space).to(mlp.device)).sum() * self._per_channel(space)]

    def fixed_params(self, space):
        return space.mlp_bias * space.hidden_size

    def masks(self, space, gates, names):
        return {"mlp": self.channel_mask(space, gates)}

    def groups(self, space):
        return {"mlp": (self.num_blocks(space), space.mlp_block)}

    def kept(self, space, gate_row):
        return {"channels": torch.nonzero(self.channel_mask(space, gate_row) > 0.5).flatten().tolist()}

    def widths(self, kept):
        return {"intermediate_size": len(kept["channels"])}

    def slices(self, kept, head_dim):
        channels = torch.tensor(kept["channels"], dtype=torch.long)
        return {"gate": (channels, None), "up": (channels, None), "down": (None, channels)}

    def legacy_kept(self, record):
        return {"channels": list(range(record["intermediate_size"]))}

    def gguf_steps(self, cfg):
        step = cfg.round_to or cfg.mlp_block
        return [(step, f"MLP widths in steps of {step} (--round-to or --mlp-block)")]

    def activation_sums(self, space, columns):
        return chunk_sums(columns["down"], space.mlp_block)

    def group_sums(self, space, stats):
        rows = stats["gate"].sum(1) + stats["up"].sum(1)
        return chunk_sums(rows + stats["down"].sum(0), space.mlp_block)

    def check_rule(self, space, rule):
        if rule.round_to and rule.round_to % space.mlp_block:
            raise ATPError(f"--round-to {rule.round_to} must be a multiple of --mlp-block {space.mlp_block} "
                           f"(MLP channels are decided in blocks of {space.mlp_block})")

    def project(self, space, rule, hard, scores):
        unit = max(1, rule.round_to // space.mlp_block)  # blocks per allowed step
        blocks = self.num_blocks(space)
        counts = hard.sum(dim=1).float()
        if rule.uniform:
            counts = counts.mean().expand_as(counts)
        counts = (torch.floor(counts / unit + 0.5) * unit).clamp(min=unit if rule.uniform else 0).clamp(max=blocks)
        if space.intermediate_size % space.mlp_block:  # a shorter last block is kept only with the full width
            scores = scores.detach().clone()
            scores[counts < blocks, -1] = -float("inf")
        return keep_top(scores, counts.long())
