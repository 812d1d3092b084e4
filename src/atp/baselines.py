"""Two-stage baselines: pruning decisions fixed on the pretrained model before LoRA tuning starts.

Every method returns gates in the format of the run's `PruningSpace` ({"heads": [L, H], "mlp": [L, blocks]}
by default, 1 keep, 0 prune). The methods are the registry `METHODS`. Training then masks both the frozen and the LoRA path with these fixed gates, tunes
LoRA for the full max_steps, and exports through the same physical-removal path as ATP.

Groups (the same ones ATP's generator decides on):
  query head h:  the rows of q_proj and the columns of o_proj that belong to h;
  MLP block b:   the rows of gate_proj and up_proj and the columns of down_proj of its channels;
  a layer's attention / MLP block (--space blocks): all weights of its projections (activation: all input
                 channels of o_proj / down_proj);
  hidden block (--space hidden): the input columns of q/k/v/gate/up and the output rows of o/down of its channels
                 in every layer, summed over the layers before the norm / absolute value (taylor, magnitude,
                 random; activation cannot score it).
Scores (higher = more important), computed on the pretrained weights (LoRA is still zero):
  taylor      |sum over the group of w * dL/dw|: LLM-Pruner's first-order estimate of the loss change
              when the group is removed, with dL/dw summed over `calib_batches` calibration batches.
  magnitude   L2 norm of the group's weights.
  activation  Wanda-sp: sum over the group's input channels of the output projection (o_proj for a
              head, down_proj for an MLP block) of ||column||_1 * RMS of that channel's input over the
              calibration tokens (padding excluded).
  random      uniform noise from the run's seed (a floor).
Allocation across layers, as each method's source does it:
  taylor      uniform per layer (LLM-Pruner prunes every layer by the same ratio; unlike LLM-Pruner we
              do not exempt the first and last layers, a choice it tuned for 7B models);
  magnitude   uniform per layer (LLM-Pruner's L2 baseline and norm-based filter pruning);
  activation  global ranking over scores standardised within each layer and kind (FLAP's adaptive
              structure search; Wanda-sp itself is uniform per layer, which taylor and magnitude cover);
  random      uniform per layer.
"Uniform per layer" ranks groups within each layer and removes the k-th least important of every layer
before the (k+1)-th of any, so per-layer counts differ by at most one group and any total is reachable.
Heads and MLP blocks are scored in different units, so they are never ranked against each other: each
kind removes the same fraction of its own prunable parameters (query heads with the KV heads they free;
MLP channels), and the MLP count, the finer kind, is then set so that the exact remaining ratio from
`space.remaining_ratio` comes closest to 1 - sparsity.

frozen-generator (the loop is in train.py): ATP's generator trained on the pretrained model alone with
the same steps, schedule and losses as ATP's generator phase (LoRA untouched), calibrated to the target
with `calibrate_offset`, then frozen. It isolates the benefit of deciding *during* tuning.

Group lasso is not used with fixed decisions: both paths of a pruned group are masked from the first
step, so its LoRA weights get no gradient and are removed at export whatever their value.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ATPError
from .kinds import KINDS
from .masking import decoder_layers
from .space import Gates, PruningSpace


def _weight(module) -> torch.Tensor:
    """The frozen weight of a Linear, also inside a peft LoRA wrapper."""
    return getattr(module, "base_layer", module).weight


def _projections(space: PruningSpace, layer) -> dict[str, torch.nn.Module]:
    """The projections the selected kinds' scores read (q, o for heads; gate, up, down for MLP blocks)."""
    return {role: space.arch.projection(layer, role) for kind in space.kind_objects for role in kind.score_roles}


def _group_sums(space: PruningSpace, stats: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-element statistics of one layer's scored weights, summed per gate of each selected kind."""
    return [kind.group_sums(space, stats) for kind in space.kind_objects]


def _stack(space: PruningSpace, per_layer: list[list[torch.Tensor]]) -> Gates:
    """Per-layer sums as [layers, gates] tables; a model-wide kind's (hidden channels) summed over the layers."""
    out = {}
    for i, kind in enumerate(space.kind_objects):
        table = torch.stack([scores[i] for scores in per_layer]).float().cpu()
        out[kind.name] = table.sum(0, keepdim=True) if kind.model_wide else table
    return out


def magnitude_scores(model, space: PruningSpace) -> Gates:
    per_layer = []
    with torch.no_grad():
        for layer in decoder_layers(model):
            stats = {k: _weight(m).float().pow(2) for k, m in _projections(space, layer).items()}
            per_layer.append(_group_sums(space, stats))
    return {kind: sums.sqrt() for kind, sums in _stack(space, per_layer).items()}


def taylor_scores(model, space: PruningSpace, batches, device) -> Gates:
    """|sum of w * dL/dw| per group, with dL/dw accumulated over the calibration batches."""
    weights = [_weight(m) for layer in decoder_layers(model) for m in _projections(space, layer).values()]
    was_training, flags = model.training, [w.requires_grad for w in weights]
    model.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        for batch in batches:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            loss.backward(inputs=weights)  # gradients for these weights only, not for LoRA
        per_layer = []
        with torch.no_grad():
            for layer in decoder_layers(model):
                stats = {k: (_weight(m) * _weight(m).grad).float() for k, m in _projections(space, layer).items()}
                per_layer.append(_group_sums(space, stats))
    finally:
        for w, flag in zip(weights, flags):
            w.grad = None
            w.requires_grad_(flag)
        model.train(was_training)
    return {kind: sums.abs() for kind, sums in _stack(space, per_layer).items()}


def activation_scores(model, space: PruningSpace, batches, device) -> Gates:
    """Wanda-sp: per input channel of o_proj / down_proj, ||weight column||_1 * RMS(input), summed per group."""
    layers = decoder_layers(model)
    outputs = list(dict.fromkeys(role for kind in space.kind_objects for role in kind.output_roles))
    sq_sums = {(i, k): 0.0 for i in range(len(layers)) for k in outputs}
    count, current = [0], {}

    def hook(key):
        def record(module, args):
            x = args[0].float()[current["mask"]]  # [real tokens, channels]
            sq_sums[key] = sq_sums[key] + x.pow(2).sum(0)
        return record

    handles = [space.arch.projection(layer, k).register_forward_pre_hook(hook((i, k)))
               for i, layer in enumerate(layers) for k in outputs]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                current["mask"] = batch["attention_mask"].bool()
                count[0] += int(current["mask"].sum())
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    per_layer = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            columns = {k: _weight(space.arch.projection(layer, k)).float().abs().sum(0)
                       * (sq_sums[(i, k)] / max(1, count[0])).sqrt() for k in outputs}
            per_layer.append([kind.activation_sums(space, columns) for kind in space.kind_objects])
    return _stack(space, per_layer)


def random_scores(space: PruningSpace, seed: int) -> Gates:
    noise = torch.Generator().manual_seed(seed * 7_919 + 17)
    return {kind: torch.rand(shape, generator=noise) for kind, shape in space.gate_shapes.items()}


def order(scores: torch.Tensor, allocation: str) -> torch.Tensor:
    """Flat indices into a [layers, width] score table, least important first."""
    layers, width = scores.shape
    if allocation == "global":  # FLAP: standardise within each layer, then rank across layers
        z = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-12)
        return torch.argsort(z.flatten(), stable=True)
    if allocation == "uniform":  # the k-th least important of every layer before any (k+1)-th
        rank = torch.argsort(torch.argsort(scores, dim=1, stable=True), dim=1, stable=True)
        keys = [(int(rank.flatten()[i]), float(scores.flatten()[i]), i) for i in range(layers * width)]
        return torch.tensor([i for _, _, i in sorted(keys)], dtype=torch.long)
    raise ATPError(f"unknown allocation '{allocation}'")


def select(space: PruningSpace, scores: Gates, sparsity: float, allocation: str) -> Gates:
    """Prune the least important groups of each kind so that the remaining ratio of prunable parameters
    comes closest to 1 - sparsity, every kind giving up the same fraction of its own parameters."""
    orders = {kind: order(scores[kind], allocation) for kind in space.gate_shapes}
    # at most every gate but the `min_kept` of each row (a model keeps a hidden channel)
    limit = {kind: len(orders[kind]) - KINDS[kind].min_kept * rows for kind, (rows, _) in space.gate_shapes.items()}
    total = space.target_params()

    def gates(counts: dict[str, int]) -> Gates:
        out = space.full_gates()
        for kind, n in counts.items():
            out[kind].view(-1)[orders[kind][:n]] = 0
        return out

    def removed(counts: dict[str, int]) -> float:
        return total * (1 - float(space.remaining_ratio(gates(counts))))

    def closest(fn, target: float, most: int) -> int:
        """The count in [0, most] whose removal fn(count) (non-decreasing) is nearest to target."""
        low, high = 0, most
        while low < high:  # smallest count with fn(count) >= target
            mid = (low + high) // 2
            low, high = (mid + 1, high) if fn(mid) < target else (low, mid)
        return min({max(0, low - 1), low}, key=lambda n: (abs(fn(n) - target), n))

    kinds = list(space.gate_shapes)  # the last kind is the finest: it closes the gap
    most = {kind: removed({kind: limit[kind]}) for kind in kinds}
    share = sparsity * total / sum(most.values())  # the same fraction from every kind
    counts = {}
    for kind in kinds[:-1]:
        counts[kind] = closest(lambda n: removed({kind: n}), share * most[kind], limit[kind])
    last = kinds[-1]
    counts[last] = closest(lambda n: removed({**counts, last: n}), sparsity * total, limit[last])
    return gates(counts)


@dataclass(frozen=True)
class Method:
    """A way to decide what to prune. `score` (model, space, batches, device, seed) -> scores per gate makes
    a two-stage method whose decisions `select` fixes before tuning; without it the generator decides."""

    name: str
    allocation: str  # "uniform", "global" (see `order`) or "learned" (the generator)
    score: Callable | None = None
    calibration: bool = False  # the score reads calibration batches

    @property
    def scored(self) -> bool:
        return self.score is not None


# the score functions are looked up when called, so that tests can replace them
METHODS = {m.name: m for m in (
    Method("atp", "learned"),
    Method("taylor", "uniform", lambda model, space, batches, device, seed: taylor_scores(model, space, batches, device),
           calibration=True),
    Method("magnitude", "uniform", lambda model, space, batches, device, seed: magnitude_scores(model, space)),
    Method("activation", "global",
           lambda model, space, batches, device, seed: activation_scores(model, space, batches, device), calibration=True),
    Method("random", "uniform", lambda model, space, batches, device, seed: random_scores(space, seed)),
    Method("frozen-generator", "learned"),
)}
SCORED = tuple(name for name, m in METHODS.items() if m.scored)  # decisions from an importance score
ALLOCATION = {name: m.allocation for name, m in METHODS.items()}


def check_kinds_scored(method: str, kinds) -> None:
    """A clear error where a selected gate kind cannot be scored by this method."""
    for name in kinds:
        reason = KINDS[name].unsupported_methods.get(method) if name in KINDS else None
        if reason:
            raise ATPError(f"--method {method} does not support --space {name}: {reason}")


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise ATPError(f"unknown --method '{method}'; choices: {', '.join(METHODS)}")
    return METHODS[method]


def fixed_decisions(method: str, model, space: PruningSpace, sparsity: float, batches, seed: int,
                    device) -> tuple[Gates, dict]:
    """Gates for a scored two-stage method, and what was done (scores' kind, allocation, seconds)."""
    started = time.time()
    chosen = check_method(method)
    if not chosen.scored:
        raise ATPError(f"method '{method}' has no importance score; scored methods: {', '.join(SCORED)}")
    check_kinds_scored(method, space.kinds)
    scores = chosen.score(model, space, batches, device, seed)
    gates = select(space, scores, sparsity, chosen.allocation)
    info = {"allocation": chosen.allocation, "calibration_batches": len(batches) if chosen.calibration else 0,
            "selection_seconds": round(time.time() - started, 2)}
    return gates, info
