"""Pruning-decision generator: learned per-layer inputs -> bi-GRU -> per-layer heads -> one logit per gate.

Training mode samples Gumbel-sigmoid gates with a straight-through hard threshold; eval mode returns
deterministic hard decisions (logit + offset > 0). The offset starts every gate well inside "keep".
"""
from __future__ import annotations

import torch
from torch import nn

from .space import Gates, PruningSpace


class DecisionGenerator(nn.Module):
    def __init__(
        self,
        space: PruningSpace,
        hidden: int = 64,
        temperature: float = 0.4,
        offset: float = 3.0,
        seed: int = 0,
    ):
        super().__init__()
        self.space = space
        self.temperature = temperature
        self.offset = offset
        self.seed = seed
        num_layers = next(iter(space.gate_shapes.values()))[0]
        init = torch.Generator().manual_seed(seed)
        self.inputs = nn.Parameter(torch.randn(num_layers, hidden, generator=init) * 0.5)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.heads = nn.ModuleDict(
            {
                kind: nn.ModuleList(nn.Linear(2 * hidden, width) for _ in range(num_layers))
                for kind, (_, width) in space.gate_shapes.items()
            }
        )
        with torch.no_grad():
            for layer_heads in self.heads.values():
                for head in layer_heads:
                    head.weight.mul_(0.1)
                    head.bias.zero_()

    def logits(self) -> Gates:
        states, _ = self.rnn(self.inputs.float().unsqueeze(0))
        states = states.squeeze(0)
        return {
            kind: torch.stack([head(states[i]) for i, head in enumerate(layer_heads)]) + self.offset
            for kind, layer_heads in self.heads.items()
        }

    def forward(self, step: int | None = None) -> Gates:
        """Gates for one step. `step` seeds the Gumbel noise so that every process draws the same sample."""
        logits = self.logits()
        if not self.training:
            return {kind: (value > 0).float() for kind, value in logits.items()}
        noise_gen = None if step is None else torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        gates = {}
        for kind, value in logits.items():
            u = torch.rand(value.shape, generator=noise_gen).clamp(1e-6, 1 - 1e-6).to(value.device)
            soft = torch.sigmoid((value + torch.log(u) - torch.log1p(-u)) / self.temperature)
            hard = (soft > 0.5).float()
            gates[kind] = hard + soft - soft.detach()
        return gates

    @torch.no_grad()
    def decisions(self) -> Gates:
        """Deterministic hard decisions, whatever the module's mode."""
        return {kind: (value > 0).float() for kind, value in self.logits().items()}
