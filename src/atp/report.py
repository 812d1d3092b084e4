"""The report of `atp compare`: per-domain summary over seeds, relative performance, results.md,
results.json and the plots (matplotlib, the `plots` extra).

Relative performance of a run = mean over tasks of run / dense-LoRA on one metric per task (perplexity
inverted: dense-LoRA / run). Every run of a domain is divided by the same reference: the mean of the
dense-LoRA seeds. Mean and std over seeds are reported where several seeds ran.

`spec` below is the compare config, an atp.compare.CompareSpec; this module reads its fields and does not import
atp.compare (which imports this one).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .fsutil import write_text_atomic

LABELS = {"dense": "dense (no tuning)", "dense-lora": "dense + LoRA"}  # the reference runs
SHOWN = ("acc", "acc_norm", "same_answer", "rouge1", "rouge2", "rougeL", "ppl")  # metrics in tables and plots
PRIMARY = {"multiple_choice": "acc_norm", "summarization": "rougeL", "perplexity": "ppl"}
DEFAULT_BASE = "atp"  # the method the paired differences start from unless a compare config names another


# ----------------------------------------------------------------------------- summary

def primary_metrics(tasks, overrides: dict | None = None) -> dict[str, str]:
    """Task -> the metric relative performance uses for it."""
    from .data import TASKS

    chosen = {}
    for task in tasks:
        base = task.split("#")[0]
        if base in (overrides or {}):
            chosen[task] = overrides[base]
        elif base in TASKS:
            chosen[task] = PRIMARY[TASKS[base].kind]
    return chosen


def relative_performance(metrics: dict, reference: dict, primary: dict[str, str]) -> tuple[float | None, dict]:
    """Mean over tasks of run / reference on each task's primary metric (perplexity: reference / run).
    A task whose reference score is 0 has no ratio and is left out; None when no task has one."""
    ratios = {}
    for task, metric in primary.items():
        if task in metrics and task in reference:
            run, ref = metrics[task][metric], reference[task][metric]
            if metric == "ppl":
                ratios[task] = ref / run
            elif ref != 0:
                ratios[task] = run / ref
    return (sum(ratios.values()) / len(ratios) if ratios else None), ratios


def mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_metrics(results: list[dict]) -> dict:
    """{task: {metric: mean over results}}."""
    out = {}
    for task, metrics in results[0]["metrics"].items():
        out[task] = {m: sum(r["metrics"][task][m] for r in results) / len(results)
                     for m, v in metrics.items()
                     if isinstance(v, (int, float)) and all(m in r["metrics"][task] for r in results)}
    return out


def summarize(results: list[dict], relative_metrics: dict | None = None, majority: dict | None = None,
              base: str = DEFAULT_BASE) -> dict:
    """Per domain: rows (method, sparsity) with mean/std of every metric over seeds and relative performance.

    majority: {domain: {task: accuracy of always giving the most common answer}}. A multiple-choice task
    on which dense + LoRA does not beat that is at chance for this model: rows also get
    `relative_above_chance`, the relative performance over the other tasks. `differences`: base minus each
    other pruned method, paired (see differences)."""
    summary = {}
    for domain in dict.fromkeys(r["domain"] for r in results):
        mine = [r for r in results if r["domain"] == domain]
        refs = [r for r in mine if r["method"] == "dense-lora"]
        reference = mean_metrics(refs) if refs else None
        primary = primary_metrics(mine[0]["metrics"], relative_metrics)
        levels = (majority or {}).get(domain, {})
        at_chance = [t for t, m in primary.items() if reference is not None and t in levels and t in reference
                     and m in ("acc", "acc_norm") and reference[t][m] <= levels[t]]
        informative = {t: m for t, m in primary.items() if t not in at_chance}
        rows = []
        for key in dict.fromkeys((r["method"], r["sparsity"]) for r in mine):
            group = [r for r in mine if (r["method"], r["sparsity"]) == key]
            row = {"method": key[0], "sparsity": key[1], "seeds": [r["seed"] for r in group], "metrics": {}}
            for task in group[0]["metrics"]:
                for metric in dict.fromkeys(m for r in group for m in r["metrics"][task]):  # older cells may lack some
                    values = [r["metrics"][task][metric] for r in group if metric in r["metrics"][task]]
                    if (metric in SHOWN or metric.startswith("ppl@")) and values:
                        row["metrics"][f"{task} {metric}"] = mean_std(values)
            if reference is not None:
                scored = [relative_performance(r["metrics"], reference, primary) for r in group]
                rel = [v for v, _ in scored if v is not None]
                row["relative"] = mean_std(rel) if rel else None
                row["ratios"] = {task: mean_std([ratios[task] for _, ratios in scored if task in ratios])
                                 for task in primary if any(task in ratios for _, ratios in scored)}
                if at_chance and informative:
                    rel = [relative_performance(r["metrics"], reference, informative)[0] for r in group]
                    rel = [v for v in rel if v is not None]
                    row["relative_above_chance"] = mean_std(rel) if rel else None
            measured = [r["report"]["prunable_sparsity"] for r in group if "prunable_sparsity" in r["report"]]
            row["measured_sparsity"] = mean_std(measured) if measured else (0.0, None)
            row["train_seconds"] = mean_std([r["report"].get("train_seconds", 0.0) for r in group])
            row["cell_seconds"] = mean_std([r["cell_seconds"] for r in group])
            rows.append(row)
        summary[domain] = {"primary_metrics": primary, "reference_seeds": [r["seed"] for r in refs], "rows": rows,
                           "majority": levels, "at_chance": at_chance,
                           "base": base, "differences": differences(mine, reference, primary, informative, base),
                           "decision_overlaps": decision_overlaps(mine, base), "decision_search": decision_search(mine)}
    return summary


# ----------------------------------------------------------------------------- paired differences

def _task_rows(metrics: dict, task: str, metric: str):
    """One cell's per-record rows for a task's primary metric: (NLL, tokens) for perplexity, else the values."""
    values = (metrics.get(task) or {}).get("per_record")  # a cell that did not score the task: not compared
    if not values:
        return None
    return list(zip(values["nll"], values["tokens"])) if metric == "ppl" else values.get(metric)


def paired_task_rows(cells: dict[str, dict], task: str, metric: str) -> list:
    """The per-record rows of one task in several cells (name -> metrics), in one record order: paired by record
    id (results from before records had ids: by position). Cells evaluated on other records: an error naming them."""
    from .stats import align_records

    named = {name: (metrics[task]["per_record"].get("id"), _task_rows(metrics, task, metric))
             for name, metrics in cells.items()}
    return align_records(named, f"task {task}")


def _task_statistic(task: str, metric: str):
    from .stats import mean_of, perplexity_of

    return perplexity_of(task) if metric == "ppl" else mean_of(task)


def _relative_statistic(reference: dict, chosen: dict[str, str]):
    """Relative performance (as relative_performance) from resampled per-record rows."""
    parts = {task: (_task_statistic(task, metric), reference[task][metric], metric == "ppl")
             for task, metric in chosen.items() if reference[task][metric] != 0}

    def statistic(rows) -> float:
        ratios = [ref / stat(rows) if inverted else stat(rows) / ref for stat, ref, inverted in parts.values()]
        return sum(ratios) / len(ratios)
    return statistic


def paired_cells(results: list[dict], base_method: str):
    """(sparsity, method, base cells by seed, that method's cells by seed, the seeds both have) for every pruned
    method other than base_method, at each sparsity."""
    pruned = [r for r in results if r["method"] not in LABELS]
    for sparsity in dict.fromkeys(r["sparsity"] for r in pruned):
        at = [r for r in pruned if r["sparsity"] == sparsity]
        base = {r["seed"]: r for r in at if r["method"] == base_method}
        for method in dict.fromkeys(r["method"] for r in at if r["method"] != base_method):
            other = {r["seed"]: r for r in at if r["method"] == method}
            yield sparsity, method, base, other, sorted(set(base) & set(other))


def differences(results: list[dict], reference: dict | None, primary: dict[str, str], informative: dict[str, str],
                base_method: str = DEFAULT_BASE, resamples: int = 1000) -> list[dict]:
    """base_method minus each other pruned method at each sparsity, on the seeds both ran, with 95% paired
    intervals (`atp.stats.paired_interval`: a t-interval over the per-seed differences for 2-5 seeds, a record
    bootstrap labelled as record noise for one seed): each task's primary metric, and relative performance on
    the informative tasks (those above chance) when there is a dense + LoRA reference. Records are paired by id."""
    from .stats import paired_interval

    out = []
    for sparsity, method, base, other, seeds in paired_cells(results, base_method):
        tasks = {t: m for t, m in primary.items() if (reference is None or t in reference)
                 and all(_task_rows(c["metrics"], t, m) for s in seeds for c in (base[s], other[s]))}
        if not seeds or not tasks:
            continue
        per_seed = {"a": {}, "b": {}}
        for t, m in tasks.items():
            named = {f"{name} seed {s} at sparsity {sparsity:g}": cells[s]["metrics"]
                     for s in seeds for name, cells in ((base_method, base), (method, other))}
            rows = paired_task_rows(named, t, m)
            per_seed["a"][t], per_seed["b"][t] = rows[0::2], rows[1::2]
        measures = {}
        if reference is not None:
            measures["relative (informative tasks)"] = ({t: m for t, m in informative.items() if t in tasks}, True)
        measures.update({f"{t} {m}": ({t: m}, False) for t, m in tasks.items()})
        for label, (chosen, relative) in measures.items():
            if not chosen:
                continue
            task, metric = next(iter(chosen.items()))
            stat = _relative_statistic(reference, chosen) if relative else _task_statistic(task, metric)
            a = {t: per_seed["a"][t] for t in chosen}
            b = {t: per_seed["b"][t] for t in chosen}
            result = paired_interval(a, b, stat, resamples=resamples)
            out.append({"sparsity": sparsity, "a": base_method, "b": method, "measure": label, "seeds": seeds,
                        **{k: result[k] for k in ("diff", "low", "high", "verdict", "interval", "per_seed")},
                        "higher_is_better": relative or metric != "ppl"})
    return out


# ----------------------------------------------------------------------------- decisions

def _final_decisions(result: dict):
    """A cell's final decisions and gate weights (report.json of runs from before they were recorded: None)."""
    from .diagnostics import decode, expand_weights

    report = result.get("report", {})
    if "decisions" not in report or "decision_weights" not in report:
        return None
    return decode(report["decisions"]), expand_weights(report["decision_weights"])


def decision_overlaps(results: list[dict], base_method: str = DEFAULT_BASE) -> list[dict]:
    """For each pruned method other than base_method, at each sparsity and on the seeds both ran: how its final
    decisions differ from base_method's, per kind and per layer (atp.diagnostics.overlap: parameters pruned by
    exactly one of the two as a share of those pruned by either), per seed and as the mean over the seeds.
    Cells without recorded decisions (older runs) are listed as such."""
    from .diagnostics import overlap

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    out = []
    for sparsity, method, base, other, seeds in paired_cells(results, base_method):
        if not seeds:
            continue
        per_seed, missing = {}, []
        for seed in seeds:
            a, b = _final_decisions(base[seed]), _final_decisions(other[seed])
            if a is None or b is None:
                missing.append(seed)
                continue
            per_seed[seed] = overlap(a[0], b[0], a[1])
        entry = {"sparsity": sparsity, "a": base_method, "b": method, "seeds": sorted(per_seed),
                 "not_recorded": missing, "per_seed": {str(k): v for k, v in per_seed.items()}}
        if per_seed:
            found = list(per_seed.values())
            entry["share"] = mean([v["share"] for v in found])
            entry["kinds"] = {kind: {"share": mean([v["kinds"][kind]["share"] for v in found]),
                                     "per_layer": [mean([v["kinds"][kind]["per_layer"][i] for v in found])
                                                   for i in range(len(layers["per_layer"]))]}
                              for kind, layers in found[0]["kinds"].items()}
        out.append(entry)
    return out


def decision_search(results: list[dict]) -> list[dict]:
    """Per cell with a recorded search (ATP, frozen-generator): when the decisions stopped moving, how many gates
    the freeze's calibration moved, and the comebacks per kind (atp.diagnostics.search_diagnostics)."""
    rows = []
    for r in results:
        search = r.get("report", {}).get("decision_search")
        if search:
            last = [e for e in search["distance_to_final"] if e["event"] == "generator"]
            rows.append({"method": r["method"], "sparsity": r["sparsity"], "seed": r["seed"],
                         "generator_steps": search["generator_steps_logged"],
                         "stable_from_step": search["stable_from_step"],
                         "target_reached_step": search["target_reached_step"],
                         "moved_at_freeze": search["moved_at_freeze"],
                         "last_generator_step_to_final": last[-1] if last else None,
                         "comebacks": {k: v["count"] for k, v in search["comebacks"].items()}})
    return rows


def _share(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _decision_lines(part: dict) -> list[str]:
    lines = []
    if part.get("decision_overlaps"):
        base = part["base"]
        lines += ["", f"Final decisions against {base}'s, same seed: the parameters pruned by exactly one of the two "
                  "as a share of those pruned by either (0: the same structures, 1: none in common; mean over the "
                  "seeds; per layer in results.json):", "",
                  "| sparsity | method | seeds | all kinds | per kind | per layer |", "|---|---|---|---|---|---|"]
        for d in part["decision_overlaps"]:
            if "kinds" not in d:
                lines.append(f"| {d['sparsity']:g} | {d['b']} | - | not recorded (runs from before report.json "
                             "held the decisions) | | |")
                continue
            kinds = ", ".join(f"{k} {_share(v['share'])}" for k, v in d["kinds"].items())
            layers = "; ".join(f"{k}: " + " ".join(_share(x) for x in v["per_layer"]) for k, v in d["kinds"].items())
            missing = f" (not recorded: seeds {d['not_recorded']})" if d["not_recorded"] else ""
            lines.append(f"| {d['sparsity']:g} | {d['b']} | {d['seeds']}{missing} | {_share(d['share'])} | {kinds} "
                         f"| {layers} |")
    if part.get("decision_search"):
        lines += ["", "Decision search (decisions.jsonl): the first step from which the decisions equal the final "
                  "ones, the step where the ratio target reached its final value, gates the freeze's calibration "
                  "moved, and comebacks (structures pruned at a generator step after the target was reached and "
                  "kept at export):", "",
                  "| method | sparsity | seed | generator steps | stable from step | target reached | moved at freeze "
                  "| comebacks |", "|---|---|---|---|---|---|---|---|"]
        for r in part["decision_search"]:
            comebacks = ", ".join(f"{k} {v}" for k, v in r["comebacks"].items())
            lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['seed']} | {r['generator_steps']} | "
                         f"{r['stable_from_step']} | {r['target_reached_step']} | {r['moved_at_freeze']} | "
                         f"{comebacks} |")
    return lines


# ----------------------------------------------------------------------------- outputs

def _fmt(value: tuple[float, float | None] | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _digits(column: str) -> int:
    return 2 if column.endswith("ppl") else 1 if "rouge" in column else 3


def _relative_table(rows: list[dict], sparsities: list[float], key: str) -> list[str]:
    lines = ["| method | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for method in dict.fromkeys(r["method"] for r in rows):
        entries = []
        for s in sparsities:
            row = next((r for r in rows if r["method"] == method and r["sparsity"] == s), None)
            entries.append(_fmt(row.get(key)) if row else "")
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(entries) + " |")
    return lines


def precision_note(results: list[dict]) -> str | None:
    """A warning where cells of one method trained in different precisions (--mixed-precision auto chooses per
    machine, so cells run on different CPUs can differ): their differences then mix precision with method."""
    seen = {}
    for result in results:
        choice = (result.get("report") or {}).get("precision") or {}
        if choice.get("mixed_precision"):
            seen.setdefault(result["method"], {}).setdefault(choice["mixed_precision"], []).append(result["name"])
    mixed = {method: found for method, found in seen.items() if len(found) > 1}
    if not mixed:
        return None
    return ("**Cells of one method trained in different precisions** (`--mixed-precision auto` chooses per machine): "
            + "; ".join(f"{method}: " + ", ".join(f"{choice} in {', '.join(sorted(names))}"
                                                  for choice, names in sorted(found.items()))
                        for method, found in sorted(mixed.items()))
            + ". Set mixed_precision in the config's train section to compare like with like.")


def write_markdown(spec, summary: dict, path: Path, results: list[dict] = ()) -> None:
    from .stats import judged

    lines = ["# atp compare", "",
             f"Model `{spec.model}`; training overrides {json.dumps(spec.train)}; "
             f"evaluation {json.dumps(spec.eval)}. Sparsity is over prunable (decoder-block) parameters.",
             "Relative performance = mean over tasks of run / dense + LoRA (perplexity: dense + LoRA / run), "
             "each run against the mean of the dense + LoRA seeds. Values are mean ± std over seeds.", ""]
    lines += [f"- variant `{name}`: {json.dumps(overrides)}" for name, overrides in spec.variants.items()]
    lines += [""] if spec.variants else []
    note = precision_note(list(results))
    lines += [note, ""] if note else []
    for domain, part in summary.items():
        rows = part["rows"]
        lines += [f"## {domain}", "",
                  "Relative performance on " + ", ".join(f"{t} {m}" for t, m in part["primary_metrics"].items())
                  + f" (dense + LoRA seeds {part['reference_seeds']}):", ""]
        sparsities = sorted({r["sparsity"] for r in rows})
        lines += _relative_table(rows, sparsities, "relative")
        if part.get("majority"):
            lines += ["", "Always giving the most common answer scores " + ", ".join(
                f"{task} {value:.3f}" for task, value in part["majority"].items())
                + " (same_answer: share of records given the model's most frequent answer)."]
        if part.get("at_chance"):
            lines += ["", f"Dense + LoRA does not beat that on {', '.join(part['at_chance'])}: at this model's scale "
                      "the task measures answer bias, not skill. Relative performance without it:", ""]
            lines += _relative_table(rows, sparsities, "relative_above_chance")
        columns = list(dict.fromkeys(c for r in rows for c in r["metrics"]))
        tasks = list(part["primary_metrics"])
        lines += ["", "| method | sparsity | seeds | measured sparsity | " + " | ".join(columns)
                  + " | " + "".join(f"{t} ratio | " for t in tasks) + "relative | train s | cell s |",
                  "|---|---|---|---|" + "---|" * (len(columns) + len(tasks) + 3)]
        for r in rows:
            values = [_fmt(r["metrics"].get(c), _digits(c)) for c in columns]
            values += [_fmt(r.get("ratios", {}).get(t)) for t in tasks]
            lines.append(f"| {LABELS.get(r['method'], r['method'])} | {r['sparsity']:g} | {len(r['seeds'])} | "
                         f"{_fmt(r['measured_sparsity'], 4)} | " + " | ".join(values)
                         + f" | {_fmt(r.get('relative'))} | {_fmt(r['train_seconds'], 0)} | "
                         f"{_fmt(r['cell_seconds'], 0)} |")
        if part.get("differences"):
            base = part["base"]
            lines += ["", f"Paired differences, {base} minus each method on the seeds both ran, records paired by id "
                      "(higher is better except for perplexity; an interval that contains 0 is a tie). The 95% "
                      "interval is a t-interval over the per-seed differences with 2-5 seeds (mean ± t(S-1) sd / "
                      "√S), a bootstrap over seeds and records with more; with one seed there is no seed-level "
                      "interval, only a bootstrap over records (one seed: record noise only):", "",
                      "| sparsity | method | measure | seeds | difference | 95% interval | interval | verdict |",
                      "|---|---|---|---|---|---|---|---|"]
            for d in part["differences"]:
                verdict = judged(d, d["higher_is_better"], base)
                lines.append(f"| {d['sparsity']:g} | {d['b']} | {d['measure']} | {len(d['seeds'])} | "
                             f"{d['diff']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] | "
                             f"{d.get('interval', 'bootstrap')} | {verdict} |")
        lines += _decision_lines(part)
        lines.append("")
    write_text_atomic(path, "\n".join(lines))


def write_plots(summary: dict, results: list[dict], folder: Path) -> list[Path]:
    """Each metric against sparsity (one line per method) and per-layer kept fractions, per domain."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install 'atp-llm[plots]'); no plots written")
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for domain, part in summary.items():
        rows = part["rows"]
        derived = {"relative performance": "relative"}
        if any(r.get("relative_above_chance") for r in rows):
            derived["relative, tasks at chance left out"] = "relative_above_chance"
        columns = list(dict.fromkeys(c for r in rows for c in r["metrics"])) + list(derived)
        ncols = min(3, len(columns))
        nrows = math.ceil(len(columns) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
        methods = list(dict.fromkeys(r["method"] for r in rows))
        sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] > 0})
        for ax, column in zip(axes.flat, columns):
            values = [r.get(derived[column]) if column in derived else r["metrics"].get(column) for r in rows]
            for k, method in enumerate(methods):
                points = sorted((r["sparsity"], v) for r, v in zip(rows, values)
                                if r["method"] == method and v is not None)
                if not points:
                    continue
                if method in LABELS:  # a reference: a horizontal line
                    style = "--" if method == "dense-lora" else ":"
                    ax.axhline(points[0][1][0], linestyle=style, color="gray" if method == "dense" else "black",
                               label=LABELS[method])
                    continue
                xs = [p[0] + 0.002 * (k - len(methods) / 2) for p in points]  # a small shift keeps error bars apart
                ax.errorbar(xs, [p[1][0] for p in points], yerr=[p[1][1] or 0 for p in points], marker="o",
                            capsize=3, label=method, color=f"C{k % 10}")  # one colour per method in every panel
            ax.set_title(column + (" (log scale)" if column.endswith("ppl") else ""))
            if column.endswith("ppl"):
                ax.set_yscale("log")
            ax.set_xticks(sparsities)
            ax.set_xlim(min(sparsities, default=0) - 0.05, max(sparsities, default=0) + 0.05)
            ax.set_xlabel("sparsity (prunable parameters)")
        for ax in list(axes.flat)[len(columns):]:
            ax.axis("off")
        fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="center right", fontsize=8)
        fig.suptitle(f"{domain}: metrics against sparsity")
        fig.tight_layout(rect=(0, 0, 1 - 1.6 / fig.get_figwidth(), 1))  # the legend's column stays clear of the panels
        written.append(folder / f"{domain}_metrics.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
        written += _kept_heatmaps(plt, domain, [r for r in results if r["domain"] == domain], folder)
    return written


def _kept_heatmaps(plt, domain: str, results: list[dict], folder: Path) -> list[Path]:
    written = []
    for sparsity in sorted({r["sparsity"] for r in results if r["sparsity"] > 0}):
        chosen = {}  # method -> the result of its first seed
        for r in sorted(results, key=lambda r: r["seed"] or 0):
            if r["sparsity"] == sparsity and r["report"].get("layers") and r["method"] not in chosen:
                chosen[r["method"]] = r
        if not chosen:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.45 * len(chosen)), squeeze=False, sharey=True)
        panels = (("query heads kept", lambda rec, dense: len(rec["kept_heads"]) / dense["num_heads"]),
                  ("MLP channels kept", lambda rec, dense: rec["intermediate_size"] / dense["intermediate_size"]))
        for ax, (title, kept_fraction) in zip(axes.flat, panels):
            table = [[kept_fraction(rec, r["report"]["dense_shape"]) for rec in r["report"]["layers"]]
                     for r in chosen.values()]
            image = ax.imshow(table, aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set_yticks(range(len(chosen)), list(chosen))  # shared: labels on the left panel only
            ax.set_xticks(range(0, len(table[0]), max(1, len(table[0]) // 10)))
            ax.set_xlabel("layer")
            ax.set_title(f"{domain}, sparsity {sparsity:g}: {title}")
        fig.colorbar(image, ax=axes.ravel().tolist(), label="kept fraction")
        written.append(folder / f"{domain}_kept_s{sparsity:g}.png")
        fig.savefig(written[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return written


def chance_levels(spec, domains) -> dict:
    """{domain: {multiple-choice task: majority-class accuracy}} on the records each cell evaluates."""
    from .evaluation import majority_levels

    return {d: majority_levels(d, spec.data_dir, spec.eval_settings(d)["limit"]) for d in domains}


def write_outputs(spec, results: list[dict], plots: bool = True) -> dict:
    """OUT/results.json (config, summary, cells), OUT/results.md and, with plots, PNGs under OUT/plots."""
    out = Path(spec.out)
    summary = summarize(results, spec.relative_metrics, chance_levels(spec, {r["domain"] for r in results}),
                        spec.base or DEFAULT_BASE)
    record = {"config": dataclasses.asdict(spec), "summary": summary, "cells": results}
    write_text_atomic(out / "results.json", json.dumps(record, indent=2))
    write_markdown(spec, summary, out / "results.md", results)
    if plots:
        write_plots(summary, results, out / "plots")
    return summary

