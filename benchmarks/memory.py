"""Peak RSS of `atp prune` against plain LoRA fine-tuning with the same batch (issue 6).

    .venv/bin/python benchmarks/memory.py --max-steps 8 --out runs/bench-memory

Each configuration runs in its own child process; the peak RSS is the child's ru_maxrss.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "lora": ["--no-prune"],
    "atp": [],
    "lora+gc": ["--no-prune", "--gradient-checkpointing"],
    "atp+gc": ["--gradient-checkpointing"],
}


def peak_rss_mib(cmd):
    """Run cmd in a fresh wrapper process so that RUSAGE_CHILDREN covers exactly one run."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    started = time.time()
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return int(done.stdout.strip().splitlines()[-1]) / 1024, time.time() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="runs/bench-memory")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for name, extra in CONFIGS.items():
        cmd = [sys.executable, "-m", "atp.cli", "prune", "--model", args.model, "--domain", "healthcare",
               "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--max-length",
               str(args.max_length), "--save-every", "0", "--overwrite", "--out", str(out / name),
               "--mixed-precision", "no", *extra]  # fp32, as its figures were recorded
        rss, seconds = peak_rss_mib(cmd)
        results[name] = {"peak_rss_mib": round(rss, 1), "wall_seconds": round(seconds, 1)}
        print(name, results[name], flush=True)
    results["ratio_atp_vs_lora"] = round(results["atp"]["peak_rss_mib"] / results["lora"]["peak_rss_mib"], 3)
    results["ratio_atp_gc_vs_lora"] = round(results["atp+gc"]["peak_rss_mib"] / results["lora"]["peak_rss_mib"], 3)
    (out / "memory.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
