"""Full-logit distillation against top-k distillation from the teacher cache (issue 33 item 2), to run by hand:

    .venv/bin/python benchmarks/teacher_cache.py --max-steps 160 --seeds 0 1 2 --out runs/bench-teacher-cache

For each seed: one run with full logits (`--distill-top-k 0`, the live teacher on every step) and one per K (default
16, 64, 256) at the same number of steps ("equal steps": quality for quality), then per K a run with as many steps as
fit into the full run's training time at that K's step time ("equal time"). The caches are filled before the timed
runs (as `atp compare` does), so the runs' times hold no fill; the fill time is reported apart. Every model is
evaluated on the domain's dev split (`atp.evaluation.evaluate_domain`, --eval-limit records per task). Writes
OUT/teacher_cache.json with each run's train seconds, mean step seconds, steps, fill seconds and metrics, and the
metrics' differences to the full run of the same seed. Run one at a time: two torch jobs on a small CPU slow each
other far more than 2x.
"""
import argparse
import dataclasses
import gc
import json
from pathlib import Path

import torch

from atp.evaluation import evaluate_domain
from atp.models import load_model
from atp.options import ATPConfig
from atp.teacher_cache import fill_for_config
from atp.train import train


def flat_metrics(metrics: dict) -> dict:
    return {f"{task}/{name}": value for task, values in metrics.items() for name, value in values.items()
            if isinstance(value, (int, float))}


def run(cfg: ATPConfig, args) -> dict:
    report = train(cfg, progress=False)
    gc.collect()
    model, tokenizer = load_model(report["model_dir"])
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate_domain(model, tokenizer, args.domain, args.data_dir, limit=args.eval_limit)
    del model
    gc.collect()
    cache = report.get("teacher_cache") or {}
    return {"steps": cfg.max_steps, "top_k": cfg.distill_top_k, "train_seconds": round(report["train_seconds"], 1),
            "mean_step_seconds": report["mean_step_seconds"], "fill_seconds": cache.get("fill_seconds", 0.0),
            "teacher_freed_at": cache.get("live_teacher_freed_at"), "metrics": flat_metrics(metrics)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="healthcare")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-steps", type=int, default=160)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--eval-limit", type=int, default=100)
    parser.add_argument("--no-equal-time", action="store_true", help="only the equal-steps runs")
    parser.add_argument("--out", default="runs/bench-teacher-cache")
    args = parser.parse_args()
    out = Path(args.out)
    base = ATPConfig(model=args.model, domain=args.domain, data_dir=args.data_dir, max_steps=args.max_steps,
                     save_every=0, overwrite=True, distill=0.5, mixed_precision="no")
    fills = {}
    for k in args.ks:  # before any timed run, as atp compare's pre-pass
        stats = fill_for_config(dataclasses.replace(base, distill_top_k=k), progress=True)
        fills[k] = stats and {key: stats[key] for key in ("key", "computed_examples", "loaded_examples",
                                                            "fill_seconds")}
    results = {"config": dataclasses.asdict(base), "fills": fills, "runs": {}}
    for seed in args.seeds:
        full = run(dataclasses.replace(base, seed=seed, out=str(out / f"full-s{seed}")), args)
        results["runs"][f"full-s{seed}"] = full
        for k in args.ks:
            variants = {"steps": args.max_steps}
            if not args.no_equal_time:  # pace measured at equal steps, then as many steps as full's time allows
                variants["time"] = None
            for mode in variants:
                steps = variants[mode]
                if steps is None:
                    pace = results["runs"][f"top{k}-steps-s{seed}"]["mean_step_seconds"]
                    steps = max(1, round(full["mean_step_seconds"] * args.max_steps / pace))
                name = f"top{k}-{mode}-s{seed}"
                cfg = dataclasses.replace(base, seed=seed, distill_top_k=k, max_steps=steps, out=str(out / name))
                result = run(cfg, args)
                result["vs_full"] = {m: round(v - full["metrics"][m], 4) for m, v in result["metrics"].items()
                                     if m in full["metrics"]}
                results["runs"][name] = result
                out.mkdir(parents=True, exist_ok=True)
                (out / "teacher_cache.json").write_text(json.dumps(results, indent=2))
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_cache.json").write_text(json.dumps(results, indent=2))
    for name, result in results["runs"].items():
        print(f"{name:<22} steps {result['steps']:>5}  step {result['mean_step_seconds']:.3f}s  "
              f"train {result['train_seconds']:>7.1f}s  " + "  ".join(
                  f"{m} {v:+.4f}" for m, v in result.get("vs_full", {}).items()))


if __name__ == "__main__":
    main()
