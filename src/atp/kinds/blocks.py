"""A layer's whole attention block and whole MLP block: gates [layers, 2]. A removed block goes with its
projections, biases and the norms that exist only for it (`Arch.block_norms`), and keeps no KV cache; the export
records it in transformers' per_layer_config as `skip` (with 0 heads / 0 channels). This is a container: the kinds
whose structures live in a block (their `block`) have their gates multiplied by its gate (`PruningSpace.
effective_gates`), and it counts what goes only with a whole block: its norms and output bias."""
from __future__ import annotations

import torch

from ..errors import ATPError
from .base import GateKind, as_float


class BlockKind(GateKind):
    name = "blocks"
    description = "whole attention and MLP blocks of a layer, with their norms"
    columns = ("attention", "mlp")  # gate columns, named as in per_layer_config's `skip`
    hooks = {
        "both": (("o", "output", "attention_block"), ("down", "output", "mlp_block")),
        "frozen-output": (("o", "output", "attention_block"), ("down", "output", "mlp_block")),
        "frozen": tuple((role, "output", "attention_block") for role in ("q", "k", "v", "o"))
                  + tuple((role, "output", "mlp_block") for role in ("gate", "up", "down")),
        "frozen-qkv": tuple((role, "output", "attention_block") for role in ("q", "k", "v"))
                      + tuple((role, "output", "mlp_block") for role in ("gate", "up")),
    }
    lora_pieces = (("attention_block", "q", "B", 0), ("attention_block", "k", "B", 0), ("attention_block", "v", "B", 0),
                   ("attention_block", "o", "A", 1), ("mlp_block", "gate", "B", 0), ("mlp_block", "up", "B", 0),
                   ("mlp_block", "down", "A", 1))
    score_roles = ("q", "k", "v", "o", "gate", "up", "down")
    output_roles = ("o", "down")

    def width(self, space):
        return len(self.columns)

    def count(self, space, gates, factors):
        """Each block's norms and output bias times its gate; per-head q/k norms are as wide as the kept q/k
        head width (`qk_width`)."""
        blocks = as_float(gates)
        terms = [blocks[:, column].sum() * space.block_fixed_params(block) for column, block in enumerate(self.columns)]
        if "qk_width" in factors and space.arch.head_norms:
            lost = space.head_dim - factors["qk_width"]
            terms.append(-(lost * blocks[:, 0]).sum() * len(space.arch.head_norms))
        return terms

    def masks(self, space, gates, names):
        columns = {"attention_block": gates[:, 0:1], "mlp_block": gates[:, 1:2]}
        return {name: columns[name] for name in names}

    def groups(self, space):
        return {"attention_block": (1, space.num_heads * space.head_dim), "mlp_block": (1, space.intermediate_size)}

    def pruned(self, space, gates):
        gates = gates.detach()
        return {"attention_block": 1 - gates[:, 0:1], "mlp_block": 1 - gates[:, 1:2]}

    def kept(self, space, gate_row):
        return {"skip": [block for block, gate in zip(self.columns, gate_row.tolist()) if gate <= 0.5]}

    def widths(self, kept):
        return {"skip": list(kept["skip"])} if kept.get("skip") else {}

    def dropped(self, kept, arch):
        parts = dict(zip(self.columns, ((arch.attention,), (arch.mlp,))))
        return [name for block in kept.get("skip", ()) for name in parts[block] + arch.block_norms()[block]]

    def group_sums(self, space, stats):
        attention = sum(stats[role].sum() for role in ("q", "k", "v", "o"))
        mlp = sum(stats[role].sum() for role in ("gate", "up", "down"))
        return torch.stack([attention, mlp])

    def activation_sums(self, space, columns):
        return torch.stack([columns["o"].sum(), columns["down"].sum()])

    def check_rule(self, space, rule):
        if rule.uniform:
            raise ATPError("--uniform gives every layer the same shape, so it cannot remove whole blocks; "
                           "drop 'blocks' from --space or drop --uniform")
