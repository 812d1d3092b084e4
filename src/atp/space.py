"""Pruning space: which structures can be pruned, and exact parameter counts under given gates.

Gates are a dict of tensors, one entry per gate kind, each shaped [num_layers, gates_per_layer]:
  "heads": one gate per query head; a KV head goes when the last query head reading it goes.
  "mlp":   one gate per block of `mlp_block` intermediate channels (the last block may be shorter).
A value of 1 keeps the structure, 0 prunes it. Counts accept soft gates in [0, 1] too, which makes
them a differentiable surrogate for the parameter-ratio loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ATPError

# model_type -> (q/k/v bias, o_proj bias, mlp bias), each read from the config where the family has a flag
FAMILIES = {
    "llama": lambda c: (c.attention_bias, c.attention_bias, c.mlp_bias),
    "mistral": lambda c: (False, False, False),
    "qwen2": lambda c: (True, False, False),
}

Gates = dict[str, torch.Tensor]


def check_supported(config) -> None:
    if config.model_type not in FAMILIES:
        raise ATPError(
            f"model type '{config.model_type}' is not supported; supported families: {', '.join(sorted(FAMILIES))} "
            "(LLaMA-architecture models such as SmolLM2, LLaMA-2/3, Mistral and Qwen2)"
        )


class PruningSpace:
    """Interface a pruning space implements; `HeadMLPSpace` is the one the paper's main results use."""

    gate_shapes: dict[str, tuple[int, int]]

    def total_params(self) -> int:
        raise NotImplementedError

    def prunable_params(self) -> int:
        raise NotImplementedError

    def remaining_prunable(self, gates: Gates) -> torch.Tensor:
        raise NotImplementedError

    def full_gates(self, device=None) -> Gates:
        return {k: torch.ones(shape, device=device) for k, shape in self.gate_shapes.items()}

    def remaining_ratio(self, gates: Gates) -> torch.Tensor:
        return self.remaining_prunable(gates) / self.prunable_params()

    def sparsity(self, gates: Gates) -> dict[str, float]:
        """Sparsity over prunable (decoder-block) parameters and over the whole model."""
        removed = self.prunable_params() - float(self.remaining_prunable(gates))
        return {
            "prunable_sparsity": removed / self.prunable_params(),
            "model_sparsity": removed / self.total_params(),
            "remaining_params": int(round(self.total_params() - removed)),
        }


@dataclass
class HeadMLPSpace(PruningSpace):
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    mlp_block: int = 1
    heads_must_divide_hidden: bool = False  # the family's config rejects head counts that do not divide hidden_size

    @classmethod
    def from_config(cls, config, mlp_block: int = 1) -> "HeadMLPSpace":
        check_supported(config)
        if mlp_block < 1:
            raise ATPError(f"mlp_block must be a positive number of channels, got {mlp_block}")
        qkv_bias, o_bias, mlp_bias = FAMILIES[config.model_type](config)
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=bool(qkv_bias),
            o_bias=bool(o_bias),
            mlp_bias=bool(mlp_bias),
            mlp_block=mlp_block,
            heads_must_divide_hidden=config.model_type == "llama",
        )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_mlp_blocks(self) -> int:
        return math.ceil(self.intermediate_size / self.mlp_block)

    @property
    def gate_shapes(self) -> dict[str, tuple[int, int]]:
        return {"heads": (self.num_layers, self.num_heads), "mlp": (self.num_layers, self.num_mlp_blocks)}

    def block_sizes(self) -> torch.Tensor:
        sizes = torch.full((self.num_mlp_blocks,), self.mlp_block, dtype=torch.float32)
        sizes[-1] = self.intermediate_size - self.mlp_block * (self.num_mlp_blocks - 1)
        return sizes

    def channel_mask(self, mlp_gates: torch.Tensor) -> torch.Tensor:
        """Expand [..., blocks] gates to [..., intermediate_size] channel gates."""
        return mlp_gates.repeat_interleave(self.mlp_block, dim=-1)[..., : self.intermediate_size]

    def kv_gates(self, head_gates: torch.Tensor) -> torch.Tensor:
        """A KV head is kept if any of its query heads is: 1 - prod(1 - h), exact for 0/1 gates."""
        grouped = head_gates.reshape(*head_gates.shape[:-1], self.num_kv_heads, self.group_size)
        return 1 - torch.prod(1 - grouped, dim=-1)

    # Per-structure parameter costs
    def _per_query_head(self) -> int:
        return self.head_dim * (self.hidden_size + self.qkv_bias) + self.head_dim * self.hidden_size

    def _per_kv_head(self) -> int:
        return 2 * self.head_dim * (self.hidden_size + self.qkv_bias)

    def _per_channel(self) -> int:
        return 2 * (self.hidden_size + self.mlp_bias) + self.hidden_size

    def _fixed_per_layer(self) -> int:
        # two RMSNorm weights, plus output biases that stay whatever is pruned
        return 2 * self.hidden_size + self.o_bias * self.hidden_size + self.mlp_bias * self.hidden_size

    def prunable_params(self) -> int:
        per_layer = (
            self._fixed_per_layer()
            + self.num_heads * self._per_query_head()
            + self.num_kv_heads * self._per_kv_head()
            + self.intermediate_size * self._per_channel()
        )
        return self.num_layers * per_layer

    def total_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.prunable_params() + embeddings + self.hidden_size  # + final norm

    def remaining_prunable(self, gates: Gates) -> torch.Tensor:
        heads, mlp = gates["heads"].float(), gates["mlp"].float()
        channels = (mlp * self.block_sizes().to(mlp.device)).sum()
        return (
            self.num_layers * self._fixed_per_layer()
            + heads.sum() * self._per_query_head()
            + self.kv_gates(heads).sum() * self._per_kv_head()
            + channels * self._per_channel()
        )

    def kept_structure(self, gates: Gates) -> list[dict]:
        """Per layer: kept query heads, kept KV heads, each kept query head's index into the kept KV heads,
        and kept intermediate channels (all as original indices)."""
        layers = []
        for layer in range(self.num_layers):
            head_keep = gates["heads"][layer] > 0.5
            heads = torch.nonzero(head_keep).flatten().tolist()
            kv = sorted({h // self.group_size for h in heads})
            kv_map = [kv.index(h // self.group_size) for h in heads]
            channels = torch.nonzero(self.channel_mask(gates["mlp"][layer]) > 0.5).flatten().tolist()
            layers.append({"heads": heads, "kv_heads": kv, "kv_map": kv_map, "channels": channels})
        return layers


@dataclass
class ShapeRule:
    """Constraints on the kept widths, applied to hard decisions by keeping each layer's best-scored structures.

    uniform:  every layer keeps the same number of query heads, KV heads (query heads spread evenly over
              them) and MLP channels, so the export is the family's own config (e.g. a plain LlamaConfig);
    round_to: kept MLP widths are multiples of this many channels (a layer may also keep its full width).
    Query/key/value widths are already multiples of head_dim, so head counts are not rounded.
    """

    uniform: bool = False
    round_to: int = 0

    @property
    def active(self) -> bool:
        return self.uniform or self.round_to > 0

    def check(self, space: HeadMLPSpace) -> None:
        if self.round_to < 0:
            raise ATPError(f"--round-to must be a positive number of channels, got {self.round_to}")
        if self.round_to and self.round_to % space.mlp_block:
            raise ATPError(f"--round-to {self.round_to} must be a multiple of --mlp-block {space.mlp_block} "
                           f"(MLP channels are decided in blocks of {space.mlp_block})")
        if self.uniform and not self.head_options(space):
            raise ATPError("--uniform: no head count splits evenly over the KV heads and divides the hidden size")

    def head_options(self, space: HeadMLPSpace) -> list[tuple[int, int]]:
        """(kept KV heads, query heads per KV head) pairs a uniform export can hold."""
        return [
            (groups, per_group)
            for groups in range(1, space.num_kv_heads + 1)
            for per_group in range(1, space.group_size + 1)
            if not space.heads_must_divide_hidden or space.hidden_size % (groups * per_group) == 0
        ]

    def project(self, space: HeadMLPSpace, hard: Gates, scores: Gates) -> Gates:
        """Hard 0/1 decisions that obey the rule and stay as close as possible to `hard` in kept counts."""
        if not self.active:
            return hard
        return {"heads": self._project_heads(space, hard["heads"], scores["heads"]),
                "mlp": self._project_mlp(space, hard["mlp"], scores["mlp"])}

    def _project_mlp(self, space, hard, scores):
        unit = max(1, self.round_to // space.mlp_block)  # blocks per allowed step
        blocks = space.num_mlp_blocks
        counts = hard.sum(dim=1).float()
        if self.uniform:
            counts = counts.mean().expand_as(counts)
        counts = (torch.floor(counts / unit + 0.5) * unit).clamp(min=unit if self.uniform else 0).clamp(max=blocks)
        if space.intermediate_size % space.mlp_block:  # a shorter last block is kept only with the full width
            scores = scores.detach().clone()
            scores[counts < blocks, -1] = -float("inf")
        return _keep_top(scores, counts.long())

    def _project_heads(self, space, hard, scores):
        if not self.uniform:
            return hard
        grouped = hard.reshape(space.num_layers, space.num_kv_heads, space.group_size)
        mean_heads = float(grouped.sum(dim=(1, 2)).float().mean())
        mean_groups = float((grouped.sum(dim=2) > 0).sum(dim=1).float().mean())
        groups, per_group = min(self.head_options(space),
                                key=lambda o: (abs(o[0] * o[1] - mean_heads), abs(o[0] - mean_groups)))
        by_score = scores.reshape(space.num_layers, space.num_kv_heads, space.group_size)
        in_group = _keep_top(by_score.reshape(-1, space.group_size), torch.full((space.num_layers * space.num_kv_heads,), per_group))
        in_group = in_group.reshape_as(by_score)
        group_scores = (by_score * in_group).sum(dim=2) / per_group
        keep_groups = _keep_top(group_scores, torch.full((space.num_layers,), groups))
        return (in_group * keep_groups.unsqueeze(2)).reshape(space.num_layers, space.num_heads)


def _keep_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row-wise 0/1 mask keeping the `counts[i]` highest scores of row i (ties go to the lower index)."""
    order = torch.argsort(scores.detach(), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (ranks < counts.to(scores.device).unsqueeze(1)).float()
