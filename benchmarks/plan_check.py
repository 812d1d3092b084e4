"""The memory planner (`atp plan`) against the measured peak RSS of short `atp prune` runs on CPU (issue 35).

    ATP_HOME=... python benchmarks/plan_check.py --max-steps 4 --out runs/plan-check

Each configuration runs alone in its own child process (peak RSS: the child's ru_maxrss, training and export);
the prediction is `atp.plan.plan_memory(...).peak` for the same options with --device cpu. The children run with
MALLOC_MMAP_THRESHOLD_=131072 unless --glibc-default.
"""
import argparse
import json
import os
import sys
from pathlib import Path

from memory import peak_rss_mib

from atp.plan import PlanOptions, load_config, plan_memory

CONFIGS = {  # name -> (atp prune flags, the same as planner options)
    "atp": ([], {}),
    "atp+gc": (["--gradient-checkpointing"], {"gradient_checkpointing": True}),
    "atp, no distillation": (["--distill", "0"], {"distill": 0.0}),
    "lora": (["--no-prune"], {"prune": False, "distill": 0.0}),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="runs/plan-check")
    parser.add_argument("--only", nargs="*", help="names of CONFIGS to run")
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave glibc's dynamic mmap threshold on (freed activations stay resident)")
    args = parser.parse_args()
    if not args.glibc_default:  # big tensors mmapped and returned on free: the RSS follows the live tensors
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = Path(args.out)
    config = load_config(args.model)
    results = {}
    for name, (flags, options) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, "-m", "atp.cli", "prune", "--model", args.model, "--domain", "healthcare",
               "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--max-length",
               str(args.max_length), "--save-every", "0", "--log-every", "1", "--overwrite",
               "--out", str(out / name.replace(" ", "").replace(",", "-")),
               "--mixed-precision", "no", *flags]  # fp32, as the planner's constants were fitted
        measured, seconds = peak_rss_mib(cmd)
        plan = plan_memory(config, PlanOptions(batch_size=args.batch_size, max_length=args.max_length, device="cpu",
                                               mixed_precision="no",
                                               **options))
        predicted = plan.peak / 2**20
        results[name] = {"measured_peak_rss_mib": round(measured, 1), "predicted_peak_mib": round(predicted, 1),
                         "predicted_train_mib": round(plan.train_peak / 2**20, 1),
                         "predicted_export_mib": round(plan.export_peak / 2**20, 1),
                         "error": round(predicted / measured - 1, 3), "wall_seconds": round(seconds, 1)}
        print(name, results[name], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
