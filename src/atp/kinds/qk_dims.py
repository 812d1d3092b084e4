"""Query/key dimensions inside the heads, in blocks of `qk_block` RoPE pairs: one set per layer, the same in every
query head and every KV head of the layer (so in every head of a KV group). HF's RoPE rotates dimension i with
i + head_dim/2 at frequency inv_freq[i]; a gate keeps or prunes both, so masking q/k before RoPE is exact. A pruned
dimension contributes nothing to q.k, and the softmax keeps the original 1/sqrt(head_dim) scale. Per-head q/k
RMSNorms (Qwen3, Gemma 3) normalise over the kept dimensions (`extra_hooks`), as the export's smaller norms do.
Counts: the kept q/k head width per layer is the "qk_width" factor, which the kinds counting q/k rows and per-head
norms read."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ATPError
from .base import MASK_MODES, GateKind, chunk_sums, option, rows

GGUF_REFUSAL = ("--gguf cannot hold a model pruned with --space qk-dims: llama.cpp's key length is one value for "
                "every layer and its RoPE rotates a fixed run of frequencies; prune without qk-dims, or drop --gguf "
                "(the run's Hugging Face folder loads in transformers)")


@dataclass
class QKDimOptions:
    qk_block: int = option(4, "RoPE pairs of query/key dimensions per gate with --space qk-dims (a gate removes "
                              "2 * QK_BLOCK dimensions from every query and key head of a layer)",
                           at_least=1, before=4, inert_unless_selected=True)


class QKDimKind(GateKind):
    name = "qk-dims"
    description = ("query/key dimensions inside heads, in blocks of --qk-block RoPE pairs, the same in every head of a "
                   "layer (the export's q/k head size is smaller than v's; remote-code export, no GGUF)")
    options = QKDimOptions
    space_options = {"qk_block": 4}
    min_kept = 1  # a layer keeps one block of pairs
    hooks = {mode: (("q", "output", "qk_q"), ("k", "output", "qk_k")) for mode in MASK_MODES}
    lora_pieces = (("qk", "q", "B", 0), ("qk", "k", "B", 0))
    score_roles = ("q", "k")
    unsupported_methods = {"activation": "Wanda-sp scores read the inputs of o_proj / down_proj, which say nothing "
                                         "about query/key dimensions; use taylor, magnitude, random or "
                                         "frozen-generator"}
    gguf_refusal = GGUF_REFUSAL

    @staticmethod
    def half(space) -> int:
        return space.head_dim // 2

    def width(self, space):
        return -(-self.half(space) // space.qk_block)

    def check_space(self, space):
        if space.qk_block < 1:
            raise ATPError(f"--qk-block must be a positive number of RoPE pairs, got {space.qk_block}")
        if space.head_dim % 2:
            raise ATPError(f"--space qk-dims keeps RoPE's pairs together, but head_dim {space.head_dim} is odd")
        if self.width(space) < 2:
            raise ATPError(f"--qk-block {space.qk_block} puts all {self.half(space)} RoPE pairs of a head in one "
                           "block, which must stay: nothing could be pruned; choose a smaller --qk-block")

    def pair_mask(self, space, gates):
        """[..., blocks] gates to [..., head_dim / 2] RoPE-pair gates."""
        return gates.repeat_interleave(space.qk_block, dim=-1)[..., : self.half(space)]

    def dim_mask(self, space, gates):
        pairs = self.pair_mask(space, gates)
        return torch.cat([pairs, pairs], dim=-1)

    def kept_dims(self, space, gates):
        """Kept q/k dimensions per head, per row of gates."""
        return 2 * self.pair_mask(space, gates.float()).sum(-1)

    def factors(self, space, gates):
        return {"qk_width": self.kept_dims(space, gates)}

    def masks(self, space, gates, names):
        dims = self.dim_mask(space, gates)  # [layers, head_dim]
        out = {"qk_q": dims.repeat(1, space.num_heads), "qk_k": dims.repeat(1, space.num_kv_heads)}
        if space.arch.head_norms:  # a norm over the k kept dims: the dense norm of the input scaled by sqrt(head_dim/k)
            out["qk_dims"] = dims
            out["qk_scale"] = torch.sqrt(space.head_dim / dims.sum(-1, keepdim=True).clamp_min(1))
        return out

    def extra_hooks(self, space, model, masks_of):
        def norm_input(index):
            def apply(module, args):
                masks = masks_of()
                if masks is None or "qk_dims" not in masks:
                    return None
                x = args[0]
                return (x * (masks["qk_dims"][index] * masks["qk_scale"][index]).to(x.dtype),) + tuple(args[1:])
            return apply

        def norm_output(index):
            def apply(module, args, output):
                masks = masks_of()
                if masks is None or "qk_dims" not in masks:
                    return None
                return output / masks["qk_scale"][index].to(output.dtype)
            return apply

        handles = []
        for index, layer in enumerate(space.arch.decoder_layers(model)):
            attention = getattr(layer, space.arch.attention)
            for name in space.arch.head_norms:
                norm = getattr(attention, name)
                handles += [norm.register_forward_pre_hook(norm_input(index)),
                            norm.register_forward_hook(norm_output(index))]
        return handles

    def groups(self, space):
        return {"qk": (self.width(space), 2 * space.qk_block * (space.num_heads + space.num_kv_heads))}

    def lora_groups(self, space, group, size):
        return torch.arange(size) % space.head_dim % self.half(space) // space.qk_block

    def kept(self, space, gate_row):
        pairs = torch.nonzero(self.pair_mask(space, gate_row) > 0.5).flatten().tolist()
        return {"qk_pairs": None if len(pairs) == self.half(space) else pairs, "qk_half": self.half(space)}

    def widths(self, kept):
        if kept.get("qk_pairs") is None or "attention" in kept.get("skip", ()):  # all kept, or no attention block
            return {}
        return {"qk_pairs": list(kept["qk_pairs"])}

    def _index(self, kept):
        pairs = torch.tensor(kept["qk_pairs"], dtype=torch.long)
        return torch.cat([pairs, pairs + kept["qk_half"]])

    def slices(self, kept, head_dim):
        """Rows within the q/k weights already sliced to the kept heads and KV heads (listed in `kept`)."""
        if not self.widths(kept):
            return {}
        index = self._index(kept)
        q = rows(list(range(len(kept["heads"]))), head_dim).view(-1, head_dim)[:, index].flatten()
        k = rows(list(range(len(kept["kv_heads"]))), head_dim).view(-1, head_dim)[:, index].flatten()
        return {"q": (q, None), "k": (k, None), "q_norm": (index, None), "k_norm": (index, None)}

    def heterogeneous_config(self, widths):
        return {"qk_pairs": None} if any("qk_pairs" in w for w in widths) else {}

    def export_record(self, kept_structure):
        widths = [self.widths(kept) for kept in kept_structure]
        if not any(w.get("qk_pairs") for w in widths):
            return {}
        return {"kept_qk_pairs": [w.get("qk_pairs") for w in widths]}  # RoPE pairs kept in every q/k head, per layer

    def group_sums(self, space, stats):
        dims = (stats["q"].sum(1).view(space.num_heads, space.head_dim).sum(0)
                + stats["k"].sum(1).view(space.num_kv_heads, space.head_dim).sum(0))
        half = self.half(space)
        return chunk_sums(dims[:half] + dims[half:], space.qk_block)

    def check_rule(self, space, rule):
        if rule.uniform:
            raise ATPError("--uniform exports the family's own config, which has one head size for queries, keys and "
                           "values; drop 'qk-dims' from --space or drop --uniform")
