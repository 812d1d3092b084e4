"""Gate kinds: the structures a pruning space can prune, one module per kind, in the registry `KINDS`.

Adding a space means adding one module (a `GateKind` subclass, see `base`) and one line here. The code outside this
package never names a kind: it asks the kinds (`KINDS`, and the helpers below, e.g. the options of the kinds or
whether a selected kind shrinks the hidden size).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ATPError
from .base import MASK_MODES, GateKind, chunk_sums, keep_top, rows
from .blocks import BlockKind
from .heads import HeadKind
from .hidden import HiddenKind
from .mlp import MLPChannelKind
from .qk_dims import QKDimKind

__all__ = ["DEFAULT_KINDS", "KINDS", "MASK_MODES", "BlockKind", "GateKind", "HeadKind", "HiddenKind",
           "MLPChannelKind", "QKDimKind", "SpaceOptions", "check_kinds", "chunk_sums", "keep_top", "rows"]

# name -> kind; this order is the order of gate dicts (the generator's calibration shifts the last kind, the
# finest, on its own; coarser kinds come first)
KINDS = {kind.name: kind for kind in (BlockKind(), HiddenKind(), HeadKind(), QKDimKind(), MLPChannelKind())}
DEFAULT_KINDS = ("heads", "mlp")
SPACE_BEFORE_OPTION = ("heads", "mlp")  # the space of runs recorded before --space existed


def check_kinds(names) -> tuple[str, ...]:
    """The selected kinds in registry order, or a clear error."""
    names = list(names)
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names:
        raise ATPError(f"--space: {'unknown kinds ' + ', '.join(map(repr, unknown)) if unknown else 'no kind given'}; "
                       f"choose one or more of: {', '.join(KINDS)}")
    return tuple(name for name in KINDS if name in names)


@dataclass
class SpaceOptions:
    space: list[str] = field(
        default_factory=lambda: list(DEFAULT_KINDS),
        metadata={"help": "what to prune (repeat the flag for several): " + "; ".join(
            f"{name}: {kind.description}" for name, kind in KINDS.items()),
            "before": list(SPACE_BEFORE_OPTION)})


# the ATPConfig mixins of the pruning space: --space, then each kind's options in registry order
OPTION_MIXINS = (SpaceOptions, *(kind.options for kind in KINDS.values() if kind.options is not None))


def _option_fields() -> list[tuple[GateKind | None, dataclasses.Field]]:
    return [(kind, f) for kind in (None, *KINDS.values()) if kind is None or kind.options is not None
            for f in dataclasses.fields(SpaceOptions if kind is None else kind.options)]


def recorded_defaults() -> dict:
    """Option -> the value a recorded config without it gets (options added after runs were first recorded)."""
    return {f.name: f.metadata["before"] for _, f in _option_fields() if "before" in f.metadata}


def inert_options(selected) -> set[str]:
    """The kinds' options that cannot change a run pruning `selected` (their kind is not selected)."""
    return {f.name for kind, f in _option_fields()
            if kind is not None and f.metadata.get("inert_unless_selected") and kind.name not in selected}


def check_options(cfg) -> None:
    """The kinds' option values (--space and each kind's options)."""
    for _, f in _option_fields():
        least = f.metadata.get("at_least")
        if least is not None and not getattr(cfg, f.name) >= least:
            raise ATPError(f"--{f.name.replace('_', '-')} must be at least {least}, got {getattr(cfg, f.name)}")
    check_kinds(cfg.space)


def space_options(cfg) -> dict:
    """The options `PruningSpace.from_config` takes, from an ATPConfig (or a run's recorded config values)."""
    get = cfg.get if isinstance(cfg, dict) else lambda name, default=None: getattr(cfg, name, default)
    return {name: get(name, default) for kind in KINDS.values() for name, default in kind.space_options.items()}


def decision_options() -> tuple[str, ...]:
    """The options that decide the shape of a run's decisions (two runs must agree on them to share decisions)."""
    return ("space", *(name for kind in KINDS.values() for name in kind.space_options))


def gguf_problems(cfg, block: int | None) -> None:
    """What the options of a pruning run alone show a GGUF file could not hold (`block`: values per quantized
    block of the GGUF type, None if it stores plain rows)."""
    selected = [KINDS[name] for name in check_kinds(cfg.space)]
    for kind in selected:
        if kind.gguf_refusal:
            raise ATPError(kind.gguf_refusal)
    if block is None:
        return
    steps = [what for kind in selected for step, what in kind.gguf_steps(cfg) if step % block]
    if steps:
        raise ATPError(f"--gguf-type {cfg.gguf_type} stores rows in blocks of {block} values, but this run keeps "
                       f"{' and '.join(steps)}; use multiples of {block}, or --gguf-type f16 or f32")


def whole_heads(selected) -> bool:
    """Does a selected kind keep attention in whole heads (so a GGUF row can be as narrow as one head)?"""
    return any(KINDS[name].gguf_whole_heads for name in selected if name in KINDS)


def report_layer(kept: dict) -> dict:
    """One layer's report.json entries besides its widths."""
    return {key: value for kind in KINDS.values() for key, value in kind.report_layer(kept).items()}


def legacy_kept(record: dict) -> dict:
    """A layer's kept structures from an atp 0.1.0 export's per-layer record."""
    return {key: value for kind in KINDS.values() for key, value in kind.legacy_kept(record).items()}
