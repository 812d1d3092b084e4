"""Same weights before and after a refactor (issue 32): a short fixed-seed `atp prune` of SmolLM2-135M for each
pruning space, and the SHA-256 of every exported file, written to a JSON file. Run it on two commits and compare:

    ATP_DATA_DIR=../shared/data .venv/bin/python benchmarks/same_weights.py --out runs/same-weights-before.json
    (change the code)
    ATP_DATA_DIR=../shared/data .venv/bin/python benchmarks/same_weights.py --out runs/same-weights-after.json \
        --compare runs/same-weights-before.json
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from atp.checkpoint import file_sha256

SPACES = {
    "heads+mlp": ["heads", "mlp"],
    "blocks+heads+mlp": ["blocks", "heads", "mlp"],
    "hidden+heads+mlp": ["hidden", "heads", "mlp"],
    "heads+qk-dims+mlp": ["heads", "qk-dims", "mlp"],
    "mlp": ["mlp"],
}
TRAIN = ["--domain", "healthcare", "--sparsity", "0.3", "--max-steps", "8", "--batch-size", "2", "--max-length", "64",
         "--seed", "3", "--save-every", "0", "--calib-batches", "2", "--log-every", "4",
         "--mixed-precision", "no"]  # fp32, as before/after pairs were recorded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", help="an earlier output of this script: exit 1 unless every hash is equal")
    parser.add_argument("--only", nargs="*", help="these spaces only")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, kinds in SPACES.items():
            if args.only and name not in args.only:
                continue
            run = Path(scratch) / name
            space = [arg for kind in kinds for arg in ("--space", kind)]
            subprocess.run([sys.executable, "-m", "atp.cli", "prune", "--model", args.model, *space, *TRAIN,
                            "--out", str(run)], check=True, stdout=subprocess.DEVNULL)
            model = run / "model"
            results[name] = {path.name: file_sha256(path) for path in sorted(model.iterdir())
                             if path.suffix in (".safetensors", ".json") and path.name != "atp_report.json"}
            report = json.loads((run / "report.json").read_text())
            results[name]["decisions"] = report.get("decisions")
            print(name, results[name].get("model.safetensors"), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [f"{name}/{key}" for name in results for key in results[name]
                  if before.get(name, {}).get(key) != results[name][key]]
        print("identical" if not differ else "DIFFERENT: " + ", ".join(differ))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
