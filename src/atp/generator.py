"""Pruning-decision generator: learned per-layer inputs -> bi-GRU -> per-layer heads -> one logit per gate (a
model-wide kind, hidden channels, has one head reading the mean of the layers' states).

Training mode samples Gumbel-sigmoid gates with a straight-through hard threshold (with `soft`: the
Gumbel-sigmoid values themselves, as the authors' generator steps use them); eval mode returns
deterministic hard decisions (logit + offset > 0). The offset starts every gate well inside "keep".
With `ema` > 0 the decisions (what LoRA steps, the freeze and the export use) follow an exponential moving
average of the logits, updated after every generator step; the search itself (sampled gates, ratio loss)
uses the current logits. With `lagrangian`, the ratio constraint's two multipliers live here too.
"""
from __future__ import annotations

import torch
from torch import nn

from .space import Gates, PruningSpace, ShapeRule


class DecisionGenerator(nn.Module):
    def __init__(
        self,
        space: PruningSpace,
        hidden: int = 64,
        temperature: float = 1.0,
        offset: float = 3.0,
        seed: int = 0,
        rule: ShapeRule | None = None,
        ema: float = 0.0,
        lagrangian: bool = False,
        soft: bool = False,
    ):
        super().__init__()
        self.space = space
        self.rule = rule or ShapeRule()
        self.temperature = temperature
        self.offset = offset
        self.seed = seed
        self.ema = ema
        self.soft = soft
        num_layers = space.num_layers
        init = torch.Generator().manual_seed(seed)
        self.inputs = nn.Parameter(torch.randn(num_layers, hidden, generator=init) * 0.5)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.heads = nn.ModuleDict(
            {
                kind: nn.ModuleList(nn.Linear(2 * hidden, width) for _ in range(rows))
                for kind, (rows, width) in space.gate_shapes.items()
            }
        )
        for kind in space.gate_shapes:
            self.register_buffer(f"shift_{kind}", torch.zeros(()))
        with torch.no_grad():
            for layer_heads in self.heads.values():
                for head in layer_heads:
                    head.weight.mul_(0.1)
                    head.bias.zero_()
        if ema > 0:  # registered only when used, so earlier checkpoints load unchanged
            with torch.no_grad():
                for kind, value in self.raw_logits().items():
                    self.register_buffer(f"ema_{kind}", value.clone())
        if lagrangian:  # Sheared-LLaMA's multipliers of (r - t) and (r - t)^2, raised by gradient ascent
            self.lagrange = nn.Parameter(torch.zeros(2))

    @torch.no_grad()
    def start_from_scores(self, scores: Gates) -> None:
        """--generator-init taylor: each gate's head bias from its importance rank within its kind (least important
        lowest; `baselines.order` with FLAP's per-layer standardisation ranks across layers), spread evenly over
        [-offset/2, +offset/2]; the heads' weights start at zero, so the first logits are exactly offset + bias:
        every gate kept, the least important nearest to being pruned."""
        from .baselines import order

        for kind, layer_heads in self.heads.items():
            ranked = order(scores[kind].float().cpu(), "global")
            rank = torch.empty_like(ranked, dtype=torch.float32)
            rank[ranked] = torch.arange(len(ranked), dtype=torch.float32)
            bias = (rank / max(1, len(ranked) - 1) - 0.5) * self.offset
            bias = bias.view(scores[kind].shape)
            for i, head in enumerate(layer_heads):
                head.weight.zero_()
                head.bias.copy_(bias[i].to(head.bias.device))
        if self.ema > 0:
            for kind, value in self.raw_logits().items():
                getattr(self, f"ema_{kind}").copy_(value)

    def raw_logits(self) -> Gates:
        states, _ = self.rnn(self.inputs.float().unsqueeze(0))
        states = states.squeeze(0)
        rows = {len(states): states, 1: states.mean(0, keepdim=True)}  # per layer, or model-wide (mean state)
        return {kind: torch.stack([head(rows[len(layer_heads)][i]) for i, head in enumerate(layer_heads)])
                for kind, layer_heads in self.heads.items()}

    def _shifted(self, raw: Gates) -> Gates:
        return {kind: value + self.offset + getattr(self, f"shift_{kind}") for kind, value in raw.items()}

    def logits(self) -> Gates:
        return self._shifted(self.raw_logits())

    def decision_logits(self) -> Gates:
        """The logits the decisions come from: the moving average when `ema` is on, else the current ones."""
        if self.ema <= 0:
            return self.logits()
        return self._shifted({kind: getattr(self, f"ema_{kind}") for kind in self.heads})

    @torch.no_grad()
    def update_ema(self) -> None:
        """After a generator step: ema <- ema * decay + logits * (1 - decay)."""
        if self.ema <= 0:
            return
        for kind, value in self.raw_logits().items():
            getattr(self, f"ema_{kind}").mul_(self.ema).add_(value, alpha=1 - self.ema)

    def search_parameters(self) -> list[nn.Parameter]:
        """What the generator's loss descends on (everything but the Lagrange multipliers)."""
        return [p for name, p in self.named_parameters() if name != "lagrange"]

    def hard(self, logits: Gates) -> Gates:
        """0/1 decisions from logits, projected onto the shape rule (uniform widths, rounded widths)."""
        return self.rule.project(self.space, {kind: (value > 0).float() for kind, value in logits.items()}, logits)

    def _straight_through(self, logits: Gates) -> Gates:
        hard = self.hard(logits)
        soft = {kind: torch.sigmoid(value / self.temperature) for kind, value in logits.items()}
        return {kind: hard[kind] + soft[kind] - soft[kind].detach() for kind in logits}

    def forward(self, step: int | None = None) -> Gates:
        """Gates for one step. `step` seeds the Gumbel noise so that every process draws the same sample."""
        if not self.training:
            return self.hard(self.decision_logits())
        return self.sample(step, self.soft)

    def sample(self, step: int | None = None, soft: bool = False) -> Gates:
        """Gumbel-sigmoid gates: straight-through hard ones, or (soft) sigmoid((logit + noise) / temperature)."""
        logits = self.logits()
        noise_gen = None if step is None else torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        noisy = {}
        for kind, value in logits.items():
            u = torch.rand(value.shape, generator=noise_gen).clamp(1e-6, 1 - 1e-6).to(value.device)
            noisy[kind] = value + torch.log(u) - torch.log1p(-u)
        if soft:
            return {kind: torch.sigmoid(value / self.temperature) for kind, value in noisy.items()}
        return self._straight_through(noisy)

    def deterministic_gates(self) -> Gates:
        """Noise-free straight-through gates: the eval-mode decisions forward, sigmoid gradients backward.
        The ratio loss uses these, so that the decisions that will be exported are the ones driven to the target."""
        return self._straight_through(self.logits())

    @torch.no_grad()
    def calibrate_offset(self, ratio_of, target: float, iters: int = 40) -> float:
        """Shift logits so that the hard decisions' remaining ratio comes closest to `target`: first one shift
        for every gate, then one for the finest-grained kind alone (the last), to close what a coarse step left.
        Decisions only grow with a shift, so bisection finds each. The shifts are buffers, saved with the state;
        each candidate is judged on the decisions those buffers give (the float32 sum that `logits` computes), so a
        gate that the bisection leaves just above zero stays kept."""
        kinds = list(self.space.gate_shapes)
        for kinds_to_shift in (kinds, kinds[-1:]):
            span = max(float(v.abs().max()) for v in self.decision_logits().values()) + 1.0
            start = {kind: getattr(self, f"shift_{kind}").clone() for kind in kinds_to_shift}

            def ratio_at(shift):
                for kind in kinds_to_shift:
                    getattr(self, f"shift_{kind}").copy_(start[kind] + shift)
                return float(ratio_of(self.decisions()))

            low, high = -span, span
            for _ in range(iters):
                mid = (low + high) / 2
                low, high = (mid, high) if ratio_at(mid) < target else (low, mid)
            ratio_at(min((low, high), key=lambda s: abs(ratio_at(s) - target)))
        return float(ratio_of(self.decisions()))

    @torch.no_grad()
    def decisions(self) -> Gates:
        """Deterministic hard decisions (from the moving average when `ema` is on), whatever the module's mode."""
        return self.hard(self.decision_logits())
