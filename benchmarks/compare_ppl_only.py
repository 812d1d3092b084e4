"""Train an `atp compare` config's cells and score only the domain's perplexity tasks, when the full evaluation
does not fit in a session (issue 34's healthcare half: HQS generation and PubMedQA take about 11 minutes a cell).

Each cell is trained exactly as `atp compare` trains it (its own settings, seed and folder, so a later `atp compare`
run of the same config reuses the training and adds the full evaluation). Each model is then scored with `atp eval`
on the domain's perplexity tasks (all records, max length 512, as the compare cells), into `<cell>/ppl.json`. The
summary pairs every method with the config's `base`, records paired by id: per seed, and over seeds a t-interval
(2-5 seeds; one seed: record noise only). A step whose output exists is skipped, so a rerun continues.

    ATP_HOME=.atp_home nohup .venv/bin/python benchmarks/compare_ppl_only.py \
        benchmarks/compare-onestage-core-healthcare.yaml > runs/onestage-core-healthcare-ppl.log 2>&1 &
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

from premise import perplexity_tasks


def evaluate(spec, cell) -> Path:
    from atp.compare import cell_dir

    out = cell_dir(spec, cell) / "ppl.json"
    if not out.exists():
        argv = [sys.executable, "-m", "atp.cli", "eval", "--model", str(cell_dir(spec, cell) / "run" / "model"),
                *perplexity_tasks(cell.domain), "--limit", "0", "--max-length", "512", "--out", str(out)]
        print(" ".join(argv), flush=True)
        subprocess.run(argv, check=True)
    return out


def cell_diagnostics(spec, todo) -> dict:
    """Per cell: training time, the search's own sparsity at the freeze, the pruned groups' LoRA norm (its peak in
    log.jsonl and at the freeze's cut); the decision search (comebacks); each method's final decisions against the
    base's, same seed (atp.report.decision_overlaps)."""
    from atp.compare import cell_dir
    from atp.report import decision_overlaps, decision_search

    results, cells = [], []
    for cell in todo:
        run = cell_dir(spec, cell) / "run"
        if not (run / "report.json").exists():
            continue
        report = json.loads((run / "report.json").read_text())
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        results.append({"method": cell.method, "sparsity": cell.sparsity, "seed": cell.seed, "report": report})
        cells.append({"cell": cell.name, "train_seconds": report["train_seconds"],
                      "search_sparsity_at_freeze": report.get("search_sparsity_at_freeze"),
                      "pruned_lora_norm_peak": max((line.get("group_lasso", 0.0) for line in log), default=None),
                      "pruned_lora_norm_before_freeze_cut": report.get("pruned_lora_norm_before_freeze_cut")})
    return {"cells": cells, "decision_search": decision_search(results),
            "decision_overlaps": decision_overlaps(results, spec.base)}


def summarise(spec, todo) -> dict:
    from atp import stats
    from atp.compare import cell_dir
    from atp.report import paired_task_rows

    by_seed = {}  # (domain, sparsity, seed) -> method -> eval metrics
    for cell in todo:
        path = cell_dir(spec, cell) / "ppl.json"
        if not path.exists():
            continue
        metrics = json.loads(path.read_text())["tasks"]
        by_seed.setdefault((cell.domain, cell.sparsity, cell.seed), {})[cell.method] = metrics
    summary = []
    for method in [m for m in spec.methods if m != spec.base]:
        groups = {}
        for (domain, sparsity, seed), cells in sorted(by_seed.items()):
            if spec.base in cells and method in cells:
                groups.setdefault((domain, sparsity), {})[seed] = cells
        for (domain, sparsity), seeds in groups.items():
            for task in next(iter(seeds.values()))[spec.base]:
                rows = {spec.base: [], method: []}
                for cells in seeds.values():
                    base_rows, other_rows = paired_task_rows({k: cells[k] for k in (spec.base, method)}, task, "ppl")
                    rows[spec.base].append(base_rows)
                    rows[method].append(other_rows)
                r = stats.paired_interval({task: rows[spec.base]}, {task: rows[method]}, stats.perplexity_of(task))
                summary.append({
                    "domain": domain, "sparsity": sparsity, "task": task, "a": spec.base, "b": method,
                    "seeds": sorted(seeds),
                    "ppl": {s: {k: cells[k][task]["ppl"] for k in (spec.base, method)} for s, cells in seeds.items()},
                    "a_minus_b": r["diff"], "ci95": [r["low"], r["high"]], "per_seed": r["per_seed"],
                    "interval": r["interval"], "verdict": stats.judged(r, higher_is_better=False, name=spec.base)})
    return {"config": str(spec.out), "base": spec.base, "comparisons": summary,
            **cell_diagnostics(spec, todo)}


def main() -> int:
    from atp.compare import CompareSpec, cell_config, cells, train_cell

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="an atp compare config")
    parser.add_argument("--summary-only", action="store_true", help="train and score nothing; summarise what exists")
    args = parser.parse_args()
    spec = CompareSpec.load(args.config)
    todo = [cell for cell in cells(spec) if cell.method not in ("dense", "dense-lora")]
    if not args.summary_only:
        for i, cell in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {cell.domain} {cell.name}", flush=True)
            train_cell(cell_config(spec, cell), progress=True)
            gc.collect()
            evaluate(spec, cell)
    summary = summarise(spec, todo)
    path = Path(spec.out) / "ppl-summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    for row in summary["comparisons"]:
        print(f"{row['domain']} {row['sparsity']} {row['task']}: {row['a']} - {row['b']} = {row['a_minus_b']:+.2f} "
              f"[{row['ci95'][0]:+.2f}, {row['ci95'][1]:+.2f}] ({row['interval']}; {row['verdict']})")
    print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
