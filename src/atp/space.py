"""Pruning space: which structures can be pruned, and exact parameter counts under given gates.

A space is made of the selected gate kinds (`atp.kinds`; `--space`, default heads and mlp). Gates are a
dict of tensors, one entry per selected kind, each shaped [num_layers, gates_per_layer] (hidden: [1, gates]):
  "heads": one gate per query head; a KV head goes when the last query head reading it goes.
  "mlp":   one gate per block of `mlp_block` intermediate channels (the last block may be shorter);
  "blocks": two gates per layer, its whole attention block and its whole MLP block;
  "hidden": one row for the whole model [1, blocks], a gate per block of `hidden_block` hidden channels;
  "qk-dims": one gate per block of `qk_block` RoPE pairs of query/key dimensions, shared by the layer's heads.
A value of 1 keeps the structure, 0 prunes it; kinds that are not selected stay dense. Kinds compose: the
effective gate of a head is its own gate times its attention block's gate, a block with no heads (channels)
left is removed (`effective_gates`), and a block's norms and output bias go only with the whole block. Counts accept soft gates in [0, 1] too, which makes them
a differentiable surrogate for the parameter-ratio loss.
"Prunable" parameters are those of the decoder blocks, whatever the selected kinds. Hidden channels also shrink
the embeddings, the LM head and the final norm, so sparsity is reported over the decoder blocks and over the whole
model, and a target (`sparsity_of`) is either.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from .arch import ARCHS, Arch, check_supported
from .errors import ATPError
from .kinds import DEFAULT_KINDS, KINDS, GateKind, check_kinds

__all__ = ["Gates", "HeadMLPSpace", "PruningSpace", "ShapeRule", "check_supported"]
SPARSITY_OF = ("prunable", "model")  # what a target sparsity is a fraction of: decoder blocks, or the whole model

Gates = dict[str, torch.Tensor]


@dataclass
class PruningSpace:
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
    arch: Arch = ARCHS["llama"]
    kinds: tuple[str, ...] = DEFAULT_KINDS  # the selected gate kinds, in registry order
    hidden_block: int = 1  # hidden channels per gate of the "hidden" kind
    sparsity_of: str = "prunable"  # one of SPARSITY_OF: the denominator of remaining_ratio
    qk_block: int = 4  # RoPE pairs of query/key dimensions per gate of the "qk-dims" kind

    def __post_init__(self):
        self.kinds = check_kinds(self.kinds)
        if self.sparsity_of not in SPARSITY_OF:
            raise ATPError(f"--sparsity-of must be one of {', '.join(SPARSITY_OF)}, got {self.sparsity_of!r}")
        for kind in self.kind_objects:
            kind.check_space(self)

    @classmethod
    def from_config(cls, config, mlp_block: int = 1, kinds=DEFAULT_KINDS, hidden_block: int = 1,
                    sparsity_of: str = "prunable", qk_block: int = 4) -> "PruningSpace":
        arch = check_supported(config)
        for name, block in (("mlp_block", mlp_block), ("hidden_block", hidden_block), ("qk_block", qk_block)):
            if block < 1:
                raise ATPError(f"{name} must be a positive number of channels, got {block}")
        qkv_bias, o_bias, mlp_bias = arch.biases(config)
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
            heads_must_divide_hidden=arch.heads_divide_hidden,
            arch=arch,
            kinds=kinds,
            hidden_block=hidden_block,
            sparsity_of=sparsity_of,
            qk_block=qk_block,
        )

    @property
    def kind_objects(self) -> list[GateKind]:
        return [KINDS[name] for name in self.kinds]

    @property
    def exact(self) -> bool:
        """Masking with these gates equals physically removing what they prune."""
        return all(kind.exact for kind in self.kind_objects)

    @property
    def heads_per_kv(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_mlp_blocks(self) -> int:
        return math.ceil(self.intermediate_size / self.mlp_block)

    @property
    def num_hidden_blocks(self) -> int:
        return math.ceil(self.hidden_size / self.hidden_block)

    @property
    def gate_shapes(self) -> dict[str, tuple[int, int]]:
        return {kind.name: (kind.rows(self), kind.width(self)) for kind in self.kind_objects}

    def full_gates(self, device=None) -> Gates:
        return {k: torch.ones(shape, device=device) for k, shape in self.gate_shapes.items()}

    def block_sizes(self) -> torch.Tensor:
        sizes = torch.full((self.num_mlp_blocks,), self.mlp_block, dtype=torch.float32)
        sizes[-1] = self.intermediate_size - self.mlp_block * (self.num_mlp_blocks - 1)
        return sizes

    def channel_mask(self, mlp_gates: torch.Tensor) -> torch.Tensor:
        """Expand [..., blocks] gates to [..., intermediate_size] channel gates."""
        return mlp_gates.repeat_interleave(self.mlp_block, dim=-1)[..., : self.intermediate_size]

    def hidden_mask(self, hidden_gates: torch.Tensor) -> torch.Tensor:
        """Expand [..., blocks] hidden gates to [..., hidden_size] channel gates."""
        return hidden_gates.repeat_interleave(self.hidden_block, dim=-1)[..., : self.hidden_size]

    def with_hidden_size(self, hidden_size) -> "PruningSpace":
        """A copy whose hidden_size is `hidden_size` (an int, or a tensor for soft gates), for counting: every
        parameter count is linear in hidden_size, so a count with the kept hidden channels in its place is exact."""
        view = copy.copy(self)
        view.hidden_size = hidden_size
        return view

    def counting_view(self, gates: Gates) -> "PruningSpace":
        """This space, or (hidden channels pruned) the copy that counts with the kept hidden channels."""
        if "hidden" not in self.kinds:
            return self
        return self.with_hidden_size(self.hidden_mask(gates["hidden"].float()).sum())

    def kv_gates(self, head_gates: torch.Tensor) -> torch.Tensor:
        """A KV head is kept if any of its query heads is: 1 - prod(1 - h), exact for 0/1 gates."""
        grouped = head_gates.reshape(*head_gates.shape[:-1], self.num_kv_heads, self.heads_per_kv)
        return 1 - torch.prod(1 - grouped, dim=-1)

    @property
    def norm_params(self) -> int:
        """Per layer: norms over hidden_size and per-head norms over head_dim (shared by all heads)."""
        return len(self.arch.norms) * self.hidden_size + len(self.arch.head_norms) * self.head_dim

    def block_fixed_params(self, block: str) -> int:
        """Per layer: the parameters that go only with a whole block, its norms and its output bias."""
        head_norms = len(self.arch.head_norms) * self.head_dim if block == "attention" else 0
        inner = KINDS[dict(zip(KINDS["blocks"].blocks, KINDS["blocks"].contains))[block]]
        return len(self.arch.block_norms()[block]) * self.hidden_size + head_norms + inner.fixed_params(self)

    @property
    def containers(self) -> list[GateKind]:
        """The selected kinds whose gates multiply finer kinds' gates (blocks)."""
        return [kind for kind in self.kind_objects if kind.contains]

    def effective_gates(self, gates: Gates) -> Gates:
        """Gates of every kind in the registry: selected ones as given, others all ones. A block's gates
        multiply those of the finer kind inside it (a removed attention block removes its heads), and a block
        whose finer structures are all pruned is removed as well (no heads left: no attention block), so that
        the export keeps no empty blocks."""
        device = next(iter(gates.values())).device
        out = {name: gates[name] if name in self.kinds else torch.ones(kind.rows(self), kind.width(self), device=device)
               for name, kind in KINDS.items()}
        for kind in self.containers:
            blocks, columns = out[kind.name], []
            for column, inner in enumerate(kind.contains):
                gate = blocks[:, column:column + 1]
                if inner in self.kinds:
                    columns.append(gate * (1 - torch.prod(1 - out[inner], dim=1, keepdim=True)))
                else:
                    columns.append(gate)
                out[inner] = out[inner] * gate
            out[kind.name] = torch.cat(columns, dim=1)
        return out

    def _fixed_per_layer(self) -> int:
        # norms, output biases that stay whatever is pruned, and the structures of kinds not selected
        return (self.norm_params + sum(kind.fixed_params(self) for kind in KINDS.values())
                + sum(kind.dense_params(self) for name, kind in KINDS.items() if name not in self.kinds))

    def prunable_params(self) -> int:
        per_layer = self._fixed_per_layer() + sum(kind.dense_params(self) for kind in self.kind_objects)
        return self.num_layers * per_layer

    def outside_params(self):
        """Embeddings, the LM head (if untied) and the final norm."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def total_params(self) -> int:
        return self.prunable_params() + self.outside_params()

    def target_params(self) -> int:
        """The parameters a target sparsity is a fraction of (`sparsity_of`)."""
        return self.total_params() if self.sparsity_of == "model" else self.prunable_params()

    def remaining_prunable(self, gates: Gates) -> torch.Tensor:
        view = self.counting_view(gates)
        if view.containers or "qk-dims" in view.kinds:  # counts that read other kinds' gates
            return view._remaining_with_blocks(gates)
        total = view.num_layers * view._fixed_per_layer()
        for kind in view.kind_objects:
            for term in kind.remaining_terms(view, gates[kind.name]):
                total = total + term
        return total

    def remaining_params(self, gates: Gates) -> torch.Tensor:
        """Parameters of the whole model kept by the gates."""
        return self.remaining_prunable(gates) + self.counting_view(gates).outside_params()

    def remaining_target(self, gates: Gates) -> torch.Tensor:
        return self.remaining_params(gates) if self.sparsity_of == "model" else self.remaining_prunable(gates)

    def _remaining_with_blocks(self, gates: Gates) -> torch.Tensor:
        """Every kind's structures under the effective gates, plus each block's norms and output bias times
        its block gate (every norm of a layer belongs to one of its blocks)."""
        effective = self.effective_gates(gates)
        total = torch.zeros((), device=next(iter(gates.values())).device)
        for name, kind in KINDS.items():
            if kind.contains:
                for column, block in enumerate(kind.blocks):
                    total = total + effective[name][:, column].sum() * self.block_fixed_params(block)
            else:
                for term in kind.remaining_with(self, effective):
                    total = total + term
        return total

    def remaining_ratio(self, gates: Gates) -> torch.Tensor:
        """Kept fraction of the target's parameters (`sparsity_of`): what the ratio loss and calibration drive."""
        return self.remaining_target(gates) / self.target_params()

    def sparsity(self, gates: Gates) -> dict[str, float]:
        """Sparsity over prunable (decoder-block) parameters and over the whole model."""
        kept_prunable, kept = float(self.remaining_prunable(gates)), float(self.remaining_params(gates))
        return {
            "prunable_sparsity": (self.prunable_params() - kept_prunable) / self.prunable_params(),
            "model_sparsity": (self.total_params() - kept) / self.total_params(),
            "remaining_params": int(round(kept)),
        }

    def fewest_gates(self) -> Gates:
        """Every gate closed that may be (a model keeps `min_kept` gates of a kind: its first hidden block)."""
        return {name: KINDS[name].keep_least(torch.zeros(shape), torch.zeros(shape))
                for name, shape in self.gate_shapes.items()}

    def largest_step(self) -> float:
        """The largest fraction of the target's parameters (`sparsity_of`) that closing one gate removes (a KV
        head goes with the last query head reading it): how closely decisions can approach a target sparsity."""
        largest = 0.0
        for name, (_, width) in self.gate_shapes.items():
            gates = self.full_gates()
            before = float(self.remaining_target(gates))
            for i in range(width):
                gates[name][0, i] = 0
                now = float(self.remaining_target(gates))
                largest, before = max(largest, before - now), now
        return largest / self.target_params()

    def kept_structure(self, gates: Gates) -> list[dict]:
        """Per layer: kept query heads, kept KV heads, each kept query head's index into the kept KV heads,
        kept intermediate channels and the model's kept hidden channels (None: all), all as original indices;
        kinds not selected keep everything."""
        effective = {name: gates.detach().cpu() for name, gates in self.effective_gates(gates).items()}
        layers = []
        for layer in range(self.num_layers):
            kept = {}
            for name, kind in KINDS.items():
                kept.update(kind.kept(self, effective[name][0 if kind.model_wide else layer]))
            layers.append(kept)
        return layers


HeadMLPSpace = PruningSpace  # the name before gate kinds


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
    keep: dict = field(default_factory=dict)  # kind -> [rows, width] 0/1: gates that stay open whatever is decided

    @property
    def active(self) -> bool:
        return self.uniform or self.round_to > 0

    def check(self, space: PruningSpace) -> None:
        if self.round_to < 0:
            raise ATPError(f"--round-to must be a positive number of channels, got {self.round_to}")
        if self.round_to and "mlp" not in space.kinds:
            raise ATPError("--round-to rounds MLP widths, but the pruning space (--space) does not prune MLP channels")
        for kind in space.kind_objects:
            kind.check_rule(space, self)

    def head_options(self, space: PruningSpace) -> list[tuple[int, int]]:
        """(kept KV heads, query heads per KV head) pairs a uniform export can hold."""
        return [
            (groups, per_group)
            for groups in range(1, space.num_kv_heads + 1)
            for per_group in range(1, space.heads_per_kv + 1)
            if not space.heads_must_divide_hidden or space.hidden_size % (groups * per_group) == 0
        ]

    def project(self, space: PruningSpace, hard: Gates, scores: Gates) -> Gates:
        """Hard 0/1 decisions that obey the rule and stay as close as possible to `hard` in kept counts. Every
        kind keeps its `min_kept` gates per row, and the gates in `keep`, whatever the rule. Kinds are projected in
        registry order, each seeing the hidden size the hidden channels already projected keep (uniform Llama head
        counts divide it)."""
        hard = {name: KINDS[name].keep_least(hard[name], scores[name]) for name in hard}
        hard = {name: torch.maximum(gates, self.keep[name].to(gates)) if name in self.keep else gates
                for name, gates in hard.items()}
        if not self.active:
            return hard
        out = {}
        for name in hard:
            view = space.with_hidden_size(int(space.hidden_mask(out["hidden"]).sum())) if "hidden" in out else space
            out[name] = KINDS[name].project(view, self, hard[name], scores[name])
        return out
