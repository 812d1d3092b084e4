"""The interface every gate kind implements (`GateKind`), and the helpers kinds share.

A kind knows, given a `PruningSpace` (the model's dimensions, its `atp.arch` entry, the kinds' space options):
  options     its `atp prune` options (`options`, a dataclass mixin of ATPConfig; `space_options` are the ones the
              space itself reads, with the defaults a bare `PruningSpace.from_config` takes);
  gates       how many gates per layer (`rows`, `width`), and the parameters they keep (`count`: exact for 0/1
              gates, a differentiable surrogate for soft gates);
  masks       where its gates act in the forward pass, in each of the MASK_MODES (`hooks`, `masks`, `extra_hooks`);
  lasso       which LoRA rows (of B) and columns (of A) belong to each of its groups;
  export      which rows and columns of which projections a layer keeps, which of its weights go altogether,
              the widths recorded for it, and what it changes outside the layers;
  gguf        what a GGUF file cannot hold of it;
  baselines   how per-weight importance statistics reduce to one score per gate, and which methods cannot score it.
Gate values: 1 keeps the structure, 0 prunes it.

Kinds interact only through data the space composes, never by name:
  `block`     the block of a layer ("attention" or "mlp") the kind's structures live in: a container kind (one with
              `columns`, a gate per block) multiplies their gates by its own, and removes a block none of them keeps;
  `factors`   what a kind's gates change in every other count: "hidden_size" (the kept hidden size, which every
              count is linear in) or "qk_width" (the kept width of each query/key head, per layer).
"""
from __future__ import annotations

from dataclasses import field

import torch

from ..errors import ATPError

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


def option(default, help: str, *, at_least=None, before=None, inert_unless_selected: bool = False):
    """A kind's ATPConfig field. at_least: the smallest valid value; before: the value a recorded config without
    this option gets (the option was added later; leave None where it always existed); inert_unless_selected:
    the option changes nothing unless the kind is in --space (it is then left out of the fingerprint)."""
    metadata = {"help": help, "at_least": at_least, "inert_unless_selected": inert_unless_selected}
    if before is not None:
        metadata["before"] = before
    return field(default=default, metadata=metadata)


def chunk_sums(values: torch.Tensor, unit: int) -> torch.Tensor:
    """Sums of consecutive runs of `unit` entries (the last run may be shorter)."""
    pad = (-len(values)) % unit
    return torch.cat([values, values.new_zeros(pad)]).view(-1, unit).sum(1)


def rows(units: list[int], size: int) -> torch.Tensor:
    """Weight indices of whole units of `size` (e.g. the rows of kept heads)."""
    return (torch.tensor(units, dtype=torch.long).unsqueeze(1) * size + torch.arange(size)).flatten().long()


def keep_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row-wise 0/1 mask keeping the `counts[i]` highest scores of row i (ties go to the lower index)."""
    order = torch.argsort(scores.detach(), dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (ranks < counts.to(scores.device).unsqueeze(1)).float()


def as_float(gates: torch.Tensor) -> torch.Tensor:
    """Gates as a floating tensor (float64 stays float64: exact dense counts)."""
    return gates if gates.is_floating_point() else gates.float()


class GateKind:
    name: str
    description: str
    exact = True  # masking equals physical removal (then the export must match the masked model)
    options = None  # the dataclass mixin holding the kind's ATPConfig fields (`option`)
    space_options: dict = {}  # option -> default of the ones `PruningSpace` holds
    # mask mode -> (projection role, "input" or "output", mask name); hooks sit on the peft wrapper in
    # "both" and on its frozen `base_layer` otherwise
    hooks: dict[str, tuple[tuple[str, str, str], ...]]
    lora_pieces: tuple[tuple[str, str, str, int], ...]  # (group, projection role, LoRA matrix, axis of the structure)
    score_roles: tuple[str, ...]  # projections whose weights the importance scores read
    output_roles: tuple[str, ...] = ()  # the projections that read the structures (activation scores)
    block: str | None = None  # the layer's block the structures live in (a container's gate multiplies them)
    columns: tuple[str, ...] = ()  # a container: the block each gate column removes
    model_wide = False  # one row of gates for the whole model instead of one per layer
    min_kept = 0  # gates every row must keep (a model needs a hidden channel)
    rounds = False  # --round-to applies to its widths
    unsupported_methods: dict[str, str] = {}  # baseline method -> why it cannot score this kind
    gguf_refusal: str | None = None  # why a GGUF file cannot hold a model pruned with it
    gguf_whole_heads = False  # its GGUF attention rows come in whole heads (quantized rows then need head_dim)

    def rows(self, space) -> int:
        return 1 if self.model_wide else space.num_layers

    def width(self, space) -> int:
        raise NotImplementedError

    def check_space(self, space) -> None:
        """A clear error where the model cannot have this kind pruned."""

    # counting: the space adds up every kind's `count` under the effective gates (a kind not selected: all ones)
    def count(self, space, gates: torch.Tensor, factors: dict) -> list[torch.Tensor]:
        """Parameters kept by gates [rows, width], summed over layers, as terms to add up in order. `space` counts
        with the kept hidden size; `factors` holds what the selected kinds contribute (see the module docstring)."""
        return []

    def factors(self, space, gates: torch.Tensor) -> dict:
        """What these gates change in the other kinds' counts."""
        return {}

    def fixed_params(self, space) -> int:
        """Parameters in one layer that go only with the kind's whole block (its output bias)."""
        return 0

    def masks(self, space, gates: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """The masks `names` (from `hooks`) expanded to the weights' axis, [rows, size]."""
        raise NotImplementedError

    def extra_hooks(self, space, model, masks_of) -> list:
        """Hooks outside the projections (`hooks`), the same in every mask mode; returns their handles."""
        return []

    def groups(self, space) -> dict[str, tuple[int, int]]:
        """Group lasso groups: name -> (groups per layer, weight rows or columns per group)."""
        raise NotImplementedError

    def lora_groups(self, space, group: str, size: int) -> torch.Tensor:
        """The group (within the layer) of each of the `size` rows / columns of a LoRA piece of `group`."""
        return torch.arange(size) // self.groups(space)[group][1]

    def pruned(self, space, gates: torch.Tensor) -> dict[str, torch.Tensor]:
        """1 where a group is pruned, per group name, [layers, groups]."""
        return {group: 1 - gates.detach() for group in self.groups(space)}

    # export
    def kept(self, space, gate_row: torch.Tensor) -> dict:
        """One layer's kept structures (original indices)."""
        raise NotImplementedError

    def widths(self, kept: dict) -> dict:
        """The per-layer config entries of a pruned layer."""
        return {}

    def slices(self, kept: dict, head_dim: int) -> dict[str, tuple]:
        """projection role (or per-head norm) -> (kept output rows, kept input columns), None for all."""
        return {}

    def dropped(self, kept: dict, arch) -> list[str]:
        """Names (within a layer) of the submodules whose weights the export drops altogether."""
        return []

    def export_config(self, kept_structure: list[dict]) -> dict:
        """Model-wide config values of the pruned model (e.g. a smaller hidden_size)."""
        return {}

    def heterogeneous_config(self, widths: list[dict]) -> dict:
        """Global values a heterogeneous config needs beside the per-layer ones."""
        return {}

    def export_record(self, kept_structure: list[dict]) -> dict:
        """Entries of the config's `atp_pruning` record (original indices of what was kept)."""
        return {}

    def report_layer(self, kept: dict) -> dict:
        """Entries of one layer in report.json besides its widths."""
        return {}

    def legacy_kept(self, record: dict) -> dict:
        """A layer's kept structures from an atp 0.1.0 export's per-layer record."""
        return {}

    def slice_outside(self, state: dict, kept_structure: list[dict], arch, config) -> None:
        """Slice the weights outside the decoder layers in `state` (in place)."""

    def finish_export(self, pruned, dense_config, arch) -> None:
        """Adjust the built pruned model (e.g. buffers that depend on a changed width)."""

    def gguf_steps(self, cfg) -> list[tuple[int, str]]:
        """(step, what) of the widths this run keeps, for GGUF types that store rows in blocks."""
        return []

    # decisions
    def protect(self, space, model, rows: list[list[int]], cfg):
        """(gates [rows, width] that must stay open, a note for the log), or None: structures the decisions keep."""
        return None

    def project(self, space, rule, hard: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Hard decisions that obey a `space.ShapeRule`."""
        return hard

    def check_rule(self, space, rule) -> None:
        pass

    def keep_least(self, hard: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Hard decisions with at least `min_kept` gates kept in every row (the best-scored ones)."""
        if not self.min_kept:
            return hard
        short = hard.sum(dim=1) < self.min_kept
        if not bool(short.any()):
            return hard
        top = keep_top(scores, torch.full((hard.shape[0],), self.min_kept))
        return torch.where(short.unsqueeze(1), torch.maximum(hard, top), hard)

    # baselines
    def group_sums(self, space, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-weight statistics of one layer's `score_roles` weights, summed per gate."""
        raise NotImplementedError

    def activation_sums(self, space, columns: dict[str, torch.Tensor]) -> torch.Tensor:
        """Activation scores per input channel of the `output_roles` (Wanda-sp), summed per gate."""
        raise ATPError(f"--method activation does not support --space {self.name}: "
                       + self.unsupported_methods["activation"])
