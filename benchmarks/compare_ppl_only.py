"""Train an `atp compare` config's cells and score only the domain's perplexity tasks (or the `--task`s named),
when the full evaluation does not fit in a session (issue 34's healthcare half: the first cell's HQS generation and
PubMedQA were still running after 17 minutes).

Each cell is trained exactly as `atp compare` trains it (its own settings, seed and folder, so a later `atp compare`
run of the same config reuses the training and adds the full evaluation). Each model is then scored with `atp eval`
on the domain's perplexity tasks (all records, max length 512, as the compare cells), into `<cell>/ppl.json`. The
summary pairs every method with the config's `base` on every task scored (`ppl.json`, and `eval-<tasks>.json` for
`--task`: each task's primary metric, as `atp compare`), records paired by id: per seed, and over seeds a t-interval
(2-5 seeds; one seed: record noise only). A step whose output exists is skipped, so a rerun continues.

    ATP_HOME=.atp_home nohup .venv/bin/python benchmarks/compare_ppl_only.py \
        benchmarks/compare-onestage-core-healthcare.yaml > runs/onestage-core-healthcare-ppl.log 2>&1 &
    ATP_HOME=.atp_home .venv/bin/python benchmarks/compare_ppl_only.py CONFIG --task hqs   # adds HQS ROUGE-L
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

from premise import perplexity_tasks


def evaluate(spec, cell, tasks: list[str]) -> Path:
    """tasks: --task names; none: the domain's perplexity tasks. All records of the dev split either way."""
    from atp.compare import cell_dir

    out = cell_dir(spec, cell) / (f"eval-{'-'.join(tasks)}.json" if tasks else "ppl.json")
    if not out.exists():
        chosen = [a for t in tasks for a in ("--task", t)] if tasks else perplexity_tasks(cell.domain)
        argv = [sys.executable, "-m", "atp.cli", "eval", "--model", str(cell_dir(spec, cell) / "run" / "model"),
                *chosen, "--limit", "0", "--max-length", "512", "--out", str(out)]
        print(" ".join(argv), flush=True)
        subprocess.run(argv, check=True)
    return out


def summarise(spec, todo) -> dict:
    """The config's base minus each other method, per domain (atp.report.differences on the perplexity tasks),
    and per cell: training time, the search's own sparsity at the freeze, the pruned groups' LoRA norm (its peak in
    log.jsonl and at the freeze's cut); the decision search (comebacks); each method's final decisions against the
    base's, same seed (atp.report.decision_overlaps)."""
    from atp.compare import cell_dir
    from atp.report import decision_overlaps, decision_search, differences, primary_metrics
    from atp.stats import judged

    results, cells = [], []
    for cell in todo:
        folder = cell_dir(spec, cell)
        scored = [f for f in [folder / "ppl.json", *sorted(folder.glob("eval-*.json"))] if f.exists()]
        if not scored:
            continue
        report = json.loads((folder / "run" / "report.json").read_text())
        log = [json.loads(line) for line in (folder / "run" / "log.jsonl").read_text().splitlines()]
        metrics = {}
        for path in scored:
            metrics.update(json.loads(path.read_text())["tasks"])
        results.append({"domain": cell.domain, "method": cell.method, "sparsity": cell.sparsity, "seed": cell.seed,
                        "metrics": metrics, "report": report})
        chosen = primary_metrics(metrics)
        cells.append({"cell": cell.name, "scores": {t: metrics[t][m] for t, m in chosen.items()},
                      "train_seconds": report["train_seconds"],
                      "search_sparsity_at_freeze": report.get("search_sparsity_at_freeze"),
                      "pruned_lora_norm_peak": max((line.get("group_lasso", 0.0) for line in log), default=None),
                      "pruned_lora_norm_before_freeze_cut": report.get("pruned_lora_norm_before_freeze_cut")})
    comparisons = []
    for domain in spec.domains:
        here = [r for r in results if r["domain"] == domain]
        tasks = primary_metrics({task: None for r in here for task in r["metrics"]})
        comparisons += [{"domain": domain, **row, "judged": judged(row, row["higher_is_better"], name=row["a"])}
                        for row in differences(here, None, tasks, {}, spec.base)]
    return {"config": str(spec.out), "base": spec.base, "comparisons": comparisons, "cells": cells,
            "decision_search": decision_search(results), "decision_overlaps": decision_overlaps(results, spec.base)}


def main() -> int:
    from atp.compare import CompareSpec, cell_config, cells, train_cell
    from atp.fsutil import write_text_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="an atp compare config")
    parser.add_argument("--summary-only", action="store_true", help="train and score nothing; summarise what exists")
    parser.add_argument("--task", action="append", default=[], metavar="NAME",
                        help="score these tasks (repeatable) instead of the perplexity tasks")
    args = parser.parse_args()
    spec = CompareSpec.load(args.config)
    todo = [cell for cell in cells(spec) if cell.method not in ("dense", "dense-lora")]
    if not args.summary_only:
        for i, cell in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {cell.domain} {cell.name}", flush=True)
            train_cell(cell_config(spec, cell), progress=True)
            gc.collect()
            evaluate(spec, cell, args.task)
    summary = summarise(spec, todo)
    path = Path(spec.out) / "ppl-summary.json"
    write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    for row in summary["comparisons"]:
        print(f"{row['domain']} {row['sparsity']:g} {row['measure']}: {row['a']} - {row['b']} = {row['diff']:+.2f} "
              f"[{row['low']:+.2f}, {row['high']:+.2f}] ({row['interval']}; {row['judged']})")
    print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
