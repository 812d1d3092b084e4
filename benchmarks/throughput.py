"""Training throughput of the default recipe with and without compaction and bf16 (issue 33), side by side in one
process, in A B C A B C order so that drift cancels in the ratios. Each variant is the same `atp prune` run (SmolLM2,
healthcare 40%, 4 x 128-token steps, distillation 0.5, the default schedule); the report's `train_tokens_per_second`
covers the LoRA steps, `whole_run_tokens_per_second` the whole loop (generator steps and the compaction included).
The top-k variants read the teacher cache under ATP_HOME: its one-time fill is reported apart
(`teacher_cache_fill_seconds`; the first round fills it, later rounds and every later seed or cell reuse it).

    nohup .venv/bin/python benchmarks/throughput.py --max-steps 40 --out runs/throughput > runs/throughput.log 2>&1 &
"""
import argparse
import json
import statistics
from pathlib import Path

from atp.options import ATPConfig
from atp.precision import cpu_flags, cpu_name
from atp.train import train

VARIANTS = {
    "masked fp32 (before)": dict(compact=False, mixed_precision="no"),
    "compact fp32": dict(compact=True, mixed_precision="no"),
    "compact bf16": dict(compact=True, mixed_precision="bf16"),
    "compact top-k64": dict(compact=True, mixed_precision="no", distill_top_k=64),
    "compact bf16 top-k64": dict(compact=True, mixed_precision="bf16", distill_top_k=64),
    "default (auto)": dict(),  # today's defaults: compaction, --mixed-precision auto (its choice is in the output)
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--out", default="runs/throughput")
    args = parser.parse_args()
    out = Path(args.out)
    print("cpu:", cpu_name(), "| bf16 flags:", sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx")),
          flush=True)
    results = {name: [] for name in args.variants}
    for round_ in range(args.rounds):
        for name in args.variants:
            cfg = ATPConfig(model=args.model, domain="healthcare", out=str(out / f"{round_}-{name.replace(' ', '-')}"),
                            overwrite=True, max_steps=args.max_steps, max_length=128, save_every=0,
                            **VARIANTS[name])
            report = train(cfg, progress=False)
            fill = (report.get("teacher_cache") or {}).get("fill_seconds", 0.0)
            row = {"lora_steps_tokens_per_second": report["train_tokens_per_second"],
                   "whole_run_tokens_per_second": report["train_tokens"] / (report["train_seconds"] - fill),
                   "train_seconds": report["train_seconds"], "teacher_cache_fill_seconds": fill,
                   "precision": report["precision"]}
            results[name].append(row)
            print(name, round_, json.dumps(row), flush=True)
    base = args.variants[0]
    summary = {}
    for name, rows in results.items():
        summary[name] = {key: statistics.fmean(r[key] for r in rows) for key in rows[0] if key != "precision"}
        summary[name]["precision"] = rows[0]["precision"]
        for key in ("lora_steps_tokens_per_second", "whole_run_tokens_per_second"):
            ratios = [r[key] / b[key] for r, b in zip(rows, results[base])]
            summary[name][f"{key}_ratio_to_{base}"] = statistics.fmean(ratios)
    print(json.dumps(summary, indent=2))
    (out / "summary.json").write_text(json.dumps({"cpu": cpu_name(), "results": results, "summary": summary},
                                                 indent=2))


if __name__ == "__main__":
    main()
