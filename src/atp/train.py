"""One-stage ATP training: LoRA steps and generator steps alternate, then LoRA finishes on fixed decisions
(with its learning-rate schedule restarted, unless restart_lr is off).

    LoRA step       (generator frozen):  task loss + lambda_t * group lasso(LoRA of pruned groups)
    generator step  (LoRA frozen, calibration batch): task loss + alpha * ratio loss(r, 1 - sparsity)

`PruneRecipe` runs it as named steps (set-up, resume, the loop, export, report); `atp.schedule` says which
step does what, and the strategies it chooses in its set-up (atp.strategies) who decides what is pruned (nobody,
decisions fixed before tuning, or the generator), how the pruned model recovers (LoRA or full fine-tuning), and
which ratio penalty the generator minimises (atp.regularization). accelerate provides devices, mixed precision,
gradient accumulation and multi-process execution.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
from pathlib import Path

import torch

from . import checkpoint, gguf_export, regularization, validation
from .batching import (
    Batch,
    batches,
    check_packing,
    load_training_examples,
    sample_texts,
    split_calibration,
    tokenize_all,
)
from .config import default_lr
from .errors import ATPError
from .export import count_safetensors_params, is_heterogeneous, layer_widths
from .fsutil import clean_stale_temps, write_text_atomic
from .kinds import report_layer, space_options
from .masking import GateController
from .models import load_model
from .options import ATPConfig, check_same_data, check_same_model, data_sha256, fingerprint, model_sha256
from .rundir import (
    RunOutputs,
    acquire,
    check_not_inside_inputs,
    check_out_path,
    discard_replaced,
    release,
    restore_interrupted,
)
from .schedule import Schedule
from .space import PruningSpace, ShapeRule, check_supported
from .strategies import RECOVERIES, LogWindow, check_finite, choose_decider, dense_shape
from .verify import COMPACTION_TOLERANCE, export_checked, exported_sparsity


def train(cfg: ATPConfig, progress: bool = True, resume: bool = False) -> dict:
    """Run ATP (or plain LoRA when cfg.prune is False) and export the model to <out>/model; returns the report.
    With resume, continue the run in cfg.out from its newest intact checkpoint."""
    return PruneRecipe(cfg, progress=progress, resume=resume).run()


class PruneRecipe:
    """One `atp prune` run as named steps, in the style of torchtune's single-device LoRA recipe:
    setup -> load_checkpoint (resume) -> train_loop (recovery.begin, decider.decide, lora_step,
    decider.freeze_step, log, save_checkpoint) -> export -> report."""

    def __init__(self, cfg: ATPConfig, progress: bool = True, resume: bool = False):
        cfg.validate()
        self.cfg, self.progress, self.resume = cfg, progress, resume
        self.schedule = Schedule.from_config(cfg)
        self.run_dir = Path(cfg.out)
        self.log_path = self.run_dir / "log.jsonl"
        self.decisions_path = self.run_dir / "decisions.jsonl"  # the decisions after each generator step
        self.window = LogWindow()
        self.step_times = {"lora": [], "generator": [], "full": []}
        self.token_counts = {"real": 0, "total": 0}  # tokens of the training batches (LoRA and full steps) run here
        # who decides, how the model recovers, the generator's ratio penalty (atp.strategies): chosen in setup
        self.decider = self.recovery = self.penalty = None
        self.generator = self.opt_gen = self.controller = None
        self.decisions, self.flips = None, 0  # the decisions in the masks; how many changed since the last log line
        self.outputs = None  # a new run's outputs (atp.rundir.RunOutputs), on the main process
        self.locked = False  # whether this process holds the run folder's lock (the main process does)
        self.compacted, self.compaction = False, {}  # pruned structures physically gone from the trained model
        # --refit ls, once applied: the compact model's refit base weights by name, and the summary (checkpoints
        # save both, report.json's compaction entry has the summary)
        self.refit_names, self.compaction_refit = [], None
        self.distilling = True  # off in generator steps with --no-distill-generator
        self.fsdp, self.export_model = False, None  # FSDP: the model gathered for the export, on the main process
        self.given = dataclasses.asdict(cfg)  # the config as given, for config.yaml

    def run(self) -> dict:
        """Run the steps; a new run that fails before its first checkpoint leaves its folder as it found it."""
        try:
            return self.run_steps()
        except BaseException:
            if self.outputs is not None:
                self.outputs.undo()
            raise
        finally:
            if self.locked:
                release(self.run_dir)

    def run_steps(self) -> dict:
        """Set up, resume if asked, train, export; returns the report (other processes: its first fields only)."""
        self.setup()
        if self.cfg.decide_only:
            return self.decisions_only()
        first_step = self.load_checkpoint() if self.resume else 1
        self.train_loop(first_step)
        train_seconds = time.time() - self.started
        self.accelerator.wait_for_everyone()
        report = {"config": dataclasses.asdict(self.cfg), "train_seconds": train_seconds, "processes": self.world,
                  "precision": self.precision, "lora_lr": self.lora_lr,
                  "distributed_type": self.accelerator.distributed_type.value,
                  "data_sha256": self.data_sha256, "model_sha256": self.model_sha256}
        if self.fsdp:  # parameters this process held as shards (the frozen base) and whole (LoRA)
            report["fsdp_sharded_params"] = sum(1 for p in self.peft_model.parameters() if hasattr(p, "to_local"))
            report["fsdp_replicated_lora_params"] = sum(1 for p in self.lora_params if not hasattr(p, "to_local"))
        if self.cfg.distill and self.cfg.distill_top_k:  # whether the teacher was cached, and when it was freed
            report["teacher_cache"] = self.teacher_cache.stats if self.teacher_cache is not None else None
        final = self.final_decisions()
        if self.decider.prunes and self.world > 1:
            self.check_same_decisions(final)
            report["decisions_identical_across_processes"] = True
        self.export_model = self.gathered_model() if self.fsdp else None  # every process takes part
        if not self.accelerator.is_main_process:
            return report
        report.update(self.report(final, *self.export(final)))
        write_text_atomic(self.run_dir / "report.json", json.dumps(report, indent=2))
        if self.outputs is not None:
            self.outputs.finish()
        else:  # a resumed run: what a run it replaced left aside goes too
            discard_replaced(self.run_dir)
        if self.cfg.gguf:  # after the report, so that a GGUF error leaves the run's results in place
            report["gguf"] = gguf_export.export_gguf(report["model_dir"], self.cfg.gguf, self.cfg.gguf_type,
                                                     overwrite=self.cfg.overwrite)
            self.accelerator.print(gguf_export.format_export(report["gguf"]))
            write_text_atomic(self.run_dir / "report.json", json.dumps(report, indent=2))
        return report

    # set-up

    def setup(self) -> None:
        """The strategies; accelerator and seed, run directory, model, data, LoRA and generator; two-stage
        baselines fix their decisions here."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        cfg = self.cfg
        self.decider = choose_decider(self)
        self.recovery = RECOVERIES[cfg.recovery](self)
        self.penalty = regularization.RATIO_PENALTIES[cfg.ratio_penalty](cfg.alpha)
        AcceleratorState._reset_state()  # a second run in one process may use other precision; the process group stays
        self.precision = self.choose_precision()
        self.accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                                       mixed_precision=self.precision["mixed_precision"])
        self.world = self.accelerator.num_processes
        fsdp_on_cpu(self.accelerator)
        self.fsdp = self.accelerator.distributed_type.value == "FSDP"
        self.recovery.check_distribution(self.accelerator)
        if self.fsdp and cfg.quantize_base != "none":
            raise ATPError("--quantize-base does not shard under FSDP (accelerate keeps bitsandbytes' uint8 weights "
                           "whole on every process); use DDP or one process with a quantized base")
        set_seed(cfg.seed)
        self.check_run_dir()
        if cfg.gguf and self.accelerator.is_main_process:  # before any work: a GGUF that cannot be written
            gguf_export.check_target(cfg.gguf, cfg.overwrite, inputs=self.input_paths())
        self.started = time.time()
        self.setup_model()
        self.check_refit()
        self.decider.read_inputs()
        if cfg.gguf:  # or that the model cannot become
            gguf_export.check_source_model(self.model.config.to_dict(), self.tokenizer, cfg)
        self.setup_data()
        self.protect_outliers()
        self.setup_lora()
        self.decider.setup_gates()
        self.setup_teacher()
        self.setup_run_dir()
        if self.fsdp:  # FSDP shards the frozen base; LoRA stays whole on every process (see reduce_lora_grads)
            self.accelerator.state.fsdp_plugin.ignored_modules = lora_modules(self.peft_model)
        self.peft_model, self.opt_lora = self.accelerator.prepare(self.peft_model, self.opt_lora)
        self.decider.after_prepare()

    def choose_precision(self) -> dict:
        """--mixed-precision auto resolved once, before the model loads (atp.precision). Several processes decide by
        the CPU's flags alone: a timing could differ between them, and they must agree."""
        import os

        from .precision import choose, mlp_shape

        cfg = self.cfg
        if cfg.mixed_precision != "auto":
            return {"mixed_precision": cfg.mixed_precision, "requested": cfg.mixed_precision, "reason": "as given"}
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            choice = choose("auto", device, 0, 0, measure=lambda hidden, intermediate: float("inf"))
            if "bf16_matmul_speedup" in choice:
                choice.pop("bf16_matmul_speedup")
                choice["reason"] = "several processes: the CPU has native bf16 (no timing, so that all agree)"
            return choice

        def shape() -> tuple[int, int]:
            from transformers import AutoConfig

            from .models import resolve_model

            return mlp_shape(AutoConfig.from_pretrained(resolve_model(cfg.model), trust_remote_code=False))

        dims = functools.cache(shape)
        return choose("auto", device, lambda: dims()[0], lambda: dims()[1])

    def check_run_dir(self) -> None:
        """Before any work: (resume) the newest intact checkpoint of this config and data; (a new run) a folder
        that holds a run needs --overwrite. Temp folders of a killed run (an export, a checkpoint) are removed.
        The main process locks the folder for the whole run; no run writes over its own inputs."""
        if self.accelerator.is_main_process:
            check_out_path(self.cfg.out)
            check_not_inside_inputs(self.cfg.out, self.input_paths())
            acquire(self.run_dir)
            self.locked = True
        if self.resume:
            if self.accelerator.is_main_process:
                restore_interrupted(self.run_dir)
                clean_stale_temps(self.run_dir)
            found = checkpoint.latest_valid(self.run_dir)
            if found is None:
                raise ATPError(f"--resume {self.run_dir}: no intact checkpoint to resume from")
            if found[1]["fingerprint"] != fingerprint(self.cfg):
                raise ATPError(f"--resume {self.run_dir}: checkpoint {found[0].name} was made with a different "
                               "config")
            check_same_data(found[1].get("data_sha256"), self.cfg, f"--resume {self.run_dir}")
            self.model_sha256 = check_same_model(found[1].get("model_sha256"), self.cfg, f"--resume {self.run_dir}")
            self.resume_from, self.resume_manifest = found
        elif self.accelerator.is_main_process:
            self.outputs = RunOutputs(self.cfg)
            self.outputs.check()

    def input_paths(self) -> dict:
        """The local files and folders this run reads, by the option that names them."""
        from . import data

        cfg = self.cfg
        inputs = {"--model": cfg.model}
        if cfg.teacher != "self":
            inputs["--teacher"] = cfg.teacher
        if cfg.decisions_from:
            inputs["--decisions-from"] = cfg.decisions_from
        for i, entry in enumerate(cfg.train_files):
            inputs[f"--train-file #{i + 1}"] = entry.partition("=")[2]
        if cfg.domain:
            with contextlib.suppress(ATPError):  # a missing data folder or file is reported when the data load
                root = data.resolve_data_dir(cfg.data_dir)
                if root is not None:
                    inputs["--data-dir"] = root
        return inputs

    def setup_run_dir(self) -> None:
        """Every input checked: a new run replaces the earlier outputs in its folder (kept aside until its first
        checkpoint) and writes its config.yaml."""
        self.data_sha256 = data_sha256(self.cfg)
        if self.outputs is not None:
            self.outputs.start(self.given)

    def setup_model(self) -> None:
        """Model and tokenizer, and the pruning space read from the model's config."""
        cfg = self.cfg
        self.model, self.tokenizer = load_model(cfg.model, attn_implementation=cfg.attn_implementation)
        if not self.resume:  # a resume has them from check_run_dir
            self.model_sha256 = model_sha256(cfg)
        check_supported(self.model.config)
        if cfg.quantize_base != "none":  # QLoRA: frozen decoder projections in NF4 / int8 on the device
            from .quantize import quantize_base

            quantize_base(self.model, cfg.quantize_base, device=self.accelerator.device)
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and cfg.max_length > context:
            self.accelerator.print(f"note: --max-length {cfg.max_length} exceeds the model's context of {context} "
                                   f"tokens; sequences are truncated to {context}")
            cfg.max_length = context
        self.space = PruningSpace.from_config(self.model.config, kinds=cfg.space, sparsity_of=cfg.sparsity_of,
                                              **space_options(cfg))
        self.rule = ShapeRule(uniform=cfg.uniform, round_to=cfg.round_to)
        if cfg.prune:
            check_reachable(self.space, cfg.sparsity)
            self.rule.check(self.space)

    def protect_outliers(self) -> None:
        """Structures a selected kind never prunes (`GateKind.protect`: hidden blocks with a massive activation), found
        on the dense model and the first calibration examples, before LoRA and gates exist."""
        cfg = self.cfg
        if not cfg.prune:
            return
        rows = [row["input_ids"] for row in self.calib_rows[:cfg.calib_batches]]
        for kind in self.space.kind_objects:
            protected = kind.protect(self.space, self.model, rows, cfg)
            if protected is not None:
                self.rule.keep[kind.name], note = protected
                self.accelerator.print(note)

    def protected_hidden_blocks(self) -> list[int]:
        keep = next(iter(self.rule.keep.values()), None)
        return [] if keep is None else torch.nonzero(keep[0]).flatten().tolist()

    def setup_data(self) -> None:
        """Tokenized training rows and, when pruning, a held-out calibration slice (generator steps, baselines'
        scores); endless shuffled batch streams over both."""
        cfg, pad_id = self.cfg, self.tokenizer.pad_token_id
        examples = load_training_examples(cfg)
        self.train_examples, calib_examples = split_calibration(cfg, examples)
        rows, self.truncated = tokenize_all(self.tokenizer, self.train_examples, cfg.max_length)
        self.train_rows = rows
        calib_length = cfg.calib_max_length or max(16, cfg.max_length // 2)
        self.calib_rows, _ = tokenize_all(self.tokenizer, calib_examples, calib_length)
        needed = cfg.batch_size * self.world
        if len(rows) < needed or (cfg.prune and len(self.calib_rows) < needed):
            raise ATPError(
                f"too little training data: {len(rows)} training and {len(self.calib_rows)} calibration examples "
                f"for batch size {cfg.batch_size} x {self.world} process(es); add data or lower --batch-size"
            )
        if self.truncated:
            self.accelerator.print(f"note: {self.truncated} of {len(self.train_examples)} training examples were "
                                   f"truncated to {cfg.max_length} tokens")
        if cfg.packing:
            check_packing(self.model, cfg.attn_implementation)
        rank = self.accelerator.process_index
        self.train_iter = batches(rows, cfg.batch_size, pad_id, cfg.seed, rank, self.world,
                                  pack_width=cfg.max_length if cfg.packing else None)
        self.calib_iter = (batches(self.calib_rows, cfg.batch_size, pad_id, cfg.seed + 1, rank, self.world)
                           if cfg.prune else None)

    def setup_lora(self) -> None:
        """LoRA adapters on the frozen model, their AdamW and learning-rate schedule."""
        from peft import LoraConfig, get_peft_model

        cfg, model = self.cfg, self.model
        self.prepare_for_lora(model)
        self.lora_config = lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=validation.lora_targets_in(model, cfg.lora_targets), task_type="CAUSAL_LM")
        import warnings

        with warnings.catch_warnings():  # peft reads transformers 5's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            self.peft_model = get_peft_model(model, lora)
        self.lora_params = lora_params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.lora_lr = cfg.lr if cfg.lr is not None else default_lr(model.config.get_text_config().hidden_size)
        self.opt_lora = self.make_lora_optimizer(lora_params)
        self.optimizers = {"lora": self.opt_lora}  # checkpoints hold them as they are before accelerate wraps them
        # a lambda, not the bound method: LambdaLR's state_dict records a callable object's attributes
        factor = self.schedule.lora_lr_factor
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt_lora, lambda updates: factor(updates))

    def prepare_for_lora(self, model) -> None:
        """No KV cache while training, and gradient checkpointing if asked (also for the compacted model)."""
        model.config.use_cache = False
        if self.cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()

    def make_lora_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lora_lr, weight_decay=0.0)

    def setup_teacher(self) -> None:
        """With --distill: the teacher whose next-token distributions the model matches (atp.distill)."""
        from .distill import ModelTeacher, SelfTeacher

        self.teacher = self.teacher_cache = None
        if self.cfg.distill == 0:
            return
        if self.cfg.teacher == "self":
            gates_off = self.controller.disabled if self.controller is not None else contextlib.nullcontext
            self.teacher = SelfTeacher(self.peft_model, gates_off)
        else:
            self.teacher = ModelTeacher.from_run(self.cfg.teacher, self.accelerator.device, self.model.config.vocab_size)
        if self.cfg.distill_top_k:
            self.setup_teacher_cache()

    def setup_teacher_cache(self) -> None:
        """--distill-top-k: every training row's targets in the cache (the main process computes those missing
        while the others wait); where no generator step follows, the live teacher goes at once."""
        from . import teacher_cache

        cfg, accelerator = self.cfg, self.accelerator
        vocab = self.model.config.vocab_size
        opened = lambda: teacher_cache.open_for_run(cfg, self.model_sha256, data_sha256(cfg), vocab,  # noqa: E731
                                                    note=accelerator.print)
        if accelerator.is_main_process:
            cache = opened()
            if cache is not None:
                model = accelerator.unwrap_model(self.peft_model).to(accelerator.device)  # as prepare() would
                was_training = model.training
                model.eval()  # no dropout in the targets (as atp compare's pre-pass computes them)
                cache.fill(self.train_rows, self.teacher.logits, self.tokenizer.pad_token_id, accelerator.device,
                           self.progress)
                model.train(was_training)
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            cache = opened()
        if cache is None:
            return
        cache.restrict(self.train_rows)
        self.teacher_cache = cache
        if not self.decider.learns:  # no generator steps, the only ones that need the live teacher
            self.release_live_teacher(0)

    def release_live_teacher(self, step: int) -> None:
        """With every training row cached and no generator step left, the live teacher (for the self teacher after
        compaction or --recovery full: a dense copy of the model) is not needed: free it."""
        if self.teacher_cache is not None and self.teacher is not None:
            self.teacher = None
            self.teacher_cache.stats["live_teacher_freed_at"] = step

    @functools.cached_property
    def compaction_step(self) -> int | None:
        """The step after which the trained model is compacted (atp.compaction): 0 for decisions fixed before
        tuning, the freeze for ATP; None without --compact, when no step follows the decisions, for a pruning space
        whose masks are not physical removal, where parameters are sharded, or on a quantized base."""
        cfg, step = self.cfg, self.decider.compaction_step
        sharded = self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED", "MEGATRON_LM")
        if step is None or not cfg.compact or not self.space.exact or sharded or cfg.quantize_base != "none":
            return None
        return step if step < cfg.max_steps else None

    def check_refit(self) -> None:
        """--refit ls needs the compaction, which the model and the launch can still rule out (the config's own
        checks come first, in ATPConfig.validate)."""
        if self.cfg.refit == "none" or self.compaction_step is not None:
            return
        sharded = self.accelerator.distributed_type.value
        why = (f"{sharded} shards the parameters, and sharded runs train the masked model"
               if sharded in ("FSDP", "DEEPSPEED", "MEGATRON_LM") else
               f"the pruning space ({', '.join(self.cfg.space)}) is not exact under physical removal on this model, so "
               "it trains the masked model" if not self.space.exact else
               "no step follows the fixed decisions (lower --generator-frac or raise --max-steps)")
        raise ATPError(f"--refit {self.cfg.refit} refits the kept weights when compaction removes the pruned "
                       f"structures, and this run never compacts: {why}; run without --refit")

    def capture_refit(self, model, decisions: dict) -> tuple[dict, dict]:
        """--refit ls, before compaction: the refit base weights from the unmasked model (every structure kept,
        LoRA included) on the calibration batches, each process on its share of them (atp.refit)."""
        from . import refit
        from .models import rng_untouched

        accelerator = self.accelerator
        data = self.decider.calibration_batches()[accelerator.process_index::self.world]
        reduce = (lambda t: accelerator.reduce(t, reduction="sum")) if self.world > 1 else None
        was_training = model.training
        model.eval()
        try:
            with rng_untouched(), self.controller.disabled():
                weights, summary = refit.refit_weights(model, self.space.kept_structure(decisions), data,
                                                       accelerator.device, reduce=reduce)
        finally:
            model.train(was_training)
        summary["refit_calibration_batches"] = self.cfg.calib_batches
        return weights, summary

    def refit_state(self) -> tuple[dict, dict] | None:
        """What a checkpoint saves of the refit: the compact model's refit base weights now, and the summary."""
        if self.compaction_refit is None:
            return None
        from .refit import current

        return current(self.accelerator.unwrap_model(self.peft_model), self.refit_names), self.compaction_refit

    def compact_now(self, decisions: dict, step: int, verify: bool = True, refit_from=None) -> None:
        """Remove the pruned structures from the trained model, its LoRA and the LoRA optimizer's state, and go
        on with the smaller model. The self teacher keeps the dense weights. verify: the compact model's logits
        must equal the masked model's (fp32 tolerance) on a few training texts. With --refit ls the kept columns
        of the output projections are then refit (atp.refit), from the unmasked model before compaction, or, on
        a resume, from the checkpoint at `refit_from`."""
        from .compaction import compact, compact_optimizer, kept_params
        from .distill import SelfTeacher
        from .models import rng_untouched

        accelerator, cfg = self.accelerator, self.cfg
        # the larger model goes after this; its mixed-precision wrapper too, so that the check runs in fp32
        model = accelerator.unwrap_model(self.peft_model, keep_fp32_wrapper=False)
        probe = {k: v.to(accelerator.device) for k, v in sample_texts(self.tokenizer, self.train_examples).items()}
        refit = None
        if cfg.refit == "ls":
            refit = checkpoint.load_refit(refit_from) if refit_from is not None else self.capture_refit(model,
                                                                                                        decisions)
        if verify:
            self.controller.use("both")
            self.controller.set(decisions)
            with torch.no_grad():
                reference = model.eval()(**probe).logits.float()
        before = kept_params(model)
        with rng_untouched():
            new_model, dense, mapping = compact(model, self.space.kept_structure(decisions), self.prepare_for_lora)
        self.controller.remove()
        self.controller = None
        self.release_live_teacher(step)
        if isinstance(self.teacher, SelfTeacher):
            self.teacher = SelfTeacher(dense.requires_grad_(False).eval(), contextlib.nullcontext)
        del dense
        old_optimizer, lr = self.optimizers["lora"], self.optimizers["lora"].param_groups[0]["lr"]
        optimizer = compact_optimizer(old_optimizer, mapping, self.make_lora_optimizer)
        factor = self.schedule.lora_lr_factor
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda updates: factor(updates))
        scheduler.load_state_dict(self.lr_scheduler.state_dict())
        optimizer.param_groups[0]["lr"] = lr
        for attribute, old in (("_models", self.peft_model), ("_optimizers", self.opt_lora)):
            if hasattr(accelerator, attribute):  # let the larger model go
                setattr(accelerator, attribute, [x for x in getattr(accelerator, attribute) if x is not old])
        self.compacted = True
        self.compaction = {"step": step, "base_params_before": before, "base_params_after": kept_params(new_model),
                           "lora_steps_before": len(self.step_times["lora"])}
        if verify:  # in fp32, before accelerate wraps the new model's forward for mixed precision
            with torch.no_grad():
                logits = new_model.eval()(**probe).logits.float()
            real = probe["attention_mask"].bool()
            diff = float((logits - reference)[real].abs().max())
            allowed = max(cfg.check_tolerance, COMPACTION_TOLERANCE) * max(1.0, float(reference[real].abs().max()))
            self.compaction.update(max_abs_logit_diff=diff, allowed=allowed)
            if not diff <= allowed:
                raise ATPError(f"internal error: the compacted model does not compute what the masked model did "
                               f"(max |logit diff| {diff:.3g} > {allowed:.3g}); run with --no-compact and report it")
            accelerator.print(f"compacted after step {step}: {before:,} -> {self.compaction['base_params_after']:,} "
                              f"base parameters (max |logit diff| {diff:.2e})")
        if refit is not None:  # after the check: the refit model computes something else by design
            from .refit import apply

            weights, self.compaction_refit = refit
            apply(new_model, weights)
            self.refit_names = sorted(weights)
            self.compaction.update(self.compaction_refit)
            if refit_from is None:
                ratio = self.compaction_refit["refit_output_error_ratio"]
                accelerator.print(f"--refit ls: {len(weights)} output projections refit on "
                                  f"{self.compaction_refit['refit_calibration_tokens']:,} calibration tokens"
                                  + (f"; output error {ratio:.3f} of plain slicing's (mean)" if ratio is not None
                                     else ""))
        self.peft_model, self.opt_lora = accelerator.prepare(new_model, optimizer)
        self.optimizers["lora"], self.lr_scheduler = optimizer, scheduler
        self.lora_params = list(mapping)
        new_model.train()

    def load_checkpoint(self) -> int:
        """Resume: LoRA, generator, optimizers, learning-rate schedule and RNG from the checkpoint; the batch
        streams skip what the run used; the log keeps its lines up to the checkpoint. Returns the next step."""
        cfg, path = self.cfg, self.resume_from
        step = self.resume_manifest["step"]
        if self.compaction_step is not None and step >= self.compaction_step:  # saved from the compacted model
            self.compact_now(self.decider.saved_decisions(path), self.compaction_step, verify=False, refit_from=path)
        done = checkpoint.load(path, self.accelerator.unwrap_model(self.peft_model), self.generator, self.optimizers,
                               self.lr_scheduler)
        self.recovery.resume(path, done)
        self.accelerator.print(f"resuming {self.run_dir} from {path.name}")
        for _ in range(done * cfg.grad_accum):  # the same batches an uninterrupted run would see next
            next(self.train_iter)
        for _ in range(self.schedule.generator_steps_until(done) * cfg.generator_batches):
            next(self.calib_iter)
        if self.log_path.exists() and self.accelerator.is_main_process:
            kept = [line for line in self.log_path.read_text().splitlines() if json.loads(line)["step"] <= done]
            self.log_path.write_text("".join(line + "\n" for line in kept))
        self.decider.resume(path, done)  # fixed decisions; the generator's decisions.jsonl up to the checkpoint
        return done + 1

    # the loop

    def train_loop(self, first_step: int) -> None:
        """Steps first_step .. max_steps; the schedule says which phase each step is in, the strategies what
        happens in it."""
        from tqdm.auto import tqdm

        cfg, decider = self.cfg, self.decider
        decider.start(first_step)
        self.bar = tqdm(range(first_step, cfg.max_steps + 1), initial=first_step - 1, total=cfg.max_steps,
                        desc=decider.label, disable=not (self.progress and self.accelerator.is_main_process))
        self.peft_model.train()
        for step in self.bar:
            # --recovery full: where the fixed-decision phase begins, LoRA is merged and every decoder weight trains
            self.recovery.begin(step)
            # generator phase: every generator_every-th step begins with a generator step (LoRA frozen)
            new_decisions = decider.decide(step)
            # LoRA step (generator frozen) on the current decisions, then the group-lasso proximal step
            self.lora_step(step, new_decisions)
            # the generator phase ends with this step: calibrate the decisions to the target and freeze them
            decider.freeze_step(step)
            # log line and checkpoint
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                self.log(step)
            if cfg.save_every and step % cfg.save_every == 0 and self.accelerator.is_main_process:
                self.save_checkpoint(step)
        self.bar.close()

    def batch_loss(self, data: Batch) -> torch.Tensor:
        """The objective on one batch: the mean token loss of this process's shard, normalised by the global
        batch's label tokens, mixed with the distillation loss when --distill is set. The parts are kept in
        self.loss_parts for the log."""
        batch = {k: v.to(self.accelerator.device) for k, v in data.inputs.items()}
        out = self.peft_model(**batch, num_items_in_batch=data.tokens)
        task = out.loss * self.world
        self.loss_parts = {"task": task.detach()}
        if self.cfg.distill == 0 or not self.distilling:
            return task
        from .distill import kd_loss, topk_kd_loss
        from .teacher_cache import top_k_targets

        mask, t, k = data.mask.to(out.logits.device), self.cfg.distill_temperature, self.cfg.distill_top_k
        targets = self.teacher_cache.lookup(batch, mask) if self.teacher_cache is not None else None
        if targets is None and self.teacher is None:
            raise ATPError("internal error: a training batch is missing from the teacher cache and the live teacher "
                           "was freed; run with --distill-top-k 0 and report it")
        if targets is None:
            with self.accelerator.autocast():
                teacher_logits = self.teacher.logits(batch)
            if k:  # a calibration batch, or no cache: the live teacher's top k
                targets = top_k_targets(teacher_logits, k, t)
        # normalised by the global batch's real tokens, as task is
        kd = (topk_kd_loss(out.logits, targets, mask, t, tokens=data.real) if targets is not None
              else kd_loss(out.logits, teacher_logits, mask, t, tokens=data.real)) * self.world
        self.loss_parts["kd"] = kd.detach()
        return (1 - self.cfg.distill) * task + self.cfg.distill * kd

    @contextlib.contextmanager
    def teacher_for_generator(self):
        """--no-distill-generator: generator steps see no teacher (task loss alone); LoRA steps keep it."""
        self.distilling = self.cfg.distill_generator
        try:
            yield
        finally:
            self.distilling = True

    def lora_step(self, step: int, new_decisions: bool) -> None:
        """LoRA step under the step's mask mode (the frozen path only while the generator searches, with the
        default lora_mask), then the group-lasso proximal step on the LoRA of pruned groups. lasso lr-scaled
        also adds lambda_t * group lasso to the loss. new_decisions: take the generator's decisions first.
        In the full recovery phase the same step trains every decoder weight instead (no group lasso: LoRA is
        merged in and zero)."""
        cfg, accelerator, schedule = self.cfg, self.accelerator, self.schedule
        t0 = time.perf_counter()
        update = self.recovery.update(step)
        optimizer, scheduler = update.optimizer, update.scheduler
        self.decider.mask_lora_step(step, new_decisions)
        lasso_on = update.kind == "lora" and not self.compacted  # (nothing left to shrink once merged or compacted)
        lam = schedule.lasso_weight(step) if lasso_on else 0.0
        step_lr = optimizer.param_groups[0]["lr"]  # the learning rate of this step's update
        for _ in range(cfg.grad_accum):
            with accelerator.accumulate(self.peft_model):
                data = next(self.train_iter)
                self.token_counts["real"] += data.real
                self.token_counts["total"] += data.total
                loss = self.batch_loss(data)
                lasso = (regularization.group_lasso(self.peft_model, self.space, self.decisions) if lam > 0
                         else torch.zeros((), device=loss.device))
                total = loss + lam * lasso
                check_finite(step, task_loss=loss, group_lasso=lasso, loss=total)
                accelerator.backward(total)
                if accelerator.sync_gradients:
                    self.reduce_lora_grads()
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        if cfg.proximal and lam > 0:
            threshold = self.lr_scheduler.get_last_lr()[0] * lam
            regularization.proximal_step(self.peft_model, self.space, self.decisions, threshold=threshold)
        if lasso_on and schedule.lasso_fraction(step) > 0:
            regularization.ramp_proximal_step(self.peft_model, self.space, self.decisions, schedule.lasso_fraction(step))
            lasso = torch.tensor(self.pruned_lora_norm(self.decisions))
        if lasso_on and schedule.exp_growth(step) > 0:
            regularization.exp_ramp_proximal_step(self.peft_model, self.space, self.decisions,
                                                  cfg.lam * schedule.exp_growth(step) * step_lr)
            lasso = torch.tensor(self.pruned_lora_norm(self.decisions))
        self.step_times[update.kind].append(time.perf_counter() - t0)
        self.window.add(**{f"{name}_loss": value.item() for name, value in self.loss_parts.items()},
                        group_lasso=lasso.item())

    def pruned_lora_norm(self, decisions) -> float:
        """Sum of the LoRA norms of the groups these decisions prune (0.0 exactly once the lasso zeroed them, or
        compaction removed them)."""
        if self.compacted:
            return 0.0
        return regularization_norm(self.peft_model, self.space, decisions)

    def log(self, step: int) -> None:
        """One line of log.jsonl: the means since the last line, lambda_t, the LoRA lr, decisions and flips."""
        record = {"step": step, **self.window.means(), "lam": self.schedule.lasso_weight(step),
                  "lasso_fraction": self.schedule.lasso_fraction(step),
                  "lr": self.recovery.scheduler().get_last_lr()[0], "flips": self.flips}
        if self.decisions is not None:
            sp = self.space.sparsity(self.decisions)
            record.update(ratio=1 - sp[f"{self.cfg.sparsity_of}_sparsity"], prunable_sparsity=sp["prunable_sparsity"],
                          model_sparsity=sp["model_sparsity"])
        if self.cfg.lasso == "exp-ramp":  # its threshold is lam * growth * lr, not lam_t or lasso_fraction
            record["lasso_growth"] = self.schedule.exp_growth(step)
        self.flips = 0
        if self.accelerator.is_main_process:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.bar.set_postfix(loss=f"{record['task_loss']:.3f}",
                             **({"sparsity": f"{record['prunable_sparsity']:.3f}"} if self.decider.prunes else {}))

    def save_checkpoint(self, step: int) -> None:
        checkpoint.save(self.run_dir, step, self.accelerator.unwrap_model(self.peft_model), self.generator,
                        self.optimizers, self.lr_scheduler, fingerprint(self.cfg), self.cfg.keep_checkpoints,
                        decisions=self.decider.checkpoint_decisions(), data_sha256=self.data_sha256,
                        model_sha256=self.model_sha256, full=self.recovery.checkpoint_state(),
                        refit=self.refit_state())
        if self.outputs is not None:
            self.outputs.checkpointed()  # from now on a failure leaves this run resumable

    # export and report

    def final_decisions(self) -> dict:
        return self.decider.final()

    def reduce_lora_grads(self) -> None:
        """FSDP: LoRA is outside the sharded parameters, so its gradients are averaged here, as DDP would."""
        if not self.fsdp:
            return
        for p in self.lora_params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)

    def gathered_model(self):
        """FSDP: the whole trained model, unsharded, on the main process (None elsewhere): every process sends
        its shards, the main process loads them into a fresh copy with the same LoRA and gate hooks."""
        from peft import get_peft_model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.peft_model, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
        if not self.accelerator.is_main_process:
            return None
        model, _ = load_model(self.cfg.model, attn_implementation=self.cfg.attn_implementation)
        model.config.use_cache = False
        fresh = get_peft_model(model, self.lora_config)
        fresh.load_state_dict(state)
        if self.controller is not None:
            self.controller.remove()
            self.controller = GateController(fresh, self.space, mode="both")
        return fresh

    def check_same_decisions(self, final: dict) -> None:
        mine = torch.cat([v.flatten() for v in final.values()]).to(self.accelerator.device)
        everyone = self.accelerator.gather(mine.unsqueeze(0))
        if not bool((everyone == everyone[0]).all()):
            raise ATPError("pruning decisions differ between processes; the run cannot be exported consistently")

    def export(self, final: dict):
        """Reference logits from the masked LoRA model (fp32), then merge, slice, save, reload and compare.
        Returns (model folder, logits check, exported model, LoRA norm left in pruned groups)."""
        cfg = self.cfg
        peft_model = self.export_model  # FSDP: gathered
        if peft_model is None:
            peft_model = self.accelerator.unwrap_model(self.peft_model, keep_fp32_wrapper=False)
        peft_model.eval()  # fp32 reference
        examples = self.train_examples
        probe = sample_texts(self.tokenizer, examples[::max(1, len(examples) // 4)][:4])
        # what group lasso left in pruned groups (nothing is left of them once compacted)
        pruned = self.decider.prunes and not self.compacted
        pruned_lora_norm = regularization_norm(peft_model, self.space, final) if pruned else 0.0
        controller = self.controller
        if controller is not None:
            controller.use("both")  # the export removes both paths
        model_dir, check, merged = export_checked(cfg, peft_model, controller, self.space, final, self.tokenizer, probe,
                                                  self.accelerator.device, self.run_dir / "model",
                                                  compacted=self.compacted)
        return model_dir, check, merged, pruned_lora_norm

    def lora_step_seconds_around_compaction(self) -> dict:
        """Mean seconds of the LoRA steps run here before and after the compaction (a resumed run: its own)."""
        times, n = self.step_times["lora"], self.compaction.get("lora_steps_before", 0)
        return {"mean_lora_step_seconds_masked": _mean(times[:n]), "mean_lora_step_seconds_compact": _mean(times[n:])}

    def decisions_only(self) -> dict:
        """--decide-only: the two-stage decisions and how they were chosen, in report.json; no tuning, no export."""
        self.accelerator.wait_for_everyone()
        cfg, space, final = self.cfg, self.space, self.final_decisions()
        decided = space.sparsity(final)
        report = {"config": dataclasses.asdict(cfg), "decide_only": True, "processes": self.world,
                  "precision": self.precision, "data_sha256": self.data_sha256, "model_sha256": self.model_sha256,
                  "method": self.decider.method, "target_sparsity": self.decider.target_sparsity,
                  "sparsity_of": cfg.sparsity_of, "decisions_sparsity": decided["prunable_sparsity"],
                  "decisions_model_sparsity": decided["model_sparsity"], "decisions_info": self.decider.info or {},
                  "dense_params": space.total_params(), "prunable_params": space.prunable_params(),
                  "dense_shape": dense_shape(self.space), **self.decider.decision_report(final),
                  "total_seconds": time.time() - self.started}
        if self.accelerator.is_main_process:
            write_text_atomic(self.run_dir / "report.json", json.dumps(report, indent=2))
            if self.outputs is not None:
                self.outputs.finish()
            self.accelerator.print(f"{self.decider.method}: decisions written to {self.run_dir / 'report.json'} "
                                   f"(--decide-only: no tuning, no model)")
        return report

    def report(self, final: dict, model_dir, check: dict, merged, pruned_lora_norm: float) -> dict:
        """What report.json records besides the config and the training time."""
        cfg, space, times = self.cfg, self.space, self.step_times
        exported = count_safetensors_params(model_dir)
        dense_total = space.total_params()
        kept = space.kept_structure(final)
        decided = space.sparsity(final)
        return {
            "logits_check": check,
            "pruned_lora_group_norm_sum": pruned_lora_norm,  # at export
            **self.decider.freeze_info,
            **({"compaction": {**self.compaction, **self.lora_step_seconds_around_compaction()}} if self.compacted
               else {}),
            "model_dir": str(model_dir),
            "exported_params": exported,
            "dense_params": dense_total,
            "prunable_params": space.prunable_params(),
            "prunable_sparsity": exported_sparsity(space, model_dir, "prunable"),
            "model_sparsity": exported_sparsity(space, model_dir, "model"),
            "target_sparsity": self.decider.target_sparsity,
            "sparsity_of": cfg.sparsity_of,
            "method": self.decider.method,
            "decisions_sparsity": decided["prunable_sparsity"],
            "decisions_model_sparsity": decided["model_sparsity"],
            "decisions_info": self.decider.info or {},
            "dense_shape": dense_shape(self.space),
            "hidden_size": merged.config.hidden_size,
            "mean_lora_step_seconds": _mean(times["lora"]),
            "mean_generator_step_seconds": _mean(times["generator"]),
            "generator_steps": len(times["generator"]),
            "truncated_examples": self.truncated,
            "mean_step_seconds": (sum(times["lora"]) + sum(times["full"]) + sum(times["generator"]))
                                 / max(1, len(times["lora"]) + len(times["full"])),
            "full_recovery_steps": len(times["full"]),
            "mean_full_step_seconds": _mean(times["full"]),
            # the training batches of the LoRA and full steps this process ran (after a resume: since then)
            "train_tokens": self.token_counts["real"],  # real (non-padding) tokens, all processes
            "train_tokens_per_second": self.token_counts["real"] / max(1e-9, sum(times["lora"]) + sum(times["full"])),
            "pad_fraction": 1 - self.token_counts["real"] / max(1, self.token_counts["total"]),
            "layers": [{**{k: v for k, v in widths.items() if k != "kv_map"}, **report_layer(layer)}
                       for widths, layer in zip(layer_widths(kept), kept)],
            "protected_hidden_blocks": self.protected_hidden_blocks(),
            "export_format": "heterogeneous" if is_heterogeneous(merged.config) else "uniform",
            **self.decider.decision_report(final),
            "total_seconds": time.time() - self.started,
        }

def fsdp_on_cpu(accelerator) -> None:
    """accelerate chooses FSDP only on top of an accelerator (MULTI_GPU and kin; accelerate.state, where it picks
    the distributed type); launched with an FSDP config on CPU it runs MULTI_CPU, a DDP over gloo. torch's FSDP2
    itself runs on CPU with gloo, so there atp switches accelerate's state to FSDP with the launcher's FSDP plugin:
    the same accelerate path (fsdp2_prepare_model) then runs in tests and CPU runs as on GPUs."""
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if (state.distributed_type == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
        if plugin.fsdp_version != 2:
            raise ATPError("FSDP on CPU runs with FSDP2 only (fsdp_version: 2 in the accelerate config, e.g. "
                           "configs/accelerate/fsdp2.yaml)")
        state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
        PartialState().distributed_type = DistributedType.FSDP  # AcceleratorState() copies it again later


def lora_modules(peft_model) -> list:
    """The LoRA matrices' modules (peft's lora_A / lora_B of every adapter)."""
    from peft.tuners.lora import LoraLayer

    return [module for layer in peft_model.modules() if isinstance(layer, LoraLayer)
            for pieces in (layer.lora_A, layer.lora_B) for module in pieces.values()]


def regularization_norm(peft_model, space, decisions) -> float:
    """Sum of the LoRA norms of the groups these decisions prune."""
    return sum(v["sum"] for v in regularization.pruned_norms(peft_model, space, decisions).values())


def _mean(values):
    return sum(values) / len(values) if values else 0.0


def check_reachable(space, sparsity: float) -> None:
    """The most the space can remove is everything but the fixed parameters (norms, output biases; the embeddings
    and LM head unless hidden channels are pruned, and one block of those stays)."""
    most = 1 - float(space.remaining_ratio(space.fewest_gates()))
    if sparsity > most - 0.01:
        of = "whole model's parameters" if space.sparsity_of == "model" else "prunable parameters"
        raise ATPError(f"--sparsity {sparsity} cannot be reached: this pruning space can remove at most "
                       f"{most:.4f} of the {of} (norms and output biases stay)")
