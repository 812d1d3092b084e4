"""The ratio of one compare method's perplexity to another's, paired by seed (issue 33's "ATP against dense + LoRA
perplexity at equal time"): per seed the two cells' perplexity and training seconds, then the geometric mean ratio
with a t-interval over the seeds on the logs. Each cell is a compare_ppl_only.py / atp compare cell folder holding
ppl.json and run/report.json; the two sets may come from different compare configs (the same CPU kind).

    python benchmarks/ppl_ratio.py runs/compare-levers-amx/healthcare/lr-1.5e-3 \
        runs/compare-levers-dense430-amx/healthcare/lora-430-lr1.5e-3 --task pubmed_text --seeds 0 1 2
"""
import argparse
import json
import math
import statistics

from atp.stats import t_quantile


def cell(prefix: str, sparsity: float, seed: int, task: str) -> tuple[float, float]:
    folder = f"{prefix}-s{sparsity:g}-seed{seed}"
    with open(f"{folder}/ppl.json") as f:
        ppl = json.load(f)["tasks"][task]["ppl"]
    with open(f"{folder}/run/report.json") as f:
        seconds = json.load(f)["train_seconds"]
    return ppl, seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("numerator", help="cell folder prefix, up to the method name (…/healthcare/lr-1.5e-3)")
    parser.add_argument("denominator")
    parser.add_argument("--task", default="pubmed_text")
    parser.add_argument("--sparsity", type=float, default=0.4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logs = []
    for seed in args.seeds:
        (a, a_s), (b, b_s) = (cell(p, args.sparsity, seed, args.task) for p in (args.numerator, args.denominator))
        logs.append(math.log(a / b))
        print(f"seed {seed}: {a:.2f} ({a_s:.0f} s) / {b:.2f} ({b_s:.0f} s) = {a / b:.2f}x")
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        print(f"ratio {math.exp(mean):.2f}x (one seed: no interval)")
        return
    half = t_quantile(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    print(f"geometric mean ratio {math.exp(mean):.2f}x [{math.exp(mean - half):.2f}, {math.exp(mean + half):.2f}] "
          f"(t-interval over {len(logs)} seeds, on the logs)")


if __name__ == "__main__":
    main()
