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

from atp.stats import align_records, bootstrap_difference, perplexity_of, t_quantile


def cell(prefix: str, sparsity: float, seed: int, task: str) -> tuple[float, float, dict]:
    folder = f"{prefix}-s{sparsity:g}-seed{seed}"
    with open(f"{folder}/ppl.json") as f:
        scores = json.load(f)["tasks"][task]
    with open(f"{folder}/run/report.json") as f:
        seconds = json.load(f)["train_seconds"]
    return scores["ppl"], seconds, scores["per_record"]


def record_interval(a: dict, b: dict, task: str) -> tuple[float, float]:
    """One seed: the ratio a / b's interval from atp.stats' paired bootstrap over the windows (record noise only)."""
    rows_a, rows_b = align_records({"a": (a["id"], list(zip(a["nll"], a["tokens"]))),
                                    "b": (b["id"], list(zip(b["nll"], b["tokens"])))}, "perplexity windows")
    log_ppl = perplexity_of(task)
    result = bootstrap_difference({task: [rows_a]}, {task: [rows_b]}, lambda rows: math.log(log_ppl(rows)))
    return math.exp(result["low"]), math.exp(result["high"])


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
        (a, a_s, a_rec), (b, b_s, b_rec) = (cell(p, args.sparsity, seed, args.task)
                                            for p in (args.numerator, args.denominator))
        logs.append(math.log(a / b))
        print(f"seed {seed}: {a:.2f} ({a_s:.0f} s) / {b:.2f} ({b_s:.0f} s) = {a / b:.2f}x")
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        low, high = record_interval(a_rec, b_rec, args.task)
        print(f"ratio {math.exp(mean):.2f}x [{low:.2f}, {high:.2f}] (one seed: record noise only, paired bootstrap "
              f"over the windows)")
        return
    half = t_quantile(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    print(f"geometric mean ratio {math.exp(mean):.2f}x [{math.exp(mean - half):.2f}, {math.exp(mean + half):.2f}] "
          f"(t-interval over {len(logs)} seeds, on the logs)")


if __name__ == "__main__":
    main()
