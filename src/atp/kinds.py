"""Gate kinds: the structures a pruning space can prune, one object per kind, in the registry `KINDS`.

A kind knows, given a `PruningSpace` (the model's dimensions and its `atp.arch` entry):
  gates       how many gates per layer, and the parameters they keep (exact for 0/1 gates, a differentiable
              surrogate for soft gates);
  masks       where its gates act in the forward pass, in each of the MASK_MODES;
  lasso       which LoRA rows (of B) and columns (of A) belong to each of its groups;
  export      which rows and columns of which projections a layer keeps, which of its weights go altogether,
              and the widths recorded for it;
  baselines   how per-weight importance statistics reduce to one score per gate (per layer; a model-wide kind's
              are summed over layers), and which methods cannot score it;
  exact       whether masking equals physical removal (then the export must match the masked model).
Gate values: 1 keeps the structure, 0 prunes it. A kind may contain finer kinds (`contains`): a removed
attention block removes all its heads, so the space multiplies the finer kind's gates by the block's gate.
"""
from __future__ import annotations

import torch

from .errors import ATPError

# Where the gates act (the hooks are on projections of each pruned structure):
MASK_MODES = {
    "both": "on the input of o_proj / down_proj at the peft LoRA wrapper: the frozen and the LoRA path of a "
            "pruned structure are both removed (the default)",
    "frozen": "only the frozen weights of every projection touching the structure (outputs of q/k/v and "
              "gate/up, input of o_proj/down_proj); the LoRA path is left alone",
    "frozen-output": "only the frozen path of o_proj / down_proj (the --no-mask-lora ablation)",
    "frozen-qkv": "only the frozen outputs of q/k/v and gate/up; the frozen o_proj / down_proj and every LoRA path "
                  "are left alone, so a pruned structure's LoRA activation leaves through the frozen o_proj / "
                  "down_proj (the authors' LoRA-aware forward)",
}


def chunk_sums(values: torch.Tensor, unit: int) -> torch.Tensor:
    """Sums of consecutive runs of `unit` entries (the last run may be shorter)."""
    pad = (-len(values)) % unit
    return torch.cat([values, values.new_zeros(pad)]).view(-1, unit).sum(1)


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Weight indices of whole units of `size` (e.g. the rows of kept heads)."""
    return (torch.tensor(units, dtype=torch.long).unsqueeze(1) * size + torch.arange(size)).flatten().long()


def keep_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row-wise 0/1 mask keeping the `counts[i]` highest scores of row i (ties go to the lower index)."""
    order = torch.argsort(scores.detach(), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (ranks < counts.to(scores.device).unsqueeze(1)).float()


class GateKind:
    name: str
    description: str
    exact = True
    # mask mode -> (projection role, "input" or "output", mask name); hooks sit on the peft wrapper in
    # "both" and on its frozen `base_layer` otherwise
    hooks: dict[str, tuple[tuple[str, str, str], ...]]
    lora_pieces: tuple[tuple[str, str, str, int], ...]  # (group, projection role, LoRA matrix, axis of the structure)
    score_roles: tuple[str, ...]  # projections whose weights the importance scores read
    output_roles: tuple[str, ...]  # the projections that read the structures (activation scores)
    contains: tuple[str, ...] = ()  # per gate column, a finer kind whose gates in the layer this gate multiplies
    model_wide = False  # one row of gates for the whole model instead of one per layer
    min_kept = 0  # gates every row must keep (a model needs a hidden channel)
    unsupported_methods: dict[str, str] = {}  # baseline method -> why it cannot score this kind

    def rows(self, space) -> int:
        return 1 if self.model_wide else space.num_layers

    def width(self, space) -> int:
        raise NotImplementedError

    def check_space(self, space) -> None:
        """A clear error where the model cannot have this kind pruned."""

    def dense_params(self, space) -> int:
        """Parameters of all the kind's structures in one layer."""
        raise NotImplementedError

    def fixed_params(self, space) -> int:
        """Parameters in one layer that stay whatever the kind prunes (output biases)."""
        raise NotImplementedError

    def remaining_terms(self, space, gates: torch.Tensor) -> list[torch.Tensor]:
        """Parameters kept by gates [layers, width], summed over layers, as terms to add up in order."""
        raise NotImplementedError

    def masks(self, space, gates: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """The masks `names` (from `hooks`) expanded to the weights' axis, [layers, size]."""
        raise NotImplementedError

    def groups(self, space) -> dict[str, tuple[int, int]]:
        """Group lasso groups: name -> (groups per layer, weight rows or columns per group)."""
        raise NotImplementedError

    def pruned(self, space, gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """1 where a group is pruned, per group name, [layers, groups]."""
        raise NotImplementedError

    def kept(self, space, gate_row: torch.Tensor) -> dict:
        """One layer's kept structures (original indices)."""
        raise NotImplementedError

    def widths(self, kept: dict) -> dict:
        """The per-layer config entries of a pruned layer."""
        raise NotImplementedError

    def slices(self, kept: dict, head_dim: int) -> dict[str, tuple]:
        """projection role -> (kept output rows, kept input columns), None for all."""
        raise NotImplementedError

    def dropped(self, kept: dict, arch) -> list[str]:
        """Names (within a layer) of the submodules whose weights the export drops altogether."""
        return []

    def unit(self, space) -> int:
        """Weight rows / columns per gate."""
        raise NotImplementedError

    def activation_sums(self, space, columns: dict[str, torch.Tensor]) -> torch.Tensor:
        """Activation scores per input channel of the `output_roles` (Wanda-sp), summed per gate."""
        return chunk_sums(columns[self.output_roles[0]], self.unit(space))

    def group_sums(self, space, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-weight statistics of one layer's `score_roles` weights, summed per gate."""
        raise NotImplementedError

    def project(self, space, rule, hard: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Hard decisions that obey a `space.ShapeRule`."""
        return hard

    def keep_least(self, hard: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Hard decisions with at least `min_kept` gates kept in every row (the best-scored ones)."""
        if not self.min_kept:
            return hard
        short = hard.sum(dim=1) < self.min_kept
        if not bool(short.any()):
            return hard
        top = keep_top(scores, torch.full((hard.shape[0],), self.min_kept))
        return torch.where(short.unsqueeze(1), torch.maximum(hard, top), hard)

    def check_rule(self, space, rule) -> None:
        pass

    def remaining_with(self, space, effective: dict) -> list[torch.Tensor]:
        """`remaining_terms` given every kind's effective gates (a kind whose counts depend on another's overrides)."""
        return self.remaining_terms(space, effective[self.name])

    def lora_groups(self, space, group: str, size: int) -> torch.Tensor:
        """The group (within the layer) of each of the `size` rows / columns of a LoRA piece of `group`."""
        return torch.arange(size) // self.groups(space)[group][1]

    def extra_hooks(self, space, model, masks_of) -> list:
        """Hooks outside the projections (`hooks`), the same in every mask mode; returns their handles."""
        return []


class HeadKind(GateKind):
    """Query heads; a KV head goes when the last query head reading it goes."""

    name = "heads"
    description = "query heads, with the KV heads they free"
    hooks = {
        "both": (("o", "input", "heads"),),
        "frozen-output": (("o", "input", "heads"),),
        "frozen": (("q", "output", "heads"), ("k", "output", "kv"), ("v", "output", "kv"), ("o", "input", "heads")),
        "frozen-qkv": (("q", "output", "heads"), ("k", "output", "kv"), ("v", "output", "kv")),
    }
    lora_pieces = (("heads", "q", "B", 0), ("heads", "o", "A", 1), ("kv", "k", "B", 0), ("kv", "v", "B", 0))
    score_roles = ("q", "o")
    output_roles = ("o",)

    def width(self, space):
        return space.num_heads

    @staticmethod
    def _per_query_head(space):
        return space.head_dim * (space.hidden_size + space.qkv_bias) + space.head_dim * space.hidden_size

    @staticmethod
    def _per_kv_head(space):
        return 2 * space.head_dim * (space.hidden_size + space.qkv_bias)

    def dense_params(self, space):
        return space.num_heads * self._per_query_head(space) + space.num_kv_heads * self._per_kv_head(space)

    def fixed_params(self, space):
        return space.o_bias * space.hidden_size

    def remaining_terms(self, space, gates):
        heads = gates.float()
        return [heads.sum() * self._per_query_head(space), space.kv_gates(heads).sum() * self._per_kv_head(space)]

    def remaining_with(self, space, effective):
        """Query/key rows keep only the layer's kept q/k dimensions (`QKDimKind`), value/output rows all of them."""
        heads = effective["heads"].float()
        kv = space.kv_gates(heads)
        qk = (KINDS["qk-dims"].kept_dims(space, effective["qk-dims"]) if "qk-dims" in space.kinds
              else torch.full((space.num_layers,), float(space.head_dim), device=heads.device))
        row = space.hidden_size + space.qkv_bias
        return [(heads.sum(1) * qk).sum() * row, heads.sum() * space.head_dim * space.hidden_size,
                (kv.sum(1) * qk).sum() * row, kv.sum() * space.head_dim * row]

    def masks(self, space, gates, names):
        out = {}
        if "heads" in names:
            out["heads"] = gates.repeat_interleave(space.head_dim, dim=-1)
        if "kv" in names:
            out["kv"] = space.kv_gates(gates).repeat_interleave(space.head_dim, dim=-1)
        return out

    def groups(self, space):
        return {"heads": (space.num_heads, space.head_dim), "kv": (space.num_kv_heads, space.head_dim)}

    def pruned(self, space, gates):
        heads = gates.detach()
        return {"heads": 1 - heads, "kv": 1 - space.kv_gates(heads)}

    def kept(self, space, gate_row):
        heads = torch.nonzero(gate_row > 0.5).flatten().tolist()
        kv = sorted({h // space.heads_per_kv for h in heads})
        return {"heads": heads, "kv_heads": kv, "kv_map": [kv.index(h // space.heads_per_kv) for h in heads]}

    def widths(self, kept):
        heads, kv_heads, kv_map = len(kept["heads"]), len(kept["kv_heads"]), kept["kv_map"]
        even = heads == 0 or (heads % kv_heads == 0 and kv_map == [i // (heads // kv_heads) for i in range(heads)])
        return {"num_attention_heads": heads, "num_key_value_heads": kv_heads, "kv_map": None if even else kv_map}

    def slices(self, kept, head_dim):
        q_rows, kv_rows = _rows(kept["heads"], head_dim), _rows(kept["kv_heads"], head_dim)
        return {"q": (q_rows, None), "k": (kv_rows, None), "v": (kv_rows, None), "o": (None, q_rows)}

    def unit(self, space):
        return space.head_dim

    def group_sums(self, space, stats):
        return chunk_sums(stats["q"].sum(1), space.head_dim) + chunk_sums(stats["o"].sum(0), space.head_dim)

    def check_rule(self, space, rule):
        if rule.uniform and not rule.head_options(space):
            raise ATPError("--uniform: no head count splits evenly over the KV heads and divides the hidden size")

    def project(self, space, rule, hard, scores):
        if not rule.uniform:
            return hard
        per_kv = space.heads_per_kv
        grouped = hard.reshape(space.num_layers, space.num_kv_heads, per_kv)
        mean_heads = float(grouped.sum(dim=(1, 2)).float().mean())
        mean_groups = float((grouped.sum(dim=2) > 0).sum(dim=1).float().mean())
        groups, per_group = min(rule.head_options(space),
                                key=lambda o: (abs(o[0] * o[1] - mean_heads), abs(o[0] - mean_groups)))
        by_score = scores.reshape(space.num_layers, space.num_kv_heads, per_kv)
        groups_in_model = space.num_layers * space.num_kv_heads
        in_group = keep_top(by_score.reshape(-1, per_kv), torch.full((groups_in_model,), per_group))
        in_group = in_group.reshape_as(by_score)
        group_scores = (by_score * in_group).sum(dim=2) / per_group
        keep_groups = keep_top(group_scores, torch.full((space.num_layers,), groups))
        return (in_group * keep_groups.unsqueeze(2)).reshape(space.num_layers, space.num_heads)


class MLPChannelKind(GateKind):
    """MLP intermediate channels, in blocks of `mlp_block` (the last block may be shorter)."""

    name = "mlp"
    description = "MLP channel blocks of --mlp-block channels"
    hooks = {
        "both": (("down", "input", "mlp"),),
        "frozen-output": (("down", "input", "mlp"),),
        "frozen": (("gate", "output", "mlp"), ("up", "output", "mlp"), ("down", "input", "mlp")),
        "frozen-qkv": (("gate", "output", "mlp"), ("up", "output", "mlp")),
    }
    lora_pieces = (("mlp", "gate", "B", 0), ("mlp", "up", "B", 0), ("mlp", "down", "A", 1))
    score_roles = ("gate", "up", "down")
    output_roles = ("down",)

    def width(self, space):
        return space.num_mlp_blocks

    @staticmethod
    def _per_channel(space):
        return 2 * (space.hidden_size + space.mlp_bias) + space.hidden_size

    def dense_params(self, space):
        return space.intermediate_size * self._per_channel(space)

    def fixed_params(self, space):
        return space.mlp_bias * space.hidden_size

    def remaining_terms(self, space, gates):
        mlp = gates.float()
        return [(mlp * space.block_sizes().to(mlp.device)).sum() * self._per_channel(space)]

    def masks(self, space, gates, names):
        return {"mlp": space.channel_mask(gates)}

    def groups(self, space):
        return {"mlp": (space.num_mlp_blocks, space.mlp_block)}

    def pruned(self, space, gates):
        return {"mlp": 1 - gates.detach()}

    def kept(self, space, gate_row):
        return {"channels": torch.nonzero(space.channel_mask(gate_row) > 0.5).flatten().tolist()}

    def widths(self, kept):
        return {"intermediate_size": len(kept["channels"])}

    def slices(self, kept, head_dim):
        channels = torch.tensor(kept["channels"], dtype=torch.long)
        return {"gate": (channels, None), "up": (channels, None), "down": (None, channels)}

    def unit(self, space):
        return space.mlp_block

    def group_sums(self, space, stats):
        rows = stats["gate"].sum(1) + stats["up"].sum(1)
        return chunk_sums(rows + stats["down"].sum(0), space.mlp_block)

    def check_rule(self, space, rule):
        if rule.round_to and rule.round_to % space.mlp_block:
            raise ATPError(f"--round-to {rule.round_to} must be a multiple of --mlp-block {space.mlp_block} "
                           f"(MLP channels are decided in blocks of {space.mlp_block})")

    def project(self, space, rule, hard, scores):
        unit = max(1, rule.round_to // space.mlp_block)  # blocks per allowed step
        blocks = space.num_mlp_blocks
        counts = hard.sum(dim=1).float()
        if rule.uniform:
            counts = counts.mean().expand_as(counts)
        counts = (torch.floor(counts / unit + 0.5) * unit).clamp(min=unit if rule.uniform else 0).clamp(max=blocks)
        if space.intermediate_size % space.mlp_block:  # a shorter last block is kept only with the full width
            scores = scores.detach().clone()
            scores[counts < blocks, -1] = -float("inf")
        return keep_top(scores, counts.long())


class BlockKind(GateKind):
    """A layer's whole attention block and whole MLP block: gates [layers, 2]. A removed block goes with its
    projections, biases and the norms that exist only for it (`Arch.block_norms`), and keeps no KV cache; the
    export records it in transformers' per_layer_config as `skip` (with 0 heads / 0 channels)."""

    name = "blocks"
    description = "whole attention and MLP blocks of a layer, with their norms"
    blocks = ("attention", "mlp")  # gate columns, named as in per_layer_config's `skip`
    contains = ("heads", "mlp")  # the finer kind inside each block
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
        return len(self.blocks)

    def dense_params(self, space):
        return 0  # the parameters are those of the contained kinds and of the layer's norms and biases

    def fixed_params(self, space):
        return 0

    def remaining_terms(self, space, gates):
        raise ATPError("internal error: block gates are counted through the kinds they contain")

    def masks(self, space, gates, names):
        columns = {"attention_block": gates[:, 0:1], "mlp_block": gates[:, 1:2]}
        return {name: columns[name] for name in names}

    def groups(self, space):
        return {"attention_block": (1, space.num_heads * space.head_dim), "mlp_block": (1, space.intermediate_size)}

    def pruned(self, space, gates):
        gates = gates.detach()
        return {"attention_block": 1 - gates[:, 0:1], "mlp_block": 1 - gates[:, 1:2]}

    def kept(self, space, gate_row):
        return {"skip": [block for block, gate in zip(self.blocks, gate_row.tolist()) if gate <= 0.5]}

    def widths(self, kept):
        return {"skip": list(kept["skip"])} if kept.get("skip") else {}

    def slices(self, kept, head_dim):
        return {}

    def dropped(self, kept, arch):
        parts = {"attention": (arch.attention,), "mlp": (arch.mlp,)}
        return [name for block in kept.get("skip", ()) for name in parts[block] + arch.block_norms()[block]]

    def unit(self, space):
        raise ATPError("internal error: a block gate has no unit of weight rows")

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


class HiddenKind(GateKind):
    """Hidden (embedding) channels in blocks of `hidden_block`, Minitron's embedding-channel pruning: one row of gates
    for the whole model. A pruned channel goes from the embeddings, every projection that reads or writes the
    residual stream (columns of q/k/v/gate/up, rows and bias entries of o/down), every norm over hidden_size and the
    LM head: the export has a smaller hidden_size. Its masks act on the residual stream itself (`atp.hidden`), the
    same in every mask mode: the norms (frozen weights) cut a pruned channel in all of them, so its LoRA pieces get no
    gradient and group lasso drives them to zero. Counts: every other count is linear in hidden_size, so the space
    counts with the kept channels in its place (`PruningSpace.counting_view`)."""

    name = "hidden"
    description = ("hidden (embedding) channels in blocks of --hidden-block, one set shared by the embeddings, every "
                   "layer, every norm and the LM head (the export has a smaller hidden size)")
    model_wide = True
    min_kept = 1
    unsupported_methods = {"activation": "Wanda-sp scores read the inputs of o_proj / down_proj, which say nothing "
                                         "about hidden channels; use taylor, magnitude, random or frozen-generator"}
    hooks = {mode: () for mode in MASK_MODES}  # the residual-stream hooks are `atp.hidden.stream_modules`
    readers = ("q", "k", "v", "gate", "up")  # the projections whose input columns are hidden channels
    writers = ("o", "down")  # those whose output rows (and bias entries) are
    lora_pieces = (tuple(("hidden", role, "A", 1) for role in readers)
                   + tuple(("hidden", role, "B", 0) for role in writers))
    score_roles = readers + writers
    output_roles = ()

    def width(self, space):
        return space.num_hidden_blocks

    def check_space(self, space):
        if not space.arch.rms_norms:
            raise ATPError(f"--space hidden needs RMSNorm everywhere on the residual stream (norms are renormalised "
                           f"over the kept channels); {space.arch.label} models are not supported")
        if space.num_hidden_blocks < 2:
            raise ATPError(f"--hidden-block {space.hidden_block} puts all {space.hidden_size} hidden channels in one "
                           "block, which must stay: nothing could be pruned; choose a smaller --hidden-block")

    def dense_params(self, space):
        return 0  # counted by the kinds that read and write the channels, through hidden_size

    def fixed_params(self, space):
        return 0

    def remaining_terms(self, space, gates):
        return []

    def masks(self, space, gates, names):
        channels = space.hidden_mask(gates)  # [1, hidden_size]
        # a norm over the k kept channels is the dense norm of the input scaled by sqrt(hidden_size / k)
        return {"hidden": channels, "hidden_scale": torch.sqrt(space.hidden_size / channels.sum().clamp_min(1))}

    def groups(self, space):
        return {"hidden": (space.num_hidden_blocks, space.hidden_block)}  # per layer: its own LoRA pieces

    def pruned(self, space, gates):
        return {"hidden": (1 - gates.detach()).expand(space.num_layers, -1)}

    def kept(self, space, gate_row):
        channels = torch.nonzero(space.hidden_mask(gate_row) > 0.5).flatten().tolist()
        return {"hidden": None if len(channels) == space.hidden_size else channels}

    def widths(self, kept):
        return {}  # the model's hidden_size, not a per-layer width

    def slices(self, kept, head_dim):
        if kept.get("hidden") is None:
            return {}
        channels = torch.tensor(kept["hidden"], dtype=torch.long)
        return {**{role: (None, channels) for role in self.readers},
                **{role: (channels, None) for role in self.writers}}

    def unit(self, space):
        return space.hidden_block

    def group_sums(self, space, stats):
        columns = sum(stats[role].sum(0) for role in self.readers) + sum(stats[role].sum(1) for role in self.writers)
        return chunk_sums(columns, space.hidden_block)

    def activation_sums(self, space, columns):
        raise ATPError(f"--method activation does not support --space hidden: {self.unsupported_methods['activation']}")

    def extra_hooks(self, space, model, masks_of):
        from . import hidden

        return hidden.register_hooks(space, model, masks_of)


class QKDimKind(GateKind):
    """Query/key dimensions inside the heads, in blocks of `qk_block` RoPE pairs: one set per layer, the same in every
    query head and every KV head of the layer (so in every head of a KV group). HF's RoPE rotates dimension i with
    i + head_dim/2 at frequency inv_freq[i]; a gate keeps or prunes both, so masking q/k before RoPE is exact. A pruned
    dimension contributes nothing to q.k, and the softmax keeps the original 1/sqrt(head_dim) scale. Per-head q/k
    RMSNorms (Qwen3, Gemma 3) normalise over the kept dimensions (`extra_hooks`), as the export's smaller norms do.
    Counts: the heads kind counts q/k rows as kept heads x kept dimensions (`HeadKind.remaining_with`)."""

    name = "qk-dims"
    description = ("query/key dimensions inside heads, in blocks of --qk-block RoPE pairs, the same in every head of a "
                   "layer (the export's q/k head size is smaller than v's; remote-code export, no GGUF)")
    min_kept = 1  # a layer keeps one block of pairs
    hooks = {mode: (("q", "output", "qk_q"), ("k", "output", "qk_k")) for mode in MASK_MODES}
    lora_pieces = (("qk", "q", "B", 0), ("qk", "k", "B", 0))
    score_roles = ("q", "k")
    output_roles = ()
    unsupported_methods = {"activation": "Wanda-sp scores read the inputs of o_proj / down_proj, which say nothing "
                                         "about query/key dimensions; use taylor, magnitude, random or "
                                         "frozen-generator"}

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

    def dense_params(self, space):
        return 0  # counted by the heads kind

    def fixed_params(self, space):
        return 0

    def remaining_terms(self, space, gates):
        return []

    def remaining_with(self, space, effective):
        """The per-head q/k norms keep the kept dimensions (in a kept attention block)."""
        if not space.arch.head_norms:
            return []
        block = effective["blocks"][:, 0].float()
        lost = space.head_dim - self.kept_dims(space, effective[self.name])
        return [-(lost * block).sum() * len(space.arch.head_norms)]

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

    def pruned(self, space, gates):
        return {"qk": 1 - gates.detach()}

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
        """Rows within the q/k weights the heads kind has already sliced (kept heads, kept KV heads)."""
        if not self.widths(kept):
            return {}
        index = self._index(kept)
        q = _rows(list(range(len(kept["heads"]))), head_dim).view(-1, head_dim)[:, index].flatten()
        k = _rows(list(range(len(kept["kv_heads"]))), head_dim).view(-1, head_dim)[:, index].flatten()
        return {"q": (q, None), "k": (k, None), "q_norm": (index, None), "k_norm": (index, None)}

    def unit(self, space):
        return 2 * space.qk_block

    def group_sums(self, space, stats):
        dims = (stats["q"].sum(1).view(space.num_heads, space.head_dim).sum(0)
                + stats["k"].sum(1).view(space.num_kv_heads, space.head_dim).sum(0))
        half = self.half(space)
        return chunk_sums(dims[:half] + dims[half:], space.qk_block)

    def activation_sums(self, space, columns):
        raise ATPError("--method activation does not support --space qk-dims: "
                       + self.unsupported_methods["activation"])

    def check_rule(self, space, rule):
        if rule.uniform:
            raise ATPError("--uniform exports the family's own config, which has one head size for queries, keys and "
                           "values; drop 'qk-dims' from --space or drop --uniform")


# name -> kind; this order is the order of gate dicts (the generator's calibration shifts the last kind, the
# finest, on its own; coarser kinds come first)
KINDS = {kind.name: kind for kind in (BlockKind(), HiddenKind(), HeadKind(), QKDimKind(), MLPChannelKind())}
DEFAULT_KINDS = ("heads", "mlp")


def check_kinds(names) -> tuple[str, ...]:
    """The selected kinds in registry order, or a clear error."""
    names = list(names)
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names:
        raise ATPError(f"--space: {'unknown kinds ' + ', '.join(map(repr, unknown)) if unknown else 'no kind given'}; "
                       f"choose one or more of: {', '.join(KINDS)}")
    return tuple(name for name in KINDS if name in names)
