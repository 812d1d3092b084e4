"""The recipe's own options of `atp prune` (one dataclass field each, with its --help text) and their pure checks.

This module is a leaf: it imports nothing from atp but `errors`. The pruning space's options (--space and each
kind's options) live with the kinds (`atp.kinds`), and `atp.options` composes both into `ATPConfig`, with the checks
and record helpers that need other modules (fingerprint, resume, data and model stamps)."""
from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field

from .errors import ATPError

# distillation from the dense model when pruning: at equal time it ties on ROUGE-L and wins perplexity, at equal
# steps it wins both (docs/benchmarks.md, eighth session)
DEFAULT_DISTILL = 0.5
MIN_LENGTH = 2  # tokens of a sequence with a next-token loss: one to read, one to predict
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# --recipe: the defaults of the options each recipe sets (an option given explicitly wins). "paper": the search of
# the authors' released code (LoRA-aware forward on the q/k/v and gate/up outputs only, a back-loaded proximal
# lasso, the full target from the first step, AdamW 1e-3 clipped at 1.0, soft Gumbel-sigmoid gates at T 0.4,
# sampled masks in LoRA steps, no distillation in generator steps, calibration at the training length)
RECIPES = {
    "default": {"lora_mask": "frozen", "lasso": "ramp", "target_warmup": 0.5, "generator_lr": 1e-2,
                "generator_clip": 0.0, "temperature": 1.0, "generator_gates": "hard",
                "lora_decisions": "deterministic", "distill_generator": True},
    "paper": {"lora_mask": "frozen-qkv", "lasso": "exp-ramp", "target_warmup": 0.0, "generator_lr": 1e-3,
              "generator_clip": 1.0, "temperature": 0.4, "generator_gates": "soft",
              "lora_decisions": "sampled", "distill_generator": False},
}
# --lam's default per --lasso: exp-ramp's threshold is lam * growth * LoRA lr * a layer's share of the pruned
# groups, with the authors' 50000 (alignment_function_llm.py groupproximal, train_llm_disp.py grad_mul)
DEFAULT_LAM = {"ramp": 1.0, "lr-scaled": 1.0, "exp-ramp": 50000.0}
# --lr's default: the best rate measured on SmolLM2-135M (hidden 576; docs/benchmarks.md, "More recovery per step"),
# inversely proportional to the width of wider models: 2.1e-4 at 4096 and 1.1e-4 at 8192, near QLoRA's published
# 2e-4 (7B, 13B) and 1e-4 (33B, 65B) and the ATP authors' 1e-4 for LLaMA2-7B; narrower models are not extrapolated
LR_AT_WIDTH = (1.5e-3, 576)


def default_lr(hidden_size: int) -> float:
    """--lr's default for a model this wide."""
    rate, width = LR_AT_WIDTH
    return rate * min(1.0, width / hidden_size)


@dataclass
class RecipeOptions:
    """The options of `atp prune` that are not the pruning space's (`atp.options.ATPConfig` adds those)."""

    model: str = field(default="smollm2-135m", metadata={"help": "embedded name (smollm2-135m), local HF folder, or hub id"})
    domain: str | None = field(default="healthcare", metadata={"help": "training domain: healthcare or legal"})
    train_files: list[str] = field(default_factory=list, metadata={
        "help": "extra training data as TASK=PATH.jsonl (repeatable)"})
    data_dir: str | None = field(default=None, metadata={
        "help": "folder with the domain JSONL files (default: $ATP_DATA_DIR or ../shared/data)"})
    out: str = field(default="runs/atp", metadata={"help": "run directory; the exported model lands in OUT/model"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing, non-empty run directory (and an existing --gguf file)"})
    prune: bool = field(default=True, metadata={
        "help": "--no-prune runs plain LoRA fine-tuning with the same loop (the dense + LoRA baseline)"})
    method: str = field(default="atp", metadata={
        "help": "atp (one-stage), or a two-stage baseline whose decisions are fixed on the pretrained model before "
                "LoRA tuning: taylor, magnitude, activation, random, frozen-generator (see atp.baselines)"})
    sparsity: float = field(default=0.4, metadata={
        "help": "target fraction of parameters to remove, in (0, 1): of the prunable (decoder-block) parameters or "
                "of the whole model (--sparsity-of)"})
    sparsity_of: str = field(default="prunable", metadata={
        "help": "what --sparsity is a fraction of: prunable (the decoder blocks' parameters) or model (every "
                "parameter, embeddings and LM head included, which --space hidden also shrinks)"})
    uniform: bool = field(default=False, metadata={
        "help": "keep the same widths in every layer, so the export is a plain LlamaForCausalLM / Qwen2ForCausalLM "
                "/ MistralForCausalLM checkpoint"})
    round_to: int = field(default=0, metadata={
        "help": "keep MLP widths at multiples of this many channels (a multiple of --mlp-block), for "
                "hardware-friendly shapes"})
    recipe: str = field(default="default", metadata={
        "help": "a set of defaults: default, or paper (the authors' search: --lora-mask frozen-qkv, --lasso exp-ramp, "
                "--target-warmup 0, --generator-lr 1e-3, --generator-clip 1.0, --temperature 0.4, --generator-gates "
                "soft, --lora-decisions sampled, --no-distill-generator, --calib-max-length at --max-length); an "
                "option given explicitly wins"})
    decisions_from: str | None = field(default=None, metadata={
        "help": "a finished run directory whose final decisions (report.json) this run uses as fixed two-stage "
                "decisions: no generator, compaction at step 0 (the run must have the same model shape and pruning "
                "space)"})
    decide_only: bool = field(default=False, metadata={
        "help": "a two-stage --method only: choose the decisions, write them to report.json and stop (no tuning, no "
                "export); another run reuses them with --decisions-from"})
    max_steps: int = field(default=200, metadata={"help": "training steps (optimizer updates)"})
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    packing: bool = field(default=False, metadata={
        "help": "pack whole training examples into rows of exactly --max-length tokens (first fit, in the shuffled "
                "order), with positions restarting at each example and no attention across examples, instead of "
                "padding each batch to its longest example; calibration batches stay unpacked"})
    lr: float | None = field(default=None, metadata={
        "help": "peak LoRA learning rate (default: by the model's hidden size, 1.5e-3 up to 576 wide as SmolLM2-135M, "
                "then 1.5e-3 x 576 / hidden size: about 2.1e-4 for 4096-wide 7-8B models, 1.1e-4 for 8192-wide 70B "
                "ones; report.json records it)"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    generator_lr: float | None = field(default=None, metadata={
        "help": "the generator's AdamW learning rate (by --recipe: 1e-2, paper 1e-3)"})
    generator_hidden: int = 64
    temperature: float | None = field(default=None, metadata={
        "help": "Gumbel-sigmoid temperature of the generator's gates: with --generator-gates hard it shapes only the "
                "straight-through gradient (by --recipe: 1.0, paper 0.4)"})
    generator_gates: str | None = field(default=None, metadata={
        "help": "gate values in generator steps: hard (0/1 decisions forward, sigmoid gradients backward) or soft "
                "(the Gumbel-sigmoid values themselves, as the authors' code; the ratio loss still counts hard "
                "decisions) (by --recipe: hard, paper soft)"})
    offset: float = 3.0
    generator_init: str = field(default="keep", metadata={
        "help": "the generator's starting logits: keep (every gate at --offset, the search's ranking all learned) or "
                "taylor (each gate's bias from its taylor importance on the calibration batches, ranked across "
                "layers as FLAP standardises, spread over +-offset/2: every gate still starts kept, and the ratio "
                "pressure prunes the least important first); atp and frozen-generator only"})
    generator_every: int = field(default=2, metadata={"help": "one generator step per this many LoRA steps"})
    calib_max_length: int | None = field(default=None, metadata={
        "help": "token length of calibration sequences for generator steps (default: max_length // 2; with "
                "--recipe paper max_length)"})
    generator_frac: float = field(default=0.6, metadata={
        "help": "freeze the generator after this fraction of steps; LoRA then finishes on fixed decisions "
                "(1.0: the generator trains to the end and is calibrated to the target just before export)"})
    restart_lr: bool = field(default=True, metadata={
        "help": "restart the LoRA learning-rate schedule (warm-up, cosine) when the generator freezes, so the "
                "fixed-decision phase recovers at the full learning rate (--no-restart-lr: one cosine over the run)"})
    calib_fraction: float = field(default=0.1, metadata={
        "help": "fraction of training examples held out for generator steps"})
    calib_batches: int = field(default=8, metadata={
        "help": "calibration batches for the importance scores of the taylor and activation baselines"})
    alpha: float = field(default=50.0, metadata={"help": "weight of the parameter-ratio loss"})
    target_warmup: float | None = field(default=None, metadata={
        "help": "fraction of the generator phase over which the ratio target moves from 1 to 1 - sparsity (0: the "
                "full target from the first step) (by --recipe: 0.5, paper 0)"})
    lam: float | None = field(default=None, metadata={
        "help": "group-lasso strength. With --lasso ramp: the proximal threshold is min(1, lam * step / freeze step) "
                "times the largest pruned group's LoRA norm, so lam >= 1 zeroes every pruned group by the freeze; "
                "with --lasso lr-scaled: the lasso loss weight. 0 turns group lasso off (an ablation); not used by "
                "the two-stage baselines; with --lasso exp-ramp: see there (default 1, with exp-ramp 50000)"})
    lasso: str | None = field(default=None, metadata={
        "help": "group lasso on the LoRA of pruned groups: ramp (a proximal step whose threshold grows to the "
                "largest pruned group's norm at the freeze, independent of Adam's step size), lr-scaled (lam * group "
                "lasso in the loss and a proximal threshold of lr * lam) or exp-ramp (the authors': after each LoRA "
                "step of the generator phase a proximal threshold of lam * (e^(t/T) - 1) / (e - 1) * LoRA lr * the "
                "layer's share of the pruned groups of that kind, T the freeze step; every pruned group cut to zero "
                "at the freeze) (by --recipe: ramp, paper exp-ramp)"})
    proximal: bool = field(default=True, metadata={
        "help": "with --lasso lr-scaled, also take the proximal step (--no-proximal: the loss term only)"})
    lora_mask: str | None = field(default=None, metadata={
        "help": "where a pruning decision acts in LoRA steps while the generator searches: frozen (the frozen "
                "weights of the structure only; its LoRA keeps learning until group lasso zeroes it), frozen-qkv "
                "(the frozen outputs of q/k/v and gate/up only: a pruned structure's LoRA activation still leaves "
                "through the frozen o_proj / down_proj, as in the authors' code), both (frozen and LoRA paths: a moving two-stage mask, an ablation), or "
                "frozen-output (the frozen path of o_proj/down_proj only, an ablation). "
                "Generator steps, and every step after the generator freezes, mask both paths (by --recipe: frozen, paper "
                "frozen-qkv)"})
    lora_decisions: str | None = field(default=None, metadata={
        "help": "decisions that mask LoRA steps in the generator phase: deterministic (the generator's hard "
                "decisions) or sampled (a fresh hard Gumbel sample every LoRA step: structured dropout) (by --recipe: "
                "deterministic, paper sampled)"})
    generator_batches: int = field(default=1, metadata={
        "help": "calibration batches per generator step (their task losses are averaged; more batches, less noise)"})
    generator_clip: float | None = field(default=None, metadata={
        "help": "clip the generator's gradient norm to this (0: no clipping) (by --recipe: 0, paper 1.0)"})
    generator_ema: float = field(default=0.0, metadata={
        "help": "decay of an exponential moving average of the gate logits, updated after each generator step; "
                "the decisions that mask LoRA steps, and those calibrated at the freeze, follow the average "
                "(0: off; e.g. 0.8)"})
    ratio_penalty: str = field(default="log", metadata={
        "help": "how generator steps hold the remaining ratio r to its target t: log (alpha * |log r - log t|) "
                "or lagrangian (Sheared-LLaMA: l1 (r - t) + l2 (r - t)^2 with multipliers raised by gradient "
                "ascent, at alpha times the generator's learning rate)"})
    distill: float | None = field(default=None, metadata={
        "help": "knowledge distillation weight w: LoRA and generator steps minimise (1 - w) * task loss + w * "
                f"T^2 * KL(teacher || model) over every real token (0: task loss only; default {DEFAULT_DISTILL} "
                "when pruning, 0 with --no-prune). It makes a step about 1.5-1.7x as long on a CPU"})
    distill_generator: bool | None = field(default=None, metadata={
        "help": "with --distill, distil in generator steps too (--no-distill-generator: generator steps minimise the "
                "task loss alone; LoRA steps keep distillation) (by --recipe: on, paper off)"})
    distill_temperature: float = field(default=1.0, metadata={"help": "distillation temperature T"})
    distill_top_k: int = field(default=0, metadata={
        "help": "distil the teacher's K most likely tokens and one bucket for the rest of its probability mass, "
                "from targets computed once per teacher, data and --max-length and cached under "
                "$ATP_HOME/teacher-cache (reused by every epoch, seed, resume and compare cell; the dense self "
                "teacher is then freed once the decisions are fixed); 0: the full logits of a live teacher"})
    teacher: str = field(default="self", metadata={
        "help": "distillation teacher: self (the dense pretrained model: adapters disabled, gates open, no extra "
                "memory) or a run directory made by `atp prune --no-prune` on the same domain (a dense + LoRA "
                "teacher)"})
    compact: bool = field(default=True, metadata={
        "help": "once the pruning decisions are fixed (the freeze; step 0 of a two-stage method), remove the pruned "
                "structures from the model being trained, its LoRA and the optimizer state, and train the smaller "
                "model (same function, checked; fewer FLOPs). --no-compact trains the masked full-size model"})
    refit: str = field(default="none", metadata={
        "help": "at compaction, compensate the removed heads and MLP channels: none, or ls (each layer's o_proj and "
                "down_proj get the least-squares refit of their kept input columns to the unmasked model's outputs on "
                "the calibration batches, W_K + W_P H_PK H_KK^-1 with H = X^T X, added to the frozen base weight; "
                "LoRA untouched; needs compaction)"})
    recovery: str = field(default="lora", metadata={
        "help": "training after the decisions are fixed (the steps after int(generator_frac * max_steps), for ATP and "
                "the two-stage baselines alike): lora (LoRA continues) or full (LoRA is merged into the weights and "
                "every weight of the decoder layers trains, pruned structures still masked and the generator frozen; "
                "gradients and two AdamW states for all those weights take three more copies of them in memory, "
                "far more than LoRA on large models)"})
    recovery_lr: float = field(default=5e-5, metadata={
        "help": "peak learning rate of --recovery full (its own warm-up and cosine over the phase with "
                "--restart-lr, else the run's one cosine)"})
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = field(default="auto", metadata={
        "help": "auto (default): bf16 autocast on a GPU that has it, and on a CPU only with AMX or AVX512-BF16 where "
                "a start-up matmul at the model's shape is at least 1.2x faster than fp32, else fp32 (report.json "
                "records the choice and the CPU's flags; ATP_CPU_FLAGS overrides the flags); or no (fp32), bf16 or "
                "fp16 (accelerate)"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass to save memory"})
    attn_implementation: str | None = None
    quantize_base: str = field(default="none", metadata={
        "help": "QLoRA: hold the frozen decoder projections in 4-bit NF4 or 8-bit (bitsandbytes); LoRA, gates and "
                "distillation run on them, the export dequantizes to fp32 (none, nf4 or int8)"})
    check_tolerance: float = field(default=1e-3, metadata={
        "help": "export check: the reloaded model's max |logit diff| from the masked model must be at most "
                "this times the largest |logit| (at least 1)"})
    gguf: str | None = field(default=None, metadata={
        "help": "also write the exported model as a GGUF file for llama.cpp at this path (see atp export)"})
    gguf_type: str = field(default="f16", metadata={"help": "GGUF tensor type: f32, f16, q8_0 or q4_0"})

    def __post_init__(self) -> None:
        if self.distill is None:
            self.distill = DEFAULT_DISTILL if self.prune is True else 0.0
        # options left unset take the recipe's default (an unknown recipe is reported by validate)
        for name, value in RECIPES.get(self.recipe, RECIPES["default"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.lam is None:
            self.lam = DEFAULT_LAM.get(self.lasso, 1.0)
        if self.recipe == "paper" and self.calib_max_length is None:
            self.calib_max_length = self.max_length

    def check_values(self) -> None:
        """The checks that need no other module: ranges, choices, and options that exclude each other."""
        if self.prune and not 0 < self.sparsity < 1:
            raise ATPError(f"--sparsity must be strictly between 0 and 1 (a fraction of prunable parameters), got {self.sparsity}")
        for name in ("max_steps", "batch_size", "grad_accum", "lora_r", "generator_every", "generator_hidden",
                     "log_every", "keep_checkpoints", "calib_batches", "generator_batches"):
            if getattr(self, name) < 1:
                raise ATPError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        # the causal LM loss predicts each token from those before it, so the first token of a sequence (packed
        # or not: each packed example restarts) is never a target: one token leaves no loss at all
        for name in ("max_length", "calib_max_length"):
            if getattr(self, name) is not None and getattr(self, name) < MIN_LENGTH:
                raise ATPError(f"{flag(name)} must be at least {MIN_LENGTH} tokens (the loss predicts each token "
                               f"from the ones before it, so {getattr(self, name)} leaves nothing to predict), "
                               f"got {getattr(self, name)}")
        for name in ("lr", "generator_lr", "temperature", "lora_alpha", "recovery_lr"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ATPError(f"{flag(name)} must be greater than 0, got {getattr(self, name)}")
        for name in ("alpha", "lam", "save_every", "check_tolerance", "generator_clip"):
            if not getattr(self, name) >= 0:
                raise ATPError(f"{flag(name)} must be at least 0, got {getattr(self, name)}")
        if not 0 <= self.generator_ema < 1:
            raise ATPError(f"--generator-ema must be in [0, 1) (the moving average's decay), got {self.generator_ema}")
        if not 0 <= self.distill <= 1:
            raise ATPError(f"--distill must be in [0, 1] (the weight of the distillation loss), got {self.distill}")
        if not self.distill_top_k >= 0:
            raise ATPError(f"--distill-top-k must be at least 0 (0: full logits), got {self.distill_top_k}")
        if not self.distill_temperature > 0:
            raise ATPError(f"--distill-temperature must be greater than 0, got {self.distill_temperature}")
        if not 0 <= self.lora_dropout < 1:
            raise ATPError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.calib_fraction < 1:
            raise ATPError(f"--calib-fraction must be in (0, 1), got {self.calib_fraction}")
        if not 0 <= self.target_warmup <= 1:
            raise ATPError(f"--target-warmup must be in [0, 1], got {self.target_warmup}")
        if not 0 <= self.generator_frac <= 1:
            raise ATPError(f"--generator-frac must be in [0, 1], got {self.generator_frac}")
        if self.gguf is not None and not str(self.gguf).endswith(".gguf"):
            raise ATPError(f"--gguf takes a path ending in .gguf, got '{self.gguf}'")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ATPError(f"{flag(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    def check_combinations(self, scored: bool) -> None:
        """Options that exclude each other; `scored`: --method is a scored two-stage baseline."""
        if self.prune and scored and (self.uniform or self.round_to):
            raise ATPError(f"--uniform and --round-to apply to the generator's decisions (atp, frozen-generator), "
                           f"not to --method {self.method}")
        self.check_recovery()
        if self.decisions_from is not None:
            if not self.prune:
                raise ATPError("--decisions-from gives pruning decisions; --no-prune has none (drop one of them)")
            if self.method != "atp":
                raise ATPError(f"--decisions-from fixes the decisions itself; it cannot be combined with --method "
                               f"{self.method} (leave --method at atp)")
        if self.generator_init != "keep" and (not self.prune or scored or self.decisions_from is not None):
            raise ATPError(f"--generator-init {self.generator_init} starts the decision generator; "
                           + ("--no-prune has none" if not self.prune else
                              "--decisions-from has none" if self.decisions_from is not None else
                              f"--method {self.method} has none (use atp or frozen-generator)"))
        self.check_refit()
        if self.decide_only:
            if not self.prune or self.method == "atp" or self.decisions_from is not None:
                raise ATPError("--decide-only stops after a two-stage method has chosen its decisions; give --method "
                               "frozen-generator, taylor, magnitude, activation or random (ATP decides while it tunes)"
                               if self.prune else "--decide-only needs pruning; drop --no-prune")
            if self.gguf:
                raise ATPError("--decide-only exports no model, so there is no GGUF to write; drop --gguf")
        if not self.domain and not self.train_files:
            raise ATPError("give training data: --domain NAME or --train-file TASK=PATH")

    def check_refit(self) -> None:
        """--refit ls works at compaction: the run must compact (what only the model and the launch tell, the
        pruning space's exactness and sharding, is checked when the run sets up)."""
        if self.refit == "none":
            return
        why = ("--no-prune removes nothing (drop --refit)" if not self.prune else
               "--decide-only trains and exports no model (drop --refit)" if self.decide_only else
               "--no-compact keeps the pruned structures in the model, masked, so nothing is removed there (drop "
               "--no-compact, or --refit)" if not self.compact else
               f"--quantize-base {self.quantize_base} never compacts (its base weights are quantized; drop one of "
               "them)" if self.quantize_base != "none" else None)
        if why is None and self.method == "atp" and self.decisions_from is None \
                and int(self.generator_frac * self.max_steps) >= self.max_steps:
            why = (f"--generator-frac {self.generator_frac} fixes the decisions at the last step, so no step follows "
                   "and the run never compacts; lower --generator-frac")
        if why is not None:
            raise ATPError(f"--refit {self.refit} refits the kept weights when compaction removes the pruned "
                           f"structures; {why}")

    def check_recovery(self) -> None:
        """--recovery full needs a phase with fixed decisions after some steps of the run."""
        if self.recovery != "full":
            return
        if not self.prune:
            raise ATPError("--recovery full trains all weights once the pruning decisions are fixed; --no-prune has "
                           "no pruning decisions (use --recovery lora, or prune)")
        if int(self.generator_frac * self.max_steps) >= self.max_steps:
            raise ATPError(f"--recovery full needs steps after the decisions are fixed, but --generator-frac "
                           f"{self.generator_frac} leaves none of the {self.max_steps} steps; lower --generator-frac")


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _expected(kind) -> tuple[str, typing.Callable]:
    """(what a value of this field type must be, its test): bool, int, float (ints accepted, finite), str,
    list[str], each optionally None."""
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        what, test = _expected(next(a for a in args if a is not type(None)))
        return f"{what} or null", lambda v: v is None or test(v)
    if typing.get_origin(kind) is list:
        return "a list of strings such as [a, b]", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)
    if kind is bool:
        return "true or false", lambda v: isinstance(v, bool)
    if kind is int:
        return "a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if kind is float:
        return "a finite number", lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v))
    return "a string", lambda v: isinstance(v, str)


def check_types(values: dict, config_cls, where: str | None = None) -> None:
    """Each value has its `config_cls` field's type; the error names the key (in `where`) or the flag. Unknown
    keys are left to the caller."""
    hints = typing.get_type_hints(config_cls)
    for name, value in values.items():
        if name not in hints:
            continue
        what, test = _expected(hints[name])
        if test(value):
            continue
        label = f"{name} in {where}" if where else f"--{name.replace('_', '-')}"
        hint = ""
        if isinstance(value, str) and "list" in what:
            hint = f" (a single string; write [{value}])"
        elif isinstance(value, str) and "string" not in what:
            exponent = re.fullmatch(r"([-+]?\d+)([eE][-+]?\d+)", value)
            hint = (f" (a string: YAML reads {value} as text; write {exponent[1]}.0{exponent[2]})" if exponent
                    else " (a string; write it without quotes)")
        raise ATPError(f"{label} must be {what}, got {value!r}{hint}")


CHOICES = {"generator_init": ("keep", "taylor"), "refit": ("none", "ls"), "gguf_type": ("f32", "f16", "q8_0", "q4_0"),
           "lasso": ("ramp", "lr-scaled", "exp-ramp"),
           "lora_mask": ("frozen", "frozen-qkv", "both", "frozen-output"), "recipe": tuple(RECIPES),
           "generator_gates": ("hard", "soft"), "lora_decisions": ("deterministic", "sampled"), "ratio_penalty": ("log", "lagrangian"),
           "sparsity_of": ("prunable", "model"), "recovery": ("lora", "full")}


def upgrade_record(values: dict) -> dict:
    """Option values recorded by an older atp, in today's names."""
    values = dict(values)
    if "mask_lora" in values:
        values["lora_mask"] = "both" if values.pop("mask_lora") else "frozen-output"
    return values


# options that do not change what a run computes; everything else must match to resume
NON_SEMANTIC = ("out", "overwrite", "log_every", "save_every", "keep_checkpoints", "gradient_checkpointing",
                "gguf", "gguf_type")


# options added after runs were first recorded, with the value that reproduces those runs: a recorded
# config without them gets that value, and the fingerprint leaves them out at that value, so older runs
# stay resumable and their compare cells stay valid
# (the pruning space's options declare theirs with the kinds: `atp.kinds.recorded_defaults`)
LATER_OPTIONS = {"restart_lr": False, "lasso": "lr-scaled", "lora_mask": "both",
                 "lora_decisions": "deterministic", "generator_batches": 1, "generator_clip": 0.0, "distill": 0.0,
                 "distill_temperature": 1.0, "teacher": "self", "generator_ema": 0.0, "ratio_penalty": "log",
                 "sparsity_of": "prunable", "packing": False, "recovery": "lora",
                 "recovery_lr": 5e-5, "quantize_base": "none",
                 "compact": False, "distill_top_k": 0, "recipe": "default", "decisions_from": None,
                 "decide_only": False, "generator_init": "keep", "generator_gates": "hard", "distill_generator": True,
                 "refit": "none"}
