"""Command line: atp prepare | eval | prune | export | bench | compare | demo."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing

from .errors import ATPError

HELP = {
    "model": "embedded name (smollm2-135m), local HF folder, or hub id",
    "domain": "training domain: healthcare or legal",
    "train_files": "extra training data as TASK=PATH.jsonl (repeatable)",
    "data_dir": "folder with the domain JSONL files (default: $ATP_DATA_DIR or ../shared/data)",
    "out": "run directory; the exported model lands in OUT/model",
    "overwrite": "replace an existing, non-empty run directory",
    "prune": "--no-prune runs plain LoRA fine-tuning with the same loop (the dense + LoRA baseline)",
    "method": "atp (one-stage), or a two-stage baseline whose decisions are fixed on the pretrained model before "
              "LoRA tuning: taylor, magnitude, activation, random, frozen-generator (see atp.baselines)",
    "sparsity": "target fraction of prunable (decoder-block) parameters to remove, in (0, 1)",
    "mlp_block": "MLP channels per gate (kept MLP widths are multiples of it)",
    "uniform": "keep the same widths in every layer, so the export is a plain LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM checkpoint",
    "round_to": "keep MLP widths at multiples of this many channels (a multiple of --mlp-block), for hardware-friendly shapes",
    "max_steps": "training steps (optimizer updates)",
    "generator_every": "one generator step per this many LoRA steps",
    "generator_frac": "freeze the generator after this fraction of steps; LoRA then finishes on fixed decisions "
                      "(1.0: the generator trains to the end and is calibrated to the target just before export)",
    "restart_lr": "restart the LoRA learning-rate schedule (warm-up, cosine) when the generator freezes, so the "
                  "fixed-decision phase recovers at the full learning rate (--no-restart-lr: one cosine over the run)",
    "calib_fraction": "fraction of training examples held out for generator steps",
    "calib_max_length": "token length of calibration sequences for generator steps (default: max_length // 2)",
    "calib_batches": "calibration batches for the importance scores of the taylor and activation baselines",
    "alpha": "weight of the parameter-ratio loss",
    "target_warmup": "fraction of the generator phase over which the ratio target moves from 1 to 1 - sparsity",
    "lam": "group-lasso weight (ramped up over the generator phase); 0 turns group lasso and its proximal "
           "step off (an ablation); not used by the two-stage baselines",
    "mask_lora": "--no-mask-lora masks only the frozen path (an ablation)",
    "mixed_precision": "no, bf16 or fp16 (accelerate)",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "gguf": "also write the exported model as a GGUF file for llama.cpp at this path (see atp export)",
    "gguf_type": "GGUF tensor type: f32, f16, q8_0 or q4_0",
    "check_tolerance": "export check: the reloaded model's max |logit diff| from the masked model must be at most "
                       "this times the largest |logit| (at least 1)",
}


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per config field; defaults stay None so that a YAML file's values are not overridden."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{HELP.get(f.name, '')} (default: {default})".strip()
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            name = "--train-file" if f.name == "train_files" else flag
            parser.add_argument(name, dest=f.name, action="append", default=None, help=help_text)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)


def config_from_args(args, config_cls):
    values = config_cls.from_yaml(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(config_cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return config_cls(**values)


def cmd_prepare(args) -> int:
    from .models import resolve_model

    print(resolve_model(args.model))
    return 0


def cmd_eval(args) -> int:
    from .evaluation import run_eval_command

    return run_eval_command(args)


def print_prune_report(report: dict) -> None:
    check = report.get("logits_check", {})
    print(
        f"exported {report['exported_params']:,} of {report['dense_params']:,} parameters: "
        f"sparsity {report['prunable_sparsity']:.4f} over prunable parameters "
        f"(target {report['target_sparsity']}), {report['model_sparsity']:.4f} over the whole model"
    )
    if check:
        print(f"logits check: max |diff| {check['max_abs_logit_diff']:.2e} (allowed {check['allowed']:.2e}) "
              f"{'passed' if check['passed'] else 'FAILED'}")
    print(f"training {report['train_seconds']:.0f}s; model saved to {report['model_dir']}")


def cmd_prune(args) -> int:
    from .train import ATPConfig, resume_config, train

    if args.resume:
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ATPConfig) if getattr(args, f.name) is not None}
        if args.config:
            given = {**ATPConfig.from_yaml(args.config), **given}
        cfg = resume_config(args.resume, given)
    else:
        cfg = config_from_args(args, ATPConfig)
    report = train(cfg, resume=bool(args.resume))
    if "exported_params" in report:
        print_prune_report(report)
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare

    return run_compare(args.config, dry_run=args.dry_run, report_only=args.report_only)


def cmd_demo(args) -> int:
    from .evaluation import evaluate_domain
    from .models import load_model
    from .train import ATPConfig, train

    out = args.out
    cfg = ATPConfig(model=args.model, domain="healthcare", sparsity=args.sparsity, out=out, overwrite=True,
                    max_steps=args.max_steps, max_length=args.max_length)
    print(f"[1/3] ATP: pruning {cfg.model} to {cfg.sparsity:.0%} sparsity on {cfg.domain} data ({cfg.max_steps} steps)")
    report = train(cfg)
    print_prune_report(report)
    results = {}
    for label, name in (("dense", cfg.model), ("atp", report["model_dir"])):
        print(f"[{2 if label == 'dense' else 3}/3] evaluating {label} model on the {cfg.domain} dev split")
        started = time.time()
        model, tokenizer = load_model(name)
        results[label] = evaluate_domain(model, tokenizer, cfg.domain, limit=args.limit)
        print(f"      {time.time() - started:.0f}s")
    print(side_by_side(results))
    with open(f"{out}/demo_results.json", "w") as f:
        json.dump({"report": report, "results": results}, f, indent=2)
    return 0


def side_by_side(results: dict[str, dict]) -> str:
    """Table of task | metric | one column per model, from {label: {task: {metric: value}}}."""
    labels = list(results)
    first = results[labels[0]]
    lines = [f"{'task':<14}{'metric':<10}" + "".join(f"{label:>12}" for label in labels)]
    for task, metrics in first.items():
        for metric, value in metrics.items():
            if not isinstance(value, float) or metric in ("nll",):
                continue
            row = [results[label].get(task, {}).get(metric) for label in labels]
            lines.append(f"{task:<14}{metric:<10}" + "".join(f"{v:>12.3f}" if v is not None else f"{'-':>12}" for v in row))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .train import ATPConfig

    parser = argparse.ArgumentParser(
        prog="atp",
        description="ATP: one-stage structural pruning + LoRA tuning that turns a general LLM into a small domain model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="prepare a model (convert the embedded SmolLM2 GGUF once) and print its path")
    p.add_argument("--model", default="smollm2-135m", help=HELP["model"])
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("eval", help="evaluate a dense or pruned model on domain tasks (perplexity, accuracy, ROUGE)")
    from .evaluation import add_eval_arguments

    add_eval_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prune", help="ATP: prune and LoRA-tune in one run, then export a physically smaller model")
    p.add_argument("--config", help="YAML file with any of the options below (flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest intact checkpoint")
    add_config_arguments(p, ATPConfig)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("export", help="write a dense, uniform or heterogeneous model as a GGUF file for llama.cpp")
    from .gguf_export import add_export_arguments, run_export_command

    add_export_arguments(p)
    p.set_defaults(func=run_export_command)

    p = sub.add_parser("bench", help="speed and size of a dense and pruned models side by side (ratios, medians)")
    from .bench import add_bench_arguments, run_bench_command

    add_bench_arguments(p)
    p.set_defaults(func=lambda args: run_bench_command(args))

    p = sub.add_parser("compare", help="ATP vs two-stage baselines and ablations: methods x sparsities x domains "
                                       "x seeds from one YAML config; resumable; markdown, JSON and plots",
                       description="Runs every cell (train, then evaluate on the dev split) that has no result yet. "
                                   "In the background: nohup atp compare --config X > compare.log 2>&1 &")
    p.add_argument("--config", required=True, help="YAML file (keys: see atp.compare, e.g. benchmarks/compare.yaml)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--report-only", action="store_true", help="write tables and plots from finished cells, run nothing")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="prune SmolLM2 at 40%% on healthcare data and compare dense vs pruned metrics")
    p.add_argument("--model", default="smollm2-135m", help=HELP["model"])
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--max-steps", type=int, default=120)
    p.add_argument("--max-length", type=int, default=128, help="training sequence length")
    p.add_argument("--limit", type=int, default=40, help="examples per task for the evaluation")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ATPError as err:
        print(f"atp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
