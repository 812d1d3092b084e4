"""Issue 34 item 4, the premise test: do pruning decisions found on *tuned* weights beat decisions found on
*pretrained* weights at all, at our scale? Run for seeds 0-2 (docs/benchmarks.md, "The premise test").

Per seed s (legal, 50% of the prunable parameters by default):
  dense-lora-s     atp prune --no-prune: LoRA on the dense model; its merged model is the tuned model
  search-pre-s     atp prune --method frozen-generator --decide-only on the pretrained model -> D_pre
  search-post-s    the same search on dense-lora-s/model (the merged dense + LoRA model)     -> D_post
                   (--decide-only: the generator's search and calibration, then stop; no tuning, no export)
  recover-pre-s    atp prune --decisions-from search-pre-s: the pretrained model, fresh LoRA, seed s, the dense
  recover-post-s   pretrained teacher; the two recoveries differ in their decisions alone
  eval-*-s.json    atp eval of both recoveries on the dev splits of the domain's perplexity tasks

Then OUT/premise.json: the overlap of D_pre and D_post per seed (atp.diagnostics.overlap: the share of pruned
parameters on which they disagree, per kind and layer), and per perplexity task the difference
ppl(D_post) - ppl(D_pre), records paired by id, with the interval its number of seeds allows
(atp.stats.paired_interval: a bootstrap over records for one seed, a t-interval over seeds for 2-5). A step
whose output exists is skipped, so a stopped run goes on where it stopped.

    ATP_HOME=.atp_home nohup .venv/bin/python benchmarks/premise.py --out runs/premise > runs/premise.log 2>&1 &
    .venv/bin/python benchmarks/premise.py --out runs/premise --dry-run   # the commands, nothing run
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# the training settings of benchmarks/compare-onestage-paper.yaml
TRAIN = ["--max-steps", "90", "--batch-size", "4", "--max-length", "256", "--mlp-block", "32", "--lora-r", "8",
         "--lr", "6.0e-4", "--calib-batches", "8",
         "--mixed-precision", "no"]  # fp32, as seeds 0-2 ran; pruning runs distil at atp prune's default 0.5


def perplexity_tasks(domain: str) -> list[str]:
    """--task options for the domain's perplexity tasks: the premise is judged on perplexity alone, and the
    domain's other tasks (CaseHOLD's five choices per record) would double each evaluation's time."""
    from atp.data import DOMAINS, TASKS, PerplexityTask

    return [arg for name in DOMAINS[domain] if isinstance(TASKS[name], PerplexityTask) for arg in ("--task", name)]


def commands(out: Path, seed: int, domain: str, sparsity: float, model: str, extra: list[str]):
    """(output that marks the step done, argv) for one seed, in order."""
    atp = [sys.executable, "-m", "atp.cli"]
    common = ["--domain", domain, "--seed", str(seed), *TRAIN, *extra]
    pruned = [*common, "--sparsity", str(sparsity)]
    steps = [(out / f"dense-lora-{seed}" / "report.json",
              [*atp, "prune", "--model", model, "--no-prune", *common, "--out", str(out / f"dense-lora-{seed}")]),
             (out / f"search-pre-{seed}" / "report.json",
              [*atp, "prune", "--model", model, "--method", "frozen-generator", "--decide-only", *pruned,
               "--out", str(out / f"search-pre-{seed}")]),
             (out / f"search-post-{seed}" / "report.json",
              [*atp, "prune", "--model", str(out / f"dense-lora-{seed}" / "model"), "--method", "frozen-generator",
               "--decide-only", *pruned, "--out", str(out / f"search-post-{seed}")])]
    for which in ("pre", "post"):
        run = out / f"recover-{which}-{seed}"
        steps.append((run / "report.json", [*atp, "prune", "--model", model, *pruned, "--decisions-from",
                                            str(out / f"search-{which}-{seed}"), "--out", str(run)]))
        steps.append((out / f"eval-{which}-{seed}.json",
                      [*atp, "eval", "--model", str(run / "model"), *perplexity_tasks(domain), "--limit", "0",
                       "--max-length", "512", "--out", str(out / f"eval-{which}-{seed}.json")]))
    return steps


def summarise(out: Path, seeds: list[int]) -> dict:
    from atp import diagnostics, stats

    overlaps, ppl, rows = {}, {}, {}  # rows: task -> which -> [seed] -> (summed NLL, tokens) per record
    for seed in seeds:
        pre = json.loads((out / f"search-pre-{seed}" / "report.json").read_text())
        post = json.loads((out / f"search-post-{seed}" / "report.json").read_text())
        weights = diagnostics.expand_weights(pre["decision_weights"])
        overlaps[seed] = diagnostics.overlap(diagnostics.decode(pre["decisions"]),
                                             diagnostics.decode(post["decisions"]), weights)
        evals = {which: json.loads((out / f"eval-{which}-{seed}.json").read_text())["tasks"]
                 for which in ("pre", "post")}
        for task, metrics in evals["pre"].items():
            if "ppl" not in metrics:
                continue
            ppl.setdefault(task, {})[seed] = {"pre": metrics["ppl"], "post": evals["post"][task]["ppl"]}
            records = {which: evals[which][task]["per_record"] for which in ("pre", "post")}
            aligned = stats.align_records({which: (r.get("id"), list(zip(r["nll"], r["tokens"])))
                                           for which, r in records.items()}, f"{task}, seed {seed}")
            for which, table in zip(records, aligned):
                rows.setdefault(task, {}).setdefault(which, []).append(table)
    differences = {}
    for task, per_seed in ppl.items():
        result = stats.paired_interval({task: rows[task]["post"]}, {task: rows[task]["pre"]},
                                       stats.perplexity_of(task))
        differences[task] = {"per_seed": per_seed, "post_minus_pre": result["per_seed"], "mean": result["diff"],
                             "ci95": [result["low"], result["high"]], "interval": result["interval"],
                             "verdict": stats.judged(result, higher_is_better=False)}
    return {"seeds": seeds, "overlap_pre_post": overlaps, "perplexity": differences}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/premise")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domain", default="legal")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    parser.add_argument("extra", nargs="*", help="further atp prune options for every run (after --)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    for seed in args.seeds:
        for done, argv in commands(out, seed, args.domain, args.sparsity, args.model, args.extra):
            if done.exists():
                continue
            print(" ".join(argv), flush=True)
            if not args.dry_run:
                out.mkdir(parents=True, exist_ok=True)
                subprocess.run(argv, check=True)
    if args.dry_run:
        return 0
    summary = summarise(out, args.seeds)
    (out / "premise.json").write_text(json.dumps(summary, indent=2) + "\n")
    for task, entry in summary["perplexity"].items():
        low, high = entry["ci95"]
        print(f"{task}: ppl(D_post) - ppl(D_pre) per seed {[round(d, 3) for d in entry['post_minus_pre']]}, "
              f"mean {entry['mean']:.3f}, 95% [{low:.3f}, {high:.3f}] ({entry['interval']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
