"""One-stage ATP training: LoRA steps and generator steps alternate, then LoRA finishes on fixed decisions
(with its learning-rate schedule restarted, unless restart_lr is off).

    LoRA step       (generator frozen):  task loss + lambda_t * group lasso(LoRA of pruned groups)
    generator step  (LoRA frozen, calibration batch): task loss + alpha * ratio loss(r, 1 - sparsity)

accelerate provides devices, mixed precision, gradient accumulation and multi-process execution.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .errors import ATPError
from .fsutil import read_yaml_mapping, write_text_atomic

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ATPConfig:
    model: str = "smollm2-135m"
    domain: str | None = "healthcare"
    train_files: list[str] = field(default_factory=list)  # "task=path.jsonl" entries, instead of or besides --domain
    data_dir: str | None = None
    out: str = "runs/atp"
    overwrite: bool = False
    prune: bool = True  # False: plain LoRA fine-tuning with the same loop (the dense + LoRA baseline)
    method: str = "atp"  # atp, or a two-stage baseline with decisions fixed before tuning (atp.baselines)
    sparsity: float = 0.4
    mlp_block: int = 32
    uniform: bool = False  # every layer keeps the same widths: a plain family checkpoint (space.ShapeRule)
    round_to: int = 0  # kept MLP widths are multiples of this many channels (0: no rounding)
    max_steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    lr: float = 3e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    generator_lr: float = 1e-2
    generator_hidden: int = 64
    temperature: float = 1.0  # shapes only the straight-through gradient (0.4 before 041ec9a; docs/benchmarks.md)
    offset: float = 3.0
    generator_every: int = 2  # one generator step per this many LoRA steps
    calib_max_length: int | None = None  # token length of calibration sequences (default: max_length // 2)
    generator_frac: float = 0.6  # freeze the generator after this fraction of steps
    restart_lr: bool = True  # the LoRA learning rate restarts (warm-up, cosine) when the generator freezes
    calib_fraction: float = 0.1
    calib_batches: int = 8  # calibration batches for the taylor and activation importance scores
    alpha: float = 50.0  # ratio-loss weight
    target_warmup: float = 0.5  # the ratio target moves from 1 to 1 - sparsity over this fraction of the generator phase
    lam: float = 0.05  # group-lasso weight after warm-up
    proximal: bool = True
    mask_lora: bool = True  # ablation switch: False masks only the frozen path
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (accelerate)
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    check_tolerance: float = 1e-3  # export check: max |logit diff| <= this x max(1, largest |logit|)
    gguf: str | None = None  # also write OUT/model as a GGUF file for llama.cpp here (atp.gguf_export)
    gguf_type: str = "f16"  # f32, f16, q8_0 or q4_0

    def validate(self) -> None:
        if self.prune and not 0 < self.sparsity < 1:
            raise ATPError(f"--sparsity must be strictly between 0 and 1 (a fraction of prunable parameters), got {self.sparsity}")
        def flag(name):
            return f"--{name.replace('_', '-')}"

        for name in ("max_steps", "batch_size", "grad_accum", "max_length", "lora_r", "generator_every", "mlp_block",
                     "generator_hidden", "log_every", "keep_checkpoints", "calib_batches"):
            if getattr(self, name) < 1:
                raise ATPError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.calib_max_length is not None and self.calib_max_length < 1:
            raise ATPError(f"{flag('calib_max_length')} must be at least 1, got {self.calib_max_length}")
        for name in ("lr", "generator_lr", "temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ATPError(f"{flag(name)} must be greater than 0, got {getattr(self, name)}")
        for name in ("alpha", "lam", "save_every", "check_tolerance"):
            if not getattr(self, name) >= 0:
                raise ATPError(f"{flag(name)} must be at least 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ATPError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.calib_fraction < 1:
            raise ATPError(f"--calib-fraction must be in (0, 1), got {self.calib_fraction}")
        if not 0 <= self.target_warmup <= 1:
            raise ATPError(f"--target-warmup must be in [0, 1], got {self.target_warmup}")
        if not 0 <= self.generator_frac <= 1:
            raise ATPError(f"--generator-frac must be in [0, 1], got {self.generator_frac}")
        from .baselines import SCORED, check_method

        check_method(self.method)
        if self.prune and self.method in SCORED and (self.uniform or self.round_to):
            raise ATPError(f"--uniform and --round-to apply to the generator's decisions (atp, frozen-generator), "
                           f"not to --method {self.method}")
        if not self.domain and not self.train_files:
            raise ATPError("give training data: --domain NAME or --train-file TASK=PATH")
        if self.gguf_type not in ("f32", "f16", "q8_0", "q4_0"):
            raise ATPError(f"--gguf-type must be f32, f16, q8_0 or q4_0, got '{self.gguf_type}'")
        if self.gguf is not None and not str(self.gguf).endswith(".gguf"):
            raise ATPError(f"--gguf takes a path ending in .gguf, got '{self.gguf}'")

    @classmethod
    def from_yaml(cls, path) -> dict:
        return read_yaml_mapping(path, "config file", {f.name for f in dataclasses.fields(cls)})


def load_training_examples(cfg: ATPConfig):
    from . import data

    examples = []
    if cfg.domain:
        examples += data.domain_examples(data.load_domain(cfg.domain, cfg.data_dir), "train")
    for entry in cfg.train_files:
        if "=" not in entry:
            raise ATPError(f"--train-file takes TASK=PATH, got '{entry}'")
        task_name, path = entry.split("=", 1)
        task = data.get_task(task_name)
        records = data.split(task.load(path), "train")
        examples += [task.train_example(r) for r in records]
    return examples


def tokenize_all(tokenizer, examples, max_length):
    from .data import tokenize_example

    rows, truncated = [], 0
    for example in examples:
        row = tokenize_example(tokenizer, example, max_length)
        truncated += bool(row.pop("truncated", False))
        if any(label != -100 for label in row["labels"]):
            rows.append(row)
    return rows, truncated


def batches(rows, batch_size, pad_id, seed, rank=0, world=1):
    """Endless shuffled global batches of batch_size * world rows (each epoch reshuffled with its own seed).
    Yields this process's shard, collated, and the number of label tokens in the whole global batch, so
    that the loss is normalised by the global count: N processes then compute what one process would."""
    from .data import collate

    size = batch_size * world
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            chosen = order[start : start + size]
            tokens = sum(sum(label != -100 for label in rows[i]["labels"][1:]) for i in chosen)
            yield collate([rows[i] for i in chosen[rank::world]], pad_id), max(1, tokens)
        epoch += 1


RUN_OUTPUTS = ("log.jsonl", "report.json", "config.yaml", "checkpoints")


def target_at(cfg: ATPConfig, step: int, freeze_at: int) -> float:
    """Remaining-ratio target for the generator: lowered linearly so that pruning comes in gradually."""
    ramp = max(1, int(cfg.target_warmup * freeze_at))
    return 1 - cfg.sparsity * min(1.0, step / ramp)


def lora_lr_factor(cfg: ATPConfig, updates: int, freeze_at: int) -> float:
    """LoRA learning-rate multiplier after `updates` optimizer updates: linear warm-up over 5% of the steps,
    then cosine decay to 0. With restart_lr, the fixed-decision phase after the generator freezes gets
    its own warm-up and cosine, so the recovery from the final decisions runs at the full learning rate."""
    start, length = 0, cfg.max_steps
    if cfg.restart_lr and 0 < freeze_at < cfg.max_steps and updates >= freeze_at:
        start, length = freeze_at, cfg.max_steps - freeze_at
    s = updates - start
    return min(1.0, (s + 1) / max(1, length // 20)) * 0.5 * (1 + math.cos(math.pi * s / length))


def lambda_at(cfg: ATPConfig, step: int) -> float:
    ramp = max(1, int(cfg.generator_frac * cfg.max_steps))
    return cfg.lam * min(1.0, step / ramp)


def prepare_run_dir(cfg: ATPConfig) -> Path:
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ATPError(f"output path {run_dir} is a file; --out takes a directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.overwrite:
            raise ATPError(f"output directory {run_dir} already exists and is not empty; pass --overwrite to replace it")
        for name in RUN_OUTPUTS:  # only what a run writes; other files in the folder stay
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# options that do not change what a run computes; everything else must match to resume
NON_SEMANTIC = ("out", "overwrite", "log_every", "save_every", "keep_checkpoints", "gradient_checkpointing",
                "gguf", "gguf_type")


# options added after runs were first recorded, with the value that reproduces those runs: a recorded
# config without them gets that value, and the fingerprint leaves them out at that value, so older runs
# stay resumable and their compare cells stay valid
LATER_OPTIONS = {"restart_lr": False}


def fixed_phase_start(cfg: ATPConfig) -> int:
    """The step after which ATP's LoRA tunes fixed decisions; 0 when a run has no such phase after
    generator steps (baselines fix their decisions before step 1; generator_frac 0 or 1)."""
    freeze_at = int(cfg.generator_frac * cfg.max_steps)
    return freeze_at if cfg.prune and cfg.method == "atp" and 0 < freeze_at < cfg.max_steps else 0


def inert_options(cfg: ATPConfig) -> set[str]:
    """Options that cannot change what this run computes (left out of its fingerprint)."""
    return set() if fixed_phase_start(cfg) else {"restart_lr"}


def config_from_record(values: dict) -> ATPConfig:
    """An ATPConfig from a recorded config.yaml / report (older records lack the later options)."""
    return ATPConfig(**{**LATER_OPTIONS, **values})


def fingerprint(cfg: ATPConfig) -> str:
    skip = set(NON_SEMANTIC) | inert_options(cfg)
    values = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in skip and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def resume_config(run_dir, overrides: dict) -> ATPConfig:
    """The config recorded in RUN_DIR, with only non-semantic overrides allowed."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ATPError(f"--resume {run_dir}: no config.yaml there; is it an atp run directory?")
    recorded = {**LATER_OPTIONS, **ATPConfig.from_yaml(path)}
    changed = sorted(k for k, v in overrides.items() if k not in NON_SEMANTIC and k in recorded and recorded[k] != v)
    if changed:
        detail = ", ".join(f"{k}: {recorded[k]!r} -> {overrides[k]!r}" for k in changed)
        raise ATPError(f"--resume {run_dir}: that run was made with a different config ({detail}); "
                       "resume with the same options, or start a new run")
    recorded.update({k: v for k, v in overrides.items() if k in NON_SEMANTIC})
    recorded["out"] = str(run_dir)
    return ATPConfig(**recorded)


def sample_texts(tokenizer, examples, n=4, max_length=128):
    texts = [(e.prompt + e.response)[:2000] for e in examples[:n]]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)


def train(cfg: ATPConfig, progress: bool = True, resume: bool = False) -> dict:
    """Run ATP (or plain LoRA when cfg.prune is False) and export the model to <out>/model.
    With resume, continue the run in cfg.out from its newest intact checkpoint."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from . import checkpoint
    from .export import count_safetensors_params, is_heterogeneous, layer_widths
    from .generator import DecisionGenerator
    from .masking import GateController
    from .models import load_model
    from .regularization import group_lasso, proximal_step, ratio_loss
    from .space import HeadMLPSpace, ShapeRule, check_supported

    cfg.validate()
    AcceleratorState._reset_state()  # a second run in one process may use other precision; the process group stays
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision)
    set_seed(cfg.seed)
    run_dir = Path(cfg.out)
    if resume:
        found = checkpoint.latest_valid(run_dir)
        if found is None:
            raise ATPError(f"--resume {run_dir}: no intact checkpoint to resume from")
        if found[1]["fingerprint"] != fingerprint(cfg):
            raise ATPError(f"--resume {run_dir}: checkpoint {found[0].name} was made with a different config")
    elif accelerator.is_main_process:
        prepare_run_dir(cfg)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    started = time.time()

    model, tokenizer = load_model(cfg.model, attn_implementation=cfg.attn_implementation)
    check_supported(model.config)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and cfg.max_length > context:
        accelerator.print(f"note: --max-length {cfg.max_length} exceeds the model's context of {context} tokens; "
                          f"sequences are truncated to {context}")
        cfg.max_length = context
    space = HeadMLPSpace.from_config(model.config, mlp_block=cfg.mlp_block)
    rule = ShapeRule(uniform=cfg.uniform, round_to=cfg.round_to)
    if cfg.prune:
        check_reachable(space, cfg.sparsity)
        rule.check(space)
    examples = load_training_examples(cfg)
    calib_count = max(1, int(len(examples) * cfg.calib_fraction)) if cfg.prune else 0
    train_examples, calib_examples = examples[calib_count:], examples[:calib_count]
    rows, truncated = tokenize_all(tokenizer, train_examples, cfg.max_length)
    calib_rows, _ = tokenize_all(tokenizer, calib_examples, cfg.calib_max_length or max(16, cfg.max_length // 2))
    world = accelerator.num_processes
    needed = cfg.batch_size * world
    if len(rows) < needed or (cfg.prune and len(calib_rows) < needed):
        raise ATPError(
            f"too little training data: {len(rows)} training and {len(calib_rows)} calibration examples "
            f"for batch size {cfg.batch_size} x {world} process(es); add data or lower --batch-size"
        )
    if truncated:
        accelerator.print(f"note: {truncated} of {len(train_examples)} training examples were truncated to {cfg.max_length} tokens")

    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                  target_modules=cfg.lora_targets, task_type="CAUSAL_LM"))
    target_ratio = 1 - cfg.sparsity
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    opt_lora = torch.optim.AdamW(lora_params, lr=cfg.lr, weight_decay=0.0)
    optimizers = {"lora": opt_lora}
    generator = controller = opt_gen = None
    if cfg.prune:
        generator = DecisionGenerator(space, cfg.generator_hidden, cfg.temperature, cfg.offset, cfg.seed, rule)
        opt_gen = torch.optim.AdamW(generator.parameters(), lr=cfg.generator_lr, weight_decay=0.0)
        optimizers["generator"] = opt_gen
        controller = GateController(peft_model, space, mask_lora=cfg.mask_lora)
    freeze_at = int(cfg.generator_frac * cfg.max_steps)
    restart_at = fixed_phase_start(cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt_lora, lambda s: lora_lr_factor(cfg, s, restart_at))
    peft_model, opt_lora = accelerator.prepare(peft_model, opt_lora)
    # The generator stays unwrapped and fp32 on every process: same init, same per-step noise and
    # all-reduced gradients keep its decisions identical across processes.
    gen_module = generator.to(accelerator.device) if generator is not None else None

    rank = accelerator.process_index
    train_iter = batches(rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed, rank, world)
    calib_iter = batches(calib_rows, cfg.batch_size, tokenizer.pad_token_id, cfg.seed + 1, rank, world) if cfg.prune else None

    def task_loss(batch_and_count):
        batch, tokens = batch_and_count
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        return peft_model(**batch, num_items_in_batch=tokens).loss * world
    is_generator_step = lambda s: generator is not None and s <= freeze_at and (s - 1) % cfg.generator_every == 0
    step_times = {"lora": [], "generator": []}
    window = LogWindow()

    def generator_step(step, window):
        """Generator step on a calibration batch, LoRA frozen (gradients flow only into the generator)."""
        t0 = time.perf_counter()
        generator.train()
        controller.set(gen_module(step=step))
        with accelerator.no_sync(peft_model):  # no LoRA gradients in this step
            task = task_loss(next(calib_iter))
            ratio = space.remaining_ratio(gen_module.deterministic_gates())
            r_loss = ratio_loss(ratio, target_at(cfg, step, freeze_at))
            check_finite(step, generator_task_loss=task, ratio_loss=r_loss)
            opt_gen.zero_grad(set_to_none=True)
            (task + cfg.alpha * r_loss).backward(inputs=list(gen_module.parameters()))
        if world > 1:
            for p in gen_module.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
        opt_gen.step()
        window.add(generator_task_loss=task.item(), ratio_loss=r_loss.item(), deterministic_ratio=ratio.item())
        step_times["generator"].append(time.perf_counter() - t0)

    # Two-stage baselines: decisions fixed on the pretrained model before tuning (atp.baselines); a resumed
    # run reads them from its checkpoint. No generator steps and no group lasso afterwards.
    fixed = chosen = None
    if cfg.prune and cfg.method != "atp":
        if not resume:
            fixed, chosen = choose_fixed_decisions(cfg, accelerator, peft_model, space, calib_rows, tokenizer.pad_token_id,
                                                   generator_step, gen_module, freeze_at)
        generator = gen_module = opt_gen = None
        del optimizers["generator"]
    log_path = run_dir / "log.jsonl"
    first_step = 1
    if resume:
        done = checkpoint.load(found[0], accelerator.unwrap_model(peft_model), gen_module, optimizers, schedule)
        if cfg.prune and cfg.method != "atp":
            fixed, chosen = checkpoint.load_decisions(found[0], accelerator.device)
        accelerator.print(f"resuming {run_dir} from {found[0].name}")
        for _ in range(done * cfg.grad_accum):  # the same batches an uninterrupted run would see next
            next(train_iter)
        for _ in range(sum(is_generator_step(s) for s in range(1, done + 1))):
            next(calib_iter)
        first_step = done + 1
        if log_path.exists() and accelerator.is_main_process:
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= done]
            log_path.write_text("".join(line + "\n" for line in kept))
    if fixed is not None:
        controller.set(fixed)
    last_decisions = decisions = fixed if fixed is not None else gen_module.decisions() if gen_module is not None else None
    flips_since_log = 0
    desc = ("atp prune" if cfg.method == "atp" else cfg.method) if cfg.prune else "lora"
    bar = tqdm(range(first_step, cfg.max_steps + 1), initial=first_step - 1, total=cfg.max_steps, disable=not (progress and accelerator.is_main_process), desc=desc)
    peft_model.train()
    for step in bar:
        if is_generator_step(step):
            generator_step(step, window)

        if generator is not None and step == freeze_at + 1:
            reached = gen_module.calibrate_offset(space.remaining_ratio, target_ratio)
            accelerator.print(f"generator frozen at step {freeze_at}; decisions calibrated to ratio {reached:.4f}")
        # LoRA step with the generator's current deterministic decisions; they change only when the
        # generator has just been updated or calibrated, so the masks are rebuilt only then.
        t0 = time.perf_counter()
        if gen_module is not None and (step == first_step or is_generator_step(step) or step == freeze_at + 1):
            decisions = gen_module.decisions()
            controller.set(decisions)
            flips_since_log += sum(int((decisions[k] != last_decisions[k]).sum()) for k in decisions)
            last_decisions = decisions
        lam = lambda_at(cfg, step) if gen_module is not None else 0.0  # no group lasso with fixed decisions
        for micro in range(cfg.grad_accum):
            with accelerator.accumulate(peft_model):
                task = task_loss(next(train_iter))
                lasso = group_lasso(peft_model, space, decisions) if (cfg.prune and lam > 0) else torch.zeros((), device=task.device)
                loss = task + lam * lasso
                check_finite(step, task_loss=task, group_lasso=lasso)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    opt_lora.step()
                    schedule.step()
                    opt_lora.zero_grad(set_to_none=True)
        if cfg.prune and cfg.proximal and lam > 0:
            proximal_step(peft_model, space, decisions, threshold=schedule.get_last_lr()[0] * lam)
        step_times["lora"].append(time.perf_counter() - t0)
        window.add(task_loss=task.item(), group_lasso=lasso.item())

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            record = {"step": step, **window.means(), "lam": lam, "lr": schedule.get_last_lr()[0], "flips": flips_since_log}
            if decisions is not None:
                sp = space.sparsity(decisions)
                record.update(ratio=1 - sp["prunable_sparsity"], prunable_sparsity=sp["prunable_sparsity"])
            flips_since_log = 0
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['task_loss']:.3f}", **({"sparsity": f"{record['prunable_sparsity']:.3f}"} if cfg.prune else {}))
        if cfg.save_every and step % cfg.save_every == 0 and accelerator.is_main_process:
            checkpoint.save(run_dir, step, accelerator.unwrap_model(peft_model), gen_module, optimizers, schedule,
                            fingerprint(cfg), cfg.keep_checkpoints, decisions=(fixed, chosen) if fixed is not None else None)
    bar.close()
    if gen_module is not None and freeze_at >= cfg.max_steps:  # the generator trained to the end (no fixed phase)
        reached = gen_module.calibrate_offset(space.remaining_ratio, target_ratio)
        accelerator.print(f"generator trained to the last step; decisions calibrated to ratio {reached:.4f} for export")
    train_seconds = time.time() - started

    # Export: reference logits from the masked LoRA model, then merge, slice, save, reload and compare.
    accelerator.wait_for_everyone()
    report = {"config": dataclasses.asdict(cfg), "train_seconds": train_seconds, "processes": world}
    final = fixed if fixed is not None else gen_module.decisions() if gen_module is not None else space.full_gates()
    if cfg.prune and world > 1:
        mine = torch.cat([v.flatten() for v in final.values()]).to(accelerator.device)
        everyone = accelerator.gather(mine.unsqueeze(0))
        if not bool((everyone == everyone[0]).all()):
            raise ATPError("pruning decisions differ between processes; the run cannot be exported consistently")
        report["decisions_identical_across_processes"] = True
    if not accelerator.is_main_process:
        return report
    peft_model = accelerator.unwrap_model(peft_model, keep_fp32_wrapper=False).eval()  # fp32 reference
    probe = sample_texts(tokenizer, train_examples[::max(1, len(train_examples) // 4)][:4])
    with torch.no_grad():  # how far group lasso drove the LoRA weights of pruned groups towards zero
        pruned_lora_norm = float(group_lasso(peft_model, space, final)) if cfg.prune else 0.0
    if controller is not None and not cfg.mask_lora:  # ablation: export removes both paths, so check against that
        controller.remove()
        controller = GateController(peft_model, space, mask_lora=True)
    model_dir, check, merged = export_checked(cfg, peft_model, controller, space, final, tokenizer, probe,
                                              accelerator.device, run_dir / "model")
    exported = count_safetensors_params(model_dir)
    dense_total = space.total_params()
    removed = dense_total - exported
    report.update(
        logits_check=check,
        pruned_lora_group_norm_sum=pruned_lora_norm,
        model_dir=str(model_dir),
        exported_params=exported,
        dense_params=dense_total,
        prunable_params=space.prunable_params(),
        prunable_sparsity=removed / space.prunable_params(),
        model_sparsity=removed / dense_total,
        target_sparsity=cfg.sparsity if cfg.prune else 0.0,
        method=cfg.method if cfg.prune else "dense-lora",
        decisions_sparsity=space.sparsity(final)["prunable_sparsity"],
        decisions_info=chosen or {},
        dense_shape={"num_layers": space.num_layers, "num_heads": space.num_heads,
                     "num_kv_heads": space.num_kv_heads, "intermediate_size": space.intermediate_size},
        mean_lora_step_seconds=_mean(step_times["lora"]),
        mean_generator_step_seconds=_mean(step_times["generator"]),
        generator_steps=len(step_times["generator"]),
        truncated_examples=truncated,
        mean_step_seconds=(sum(step_times["lora"]) + sum(step_times["generator"])) / max(1, len(step_times["lora"])),
        layers=[{**{k: v for k, v in widths.items() if k != "kv_map"}, "kept_heads": kept["heads"]}
                for widths, kept in zip(layer_widths(space.kept_structure(final)), space.kept_structure(final))],
        export_format="heterogeneous" if is_heterogeneous(merged.config) else "uniform",
        total_seconds=time.time() - started,
    )
    write_text_atomic(run_dir / "report.json", json.dumps(report, indent=2))
    if cfg.gguf:  # after the report, so that a GGUF error leaves the run's results in place
        from .gguf_export import export_gguf, format_export

        report["gguf"] = export_gguf(model_dir, cfg.gguf, cfg.gguf_type)
        accelerator.print(format_export(report["gguf"]))
        write_text_atomic(run_dir / "report.json", json.dumps(report, indent=2))
    return report


def choose_fixed_decisions(cfg: ATPConfig, accelerator, peft_model, space, calib_rows, pad_id, generator_step,
                           gen_module, freeze_at: int):
    """Decisions of a two-stage baseline, chosen on the pretrained model (LoRA is still zero), and a summary.
    frozen-generator: ATP's generator phase (same steps and losses) without LoRA steps, then calibrated."""
    from .baselines import ALLOCATION, fixed_decisions

    started = time.time()
    if cfg.method == "frozen-generator":
        peft_model.train()
        window = LogWindow()
        steps = [s for s in range(1, freeze_at + 1) if (s - 1) % cfg.generator_every == 0]
        for s in steps:
            generator_step(s, window)
        gen_module.calibrate_offset(space.remaining_ratio, 1 - cfg.sparsity)
        gates = gen_module.decisions()
        info = {"allocation": ALLOCATION[cfg.method], "generator_steps": len(steps), **window.means(),
                "selection_seconds": round(time.time() - started, 2)}
    else:
        # whole batches on every process, so that every process picks the same decisions
        source = batches(calib_rows, cfg.batch_size, pad_id, cfg.seed + 2)
        data = [next(source)[0] for _ in range(cfg.calib_batches)]
        gates, info = fixed_decisions(cfg.method, accelerator.unwrap_model(peft_model), space, cfg.sparsity, data,
                                      cfg.seed, accelerator.device)
    gates = {k: v.to(accelerator.device) for k, v in gates.items()}
    sparsity = space.sparsity(gates)["prunable_sparsity"]
    accelerator.print(f"{cfg.method}: decisions fixed before tuning at prunable sparsity {sparsity:.4f} "
                      f"({info['allocation']} allocation, {info['selection_seconds']:.0f}s)")
    return gates, info


def export_checked(cfg: ATPConfig, peft_model, controller, space, decisions, tokenizer, probe, device, out_dir):
    """Merge LoRA, slice the pruned structures out and save; before the saved folder is moved into place,
    reload it and compare its logits on `probe` with the masked model's (fp32). Returns (path, check, model)."""
    from .export import build_pruned, save_pruned
    from .models import load_model

    with torch.no_grad():
        if controller is not None:
            controller.set(decisions)
        reference = peft_model(**{k: v.to(device) for k, v in probe.items()}).logits.float().cpu()
        if controller is not None:
            controller.remove()
    merged = dense = peft_model.merge_and_unload()
    merged.config.use_cache = True
    if cfg.prune:
        merged = build_pruned(merged, space.kept_structure(decisions))
    merged = merged.float()
    check = {}

    def verify(path):
        loaded, _ = load_model(str(path), attn_implementation=cfg.attn_implementation)
        with torch.no_grad():
            logits = loaded(**probe).logits.float()
        real = probe["attention_mask"].bool()
        diff = float((logits - reference)[real].abs().max())
        # fp32 rounding grows with the logits' magnitude, so the tolerance is relative to it (at least 1)
        scale = max(1.0, float(reference[real].abs().max()))
        allowed = cfg.check_tolerance * scale
        check.update(max_abs_logit_diff=diff, max_abs_logit=scale, tolerance=cfg.check_tolerance, allowed=allowed,
                     passed=diff <= allowed)
        if diff > allowed and cfg.prune and space.total_params() <= FLOAT64_RECHECK_MAX_PARAMS:
            # Damaged models can carry huge hidden states (1e4 seen), where fp32 rounding alone exceeds the
            # tolerance. Slicing is exact, so in float64 the masked dense model and the export must agree.
            exact = float64_diff(dense, space, decisions, loaded, probe)
            check.update(float64_diff=exact, passed=exact <= 1e-6 * scale)
        if not check["passed"]:
            exact = f"; in float64 {check['float64_diff']:.3g}" if "float64_diff" in check else ""
            raise ATPError(f"exported model does not match the masked model: max |logit diff| {diff:.3g} > "
                           f"{allowed:.3g} ({cfg.check_tolerance:g} x the largest |logit|, {scale:.3g}){exact}")

    return save_pruned(merged, tokenizer, out_dir, overwrite=True, verify=verify), check, merged


FLOAT64_RECHECK_MAX_PARAMS = 2_000_000_000


def float64_diff(dense, space, decisions, pruned, probe) -> float:
    """Max |logit diff| between the masked dense (merged) model and the pruned one, both in float64 on CPU."""
    import copy

    from .masking import GateController

    dense64, pruned64 = copy.deepcopy(dense).to("cpu", torch.float64), copy.deepcopy(pruned).to("cpu", torch.float64)
    dense64.config._attn_implementation = pruned64.config._attn_implementation  # eager softmax runs in fp32
    controller = GateController(dense64, space)
    controller.set({k: v.cpu() for k, v in decisions.items()})
    with torch.no_grad():
        reference, logits = dense64(**probe).logits, pruned64(**probe).logits
    controller.remove()
    return float((logits - reference)[probe["attention_mask"].bool()].abs().max())


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


def _mean(values):
    return sum(values) / len(values) if values else 0.0


def check_reachable(space, sparsity: float) -> None:
    """The most the space can remove is everything but the fixed parameters (norms, output biases)."""
    most = 1 - float(space.remaining_prunable({k: torch.zeros(v) for k, v in space.gate_shapes.items()})) / space.prunable_params()
    if sparsity > most - 0.01:
        raise ATPError(f"--sparsity {sparsity} cannot be reached: this pruning space can remove at most "
                       f"{most:.4f} of the prunable parameters (norms and output biases stay)")


def check_finite(step: int, **terms) -> None:
    for name, value in terms.items():
        if value is not None and not torch.isfinite(torch.as_tensor(value)).all():
            raise ATPError(f"{name} became {float(value)} at step {step}; stopping (checkpoints so far are kept)")
