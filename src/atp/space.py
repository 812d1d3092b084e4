"""Pruning space: which structures can be pruned, and exact parameter counts under given gates.

A space is made of the selected gate kinds (`atp.kinds`; `--space`, default `kinds.DEFAULT_KINDS`). Gates are a dict
of tensors, one entry per selected kind, each shaped [num_layers, gates_per_layer] (a model-wide kind: [1, gates]);
`atp.kinds` says what each kind's gates are. A value of 1 keeps the structure, 0 prunes it; kinds that are not
selected stay dense. Kinds compose (`effective_gates`): a container kind's gate (a whole block of a layer) multiplies
the gates of the kinds inside that block, a block with none of their structures left is removed, and a block's
norms and output bias go only with the whole block. Counts accept soft gates in [0, 1] too, which makes them a
differentiable surrogate for the parameter-ratio loss; one path counts every space (`remaining_prunable`).
"Prunable" parameters are those of the decoder blocks, whatever the selected kinds. A kind may shrink the hidden size
too, and with it the embeddings, the LM head and the final norm, so sparsity is reported over the decoder blocks and
over the whole model, and a target (`sparsity_of`) is either.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .arch import ARCHS, Arch, check_supported
from .errors import ATPError
from .kinds import DEFAULT_KINDS, KINDS, GateKind, check_kinds
from .kinds.base import as_float

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
    heads_must_divide_hidden: bool = False  # the family's config rejects head counts that do not divide hidden_size
    arch: Arch = ARCHS["llama"]
    kinds: tuple[str, ...] = DEFAULT_KINDS  # the selected gate kinds, in registry order
    sparsity_of: str = "prunable"  # one of SPARSITY_OF: the denominator of remaining_ratio
    options: dict = field(default_factory=dict)  # the kinds' space options (`GateKind.space_options`), as attributes

    def __post_init__(self):
        self.kinds = check_kinds(self.kinds)
        self.options = {**{name: default for kind in KINDS.values() for name, default in kind.space_options.items()},
                        **self.options}
        if self.sparsity_of not in SPARSITY_OF:
            raise ATPError(f"--sparsity-of must be one of {', '.join(SPARSITY_OF)}, got {self.sparsity_of!r}")
        for kind in self.kind_objects:
            kind.check_space(self)

    def __getattr__(self, name):
        """A kind's space option (e.g. its block size) reads as an attribute."""
        options = self.__dict__.get("options")
        if options is None or name not in options:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return options[name]

    @classmethod
    def from_config(cls, config, kinds=DEFAULT_KINDS, sparsity_of: str = "prunable", **options) -> "PruningSpace":
        """options: the kinds' space options (`GateKind.space_options`, e.g. mlp_block); others are an error."""
        arch = check_supported(config)
        known = {name for kind in KINDS.values() for name in kind.space_options}
        for name, value in options.items():
            if name not in known:
                raise ATPError(f"internal error: no gate kind has the space option {name!r}")
            if value < 1:
                raise ATPError(f"{name} must be a positive number of channels, got {value}")
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
            heads_must_divide_hidden=arch.heads_divide_hidden,
            arch=arch,
            kinds=kinds,
            sparsity_of=sparsity_of,
            options=options,
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
    def gate_shapes(self) -> dict[str, tuple[int, int]]:
        return {kind.name: (kind.rows(self), kind.width(self)) for kind in self.kind_objects}

    def full_gates(self, device=None, dtype=None) -> Gates:
        return {k: torch.ones(shape, device=device, dtype=dtype) for k, shape in self.gate_shapes.items()}

    def with_hidden_size(self, hidden_size) -> "PruningSpace":
        """A copy whose hidden_size is `hidden_size` (an int, or a tensor for soft gates), for counting: every
        parameter count is linear in hidden_size, so a count with the kept hidden channels in its place is exact."""
        view = copy.copy(self)
        view.hidden_size = hidden_size
        return view

    def factors(self, gates: Gates) -> dict:
        """What the selected kinds' gates change in every count (`GateKind.factors`)."""
        return {key: value for kind in self.kind_objects for key, value in kind.factors(self, gates[kind.name]).items()}

    def counting_view(self, gates: Gates) -> "PruningSpace":
        """This space, or (a kind shrinks the hidden size) the copy that counts with the kept hidden size."""
        kept = self.factors(gates).get("hidden_size")
        return self if kept is None else self.with_hidden_size(kept)

    def block_fixed_params(self, block: str) -> int:
        """Per layer: the parameters that go only with a whole block, its norms (per-head q/k norms in the
        attention block) and the output bias of the kinds inside it."""
        head_norms = len(self.arch.head_norms) * self.head_dim if block == "attention" else 0
        biases = sum(kind.fixed_params(self) for kind in KINDS.values() if kind.block == block)
        return len(self.arch.block_norms()[block]) * self.hidden_size + head_norms + biases

    @property
    def containers(self) -> list[GateKind]:
        """The selected kinds whose gates multiply finer kinds' gates (a gate per block)."""
        return [kind for kind in self.kind_objects if kind.columns]

    def effective_gates(self, gates: Gates) -> Gates:
        """Gates of every kind in the registry: selected ones as given, others all ones. A block's gates
        multiply those of the kinds inside it (a removed attention block removes its heads), and a block
        whose finer structures are all pruned is removed as well (no heads left: no attention block), so that
        the export keeps no empty blocks."""
        first = next(iter(gates.values()))
        out = {name: gates[name] if name in self.kinds
               else torch.ones(kind.rows(self), kind.width(self), device=first.device, dtype=as_float(first).dtype)
               for name, kind in KINDS.items()}
        for kind in self.containers:
            blocks, columns = out[kind.name], []
            for column, block in enumerate(kind.columns):
                gate = blocks[:, column:column + 1]
                inside = [name for name, inner in KINDS.items() if inner.block == block]
                kept = gate
                for name in inside:
                    if name in self.kinds:
                        kept = kept * (1 - torch.prod(1 - out[name], dim=1, keepdim=True))
                    out[name] = out[name] * gate
                columns.append(kept)
            out[kind.name] = torch.cat(columns, dim=1)
        return out

    def remaining_prunable(self, gates: Gates) -> torch.Tensor:
        """Parameters of the decoder blocks kept by the gates: every kind's count under the effective gates (a kind
        not selected counts as dense), with the selected kinds' factors (e.g. the kept hidden size)."""
        effective = self.effective_gates(gates)
        factors = self.factors(effective)
        view = self.with_hidden_size(factors["hidden_size"]) if "hidden_size" in factors else self
        first = next(iter(gates.values()))
        total = torch.zeros((), device=first.device, dtype=as_float(first).dtype)
        for name, kind in KINDS.items():
            for term in kind.count(view, effective[name], factors):
                total = total + term
        return total

    def prunable_params(self) -> int:
        return int(round(float(self.remaining_prunable(self.full_gates(dtype=torch.float64)))))

    def outside_params(self):
        """Embeddings, the LM head (if untied) and the final norm."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def total_params(self) -> int:
        return self.prunable_params() + self.outside_params()

    def target_params(self) -> int:
        """The parameters a target sparsity is a fraction of (`sparsity_of`)."""
        return self.total_params() if self.sparsity_of == "model" else self.prunable_params()

    def remaining_params(self, gates: Gates) -> torch.Tensor:
        """Parameters of the whole model kept by the gates."""
        return self.remaining_prunable(gates) + self.counting_view(gates).outside_params()

    def remaining_target(self, gates: Gates) -> torch.Tensor:
        return self.remaining_params(gates) if self.sparsity_of == "model" else self.remaining_prunable(gates)

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
        """Per layer, every kind's kept structures (`GateKind.kept`, original indices); kinds not selected keep
        everything."""
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

    uniform:  every layer keeps the same widths (e.g. the same number of query heads, KV heads, with query heads
              spread evenly over them, and MLP channels), so the export is the family's own config (a plain
              LlamaConfig); each kind projects its own decisions (`GateKind.project`);
    round_to: the kept widths of the kinds that round (`GateKind.rounds`, MLP channels) are multiples of this many
              channels (a layer may also keep its full width).
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
        if self.round_to and not any(kind.rounds for kind in space.kind_objects):
            raise ATPError("--round-to rounds MLP widths, but the pruning space (--space) does not prune MLP channels")
        for kind in space.kind_objects:
            kind.check_rule(space, self)

    def project(self, space: PruningSpace, hard: Gates, scores: Gates) -> Gates:
        """Hard 0/1 decisions that obey the rule and stay as close as possible to `hard` in kept counts. Every
        kind keeps its `min_kept` gates per row, and the gates in `keep`, whatever the rule. Kinds are projected in
        registry order, each seeing the hidden size that the kinds already projected keep (uniform Llama head
        counts divide it)."""
        hard = {name: KINDS[name].keep_least(hard[name], scores[name]) for name in hard}
        hard = {name: torch.maximum(gates, self.keep[name].to(gates)) if name in self.keep else gates
                for name, gates in hard.items()}
        if not self.active:
            return hard
        out, view = {}, space
        for name in hard:
            out[name] = KINDS[name].project(view, self, hard[name], scores[name])
            kept = KINDS[name].factors(space, out[name]).get("hidden_size")
            if kept is not None:
                view = space.with_hidden_size(int(kept))
        return out
