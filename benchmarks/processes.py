"""One process against two (accelerate/torchrun, gloo on CPU) with the same global batch (issue 6).

    .venv/bin/python benchmarks/processes.py --max-steps 10 --out runs/bench-processes

Compares the decisions and the exported weights, and reports both wall times.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file


def run(cmd, env):
    started = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return time.time() - started


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--out", default="runs/bench-processes")
    args = parser.parse_args()
    out = Path(args.out)
    common = ["prune", "--model", args.model, "--domain", "healthcare", "--max-steps", str(args.max_steps),
              "--save-every", "0", "--overwrite", "--generator-frac", "0.5"]
    env = dict(os.environ)
    one = run([sys.executable, "-m", "atp.cli", *common, "--batch-size", str(args.global_batch),
               "--out", str(out / "one")], env)
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    launcher = str(Path(sys.executable).parent / "accelerate")
    two = run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "atp.cli", *common,
               "--batch-size", str(args.global_batch // 2), "--out", str(out / "two")], env)
    reports = {n: json.loads((out / n / "report.json").read_text()) for n in ("one", "two")}
    a, b = (load_file(str(out / n / "model" / "model.safetensors")) for n in ("one", "two"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a) if a.keys() == b.keys() else float("nan")
    result = {
        "steps": args.max_steps,
        "global_batch": args.global_batch,
        "same_kept_structure": reports["one"]["layers"] == reports["two"]["layers"],
        "decisions_identical_across_processes": reports["two"].get("decisions_identical_across_processes"),
        "max_abs_weight_diff": diff,
        "wall_seconds_one_process": round(one, 1),
        "wall_seconds_two_processes": round(two, 1),
        "prunable_sparsity": [reports[n]["prunable_sparsity"] for n in ("one", "two")],
    }
    (out / "processes.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
