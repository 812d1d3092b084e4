"""Issue-3 benchmark: dense, dense + LoRA (same steps) and ATP at given sparsities, side by side in one process.

    nohup .venv/bin/python benchmarks/engine.py --domain healthcare --sparsity 0.4 0.5 --max-steps 200 \
        --out runs/bench-engine > runs/bench-engine.log 2>&1 &

Writes OUT/results.json and OUT/results.md. Per-step training times come from the same process, so
their ratio (ATP / LoRA) is measured side by side.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from atp.evaluation import evaluate_domain
from atp.models import load_model
from atp.options import ATPConfig
from atp.train import train


def evaluate(name, domain, limit):
    started = time.time()
    model, tokenizer = load_model(name)
    metrics = evaluate_domain(model, tokenizer, domain, limit=limit)
    return metrics, time.time() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="healthcare")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.4, 0.5])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--limit", type=int, default=None, help="examples per task in evaluation")
    parser.add_argument("--out", default="runs/bench-engine")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--uniform", action="store_true", help="ATP runs keep equal widths in every layer")
    parser.add_argument("--round-to", type=int, default=0, help="ATP runs keep MLP widths at multiples of this")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["meta"] = {
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "max_steps": args.max_steps,
        "limit": args.limit,
        "uniform": args.uniform,
        "round_to": args.round_to,
    }

    def save():
        results_path.write_text(json.dumps(results, indent=2))

    runs = [(f"atp-{s:g}", s) for s in args.sparsity[:1]] + [("lora", None)] + [(f"atp-{s:g}", s) for s in args.sparsity[1:]]
    if args.skip_lora:
        runs = [r for r in runs if r[0] != "lora"]
    for label, sparsity in runs:
        if label in results:
            continue
        cfg = ATPConfig(model=args.model, domain=args.domain, out=str(out / label), overwrite=True,
                        max_steps=args.max_steps, prune=sparsity is not None, sparsity=sparsity or 0.4,
                        uniform=args.uniform and sparsity is not None, round_to=args.round_to if sparsity else 0,
                        mixed_precision="no")  # fp32, as its figures were recorded
        report = train(cfg)
        metrics, seconds = evaluate(report["model_dir"], args.domain, args.limit)
        keep = ("train_seconds", "total_seconds", "mean_step_seconds", "mean_lora_step_seconds",
                "mean_generator_step_seconds", "generator_steps", "prunable_sparsity", "model_sparsity",
                "exported_params", "dense_params", "logits_check", "layers")
        results[label] = {"metrics": metrics, "eval_seconds": seconds, **{k: report[k] for k in keep}}
        save()
        print(json.dumps({label: results[label]}, indent=1), flush=True)
    if not args.skip_dense and "dense" not in results:
        metrics, seconds = evaluate(args.model, args.domain, args.limit)
        results["dense"] = {"metrics": metrics, "eval_seconds": seconds}
        save()

    first = next(results[label] for label in ["dense", "lora"] + [r[0] for r in runs] if label in results)
    lines = ["| model | " + " | ".join(f"{t} {m}" for t, ms in first["metrics"].items() for m in ms
                                     if m not in ("n", "tokens", "windows", "nll")) + " | sparsity (prunable / model) | train s | s/step | ratio vs LoRA |"]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    lora_step = results.get("lora", {}).get("mean_step_seconds")
    for label in ["dense", "lora"] + [f"atp-{s:g}" for s in args.sparsity]:
        if label not in results:
            continue
        r = results[label]
        cells = [f"{v:.3f}" for t, ms in r["metrics"].items() for m, v in ms.items() if m not in ("n", "tokens", "windows", "nll")]
        step = r.get("mean_step_seconds")
        sparsity = f"{r['prunable_sparsity']:.3f} / {r['model_sparsity']:.3f}" if "prunable_sparsity" in r else "0 / 0"
        ratio = f"{step / lora_step:.3f}" if step and lora_step else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sparsity} | {r.get('train_seconds', 0):.0f} | "
                     f"{step or 0:.2f} | {ratio} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
