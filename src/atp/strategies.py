"""Who decides what is pruned, and how the pruned model recovers: the strategies a PruneRecipe (atp.train) chooses
once in its set-up, so that its loop reads as the algorithm does:

    for each step:  recovery.begin(step)        --recovery full: LoRA merged where the fixed-decision phase begins
                    decider.decide(step)        ATP's search phase: a generator step (LoRA frozen)
                    recipe.lora_step(step)      LoRA (or every decoder weight) on the decisions, then the lasso
                    decider.freeze_step(step)   the search's last step: decisions calibrated to the target, frozen

Who decides: `NoDecisions` (--no-prune: dense + LoRA); fixed decisions of a two-stage baseline, chosen before
tuning (`ScoredDecisions`: taylor, magnitude, activation, random; `FrozenGeneratorDecisions`; `DecisionsFromRun`:
--decisions-from); or `GeneratorDecisions` (ATP: the generator learns them during the run). Recovery:
`LoRARecovery` or `FullRecovery` (--recovery full). The ratio penalties are in atp.regularization
(`RATIO_PENALTIES`). Each strategy holds its recipe and reads the run's state (model, masks, optimizers) there.
"""
from __future__ import annotations

import copy
import json
import time
import typing
from pathlib import Path

import torch

from . import checkpoint, diagnostics, regularization
from .batching import batches
from .errors import ATPError
from .generator import DecisionGenerator
from .kinds import decision_options
from .masking import GateController
from .options import LATER_OPTIONS
from .verify import sparsity_tolerance

# ---- who decides


class NoDecisions:
    """--no-prune: nobody decides; dense + LoRA, no gates. The base of the other deciders: each method is a step
    of the recipe where a decider may act."""
    prunes = False  # gates mask the model and the export removes what they prune
    learns = False  # generator steps run in the training loop

    def __init__(self, recipe):
        self.recipe = recipe
        self.info = {}  # how fixed decisions were chosen (report.json's decisions_info)
        self.init_info = None  # how the generator started, with --generator-init taylor
        self.freeze_info = {}  # ATP: the search's sparsity, and the pruned groups' LoRA norm around the freeze's cut

    @property
    def label(self) -> str:
        return "lora"

    @property
    def compaction_step(self) -> int | None:
        """The step after which the decisions stay fixed, so that compaction may follow it (None: no decisions)."""
        return None

    def read_inputs(self) -> None:
        """Before the data loads: decisions given from elsewhere are read and checked."""

    def setup_gates(self) -> None:
        """After LoRA: the generator, its optimizer and the gate hooks that mask the model."""

    def after_prepare(self) -> None:
        """Once accelerate has prepared the model: a two-stage baseline fixes its decisions here."""

    def start(self, first_step: int) -> None:
        """Before the loop's first step: the masks take the decisions."""

    def decide(self, step: int) -> bool:
        """Before the LoRA step of `step`: True when new decisions were made."""
        return False

    def mask_lora_step(self, step: int, new_decisions: bool) -> None:
        """The masks the LoRA step of `step` trains under."""

    def freeze_step(self, step: int) -> None:
        """After the LoRA step of `step`."""

    def final(self) -> dict:
        """The decisions the export applies."""
        return self.recipe.space.full_gates()

    def checkpoint_decisions(self) -> tuple | None:
        """Fixed decisions and their summary, saved with a checkpoint."""
        return None

    def saved_decisions(self, path: Path) -> dict:
        """Resume: the decisions of a checkpoint saved from the compacted model."""
        raise ATPError("internal error: a run without pruning decisions has no compacted checkpoint")

    def resume(self, path: Path, done: int) -> None:
        """Resume from the checkpoint at `path` of step `done`: what the decider keeps besides the model."""

    @property
    def target_sparsity(self) -> float:
        return 0.0

    @property
    def method(self) -> str:
        return "dense-lora"

    def decision_report(self, final: dict) -> dict:
        return {}


class PruningDecider(NoDecisions):
    """What every pruning run sets up: the decision generator (its initialisation draws from the global RNG, so a
    baseline builds it too and its later random streams match ATP's), its AdamW and the gate hooks."""
    prunes = True

    @property
    def label(self) -> str:
        cfg = self.recipe.cfg
        return "atp prune" if cfg.method == "atp" else cfg.method

    @property
    def target_sparsity(self) -> float:
        return self.recipe.cfg.sparsity

    @property
    def method(self) -> str:
        return self.recipe.cfg.method

    def setup_gates(self) -> None:
        r, cfg = self.recipe, self.recipe.cfg
        r.generator = DecisionGenerator(r.space, cfg.generator_hidden, cfg.temperature, cfg.offset, cfg.seed, r.rule,
                                        ema=cfg.generator_ema, lagrangian=r.penalty.multipliers,
                                        soft=cfg.generator_gates == "soft")
        groups = [{"params": r.generator.search_parameters()}, *r.penalty.param_groups(r.generator, cfg.generator_lr)]
        r.opt_gen = torch.optim.AdamW(groups, lr=cfg.generator_lr, weight_decay=0.0)
        r.optimizers["generator"] = r.opt_gen
        # both paths masked, and the frozen-path-only mode of LoRA steps in the generator phase
        r.controller = GateController(r.peft_model, r.space, mode="both", modes=(cfg.lora_mask,))

    def after_prepare(self) -> None:
        # The generator stays unwrapped and fp32 on every process: same init, same per-step noise and
        # all-reduced gradients keep its decisions identical across processes.
        r = self.recipe
        r.generator.to(r.accelerator.device)
        if r.cfg.generator_init == "taylor" and not r.resume:
            self.start_from_taylor()

    def calibration_batches(self) -> list:
        """The calibration batches importance scores read: whole batches, the same on every process."""
        r, cfg = self.recipe, self.recipe.cfg
        source = batches(r.calib_rows, cfg.batch_size, r.tokenizer.pad_token_id, cfg.seed + 2)
        return [next(source)[0] for _ in range(cfg.calib_batches)]

    def start_from_taylor(self) -> None:
        """--generator-init taylor: the generator's first logits from taylor importance on calibration batches
        (the taylor baseline's batches and scores; every process scores the same whole batches)."""
        from .baselines import taylor_scores

        r = self.recipe
        started = time.time()
        data = self.calibration_batches()
        scores = taylor_scores(r.accelerator.unwrap_model(r.peft_model), r.space, data, r.accelerator.device)
        r.generator.start_from_scores(scores)
        self.init_info = {"generator_init": "taylor", "calibration_batches": len(data),
                          "init_seconds": round(time.time() - started, 2)}

    def generator_step(self, step: int, window: LogWindow) -> None:
        """Generator step on a calibration batch, LoRA frozen (gradients flow only into the generator): task loss
        under sampled gates + the ratio penalty of the deterministic gates against the ramped target."""
        r = self.recipe
        accelerator, generator, cfg = r.accelerator, r.generator, r.cfg
        t0 = time.perf_counter()
        generator.train()
        r.controller.use("both")  # decisions are judged as they will be exported
        r.opt_gen.zero_grad(set_to_none=True)
        batches_per_step = cfg.generator_batches
        with accelerator.no_sync(r.peft_model):  # no LoRA gradients in this step
            parts, total = {}, 0.0
            for _ in range(batches_per_step):  # the same sampled gates on each calibration batch
                r.controller.set(generator(step=step))
                with r.teacher_for_generator():
                    loss = r.batch_loss(next(r.calib_iter)) / batches_per_step
                check_finite(step, generator_loss=loss)
                loss.backward(inputs=generator.search_parameters())
                total += loss.item()
                for name, value in r.loss_parts.items():
                    key = f"generator_{name}_loss"
                    parts[key] = parts.get(key, 0.0) + value.item() / batches_per_step
            ratio = r.space.remaining_ratio(generator.deterministic_gates())
            r_loss, weighted = r.penalty.terms(ratio, r.schedule.target_at(step), generator)
            check_finite(step, ratio_loss=r_loss, generator_loss=total + weighted)
            weighted.backward(inputs=list(generator.parameters()))
            r.penalty.after_backward(generator)
        if r.world > 1:
            for p in generator.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        if cfg.generator_clip > 0:
            torch.nn.utils.clip_grad_norm_(generator.search_parameters(), cfg.generator_clip)
        r.opt_gen.step()
        generator.update_ema()
        self.record_decisions(step, generator.decisions())
        parts.update(r.penalty.logged(generator))
        window.add(**parts, ratio_loss=r_loss.item(), deterministic_ratio=ratio.item())
        r.step_times["generator"].append(time.perf_counter() - t0)

    def record_decisions(self, step: int, decisions: dict, event: str = "generator") -> None:
        """A line of decisions.jsonl: the decisions the generator step (or the freeze's calibration) left, which
        the following LoRA steps mask with."""
        r = self.recipe
        if r.accelerator.is_main_process:
            record = {"step": step, **({"event": event} if event != "generator" else {}),
                      "decisions": diagnostics.encode(decisions)}
            diagnostics.append_line(r.decisions_path, record)

    def decision_report(self, final: dict) -> dict:
        """The final decisions (encoded), each gate's parameter weight, and how the search got there (from
        decisions.jsonl; see atp.diagnostics.search_diagnostics)."""
        r = self.recipe
        weights = diagnostics.gate_params(r.space)
        target = 1 - r.cfg.sparsity
        reached = next((s for s in range(1, r.cfg.max_steps + 1) if r.schedule.target_at(s) <= target + 1e-9), None)
        search = diagnostics.search_diagnostics(diagnostics.read_lines(r.decisions_path), final, weights,
                                                r.space.prunable_params(), reached)
        return {"decisions": diagnostics.encode(final), "decision_weights": diagnostics.compact_weights(weights),
                "decision_search": search, **({"generator_init": self.init_info} if self.init_info else {})}


class GeneratorDecisions(PruningDecider):
    """ATP: the generator learns the decisions in the search phase (a generator step, LoRA frozen, before every
    generator_every-th LoRA step); at its last step they are calibrated to the target and frozen."""
    learns = True

    @property
    def compaction_step(self) -> int:
        return self.recipe.schedule.freeze_at

    def start(self, first_step: int) -> None:
        r = self.recipe
        r.decisions = r.generator.decisions()
        if r.controller is not None:  # (none once compacted)
            r.controller.set(r.decisions)
        if r.schedule.freeze_at == 0 and first_step == 1:
            self.freeze(0)  # no generator phase: decisions calibrated before the first step

    def decide(self, step: int) -> bool:
        if not self.recipe.schedule.is_generator_step(step):
            return False
        self.generator_step(step, self.recipe.window)
        return True

    def mask_lora_step(self, step: int, new_decisions: bool) -> None:
        """The frozen path only while the generator searches (with the default lora_mask), both paths after; with
        --lora-decisions sampled, a fresh hard Gumbel sample in the search (structured dropout), while the log
        and the lasso keep the decisions."""
        r, schedule = self.recipe, self.recipe.schedule
        if r.controller is not None:
            r.controller.use(schedule.lora_mask_at(step))
        if new_decisions:
            self.use_generator_decisions()
        if r.cfg.lora_decisions == "sampled" and schedule.in_generator_phase(step):
            with torch.no_grad():
                r.controller.set(r.generator.sample(step=r.cfg.max_steps + step))

    def freeze_step(self, step: int) -> None:
        if step == self.recipe.schedule.freeze_at:
            self.freeze(step)

    def freeze(self, step: int) -> None:
        """End of the generator phase: calibrate the decisions to the target ratio and keep them from here on;
        the ramp lasso's last proximal step (threshold at the largest pruned norm) zeroes the LoRA of every
        pruned group, including groups the calibration just pruned. Records what the search itself pruned (and warns
        when it is under half the target) and the pruned norm before and after."""
        r = self.recipe
        searched = 1.0 - float(r.space.remaining_ratio(r.decisions))  # what the search's own decisions pruned
        if searched < 0.5 * r.cfg.sparsity:
            r.accelerator.print(
                f"atp: warning: the search pruned {searched:.3f} of the target {r.cfg.sparsity} before the freeze, "
                "so the freeze's calibration of barely trained logits makes the decisions, not the search; give it "
                "more steps (--max-steps, --generator-frac) or a larger --generator-lr")
        reached = r.generator.calibrate_offset(r.space.remaining_ratio, 1 - r.cfg.sparsity)
        self.use_generator_decisions()
        self.record_decisions(step, r.decisions, event="freeze")
        before = r.pruned_lora_norm(r.decisions)
        regularization.ramp_proximal_step(r.peft_model, r.space, r.decisions, r.schedule.lasso_fraction(step + 1))
        after = r.pruned_lora_norm(r.decisions)
        self.freeze_info = {"search_sparsity_at_freeze": searched, "pruned_lora_norm_before_freeze_cut": before,
                            "pruned_lora_norm_at_freeze": after}
        when = "trained to the last step" if r.schedule.generator_to_end else f"frozen at step {step}"
        r.accelerator.print(f"generator {when}; decisions calibrated to ratio {reached:.4f}; LoRA norm of pruned "
                            f"groups {before:.4g} -> {after:.4g}")
        if step == r.compaction_step:
            r.compact_now(r.decisions, step)

    def use_generator_decisions(self) -> None:
        """Mask with the generator's deterministic decisions; count the gates that flipped."""
        r = self.recipe
        decisions = r.generator.decisions()
        r.controller.set(decisions)
        r.flips += sum(int((decisions[k] != r.decisions[k]).sum()) for k in decisions)
        r.decisions = decisions

    def final(self) -> dict:
        return self.recipe.generator.decisions()

    def saved_decisions(self, path: Path) -> dict:
        from safetensors.torch import load_file

        generator = self.recipe.generator
        generator.load_state_dict(load_file(str(path / "generator.safetensors")))
        return generator.decisions()

    def resume(self, path: Path, done: int) -> None:
        r = self.recipe
        if r.accelerator.is_main_process:
            diagnostics.truncate_after(r.decisions_path, done)


class FixedDecisions(PruningDecider):
    """A two-stage baseline: decisions fixed before tuning, on the pretrained model (LoRA is still zero); no
    generator steps and no group lasso afterwards. A resumed run reads them from its checkpoint."""
    compaction_step = 0

    def __init__(self, recipe):
        super().__init__(recipe)
        self.fixed = None

    def choose(self) -> tuple[dict, dict]:
        """The decisions and a summary of how they were chosen (its allocation, its seconds)."""
        raise NotImplementedError

    def after_prepare(self) -> None:
        super().after_prepare()
        r = self.recipe
        if not r.resume:
            self.fixed, self.info = self.fix()
        r.generator = r.opt_gen = None
        del r.optimizers["generator"]

    def fix(self) -> tuple[dict, dict]:
        r, cfg = self.recipe, self.recipe.cfg
        gates, info = self.choose()
        gates = {k: v.to(r.accelerator.device) for k, v in gates.items()}
        sparsity = r.space.sparsity(gates)[f"{cfg.sparsity_of}_sparsity"]
        r.accelerator.print(f"{cfg.method}: decisions fixed before tuning at {cfg.sparsity_of} sparsity "
                            f"{sparsity:.4f} ({info['allocation']} allocation, {info['selection_seconds']:.0f}s)")
        return gates, info

    def start(self, first_step: int) -> None:
        r = self.recipe
        r.decisions = self.fixed
        if r.controller is not None:  # (none once compacted)
            r.controller.set(r.decisions)
        if r.compaction_step == 0 and not r.compacted:
            r.compact_now(self.fixed, 0)

    def mask_lora_step(self, step: int, new_decisions: bool) -> None:
        r = self.recipe
        if r.controller is not None:
            r.controller.use("both")  # both paths of a pruned structure, as the export removes them

    def final(self) -> dict:
        return self.fixed

    def checkpoint_decisions(self) -> tuple:
        return self.fixed, self.info

    def saved_decisions(self, path: Path) -> dict:
        return checkpoint.load_decisions(path, self.recipe.accelerator.device)[0]

    def resume(self, path: Path, done: int) -> None:
        self.fixed, self.info = checkpoint.load_decisions(path, self.recipe.accelerator.device)


class ScoredDecisions(FixedDecisions):
    """taylor, magnitude, activation, random: importance scores on calibration batches (atp.baselines)."""

    def choose(self) -> tuple[dict, dict]:
        from .baselines import fixed_decisions

        r, cfg = self.recipe, self.recipe.cfg
        return fixed_decisions(cfg.method, r.accelerator.unwrap_model(r.peft_model), r.space, cfg.sparsity,
                               self.calibration_batches(), cfg.seed, r.accelerator.device)


class FrozenGeneratorDecisions(FixedDecisions):
    """frozen-generator: ATP's generator phase (same steps and losses) without LoRA steps, then calibrated."""

    def choose(self) -> tuple[dict, dict]:
        from .baselines import ALLOCATION

        r, cfg = self.recipe, self.recipe.cfg
        started = time.time()
        r.peft_model.train()
        window = LogWindow()
        steps = r.schedule.generator_phase_steps
        for step in steps:
            self.generator_step(step, window)
        r.generator.calibrate_offset(r.space.remaining_ratio, 1 - cfg.sparsity)
        gates = r.generator.decisions()
        self.record_decisions(steps[-1] if len(steps) else 0, gates, event="freeze")
        return gates, {"allocation": ALLOCATION[cfg.method], "generator_steps": len(steps), **window.means(),
                       "selection_seconds": round(time.time() - started, 2)}


class DecisionsFromRun(FixedDecisions):
    """--decisions-from RUN: the final decisions of an earlier run, checked against this run's model shape,
    pruning space and target sparsity (atp.diagnostics encodes them)."""

    def read_inputs(self) -> None:
        self.source = self.read()

    def choose(self) -> tuple[dict, dict]:
        cfg = self.recipe.cfg
        return self.source, {"allocation": f"from {cfg.decisions_from}", "decisions_from": str(cfg.decisions_from),
                             "selection_seconds": 0.0}

    def read(self) -> dict:
        """The final decisions in RUN/report.json."""
        cfg, space = self.recipe.cfg, self.recipe.space
        where = f"--decisions-from {cfg.decisions_from}"
        path = Path(cfg.decisions_from).expanduser() / "report.json"
        if not path.is_file():
            raise ATPError(f"{where}: no report.json there; give the directory of a finished pruning run")
        try:
            report = json.loads(path.read_text())
            encoded, shape, source = report["decisions"], report["dense_shape"], report["config"]
        except (ValueError, KeyError, TypeError) as error:
            raise ATPError(f"{where}: report.json holds no final decisions ({error}); give a pruning run made by "
                           "this version of atp") from None
        mine = dense_shape(space)
        if {k: shape.get(k) for k in mine} != mine:
            raise ATPError(f"{where}: that run's model has another shape ({shape}) than --model {cfg.model} "
                           f"({mine}); use a run on the same model")
        options = decision_options()
        differ = [f"--{k.replace('_', '-')} {source.get(k)!r} there, {getattr(cfg, k)!r} here" for k in options
                  if source.get(k, LATER_OPTIONS.get(k)) != getattr(cfg, k)]
        if differ or set(encoded) != set(space.gate_shapes):
            raise ATPError(f"{where}: that run pruned another space ({'; '.join(differ) or sorted(encoded)}); use "
                           "the same pruning-space options")
        gates = diagnostics.decode(encoded)
        for kind, (rows, width) in space.gate_shapes.items():
            if tuple(gates[kind].shape) != (rows, width):
                raise ATPError(f"{where}: its {kind} decisions have shape {tuple(gates[kind].shape)}, this model's "
                               f"{(rows, width)}; use a run on the same model and space")
        reached = space.sparsity(gates)[f"{cfg.sparsity_of}_sparsity"]
        allowed = sparsity_tolerance(cfg, space)
        if abs(reached - cfg.sparsity) > allowed:
            raise ATPError(f"{where}: its decisions remove {reached:.4f} of the {cfg.sparsity_of} parameters, not "
                           f"--sparsity {cfg.sparsity} (more than {allowed:.3g} apart); give the --sparsity (and "
                           "--sparsity-of) that run used")
        return gates


def dense_shape(space) -> dict:
    """The model dimensions a run's decisions belong to (report.json's dense_shape)."""
    return {"num_layers": space.num_layers, "num_heads": space.num_heads, "num_kv_heads": space.num_kv_heads,
            "intermediate_size": space.intermediate_size, "hidden_size": space.hidden_size}


def choose_decider(recipe) -> NoDecisions:
    """Who decides in this run (its config is validated: --decisions-from implies pruning with --method atp)."""
    cfg = recipe.cfg
    if not cfg.prune:
        return NoDecisions(recipe)
    if recipe.schedule.learns_decisions:
        return GeneratorDecisions(recipe)
    if cfg.decisions_from:
        return DecisionsFromRun(recipe)
    if cfg.method == "frozen-generator":
        return FrozenGeneratorDecisions(recipe)
    return ScoredDecisions(recipe)


# ---- recovery


class Update(typing.NamedTuple):
    """What a training step updates: `kind` "lora" (the adapters, under the group lasso) or "full" (every decoder
    weight); its optimizer (as accelerate wraps it) and learning-rate schedule."""
    kind: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


class LoRARecovery:
    """--recovery lora: LoRA trains at every step, on the decisions of the step."""

    def __init__(self, recipe):
        self.recipe = recipe

    def check_distribution(self, accelerator) -> None:
        """At set-up: refuse a distribution this recovery does not run under."""

    def begin(self, step: int) -> None:
        """Before the step's decisions and update."""

    def update(self, step: int) -> Update:
        r = self.recipe
        return Update("lora", r.opt_lora, r.lr_scheduler)

    def scheduler(self):
        """The learning-rate schedule the log shows."""
        return self.recipe.lr_scheduler

    def checkpoint_state(self) -> tuple | None:
        """What a checkpoint saves besides LoRA (the full phase's weights and optimizer)."""
        return None

    def resume(self, path: Path, done: int) -> None:
        """Resume after step `done`."""


class FullRecovery(LoRARecovery):
    """--recovery full: where the fixed-decision phase begins, LoRA is merged into the weights (and left at zero,
    frozen) and every weight of the decoder layers trains with its own AdamW and learning-rate schedule."""

    def __init__(self, recipe):
        super().__init__(recipe)
        # the trained weights by name, their optimizer (also as accelerate wraps it) and schedule, once started
        self.params = self.optimizer = self.prepared = self.lr_schedule = None

    def check_distribution(self, accelerator) -> None:
        kind = accelerator.distributed_type.value
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            raise ATPError(f"--recovery full runs in one process or with DDP; it is not implemented for {kind}: it "
                           "trains every decoder weight, which sharding splits, under masks of whole rows (use "
                           "--recovery lora)")

    def begin(self, step: int) -> None:
        if step == self.recipe.schedule.full_from:
            self.start()

    def update(self, step: int) -> Update:
        if self.recipe.schedule.is_full_step(step):
            return Update("full", self.prepared, self.lr_schedule)
        return super().update(step)

    def scheduler(self):
        return self.lr_schedule or self.recipe.lr_scheduler

    def checkpoint_state(self) -> tuple | None:
        return (self.params, self.optimizer, self.lr_schedule) if self.params else None

    def resume(self, path: Path, done: int) -> None:
        if self.recipe.schedule.is_full_step(done):  # the full recovery phase had begun
            self.start()
            checkpoint.load_full(path, self.params, self.optimizer, self.lr_schedule)

    def start(self) -> None:
        """Merge LoRA and train every decoder weight from here on; the generator stays frozen. The masks stay in
        mode "both", so a pruned head's or channel's weights get exactly zero gradient and do not move (the
        export removes them). The self distillation teacher keeps the dense pretrained weights, in a copy made
        before the merge."""
        from peft.tuners.lora import LoraLayer

        from .distill import SelfTeacher
        from .masking import decoder_layers

        r = self.recipe
        cfg, accelerator, schedule = r.cfg, r.accelerator, r.schedule
        model = accelerator.unwrap_model(r.peft_model)
        r.release_live_teacher(schedule.full_from - 1)
        if isinstance(r.teacher, SelfTeacher) and not r.compacted:  # (compaction gave it its own copy)
            r.teacher = SelfTeacher(copy.deepcopy(model).requires_grad_(False), r.teacher.gates_off)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    base = module.get_base_layer()
                    for name in module.active_adapters:
                        base.weight += module.get_delta_weight(name).to(base.weight.dtype)
                        module.lora_A[name].weight.zero_()
                        module.lora_B[name].weight.zero_()
        trained = {id(p) for layer in decoder_layers(model) for n, p in layer.named_parameters() if "lora_" not in n}
        if r.compacted:  # weights the compaction left unsliced are shared with the dense teacher: train copies
            with torch.no_grad():
                for p in model.parameters():
                    if id(p) in trained:
                        p.data = p.data.clone()
        self.params = {}
        for name, p in model.named_parameters():
            p.requires_grad_(id(p) in trained)
            if id(p) in trained:
                self.params[name] = p
        optimizer = torch.optim.AdamW(list(self.params.values()), lr=cfg.recovery_lr, weight_decay=0.0)
        self.optimizer = optimizer  # as it is before accelerate wraps it, for checkpoints
        start, factor = schedule.full_from - 1, schedule.lora_lr_factor
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda updates: factor(start + updates))
        if r.world > 1:  # DDP again, over the parameters that train now
            if r.compacted:  # e.g. the norm before an attention block with no heads left: it gets no gradient
                from accelerate.utils import DistributedDataParallelKwargs

                accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
            r.peft_model = accelerator.prepare(model)
        self.prepared = accelerator.prepare(optimizer)
        accelerator.print(f"full recovery from step {schedule.full_from}: LoRA merged, "
                          f"{sum(p.numel() for p in self.params.values()):,} decoder weights train "
                          f"(peak lr {cfg.recovery_lr:g})")


RECOVERIES = {"lora": LoRARecovery, "full": FullRecovery}  # by --recovery


# ---- what the loop and the strategies share


class LogWindow:
    """Means of each logged term since the last log line."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, **terms):
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict:
        means = {name: self.sums[name] / self.counts[name] for name in self.sums}
        self.sums, self.counts = {}, {}
        return means


def check_finite(step: int, **terms) -> None:
    for name, value in terms.items():
        if value is None:
            continue
        value = torch.as_tensor(value).detach()
        if not torch.isfinite(value).all():
            raise ATPError(f"{name} became {float(value)} at step {step}; stopping (checkpoints so far are kept)")
