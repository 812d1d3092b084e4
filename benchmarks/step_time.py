"""ATP's per-step training time relative to plain LoRA, side by side in one process (issue 3).

    .venv/bin/python benchmarks/step_time.py --max-steps 24 --out runs/bench-steps

Three short runs on the same data and batch: plain LoRA; ATP with the generator active on every
step of the run (generator phase only); ATP with the default schedule (generator phase, then
frozen decisions); the default schedule with one generator step per 4 LoRA steps. Reports the mean seconds per step of each and the ratios to LoRA.
With --bf16: ATP in fp32 and under bf16 autocast, alternated (fp32, bf16, fp32, bf16).
"""
import argparse
import json
from pathlib import Path

from atp.train import ATPConfig, train


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--out", default="runs/bench-steps")
    parser.add_argument("--abab", action="store_true",
                        help="instead: LoRA, ATP (default schedule), LoRA, ATP, so that drift cancels in the ratio")
    parser.add_argument("--bf16", action="store_true",
                        help="instead: ATP in fp32, bf16 autocast, fp32, bf16 (issue 16: is bf16 the faster CPU path?)")
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
    if args.bf16:
        runs = {"fp32": dict(), "bf16": dict(mixed_precision="bf16"),
                "fp32_again": dict(), "bf16_again": dict(mixed_precision="bf16")}
    results = {}
    for name, extra in runs.items():
        cfg = ATPConfig(model=args.model, domain="healthcare", out=str(out / name), overwrite=True,
                        max_steps=args.max_steps, save_every=0, **extra)
        report = train(cfg, progress=False)
        results[name] = {k: report[k] for k in ("mean_step_seconds", "mean_lora_step_seconds",
                                                 "mean_generator_step_seconds", "generator_steps")}
    base_name = "fp32" if args.bf16 else "lora"
    for name in list(results):
        results[name]["ratio_vs_" + base_name] = round(
            results[name]["mean_step_seconds"] / results[base_name]["mean_step_seconds"], 3)
    if args.abab:
        pair = lambda name: results[name]["mean_step_seconds"] + results[name + "_again"]["mean_step_seconds"]
        results["abab_ratio_atp_vs_lora"] = round(pair("atp_default_schedule") / pair("lora"), 3)
    if args.bf16:
        pair = lambda name: results[name]["mean_step_seconds"] + results[name + "_again"]["mean_step_seconds"]
        results["abab_ratio_bf16_vs_fp32"] = round(pair("bf16") / pair("fp32"), 3)
    (out / "step_time.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
