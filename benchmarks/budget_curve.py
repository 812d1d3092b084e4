"""Issue 16's budget curve: quality against training steps, and each pruned line against dense + LoRA at
the same budget, with paired 95% bootstrap intervals over the dev records.

    .venv/bin/python benchmarks/budget_curve.py benchmarks/compare-budget-curve.yaml \
        --plot docs/img/budget-curve-healthcare-40.png --pair atp-240 atp-distill-160

Reads the finished cells of an `atp compare` config (nothing is trained). Lines are grouped by what the
cells train: dense + LoRA (`prune: false`), ATP, ATP + distillation, other methods. A ratio is
pruned / dense + LoRA at the same max_steps: perplexity (goal <= 2x) and HQS ROUGE-L (goal >= 85%).
"""
from __future__ import annotations

import argparse
import math
from statistics import fmean as mean
from statistics import stdev

from atp.compare import CompareSpec, cell_config, cells, finished
from atp.report import _task_rows
from atp.stats import bootstrap_difference, mean_of, perplexity_of

PPL_TASK, ROUGE_TASK = "pubmed_text", "hqs"
PPL, ROUGE = (PPL_TASK, "ppl", perplexity_of(PPL_TASK)), (ROUGE_TASK, "rougeL", mean_of(ROUGE_TASK))
GOALS = {"ppl": 2.0, "rougeL": 0.85}


def line_of(cfg) -> str:
    if not cfg.prune:
        return "dense + LoRA"
    name = "ATP" if cfg.method == "atp" else cfg.method
    if not cfg.distill:
        return name
    return f"{name} + distill {cfg.distill:g}" + ("" if cfg.teacher == "self" else ", dense + LoRA teacher")


def paired(a: dict, b: dict, measure: tuple, log: bool = False) -> dict:
    """Point a minus point b on one (task, metric, statistic), paired bootstrap over the seeds both have and the
    dev records; with log, the mean difference of the logs turned back into a ratio a / b and its interval."""
    task, metric, statistic = measure
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    rows = ({task: [_task_rows(q["seeds"][s], task, metric) for s in seeds]} for q in (a, b))
    result = bootstrap_difference(*rows, (lambda r: math.log(statistic(r))) if log else statistic, resamples=2000)
    if log:
        result.update({k: math.exp(result[k]) for k in ("diff", "low", "high")})
    return result


def collect(spec: CompareSpec) -> list[dict]:
    """One point per method (a budget of one line), holding every finished seed's metrics."""
    points = {}
    for cell in cells(spec):
        result = finished(spec, cell)
        if result is None:
            continue
        cfg = cell_config(spec, cell)
        point = points.setdefault(cell.method, {"method": cell.method, "line": line_of(cfg), "steps": cfg.max_steps,
                                                "seeds": {}, "train_s": []})
        point["seeds"][cell.seed] = result["metrics"]
        point["train_s"].append(result["report"].get("train_seconds") or 0.0)
    for point in points.values():
        runs = point["seeds"].values()
        point["ppl"] = [m[PPL_TASK]["ppl"] for m in runs]
        point["rougeL"] = [m[ROUGE_TASK]["rougeL"] for m in runs]
    return list(points.values())


def shown(values: list[float], digits: int) -> str:
    """Mean, and the standard deviation over seeds where there are several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {stdev(values):.{digits}f}"


def ratios(points: list[dict]) -> list[dict]:
    """Each pruned point / dense + LoRA at the same steps."""
    reference = {p["steps"]: p for p in points if p["line"] == "dense + LoRA"}
    return [{**p, "ppl_ratio": paired(p, reference[p["steps"]], PPL, log=True),
             "rouge_ratio": paired(p, reference[p["steps"]], ROUGE, log=True)}
            for p in points if p["line"] != "dense + LoRA" and p["steps"] in reference]


def differences(pairs: list[tuple[dict, dict]]) -> list[str]:
    """Markdown rows: a minus b on ROUGE-L and perplexity, paired 95% intervals."""
    lines = []
    for a, b in pairs:
        for measure in (ROUGE, PPL):
            d = paired(a, b, measure)
            lines.append(f"| {a['method']} minus {b['method']} | {d['seeds']} | {measure[0]} {measure[1]} | "
                         f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] |")
    return lines


def markdown(points: list[dict], rows: list[dict], extra_pairs: list[list[str]], extra_ratios: list[list[str]]) -> str:
    lines = ["| line | steps | seeds | train s | HQS R-L | pubmed ppl @512 |", "|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["line"], p["steps"])):
        lines.append(f"| {p['line']} | {p['steps']} | {len(p['seeds'])} | {mean(p['train_s']):.0f} "
                     f"| {shown(p['rougeL'], 1)} | {shown(p['ppl'], 2)} |")
    lines += ["", "| line | steps | seeds | ppl / dense + LoRA [95%] | goal <= 2x | R-L / dense + LoRA [95%] "
              "| goal >= 85% |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["line"], r["steps"])):
        p, q = r["ppl_ratio"], r["rouge_ratio"]
        ppl_goal = "met" if p["high"] <= GOALS["ppl"] else "not met" if p["low"] > GOALS["ppl"] else "inside the noise"
        rouge_goal = ("met" if q["low"] >= GOALS["rougeL"] else "not met" if q["high"] < GOALS["rougeL"]
                      else "inside the noise")
        lines.append(f"| {r['line']} | {r['steps']} | {p['seeds']} "
                     f"| {p['diff']:.2f}x [{p['low']:.2f}, {p['high']:.2f}] | {ppl_goal} "
                     f"| {100 * q['diff']:.0f}% [{100 * q['low']:.0f}, {100 * q['high']:.0f}] | {rouge_goal} |")
    atp = {p["steps"]: p for p in points if p["line"] == "ATP"}
    pairs = [(atp[p["steps"]], p) for p in points if p["line"] not in ("ATP", "dense + LoRA") and p["steps"] in atp]
    by_method = {p["method"]: p for p in points}
    for name in {name for pair in extra_pairs + extra_ratios for name in pair} - by_method.keys():
        raise SystemExit(f"{name}: no finished cell of that method in the config (methods with results: "
                         f"{', '.join(sorted(by_method))})")
    pairs += [(by_method[a], by_method[b]) for a, b in extra_pairs]
    if pairs:
        lines += ["", "| paired | seeds | measure | difference [95%] |", "|---|---|---|---|"] + differences(pairs)
    if extra_ratios:
        lines += ["", "| ratio | seeds | ppl ratio [95%] | R-L ratio [95%] |", "|---|---|---|---|"]
        for a, b in extra_ratios:
            p, q = (paired(by_method[a], by_method[b], m, log=True) for m in (PPL, ROUGE))
            lines.append(f"| {a} / {b} | {p['seeds']} | {p['diff']:.2f}x [{p['low']:.2f}, {p['high']:.2f}] "
                         f"| {100 * q['diff']:.0f}% [{100 * q['low']:.0f}, {100 * q['high']:.0f}] |")
    return "\n".join(lines)


def plot(points: list[dict], rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    steps = sorted({p["steps"] for p in points})
    colors = dict(zip(dict.fromkeys(p["line"] for p in points), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for line, color in colors.items():
        mine = sorted((p for p in points if p["line"] == line), key=lambda p: p["steps"])
        style = "--" if line == "dense + LoRA" else "-"
        for ax, key in ((axes[0, 0], "ppl"), (axes[0, 1], "rougeL")):
            ax.plot([p["steps"] for p in mine], [mean(p[key]) for p in mine], style, marker="o", color=color,
                    label=line)
        mine = sorted((r for r in rows if r["line"] == line), key=lambda r: r["steps"])
        for ax, key in ((axes[1, 0], "ppl_ratio"), (axes[1, 1], "rouge_ratio")):
            if mine:
                values = [r[key] for r in mine]
                ax.errorbar([r["steps"] for r in mine], [v["diff"] for v in values], color=color, marker="o",
                            capsize=3, label=line, yerr=[[v["diff"] - v["low"] for v in values],
                                                         [v["high"] - v["diff"] for v in values]])
    axes[0, 0].set(ylabel="pubmed perplexity @512 (log)", yscale="log", title="Held-out PubMed perplexity")
    axes[0, 1].set(ylabel="HQS ROUGE-L", title="HQS summaries (full dev split), ROUGE-L")
    axes[1, 0].axhline(GOALS["ppl"], color="grey", ls=":", label="goal: at most 2x")
    axes[1, 0].set(ylabel="perplexity / dense + LoRA's", title="Perplexity ratio, same steps, 95% interval")
    axes[1, 1].axhline(GOALS["rougeL"], color="grey", ls=":", label="goal: at least 85%")
    axes[1, 1].set(ylabel="ROUGE-L / dense + LoRA's", title="ROUGE-L ratio, same steps, 95% interval")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("training steps (batch 4 x 128 tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an atp compare config whose cells hold the budget points")
    parser.add_argument("--plot", help="write the plot to this PNG")
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="also A minus B, two methods of the config (e.g. at about equal time; repeatable)")
    parser.add_argument("--ratio", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="also A / B on perplexity and ROUGE-L, paired like the goal ratios (repeatable)")
    args = parser.parse_args()
    spec = CompareSpec.load(args.config)
    points = collect(spec)
    rows = ratios(points)
    print(markdown(points, rows, args.pair, args.ratio))
    if args.plot:
        plot(points, rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
