"""ATP's per-step training time relative to plain LoRA, side by side in one process (issue 3).

    .venv/bin/python benchmarks/step_time.py --max-steps 24 --out runs/bench-steps

Three short runs on the same data and batch: plain LoRA; ATP with the generator active on every
step of the run (generator phase only); ATP with the default schedule (generator phase, then
frozen decisions); the default schedule with one generator step per 4 LoRA steps. Reports the mean seconds per step of each and the ratios to LoRA.
"""
import argparse
import json
from pathlib import Path

from atp.options import ATPConfig
from atp.train import train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--out", default="runs/bench-steps")
    parser.add_argument("--abab", action="store_true",
                        help="instead: LoRA, ATP (default schedule), LoRA, ATP, so that drift cancels in the ratio")
    args = parser.parse_args()
    out = Path(args.out)
    runs = {
        "lora": dict(prune=False),
        "atp_generator_phase": dict(generator_frac=1.0),
        "atp_default_schedule": dict(),
        "atp_generator_every_4": dict(generator_every=4),
    }
    if args.abab:
        runs = {"lora": dict(prune=False), "atp_default_schedule": dict(),
                "lora_again": dict(prune=False), "atp_default_schedule_again": dict()}
    results = {}
    for name, extra in runs.items():
        cfg = ATPConfig(model=args.model, domain="healthcare", out=str(out / name), overwrite=True,
                        max_steps=args.max_steps, save_every=0, **{"mixed_precision": "no", **extra})
        report = train(cfg, progress=False)
        results[name] = {k: report[k] for k in ("mean_step_seconds", "mean_lora_step_seconds",
                                                 "mean_generator_step_seconds", "generator_steps")}
    base = results["lora"]["mean_step_seconds"]
    for name in list(results):
        results[name]["ratio_vs_lora"] = round(results[name]["mean_step_seconds"] / base, 3)
    if args.abab:
        pair = lambda name: results[name]["mean_step_seconds"] + results[name + "_again"]["mean_step_seconds"]
        results["abab_ratio_atp_vs_lora"] = round(pair("atp_default_schedule") / pair("lora"), 3)
    (out / "step_time.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
