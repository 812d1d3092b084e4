"""`atp plan`: the peak memory per device of an `atp prune` run, predicted from the model's config alone.

The parts, in bytes per device:
  base weights      every dense parameter in --dtype; with --quantize-base the decoder projections are NF4 (half a
                    byte per weight plus double-quantised block scales) or int8 (a byte plus one fp32 scale per row);
                    under FSDP they are sharded over the processes, plus one decoder layer gathered at a time
  dequant buffer    QLoRA: the largest projection dequantized for its matmul
  LoRA, gradients,  fp32 LoRA matrices on the --lora-targets, their gradients and two AdamW moments (replicated on
  optimizer state   every process, DDP or FSDP: see docs/scaling.md)
  generator         the decision generator (fp32 weights, gradients, two AdamW moments), replicated
  activations       what autograd keeps for the backward pass of one micro-batch (counted per decoder layer from its
                    saved tensors), or with --gradient-checkpointing each layer's input plus one layer recomputed
  logits            the LM head's logits and the loss's log-softmax (fp32), and their gradients in the backward
  teacher           weights of a separate teacher (--teacher-params); the self teacher shares the model's weights
  distillation      the teacher's logits and the KL's fp32 buffers over the vocabulary (--distill > 0)
  runtime           the process itself (CPU: the Python, torch and transformers a run imports, measured here; CUDA:
                    the context)
On CPU the parts are live memory; glibc's malloc keeps freed activations unless its mmap threshold is fixed
(MALLOC_MMAP_THRESHOLD_=131072), and then a run's peak RSS was up to a third above the plan (docs/scaling.md).
The training peak is their sum. The export (after training, on the main process) holds the dense model, the
pruned copy in fp32 and its reload: `export_peak`; a run's peak is the larger of the two.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import ATPError

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZE = ("none", "nf4", "int8")
SHARDING = ("ddp", "fsdp")
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256  # weights per absmax scale; scales per second-level fp32 scale
# Resident memory of a CPU process once torch, transformers, peft, accelerate and atp are imported (measured:
# 343-398 MiB here, docs/scaling.md). CUDA: the context, which torch's memory counters do not include.
RUNTIME_BYTES = {"cpu": int(0.35 * GIB), "cuda": int(0.5 * GIB)}


def bytes_per_weight(quantize: str, dtype_bytes: int) -> float:
    """Bytes a quantized decoder-projection weight takes (the per-row int8 scale is counted by the caller)."""
    if quantize == "nf4":  # 4 bits, an int8 absmax per block of 64, an fp32 scale per 256 absmaxes
        return 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_SCALE_BLOCK)
    if quantize == "int8":
        return 1.0
    return float(dtype_bytes)


@dataclasses.dataclass
class PlanOptions:
    dtype: str = "fp32"  # the base weights as loaded (atp prune loads fp32)
    quantize_base: str = "none"
    processes: int = 1
    sharding: str = "ddp"
    batch_size: int = 4  # per process, as --batch-size
    max_length: int = 256
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    gradient_checkpointing: bool = False
    distill: float = 0.5
    prune: bool = True
    sparsity: float = 0.4
    mlp_block: int = 32  # atp prune's default
    generator_hidden: int = 64
    mixed_precision: str = "auto"  # as atp prune; bf16 (and auto on a GPU): activations in bf16 under autocast
    attention: str = "sdpa"  # eager keeps the heads x length x length probabilities
    teacher_params: int = 0
    device: str = "cuda"

    def check(self) -> None:
        from . import validation

        choices = {"dtype": tuple(DTYPE_BYTES), "quantize_base": QUANTIZE, "sharding": SHARDING,
                   "mixed_precision": validation.MIXED_PRECISION, "attention": ("sdpa", "eager"),
                   "device": tuple(RUNTIME_BYTES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ATPError(f"{validation.flag(name)} must be one of {', '.join(allowed)}, got "
                               f"{getattr(self, name)!r}")
        for name in ("processes", "batch_size", "max_length", "lora_r", "mlp_block", "generator_hidden"):
            validation.at_least(getattr(self, name), 1, name)
        if not 0 <= self.distill <= 1:
            raise ATPError(f"--distill must be in [0, 1], got {self.distill}")
        if self.quantize_base != "none" and self.sharding == "fsdp" and self.processes > 1:
            raise ATPError("--quantize-base with --sharding fsdp: atp refuses it (accelerate keeps bitsandbytes' "
                           "uint8 weights whole on every process); plan DDP or one process")
        if not 0 <= self.sparsity < 1:
            raise ATPError(f"--sparsity must be in [0, 1), got {self.sparsity}")


def load_config(model: str):
    """A transformers config from a config.json path, a model folder, an embedded model's name or a hub id."""
    from transformers import AutoConfig

    from .modelfiles import read_config
    from .models import EMBEDDED, resolve_model

    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise ATPError(f"--model {model}: pass a config.json, a model folder, an embedded name or a hub id")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ATPError(f"{path} is not a readable JSON config ({err})") from None
        if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
            raise ATPError(f"{path} has no model_type; it is not a Hugging Face model config")
        return AutoConfig.for_model(**values)
    if path.is_dir() or model in EMBEDDED:
        folder = Path(resolve_model(model))
        return AutoConfig.for_model(**read_config(folder))
    resolved = resolve_model(model)  # a hub id: only its config.json is fetched
    try:
        return AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise ATPError(f"could not read the config of '{model}': {str(err).splitlines()[0]}") from None


@dataclasses.dataclass
class Plan:
    parts: dict  # name -> bytes per device during training
    export_parts: dict  # name -> bytes on the main process during the export
    options: PlanOptions
    params: int

    @property
    def train_peak(self) -> int:
        return sum(self.parts.values())

    @property
    def export_peak(self) -> int:
        return sum(self.export_parts.values())

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.export_peak)

    def as_dict(self) -> dict:
        return {"params": self.params, "options": dataclasses.asdict(self.options), "parts": self.parts,
                "train_peak": self.train_peak, "export_parts": self.export_parts, "export_peak": self.export_peak,
                "peak": self.peak}


def projection_shapes(space) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder projection, by its module name."""
    arch, h = space.arch, space.hidden_size
    q, kv, inter = space.num_heads * space.head_dim, space.num_kv_heads * space.head_dim, space.intermediate_size
    return {arch.q: (h, q), arch.k: (h, kv), arch.v: (h, kv), arch.o: (q, h), arch.gate: (h, inter),
            arch.up: (h, inter), arch.down: (inter, h)}


def generator_params(space, hidden: int) -> int:
    """The decision generator's parameters (atp.generator): layer inputs, a bidirectional GRU, per-layer heads."""
    gru = 2 * 3 * (2 * hidden * hidden + 2 * hidden)
    heads = sum(rows * (2 * hidden + 1) * width for rows, width in space.gate_shapes.values())
    return space.num_layers * hidden + gru + heads


def activation_elements_per_token(space, opts: PlanOptions) -> tuple[int, int]:
    """(saved elements per token and decoder layer, saved elements per token outside the layers) of one
    forward pass whose backward reaches LoRA in every layer, as autograd keeps them: each of the two norms its
    input and output (the output is LoRA's input, shared by q/k/v and by gate/up), each LoRA its r-wide middle,
    attention q, k, v and its output with the log-sum-exp (sdpa), or q, the repeated k and v, the probabilities
    and the output (eager), the MLP its gate, up, activation and product, and with gates the masked input of
    o_proj. Outside the layers: the final norm's input and output."""
    h, inter = space.hidden_size, space.intermediate_size
    q, kv = space.num_heads * space.head_dim, space.num_kv_heads * space.head_dim
    if opts.attention == "eager":
        attention = 4 * q + space.num_heads * opts.max_length
    else:
        attention = 2 * q + 2 * kv + space.num_heads
    masked = q if opts.prune else 0
    lora = len(opts.lora_targets) * opts.lora_r
    return 4 * h + attention + masked + 4 * inter + lora, 2 * h


def plan_memory(config, opts: PlanOptions | None = None) -> Plan:
    """Predicted bytes per device (`Plan.parts`) and on the main process at export (`Plan.export_parts`)."""
    from .space import PruningSpace, check_supported

    opts = opts or PlanOptions()
    opts.check()
    check_supported(config)
    space = PruningSpace.from_config(config, mlp_block=opts.mlp_block)
    shapes = projection_shapes(space)
    unknown = [t for t in opts.lora_targets if t not in shapes]
    if unknown:
        raise ATPError(f"--lora-targets {', '.join(unknown)}: not a decoder projection of this model; it has "
                       f"{', '.join(shapes)}")
    dtype_bytes = DTYPE_BYTES[opts.dtype]
    total = space.total_params()
    layer_weights = sum(i * o for i, o in shapes.values())  # one layer's projections
    other = total - space.num_layers * layer_weights  # embeddings, head, norms, biases
    n, sharded = opts.processes, opts.sharding == "fsdp" and opts.processes > 1
    if opts.quantize_base == "none":
        projections = space.num_layers * layer_weights * dtype_bytes
    else:
        per_weight = bytes_per_weight(opts.quantize_base, dtype_bytes)
        row_scales = sum(o for _, o in shapes.values()) * 4 if opts.quantize_base == "int8" else 0
        projections = space.num_layers * (layer_weights * per_weight + row_scales)
    base = projections + other * dtype_bytes
    parts = {"base_weights": int(base / n if sharded else base)}
    if sharded:  # one layer's projections gathered in full for its forward / backward
        parts["gathered_layer"] = int(projections / space.num_layers)
    if opts.quantize_base != "none":
        parts["dequant_buffer"] = max(i * o for i, o in shapes.values()) * dtype_bytes
    lora = space.num_layers * sum(opts.lora_r * (shapes[t][0] + shapes[t][1]) for t in opts.lora_targets)
    parts["lora"] = lora * 4
    parts["gradients"] = lora * 4
    parts["optimizer_state"] = lora * 8
    if opts.prune:
        parts["generator"] = generator_params(space, opts.generator_hidden) * 16  # weights, gradients, 2 moments
    half = opts.mixed_precision in ("bf16", "fp16") or (opts.mixed_precision == "auto" and opts.device == "cuda")
    act_bytes = 2 if half else (4 if opts.quantize_base == "none" else dtype_bytes)  # auto on a CPU: fp32, the larger
    tokens = opts.batch_size * opts.max_length
    per_layer, outside = activation_elements_per_token(space, opts)
    full = tokens * (space.num_layers * per_layer + outside) * act_bytes
    checkpointed = tokens * (space.num_layers * space.hidden_size + per_layer + outside) * act_bytes
    parts["activations"] = checkpointed if opts.gradient_checkpointing else full
    parts["logits"] = tokens * space.vocab_size * 4 * 4  # logits, log-softmax and their gradients (backward)
    if opts.teacher_params:
        parts["teacher"] = opts.teacher_params * dtype_bytes
    if opts.distill > 0:
        parts["distillation"] = tokens * space.vocab_size * 4 * 5  # teacher logits, 2 log-softmax, exp, difference
    parts["runtime"] = RUNTIME_BYTES[opts.device]
    kept = 1 - opts.sparsity if opts.prune else 1.0
    export_parts = {
        # the whole (gathered) model: dequantized to --dtype when quantized, LoRA merged
        "dense_model": total * dtype_bytes + (base if opts.quantize_base != "none" else 0),
        "pruned_fp32": int(kept * total * 4),  # the sliced copy, saved in fp32
        "reloaded_fp32": int(kept * total * 4),  # the reloaded export for the logits check
        "runtime": RUNTIME_BYTES[opts.device],
    }
    return Plan(parts=parts, export_parts=export_parts, options=opts, params=total)


def format_plan(plan: Plan, name: str = "") -> str:
    o = plan.options
    per = "per process" if o.processes > 1 else "one process"
    head = (f"{name}: {plan.params / 1e9:.3g}B parameters, {o.dtype} base"
            f"{'' if o.quantize_base == 'none' else ' quantized ' + o.quantize_base}, {o.processes} x {o.sharding}, "
            f"batch {o.batch_size} x {o.max_length} tokens, LoRA r={o.lora_r}"
            f"{', gradient checkpointing' if o.gradient_checkpointing else ''}, distill {o.distill:g}")
    lines = [head, f"  training, {per}:"]
    lines += [f"    {k:<18}{v / GIB:10.2f} GiB" for k, v in plan.parts.items()]
    lines.append(f"    {'peak':<18}{plan.train_peak / GIB:10.2f} GiB")
    lines.append("  export, main process:")
    lines += [f"    {k:<18}{v / GIB:10.2f} GiB" for k, v in plan.export_parts.items()]
    lines.append(f"    {'peak':<18}{plan.export_peak / GIB:10.2f} GiB")
    return "\n".join(lines)


def add_plan_arguments(p) -> None:
    import argparse

    d = PlanOptions()
    p.add_argument("--model", required=True, help="config.json, model folder, embedded name or hub id")
    p.add_argument("--dtype", default=d.dtype, help=f"base weights as loaded (default {d.dtype}: what atp prune loads)")
    p.add_argument("--quantize-base", default=d.quantize_base, help="none, nf4 or int8 (QLoRA base weights)")
    p.add_argument("--processes", type=int, default=d.processes)
    p.add_argument("--sharding", default=d.sharding, help="ddp (a replica per process) or fsdp (base weights sharded)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--mlp-block", type=int, default=d.mlp_block)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--distill", type=float, default=d.distill)
    p.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sparsity", type=float, default=d.sparsity)
    p.add_argument("--mixed-precision", default=d.mixed_precision,
                   help="as atp prune (default auto: planned as bf16 on a GPU, as fp32 on a CPU, the larger of its two "
                        "choices there)")
    p.add_argument("--attention", default=d.attention, help="sdpa or eager (eager keeps the attention probabilities)")
    p.add_argument("--teacher-params", type=int, default=0, help="parameters of a separate teacher model")
    p.add_argument("--device", default=d.device, help="cuda or cpu (the process's own overhead)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan_command(args) -> int:
    fields = {f.name for f in dataclasses.fields(PlanOptions)}
    opts = PlanOptions(**{k: v for k, v in vars(args).items() if k in fields})
    plan = plan_memory(load_config(args.model), opts)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan, args.model))
    return 0
