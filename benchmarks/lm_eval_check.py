"""lm-evaluation-harness on atp exports: a local PubMedQA task over a JSONL file, run with the harness's own
`hf` model class exactly as a user would (`trust_remote_code=True` for heterogeneous exports).

    .venv/bin/pip install lm_eval==0.4.13        # not an atp dependency
    ATP_HOME=.atp_home .venv/bin/python benchmarks/lm_eval_check.py \
        --model smollm2-135m --model runs/bench-engine/atp-0.4/model --limit 100

The task file and the dev split (last 20% of ../shared/data/healthcare/pubmedqa_train.jsonl, the split
atp's own evaluation uses) are written to a temporary folder; no data is copied into the repository.
Prints, per model, the harness's accuracy and the harness's exit status, and writes OUT/lm_eval.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atp import data
from atp.models import resolve_model

TASK = """task: atp_pubmedqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dev_file}
test_split: test
output_type: multiple_choice
doc_to_text: "Context: {{{{context}}}}\\nQuestion: {{{{question}}}}\\nAnswer (yes, no or maybe):"
doc_to_choice: ["yes", "no", "maybe"]
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path, data_dir: str | None) -> None:
    records = data.split(data.get_task("pubmedqa").load(data_dir=data_dir), "dev")
    choices = ["yes", "no", "maybe"]
    with open(folder / "pubmedqa_dev.jsonl", "w") as f:
        for r in records:
            row = {"context": " ".join(r["CONTEXTS"])[:3000], "question": r["QUESTION"],
                   "label": choices.index(r["final_decision"])}
            f.write(json.dumps(row) + "\n")
    (folder / "atp_pubmedqa_local.yaml").write_text(TASK.format(dev_file=folder / "pubmedqa_dev.jsonl"))


def run_harness(model_path: str, folder: Path, limit: int | None, out: Path) -> dict:
    args = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={model_path},trust_remote_code=True,dtype=float32",
            "--tasks", "atp_pubmedqa_local", "--include_path", str(folder), "--batch_size", "4",
            "--device", "cpu", "--output_path", str(out)]
    if limit:
        args += ["--limit", str(limit)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    found = sorted(out.rglob("results_*.json"))
    result = {"returncode": proc.returncode, "seconds": round(time.time() - started, 1)}
    if found:
        metrics = json.loads(found[-1].read_text())["results"]["atp_pubmedqa_local"]
        result.update(acc=metrics.get("acc,none"), acc_stderr=metrics.get("acc_stderr,none"))
    else:
        result["stderr_tail"] = proc.stderr[-2000:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", required=True, help="embedded name or model folder (repeatable)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="runs/lm-eval")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_task(folder, args.data_dir)
        for name in args.model:
            path = resolve_model(name)
            results[name] = run_harness(path, folder, args.limit, out / Path(name).name.replace("/", "_"))
            print(name, json.dumps(results[name]), flush=True)
    (out / "lm_eval.json").write_text(json.dumps(results, indent=2))
    if any(r["returncode"] != 0 or r.get("acc") is None for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
