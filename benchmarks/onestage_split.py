"""Issue 34: where a one-stage cell's gap to its two-stage twin comes from, its decisions or its training.

The one-stage run (default: atp-paper of benchmarks/compare-onestage-core.yaml) decides while it tunes and then
recovers on its final decisions for the steps after the freeze; its two-stage twin (frozen-generator-paper) decides
on the pretrained model and recovers on its decisions for every step. Per seed s this script recovers the one-stage
run's final decisions exactly as the twin recovers its own (atp prune --decisions-from: the pretrained model,
fresh LoRA, the same steps, seed, teacher and data order), evaluates the domain's perplexity tasks at the compare
cells' window (512), and splits the gap, records paired by id:

  one-stage - recovered   the same decisions, trained one-stage against trained from step 0 (the training)
  recovered - twin        the same recovery, the one-stage run's decisions against the twin's (the decisions)

with a t-interval over seeds for 2-5 seeds (one seed: record noise only). A step whose output exists is skipped.

    ATP_HOME=.atp_home nohup .venv/bin/python benchmarks/onestage_split.py > runs/onestage-split.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from premise import TRAIN, perplexity_tasks  # the same training settings as the table's cells


def cell_run(args, method: str, seed: int) -> Path:
    """The folder of one compare cell (atp.compare's naming)."""
    from atp.compare import Cell

    return args.compare_out / args.domain / Cell(args.domain, method, args.sparsity, seed).name


def commands(args, seed: int) -> list[tuple[Path, list[str]]]:
    """(output that marks the step done, argv) for one seed, in order."""
    atp = [sys.executable, "-m", "atp.cli"]
    source = cell_run(args, args.one_stage, seed) / "run"
    run = args.out / f"recover-{seed}"
    return [(run / "report.json",
             [*atp, "prune", "--model", args.model, "--domain", args.domain, "--seed", str(seed), *TRAIN,
              "--sparsity", str(args.sparsity), *args.extra, "--decisions-from", str(source), "--out", str(run)]),
            (args.out / f"eval-{seed}.json",
             [*atp, "eval", "--model", str(run / "model"), *perplexity_tasks(args.domain), "--limit", "0",
              "--max-length", "512", "--out", str(args.out / f"eval-{seed}.json")])]


def cell_perplexities(cell: Path) -> dict:
    """A compare cell's task metrics: its result.json (atp compare), else its ppl.json (compare_ppl_only.py)."""
    if (cell / "result.json").exists():
        return json.loads((cell / "result.json").read_text())["metrics"]
    return json.loads((cell / "ppl.json").read_text())["tasks"]


def summarise(args) -> dict:
    from atp import stats
    from atp.report import paired_task_rows

    rows, ppl = {}, {}  # task -> which -> [per seed (summed NLL, tokens) per record]; task -> seed -> which -> ppl
    for seed in args.seeds:
        results = {"recovered": json.loads((args.out / f"eval-{seed}.json").read_text())["tasks"]}
        for which, method in (("one-stage", args.one_stage), ("twin", args.twin)):
            results[which] = cell_perplexities(cell_run(args, method, seed))
        for task, metrics in results["recovered"].items():
            if "ppl" not in metrics:
                continue
            ppl.setdefault(task, {})[seed] = {which: r[task]["ppl"] for which, r in results.items()}
            for which, table in zip(results, paired_task_rows(results, task, "ppl")):
                rows.setdefault(task, {}).setdefault(which, []).append(table)
    splits = {}
    for task, per_seed in ppl.items():
        splits[task] = {"per_seed_ppl": per_seed}
        for name, (a, b) in {"training (one-stage - recovered)": ("one-stage", "recovered"),
                             "decisions (recovered - twin)": ("recovered", "twin"),
                             "total (one-stage - twin)": ("one-stage", "twin")}.items():
            r = stats.paired_interval({task: rows[task][a]}, {task: rows[task][b]}, stats.perplexity_of(task))
            splits[task][name] = {"mean": r["diff"], "ci95": [r["low"], r["high"]], "per_seed": r["per_seed"],
                                  "interval": r["interval"], "verdict": stats.judged(r, higher_is_better=False)}
    return {"seeds": args.seeds, "one_stage": args.one_stage, "twin": args.twin, "perplexity": splits}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare-out", type=Path, default=Path("runs/compare-onestage-paper-legal"))
    parser.add_argument("--out", type=Path, default=Path("runs/onestage-split"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="legal")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--one-stage", default="atp-paper", help="the compare method whose decisions are recovered")
    parser.add_argument("--twin", default="frozen-generator-paper", help="the two-stage method it is compared with")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    parser.add_argument("extra", nargs="*", help="further atp prune options for the recoveries (after --)")
    args = parser.parse_args()
    args.compare_out, args.out = args.compare_out.resolve(), args.out.resolve()
    args.extra = args.extra or ["--recipe", "paper", "--generator-lr", "0.01"]  # the twin's options
    for seed in args.seeds:
        for done, argv in commands(args, seed):
            if done.exists():
                continue
            print(" ".join(argv), flush=True)
            if not args.dry_run:
                args.out.mkdir(parents=True, exist_ok=True)
                subprocess.run(argv, check=True)
    if args.dry_run:
        return 0
    summary = summarise(args)
    (args.out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["perplexity"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
