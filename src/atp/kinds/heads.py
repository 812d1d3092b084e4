"""Query heads, with the KV heads they free: a KV head goes when the last query head reading it goes."""
from __future__ import annotations

import torch

from ..errors import ATPError
from .base import GateKind, as_float, chunk_sums, keep_top, rows


class HeadKind(GateKind):
    name = "heads"
    description = "query heads, with the KV heads they free"
    block = "attention"
    hooks = {
        "both": (("o", "input", "heads"),),
        "frozen-output": (("o", "input", "heads"),),
        "frozen": (("q", "output", "heads"), ("k", "output", "kv"), ("v", "output", "kv"), ("o", "input", "heads")),
        "frozen-qkv": (("q", "output", "heads"), ("k", "output", "kv"), ("v", "output", "kv")),
    }
    lora_pieces = (("heads", "q", "B", 0), ("heads", "o", "A", 1), ("kv", "k", "B", 0), ("kv", "v", "B", 0))
    score_roles = ("q", "o")
    output_roles = ("o",)
    gguf_whole_heads = True

    def width(self, space):
        return space.num_heads

    @staticmethod
    def kv_gates(space, head_gates: torch.Tensor) -> torch.Tensor:
        """A KV head is kept if any of its query heads is: 1 - prod(1 - h), exact for 0/1 gates."""
        grouped = head_gates.reshape(*head_gates.shape[:-1], space.num_kv_heads, space.heads_per_kv)
        return 1 - torch.prod(1 - grouped, dim=-1)

    def count(self, space, gates, factors):
        """Query/key rows are as wide as the layer's kept q/k head width (`qk_width`), value/output rows the full
        head_dim."""
        heads = as_float(gates)
        kv = self.kv_gates(space, heads)
        qk = factors.get("qk_width", space.head_dim)
        row = space.hidden_size + space.qkv_bias
        return [(heads.sum(1) * qk).sum() * row, heads.sum() * space.head_dim * space.hidden_size,
                (kv.sum(1) * qk).sum() * row, kv.sum() * space.head_dim * row]

    def fixed_params(self, space):
        return space.o_bias * space.hidden_size

    def masks(self, space, gates, names):
        out = {}
        if "heads" in names:
            out["heads"] = gates.repeat_interleave(space.head_dim, dim=-1)
        if "kv" in names:
            out["kv"] = self.kv_gates(space, gates).repeat_interleave(space.head_dim, dim=-1)
        return out

    def groups(self, space):
        return {"heads": (space.num_heads, space.head_dim), "kv": (space.num_kv_heads, space.head_dim)}

    def pruned(self, space, gates):
        heads = gates.detach()
        return {"heads": 1 - heads, "kv": 1 - self.kv_gates(space, heads)}

    def kept(self, space, gate_row):
        heads = torch.nonzero(gate_row > 0.5).flatten().tolist()
        kv = sorted({h // space.heads_per_kv for h in heads})
        return {"heads": heads, "kv_heads": kv, "kv_map": [kv.index(h // space.heads_per_kv) for h in heads]}

    def widths(self, kept):
        heads, kv_heads, kv_map = len(kept["heads"]), len(kept["kv_heads"]), kept["kv_map"]
        even = heads == 0 or (heads % kv_heads == 0 and kv_map == [i // (heads // kv_heads) for i in range(heads)])
        return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "kv_map": None if even else kv_map}

    def slices(self, kept, head_dim):
        q_rows, kv_rows = rows(kept["heads"], head_dim), rows(kept["kv_heads"], head_dim)
        return {"q": (q_rows, None), "k": (kv_rows, None), "v": (kv_rows, None), "o": (None, q_rows)}

    def export_record(self, kept_structure):
        return {"kept_heads": [kept["heads"] for kept in kept_structure]}

    def report_layer(self, kept):
        return {"kept_heads": kept["heads"]}

    def legacy_kept(self, record):
        return {"heads": record["kept_heads"], "kv_heads": list(range(record["num_kv_heads"])),
                "kv_map": record["kv_map"]}

    def activation_sums(self, space, columns):
        return chunk_sums(columns["o"], space.head_dim)

    def group_sums(self, space, stats):
        return chunk_sums(stats["q"].sum(1), space.head_dim) + chunk_sums(stats["o"].sum(0), space.head_dim)

    def head_options(self, space) -> list[tuple[int, int]]:
        """(kept KV heads, query heads per KV head) pairs a uniform export can hold."""
        return [
            (groups, per_group)
            for groups in range(1, space.num_kv_heads + 1)
            for per_group in range(1, space.heads_per_kv + 1)
            if not space.heads_must_divide_hidden or space.hidden_size % (groups * per_group) == 0
        ]

    def check_rule(self, space, rule):
        if rule.uniform and not self.head_options(space):
            raise ATPError("--uniform: no head count splits evenly over the KV heads and divides the hidden size")

    def project(self, space, rule, hard, scores):
        if not rule.uniform:
            return hard
        per_kv = space.heads_per_kv
        grouped = hard.reshape(space.num_layers, space.num_kv_heads, per_kv)
        mean_heads = float(grouped.sum(dim=(1, 2)).float().mean())
        mean_groups = float((grouped.sum(dim=2) > 0).sum(dim=1).float().mean())
        groups, per_group = min(self.head_options(space),
                                key=lambda o: (abs(o[0] * o[1] - mean_heads), abs(o[0] - mean_groups)))
        by_score = scores.reshape(space.num_layers, space.num_kv_heads, per_kv)
        groups_in_model = space.num_layers * space.num_kv_heads
        in_group = keep_top(by_score.reshape(-1, per_kv), torch.full((groups_in_model,), per_group))
        in_group = in_group.reshape_as(by_score)
        group_scores = (by_score * in_group).sum(dim=2) / per_group
        keep_groups = keep_top(group_scores, torch.full((space.num_layers,), groups))
        return (in_group * keep_groups.unsqueeze(2)).reshape(space.num_layers, space.num_heads)
