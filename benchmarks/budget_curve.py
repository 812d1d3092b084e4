"""Issue 16's budget curve: quality against training steps, and each pruned line against dense + LoRA at
the same budget, with paired 95% intervals (`atp.stats.paired_interval`: a t-interval over the per-seed
differences for 2-5 seeds; with one seed a bootstrap over the dev records, labelled as record noise only).

    .venv/bin/python benchmarks/budget_curve.py benchmarks/compare-budget-curve.yaml \
        --plot docs/img/budget-curve-healthcare-40.png --pair atp-240 atp-distill-160

Reads the finished cells of an `atp compare` config (nothing is trained). Lines are grouped by what the
cells train: dense + LoRA (`prune: false`), ATP, ATP + distillation, other methods. A ratio is
pruned / dense + LoRA at the same max_steps: the domain's text perplexity (goal <= 2x) and, where the domain
has a summarisation set (healthcare: HQS), its ROUGE-L (goal >= 85%). The config must name one domain.
"""
from __future__ import annotations

import argparse
import math
from statistics import fmean as mean
from statistics import stdev

from atp.compare import CompareSpec, cell_config, cells, finished
from atp.data import DOMAINS, PerplexityTask, SummarizationTask, get_task
from atp.report import paired_task_rows
from atp.stats import INTERVAL_RECORDS, INTERVAL_T, mean_of, paired_interval, perplexity_of

GOALS = {"ppl": 2.0, "rougeL": 0.85}
GOAL_LABELS = {"ppl": "goal: at most 2x", "rougeL": "goal: at least 85%"}
BUDGET_MINUTES = 30   # the issue's training budget on this machine


def domain_measures(spec: CompareSpec) -> dict:
    """{"ppl": (task, metric, statistic)} and, where the domain has a summarisation set, "rougeL" too."""
    if len(spec.domains) != 1:
        raise SystemExit(f"the config names domains {spec.domains}; a budget curve reads one (copy the config)")
    tasks = [get_task(name) for name in DOMAINS[spec.domains[0]]]
    found = {"ppl": [(t.name, "ppl", perplexity_of(t.name)) for t in tasks if isinstance(t, PerplexityTask)],
             "rougeL": [(t.name, "rougeL", mean_of(t.name)) for t in tasks if isinstance(t, SummarizationTask)]}
    return {key: values[0] for key, values in found.items() if values}


def line_of(cfg) -> str:
    if not cfg.prune:
        return "dense + LoRA"
    name = "ATP" if cfg.method == "atp" else cfg.method
    if not cfg.distill:
        return name
    return f"{name} + distill {cfg.distill:g}" + ("" if cfg.teacher == "self" else ", dense + LoRA teacher")


def paired(a: dict, b: dict, measure: tuple, log: bool = False) -> dict:
    """Point a minus point b on one (task, metric, statistic), paired over the seeds both have and the dev
    records (by record id); with log, the mean difference of the logs turned back into a ratio a / b and its
    interval. `interval` says which kind the interval is (see atp.stats.paired_interval)."""
    task, metric, statistic = measure
    seeds = sorted(set(a["seeds"]) & set(b["seeds"]))
    named = {f"{q['method']} seed {s}": q["seeds"][s] for s in seeds for q in (a, b)}
    aligned = paired_task_rows(named, task, metric)
    rows = ({task: aligned[0::2]}, {task: aligned[1::2]})
    result = paired_interval(*rows, (lambda r: math.log(statistic(r))) if log else statistic, resamples=2000)
    if log:
        result.update({k: math.exp(result[k]) for k in ("diff", "low", "high")})
    return result


def collect(spec: CompareSpec, measures: dict) -> list[dict]:
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
        for key, (task, metric, _) in measures.items():
            point[key] = [m[task][metric] for m in runs]
    return list(points.values())


def shown(values: list[float], digits: int) -> str:
    """Mean, and the standard deviation over seeds where there are several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{mean(values):.{digits}f} ± {stdev(values):.{digits}f}"


def ratios(points: list[dict], measures: dict) -> list[dict]:
    """Each pruned point / dense + LoRA at the same steps, on each measure."""
    reference = {p["steps"]: p for p in points if p["line"] == "dense + LoRA"}
    return [{**p, **{f"{key}_ratio": paired(p, reference[p["steps"]], measure, log=True)
                     for key, measure in measures.items()}}
            for p in points if p["line"] != "dense + LoRA" and p["steps"] in reference]


def differences(pairs: list[tuple[dict, dict]], measures: dict) -> list[str]:
    """Markdown rows: a minus b on each measure, paired 95% intervals."""
    lines = []
    for a, b in pairs:
        for measure in measures.values():
            d = paired(a, b, measure)
            lines.append(f"| {a['method']} minus {b['method']} | {d['seeds']} | {measure[0]} {measure[1]} | "
                         f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] {interval_mark(d)} |")
    return lines


def goal_verdict(key: str, ratio: dict) -> str:
    if key == "ppl":
        return "met" if ratio["high"] <= GOALS[key] else "not met" if ratio["low"] > GOALS[key] else "inside the noise"
    return "met" if ratio["low"] >= GOALS[key] else "not met" if ratio["high"] < GOALS[key] else "inside the noise"


INTERVAL_MARKS = {INTERVAL_T: "t", INTERVAL_RECORDS: "records"}  # anything else: the bootstrap over seeds and records


def interval_mark(result: dict) -> str:
    return INTERVAL_MARKS.get(result["interval"], "boot")


def shown_ratio(key: str, ratio: dict) -> str:
    if key == "ppl":
        return f"{ratio['diff']:.2f}x [{ratio['low']:.2f}, {ratio['high']:.2f}] {interval_mark(ratio)}"
    return f"{100 * ratio['diff']:.0f}% [{100 * ratio['low']:.0f}, {100 * ratio['high']:.0f}] {interval_mark(ratio)}"


def check_methods(points: list[dict], names: set[str]) -> None:
    missing = names - {p["method"] for p in points}
    if missing:
        raise SystemExit(f"{', '.join(sorted(missing))}: no finished cell of that method in the config (methods "
                         f"with results: {', '.join(sorted(p['method'] for p in points))})")


def markdown(points: list[dict], rows: list[dict], measures: dict, extra_pairs: list[list[str]],
             timed: list[dict]) -> str:
    names = {key: f"{task} {'R-L' if key == 'rougeL' else 'ppl @512'}" for key, (task, _, _) in measures.items()}
    lines = ["| line | steps | seeds | train s | " + " | ".join(names.values()) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for p in sorted(points, key=lambda p: (p["line"], p["steps"])):
        lines.append(f"| {p['line']} | {p['steps']} | {len(p['seeds'])} | {mean(p['train_s']):.0f} | "
                     + " | ".join(shown(p[key], 1 if key == "rougeL" else 2) for key in measures) + " |")
    goal = GOAL_LABELS
    if rows:
        lines += ["", "| line | steps | seeds | " + " | ".join(f"{names[k]} / dense + LoRA [95%] | {goal[k]}"
                                                              for k in measures) + " |",
                  "|---|---|---|" + "---|---|" * len(measures)]
    for r in sorted(rows, key=lambda r: (r["line"], r["steps"])):
        lines.append(f"| {r['line']} | {r['steps']} | {r['ppl_ratio']['seeds']} | "
                     + " | ".join(f"{shown_ratio(k, r[k + '_ratio'])} | {goal_verdict(k, r[k + '_ratio'])}"
                                  for k in measures) + " |")
    atp = {p["steps"]: p for p in points if p["line"] == "ATP"}
    pairs = [(atp[p["steps"]], p) for p in points if p["line"] not in ("ATP", "dense + LoRA") and p["steps"] in atp]
    by_method = {p["method"]: p for p in points}
    pairs += [(by_method[a], by_method[b]) for a, b in extra_pairs]
    if pairs:
        lines += ["", "| paired | seeds | measure | difference [95%] |", "|---|---|---|---|"]
        lines += differences(pairs, measures)
    if timed:
        lines += ["", "| ratio | seeds | " + " | ".join(f"{names[k]} ratio [95%] | {goal[k]}" for k in measures)
                  + " |", "|---|---|" + "---|---|" * len(measures)]
        for row in timed:
            found = {k: row[f"{k}_ratio"] for k in measures}
            lines.append(f"| {row['method']} / {row['against']} | {found['ppl']['seeds']} | "
                         + " | ".join(f"{shown_ratio(k, found[k])} | {goal_verdict(k, found[k])}" for k in measures)
                         + " |")
    lines += ["", "95% intervals: t = t-interval over the per-seed values (2-5 seeds); records = one seed: record "
              "noise only (a bootstrap over the dev records, no seed-level interval); boot = bootstrap over seeds and "
              "records (more than 5 seeds)."]
    return "\n".join(lines)


def time_ratios(points: list[dict], measures: dict, extra_ratios: list[list[str]]) -> list[dict]:
    """The --ratio pairs as rows of the pruned point (a): at about equal time rather than equal steps."""
    by_method = {p["method"]: p for p in points}
    return [{**by_method[a], "against": b, **{f"{key}_ratio": paired(by_method[a], by_method[b], measure, log=True)
                                              for key, measure in measures.items()}}
            for a, b in extra_ratios]


def minutes(point: dict) -> float:
    return mean(point["train_s"]) / 60


def plot(points: list[dict], rows: list[dict], measures: dict, path: str, x_minutes: bool = False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(measures)
    fig, axes = plt.subplots(2 if rows else 1, len(keys), figsize=(6 * len(keys), 8 if rows else 4), squeeze=False)
    x_of = minutes if x_minutes else (lambda p: p["steps"])
    steps = sorted({p["steps"] for p in points})
    colors = dict(zip(dict.fromkeys(p["line"] for p in points), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for line, color in colors.items():
        mine = sorted((p for p in points if p["line"] == line), key=lambda p: p["steps"])
        style = "--" if line == "dense + LoRA" else "-"
        for ax, key in zip(axes[0], keys):
            ax.plot([x_of(p) for p in mine], [mean(p[key]) for p in mine], style, marker="o", color=color,
                    label=line)
        mine = sorted((r for r in rows if r["line"] == line), key=x_of)
        for ax, key in zip(axes[1] if rows else [], keys):
            if mine:
                values = [r[f"{key}_ratio"] for r in mine]
                ax.errorbar([x_of(r) for r in mine], [v["diff"] for v in values], color=color, marker="o",
                            capsize=3, label=line, yerr=[[v["diff"] - v["low"] for v in values],
                                                         [v["high"] - v["diff"] for v in values]])
    for column, key in enumerate(keys):
        top, bottom, task = axes[0, column], axes[-1, column], measures[key][0]
        if key == "ppl":
            top.set(ylabel=f"{task} perplexity @512 (log)", yscale="log", title="Held-out domain text perplexity")
        else:
            top.set(ylabel=f"{task} ROUGE-L", title=f"{task} summaries (full dev split), ROUGE-L")
        if not rows:
            continue
        against = "about the same time" if x_minutes else "same steps"
        if key == "ppl":
            bottom.set(ylabel="perplexity / dense + LoRA's", title=f"Perplexity ratio, {against}, 95% interval")
        else:
            bottom.set(ylabel="ROUGE-L / dense + LoRA's", title=f"ROUGE-L ratio, {against}, 95% interval")
        bottom.axhline(GOALS[key], color="grey", ls=":", label=GOAL_LABELS[key])
    for ax in axes.flat:
        if x_minutes:
            ax.set_xlim(0, max(BUDGET_MINUTES, max(minutes(p) for p in points)) + 2)
            ax.axvline(BUDGET_MINUTES, color="grey", ls="-.", lw=1, label=f"budget: {BUDGET_MINUTES} minutes")
            ax.set_xlabel("training minutes on this 2-core CPU (mean over seeds; batch 4 x 128 tokens)")
        else:
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
    parser.add_argument("--x", choices=["steps", "minutes"], default="steps",
                        help="the plot's x axis; with minutes, its ratio panel shows the --ratio pairs (pair points "
                             "of about equal time, e.g. distilled and plain steps) in place of the same-steps ratios")
    args = parser.parse_args()
    spec = CompareSpec.load(args.config)
    measures = domain_measures(spec)
    points = collect(spec, measures)
    check_methods(points, {name for pair in args.pair + args.ratio for name in pair})
    rows = ratios(points, measures)
    timed = time_ratios(points, measures, args.ratio)
    print(markdown(points, rows, measures, args.pair, timed))
    if args.plot:
        x_minutes = args.x == "minutes"
        plot(points, timed if x_minutes else rows, measures, args.plot, x_minutes=x_minutes)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
