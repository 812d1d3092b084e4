"""When each phase of a run happens and how the weights ramp within it, computed from the config in one place.

    steps 1 .. freeze_at               generator phase: every generator_every-th step starts with a generator
                                       step (both paths masked), then a LoRA step (with lora_mask "frozen",
                                       the frozen path of pruned structures only); the ratio target and the
                                       group-lasso threshold ramp
    steps freeze_at + 1 .. max_steps   fixed-decision phase: LoRA steps only, the LoRA learning rate restarted
                                       (with restart_lr); both paths of pruned structures masked, their
                                       LoRA kept at zero; with recovery "full" (ATP and the
                                       two-stage baselines alike) LoRA is merged into the weights at the
                                       start of this phase and every decoder weight trains (full_from)

Steps count from 1 and are optimizer updates of LoRA. Plain LoRA and the two-stage baselines have no
generator phase: every step is a LoRA step on fixed (or no) decisions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    max_steps: int
    freeze_at: int  # the generator phase's last step: int(generator_frac * max_steps)
    generator_every: int
    learns_decisions: bool  # the generator trains during the run (ATP; not plain LoRA or a two-stage baseline)
    restart_lr: bool
    sparsity: float
    target_warmup: float
    lam: float
    lasso: str = "lr-scaled"  # "ramp": proximal threshold grows to the largest pruned norm at the freeze
    lora_mask: str = "both"  # mask mode of LoRA steps in the generator phase
    full_from: int = 0  # recovery "full": the first step that trains all decoder weights (0: never)

    @classmethod
    def from_config(cls, cfg) -> Schedule:
        freeze_at = int(cfg.generator_frac * cfg.max_steps)
        full = cfg.prune and cfg.recovery == "full" and freeze_at < cfg.max_steps
        return cls(max_steps=cfg.max_steps, freeze_at=freeze_at,
                   generator_every=cfg.generator_every,
                   learns_decisions=cfg.prune and cfg.method == "atp" and not cfg.decisions_from,
                   restart_lr=cfg.restart_lr, sparsity=cfg.sparsity, target_warmup=cfg.target_warmup, lam=cfg.lam,
                   lasso=cfg.lasso, lora_mask=cfg.lora_mask, full_from=freeze_at + 1 if full else 0)

    # phases

    @property
    def generator_phase_steps(self) -> range:
        """The steps that start with a generator step when the generator learns (the frozen-generator
        baseline runs these alone, before tuning)."""
        return range(1, self.freeze_at + 1, self.generator_every)

    def is_generator_step(self, step: int) -> bool:
        return self.learns_decisions and step in self.generator_phase_steps

    def generator_steps_until(self, step: int) -> int:
        """Generator steps in steps 1 .. step (each used one calibration batch)."""
        return sum(self.is_generator_step(s) for s in range(1, step + 1))

    @property
    def generator_to_end(self) -> bool:
        """The generator trains to the last step (no fixed-decision phase); it is calibrated before export."""
        return self.learns_decisions and self.freeze_at >= self.max_steps

    @property
    def fixed_phase_start(self) -> int:
        """The step after which ATP's LoRA tunes fixed decisions; 0 when a run has no such phase after
        generator steps (baselines fix their decisions before step 1; generator_frac 0 or 1)."""
        return self.freeze_at if self.learns_decisions and 0 < self.freeze_at < self.max_steps else 0

    def is_full_step(self, step: int) -> bool:
        """recovery "full": this step trains every decoder weight (LoRA merged in) instead of LoRA."""
        return bool(self.full_from) and step >= self.full_from

    def in_generator_phase(self, step: int) -> bool:
        return self.learns_decisions and step <= self.freeze_at

    def lora_mask_at(self, step: int) -> str:
        """Mask mode of the LoRA step at `step`: lora_mask while the generator searches, both paths after."""
        return self.lora_mask if self.in_generator_phase(step) else "both"

    # ramps

    def target_at(self, step: int) -> float:
        """Remaining-ratio target for the generator: lowered linearly so that pruning comes in gradually."""
        ramp = max(1, int(self.target_warmup * self.freeze_at))
        return 1 - self.sparsity * min(1.0, step / ramp)

    def lasso_weight(self, step: int) -> float:
        """lasso lr-scaled: the group-lasso loss weight lambda_t, ramped over the generator phase; 0 with fixed
        decisions or with the ramp lasso (a proximal step only)."""
        if not self.learns_decisions or self.lasso != "lr-scaled":
            return 0.0
        return self.lam * min(1.0, step / max(1, self.freeze_at))

    def lasso_fraction(self, step: int) -> float:
        """lasso ramp: the proximal threshold as a fraction of the largest pruned group's norm, min(1, lam * t /
        freeze_at): 1 from the freeze on (lam >= 1), so every pruned group is exactly zero by then and stays
        there. lasso exp-ramp: 0 in the generator phase (`exp_growth` sets its threshold), 1 from the freeze on.
        0 with fixed decisions, lam 0, or the lr-scaled lasso."""
        if not self.learns_decisions or self.lasso not in ("ramp", "exp-ramp") or self.lam == 0:
            return 0.0
        if step > self.freeze_at:
            return 1.0
        return min(1.0, self.lam * step / max(1, self.freeze_at)) if self.lasso == "ramp" else 0.0

    def exp_growth(self, step: int) -> float:
        """lasso exp-ramp: (e^(t/T) - 1) / (e - 1) at step t of the generator phase (T: the freeze step), the
        growth of the authors' proximal threshold: near 0 for most of the phase, 1 at the freeze. 0 otherwise."""
        if not self.learns_decisions or self.lasso != "exp-ramp" or self.lam == 0 or step > self.freeze_at:
            return 0.0
        return math.expm1(step / max(1, self.freeze_at)) / math.expm1(1.0)

    @property
    def lr_restart_step(self) -> int:
        """The learning-rate schedule starts again after this many updates (0: never): at ATP's freeze, or
        where recovery "full" begins (for the two-stage baselines too)."""
        if not self.restart_lr:
            return 0
        return self.full_from - 1 if self.full_from else self.fixed_phase_start

    def lora_lr_factor(self, updates: int) -> float:
        """LoRA learning-rate multiplier after `updates` optimizer updates: linear warm-up over 5% of the steps,
        then cosine decay to 0. With restart_lr, the fixed-decision phase after the generator freezes gets
        its own warm-up and cosine, so the recovery from the final decisions runs at the full learning rate."""
        start, length = 0, self.max_steps
        if self.lr_restart_step and updates >= self.lr_restart_step:
            start, length = self.lr_restart_step, self.max_steps - self.lr_restart_step
        s = updates - start
        return min(1.0, (s + 1) / max(1, length // 20)) * 0.5 * (1 + math.cos(math.pi * s / length))
