"""`atp compare`: ATP against two-stage baselines and ablations, side by side, from one YAML config.

    atp compare --config benchmarks/compare.yaml --dry-run      # list the cells and what is done
    nohup atp compare --config benchmarks/compare.yaml > compare.log 2>&1 &
    atp compare --config benchmarks/compare.yaml --report-only  # tables and plots from finished cells

A cell is one (domain, method, sparsity, seed): `train()` then `evaluation.evaluate_domain` on the dev
split. Each domain also gets the references: the dense model without tuning ("dense") and dense + LoRA
("dense-lora", `prune: False`, same loop and budget). A finished cell writes OUT/DOMAIN/CELL/result.json
(atomically) and is skipped on the next invocation, so a stopped comparison continues where it
stopped; an interrupted training run resumes from its newest checkpoint. After every cell, OUT gets
results.json and results.md; at the end, PNGs under OUT/plots (needs matplotlib, the `plots` extra).

Relative performance of a run = mean over tasks of run / dense-LoRA on one metric per task (perplexity
inverted: dense-LoRA / run). Every run of a domain is divided by the same reference: the mean of the
dense-LoRA seeds. Mean and std over seeds are reported where several seeds ran.

Config keys:
  model        model argument (embedded name, folder, hub id)
  out          output folder
  domains      e.g. [healthcare, legal]
  sparsities   e.g. [0.4, 0.5]
  methods      ATPConfig methods (atp, taylor, magnitude, activation, random, frozen-generator) and the
               ATP ablations atp-no-lasso, atp-no-mask-lora, atp-no-final-phase
  seeds        default seeds of every cell, e.g. [0]
  cell_seeds   optional overrides: {"atp@0.4": [0, 1, 2], "dense-lora": [0, 1, 2]} (method@sparsity or method;
               [] skips those cells)
  train        ATPConfig overrides for every training run (max_steps, batch_size, max_length, ...)
  eval         limit (int, or {domain: int}; see `atp eval --limit`), batch_size, max_length, max_new_tokens
  data_dir     domain data folder (default: as `atp eval`)
  references   run dense and dense-lora per domain (default true)
  variants     extra methods defined by ATPConfig overrides, e.g. {atp-continue: {restart_lr: false}}
               (method atp unless `method` is given); list their names in `methods`
  relative_metrics  metric per task for relative performance, e.g. {casehold: acc}; defaults: multiple
               choice acc_norm, summarisation rougeL, perplexity ppl
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import time
from pathlib import Path


from .errors import ATPError
from .fsutil import read_yaml_mapping, write_text_atomic

# method name in the config -> ATPConfig overrides
METHODS = {
    "atp": {"method": "atp"},
    "atp-no-lasso": {"method": "atp", "lam": 0.0},
    "atp-no-mask-lora": {"method": "atp", "mask_lora": False},
    "atp-no-final-phase": {"method": "atp", "generator_frac": 1.0},
    "taylor": {"method": "taylor"},
    "magnitude": {"method": "magnitude"},
    "activation": {"method": "activation"},
    "random": {"method": "random"},
    "frozen-generator": {"method": "frozen-generator"},
}
REFERENCES = {"dense": None, "dense-lora": {"prune": False}}
LABELS = {"dense": "dense (no tuning)", "dense-lora": "dense + LoRA"}
KEYS = {"model", "out", "domains", "sparsities", "methods", "seeds", "cell_seeds", "train", "eval", "data_dir",
        "references", "relative_metrics", "variants"}
PER_CELL = {"model", "domain", "train_files", "data_dir", "out", "overwrite", "prune", "method", "sparsity", "seed"}
EVAL_KEYS = {"limit", "batch_size", "max_length", "max_new_tokens"}
SHOWN = ("acc", "acc_norm", "same_answer", "rouge1", "rouge2", "rougeL", "ppl")  # metrics in tables and plots
PRIMARY = {"multiple_choice": "acc_norm", "summarization": "rougeL", "perplexity": "ppl"}


@dataclasses.dataclass
class Cell:
    domain: str
    method: str  # a METHODS key, "dense" or "dense-lora"
    sparsity: float  # 0 for the references
    seed: int | None  # None for dense (nothing random)

    @property
    def name(self) -> str:
        if self.method == "dense":
            return "dense"
        if self.method == "dense-lora":
            return f"dense-lora-seed{self.seed}"
        return f"{self.method}-s{self.sparsity:g}-seed{self.seed}"


def load_spec(path) -> dict:
    spec = read_yaml_mapping(path, "compare config", KEYS)
    spec = {"model": "smollm2-135m", "out": "runs/compare", "domains": ["healthcare"], "sparsities": [0.4],
            "methods": ["atp"], "seeds": [0], "cell_seeds": {}, "train": {}, "eval": {}, "data_dir": None,
            "references": True, "relative_metrics": {}, "variants": {}, **spec}
    from .data import get_domain
    from .train import ATPConfig

    fields = {f.name for f in dataclasses.fields(ATPConfig)}
    spec["variants"] = check_variants(spec["variants"], fields, path)
    known = {**METHODS, **spec["variants"]}
    bad = [m for m in spec["methods"] if m not in known]
    if bad:
        raise ATPError(f"unknown methods {bad} in {path}; choices: {', '.join(known)} (or define them under `variants`)")
    for domain in spec["domains"]:
        get_domain(domain)
    wrong = sorted(set(spec["train"]) - (fields - PER_CELL))
    if wrong:
        raise ATPError(f"train: {wrong} cannot be set there (unknown, or set per cell by compare)")
    wrong = sorted(set(spec["eval"]) - EVAL_KEYS)
    if wrong:
        raise ATPError(f"eval: unknown keys {wrong}; valid: {sorted(EVAL_KEYS)}")
    if not all(0 < s < 1 for s in spec["sparsities"]):
        raise ATPError(f"sparsities must be in (0, 1), got {spec['sparsities']}")
    check_cell_seeds(spec, path)
    spec["out"] = str(Path(spec["out"]).resolve())
    return spec


def check_cell_seeds(spec: dict, path) -> None:
    """Each key names a listed method (or dense-lora), optionally @ a listed sparsity; each value is a
    list of int seeds, [] to skip that cell."""
    if not isinstance(spec["cell_seeds"], dict):
        raise ATPError(f"cell_seeds in {path} must map method or method@sparsity to a list of seeds")
    methods = set(spec["methods"]) | {"dense-lora"}
    sparsities = {f"{s:g}" for s in spec["sparsities"]}
    for key, seeds in spec["cell_seeds"].items():
        method, _, sparsity = str(key).partition("@")
        if method not in methods or (sparsity and (method == "dense-lora" or sparsity not in sparsities)):
            raise ATPError(f"cell_seeds key '{key}' in {path} matches no cell; use a method from `methods` "
                           f"({', '.join(sorted(methods))}), optionally @ one of the sparsities {sorted(sparsities)}")
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ATPError(f"cell_seeds['{key}'] in {path} must be a list of integer seeds ([] skips the cell), "
                           f"got {seeds!r}")


def check_variants(variants, fields: set[str], path) -> dict[str, dict]:
    """`variants` from a compare config: name -> ATPConfig overrides (method atp unless given)."""
    if not isinstance(variants, dict):
        raise ATPError(f"variants in {path} must be a mapping of name -> training options, got {type(variants).__name__}")
    checked = {}
    for name, overrides in variants.items():
        if name in METHODS or name in REFERENCES:
            raise ATPError(f"variant '{name}' in {path} has the name of a built-in method; choose another name")
        if not isinstance(overrides, dict):
            raise ATPError(f"variant '{name}' in {path} must map option names to values, got {overrides!r}")
        wrong = sorted(set(overrides) - (fields - (PER_CELL - {"method"})))
        if wrong:
            raise ATPError(f"variant '{name}' in {path}: {wrong} cannot be set there (unknown, or set per cell by compare)")
        checked[str(name)] = {"method": "atp", **overrides}
    return checked


def seeds_for(spec: dict, method: str, sparsity: float) -> list[int]:
    overrides = spec["cell_seeds"]
    return list(overrides.get(f"{method}@{sparsity:g}", overrides.get(method, spec["seeds"])))


def cells(spec: dict) -> list[Cell]:
    """References first, then every method's first seed (sparsity by sparsity, both domains), then the
    extra seeds, each round of seeds for all methods before the next: a run stopped early still holds
    a complete first-seed table for the first sparsities, and as many seeds for one method as another."""
    refs, runs = [], []
    for d, domain in enumerate(spec["domains"]):
        if spec["references"]:
            refs.append(Cell(domain, "dense", 0.0, None))
            refs += [Cell(domain, "dense-lora", 0.0, s) for s in seeds_for(spec, "dense-lora", 0.0)]
        for p, sparsity in enumerate(spec["sparsities"]):
            for m, method in enumerate(spec["methods"]):
                for k, seed in enumerate(seeds_for(spec, method, sparsity)):
                    runs.append(((k > 0, k, p, d, m), Cell(domain, method, float(sparsity), seed)))
    return refs + [cell for _, cell in sorted(runs, key=lambda item: item[0])]


def cell_dir(spec: dict, cell: Cell) -> Path:
    return Path(spec["out"]) / cell.domain / cell.name


def cell_config(spec: dict, cell: Cell):
    from .train import ATPConfig

    method = REFERENCES["dense-lora"] if cell.method == "dense-lora" else {**METHODS, **spec["variants"]}[cell.method]
    values = {**spec["train"], **method,
              "model": spec["model"], "domain": cell.domain, "data_dir": spec["data_dir"], "seed": cell.seed,
              "out": str(cell_dir(spec, cell) / "run"), "overwrite": True}
    if cell.method != "dense-lora":
        values["sparsity"] = cell.sparsity
    return ATPConfig(**values)


def eval_settings(spec: dict, domain: str) -> dict:
    settings = {"limit": None, "batch_size": 4, "max_length": 512, "max_new_tokens": 48, **spec["eval"]}
    if isinstance(settings["limit"], dict):
        settings["limit"] = settings["limit"].get(domain)
    return settings


def cell_fingerprint(spec: dict, cell: Cell) -> str:
    from .train import fingerprint

    trained = spec["model"] if cell.method == "dense" else fingerprint(cell_config(spec, cell))
    key = json.dumps({"train": trained, "eval": eval_settings(spec, cell.domain), "domain": cell.domain,
                      "data_dir": spec["data_dir"]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def finished(spec: dict, cell: Cell) -> dict | None:
    """The cell's result if it exists and was made with the current settings; an error if the settings differ."""
    path = cell_dir(spec, cell) / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result.get("fingerprint") != cell_fingerprint(spec, cell):
        raise ATPError(f"{path} was computed with different settings; use another `out` folder "
                       f"or delete {path.parent} to recompute that cell")
    return result


def run_state(cfg) -> tuple[str, object]:
    """What cfg.out holds for this config: ("trained", report), ("resumable", checkpoint name),
    ("other", None) when a run with other settings is there, or ("empty", None)."""
    from . import checkpoint
    from .train import config_from_record, fingerprint

    run_dir, wanted = Path(cfg.out), fingerprint(cfg)
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    if report is not None:
        try:
            same = fingerprint(config_from_record(report["config"])) == wanted
        except TypeError:
            same = False
        if same and Path(report["model_dir"]).is_dir():
            return "trained", report
    found = checkpoint.latest_valid(run_dir) if (run_dir / "checkpoints").is_dir() else None
    if found is not None and found[1]["fingerprint"] == wanted:
        return "resumable", found[0].name
    return ("other", None) if found is not None or report is not None else ("empty", None)


def train_cell(cfg, progress: bool) -> dict:
    """Train a cell's run, or reuse it: a finished run is kept, an interrupted one resumes from its checkpoint."""
    from .train import train

    state, detail = run_state(cfg)
    if state == "trained":
        print(f"  trained already: {cfg.out}")
        return detail
    if state == "resumable":
        print(f"  resuming {cfg.out} from {detail}")
    return train(cfg, progress=progress, resume=state == "resumable")


REPORT_FIELDS = ("method", "target_sparsity", "prunable_sparsity", "model_sparsity", "decisions_sparsity",
                 "exported_params", "dense_params", "train_seconds", "mean_step_seconds", "generator_steps",
                 "logits_check", "decisions_info", "layers", "dense_shape")


def run_cell(spec: dict, cell: Cell, progress: bool = True) -> dict:
    import torch

    from .evaluation import evaluate_domain
    from .models import load_model

    started = time.time()
    report = {}
    model_name = spec["model"]
    if cell.method != "dense":
        report = train_cell(cell_config(spec, cell), progress)
        model_name = report["model_dir"]
        gc.collect()  # the training run's model and optimizer go before the evaluation loads the export
    settings = eval_settings(spec, cell.domain)
    t0 = time.time()
    model, tokenizer = load_model(model_name)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate_domain(model, tokenizer, cell.domain, spec["data_dir"], **settings)
    del model
    gc.collect()
    result = {**dataclasses.asdict(cell), "name": cell.name, "fingerprint": cell_fingerprint(spec, cell),
              "metrics": metrics, "eval_settings": settings, "eval_seconds": round(time.time() - t0, 1),
              "cell_seconds": round(time.time() - started, 1),
              "report": {k: report[k] for k in REPORT_FIELDS if k in report}}
    write_text_atomic(cell_dir(spec, cell) / "result.json", json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- aggregation

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


def summarize(results: list[dict], relative_metrics: dict | None = None, majority: dict | None = None) -> dict:
    """Per domain: rows (method, sparsity) with mean/std of every metric over seeds and relative performance.

    majority: {domain: {task: accuracy of always giving the most common answer}}. A multiple-choice task
    on which dense + LoRA does not beat that is at chance for this model: rows also get
    `relative_above_chance`, the relative performance over the other tasks."""
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
                    if metric in SHOWN and values:
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
                           "majority": levels, "at_chance": at_chance}
    return summary


# ----------------------------------------------------------------------------- outputs

def _fmt(value: tuple[float, float | None] | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _digits(column: str) -> int:
    return 2 if column.endswith("ppl") else 1 if "rouge" in column else 3


def _relative_table(rows: list[dict], sparsities: list[float], key: str) -> list[str]:
    lines = ["| method | " + " | ".join(f"sparsity {s:g}" for s in sparsities) + " |", "|---|" + "---|" * len(sparsities)]
    for method in dict.fromkeys(r["method"] for r in rows):
        entries = []
        for s in sparsities:
            row = next((r for r in rows if r["method"] == method and r["sparsity"] == s), None)
            entries.append(_fmt(row.get(key)) if row else "")
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(entries) + " |")
    return lines


def write_markdown(spec: dict, summary: dict, path: Path) -> None:
    lines = ["# atp compare", "",
             f"Model `{spec['model']}`; training overrides {json.dumps(spec['train'])}; "
             f"evaluation {json.dumps(spec['eval'])}. Sparsity is over prunable (decoder-block) parameters.",
             "Relative performance = mean over tasks of run / dense + LoRA (perplexity: dense + LoRA / run), "
             "each run against the mean of the dense + LoRA seeds. Values are mean ± std over seeds.", ""]
    lines += [f"- variant `{name}`: {json.dumps(overrides)}" for name, overrides in spec.get("variants", {}).items()]
    lines += [""] if spec.get("variants") else []
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
                         + f" | {_fmt(r.get('relative'))} | {_fmt(r['train_seconds'], 0)} | {_fmt(r['cell_seconds'], 0)} |")
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
            get = (lambda r: r.get(derived[column])) if column in derived else (lambda r: r["metrics"].get(column))
            for k, method in enumerate(methods):
                points = sorted((r["sparsity"], get(r)) for r in rows if r["method"] == method and get(r) is not None)
                if not points:
                    continue
                if method in REFERENCES:
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
        for ax, (kind, title) in zip(axes.flat, (("heads", "query heads kept"), ("mlp", "MLP channels kept"))):
            table = []
            for r in chosen.values():
                dense = r["report"]["dense_shape"]
                if kind == "heads":
                    table.append([len(rec["kept_heads"]) / dense["num_heads"] for rec in r["report"]["layers"]])
                else:
                    table.append([rec["intermediate_size"] / dense["intermediate_size"] for rec in r["report"]["layers"]])
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


def chance_levels(spec: dict, domains) -> dict:
    """{domain: {multiple-choice task: majority-class accuracy}} on the records each cell evaluates."""
    from .evaluation import majority_levels

    return {d: majority_levels(d, spec["data_dir"], eval_settings(spec, d)["limit"]) for d in domains}


def write_outputs(spec: dict, results: list[dict], plots: bool = True) -> dict:
    out = Path(spec["out"])
    summary = summarize(results, spec["relative_metrics"], chance_levels(spec, {r["domain"] for r in results}))
    write_text_atomic(out / "results.json", json.dumps({"config": spec, "summary": summary, "cells": results}, indent=2))
    write_markdown(spec, summary, out / "results.md")
    if plots:
        write_plots(summary, results, out / "plots")
    return summary


def cell_status(spec: dict, cell: Cell) -> str:
    if (cell_dir(spec, cell) / "result.json").exists():
        return "done"
    if cell.method == "dense":
        return "to run"
    state, detail = run_state(cell_config(spec, cell))
    return {"trained": "trained, not evaluated", "resumable": f"resumes from {detail}",
            "other": "to run (an earlier run with other settings there is replaced)"}.get(state, "to run")


def run_compare(config_path, dry_run: bool = False, report_only: bool = False, progress: bool = True) -> int:
    spec = load_spec(config_path)
    todo = cells(spec)
    if dry_run:
        for i, cell in enumerate(todo, 1):
            print(f"{i:3d}. {cell.domain:<11} {cell.name:<34} {cell_status(spec, cell)}")
        print(f"{len(todo)} cells; outputs in {spec['out']}")
        return 0
    earlier = [finished(spec, cell) for cell in todo]  # refuses changed settings before anything runs
    results, failed = [], []
    for i, (cell, result) in enumerate(zip(todo, earlier), 1):
        if result is None and not report_only:
            print(f"[{i}/{len(todo)}] {cell.domain} {cell.name}", flush=True)
            try:
                result = run_cell(spec, cell, progress)
            except ATPError as err:  # one failed cell does not stop the comparison; a rerun retries it
                failed.append(f"{cell.domain} {cell.name}: {err}")
                write_text_atomic(cell_dir(spec, cell) / "error.txt", f"{err}\n")
                print(f"[{i}/{len(todo)}] {cell.domain} {cell.name}: FAILED: {err}", flush=True)
                continue
            (cell_dir(spec, cell) / "error.txt").unlink(missing_ok=True)
            print(f"[{i}/{len(todo)}] {cell.domain} {cell.name}: done in {result['cell_seconds']:.0f}s", flush=True)
        elif result is not None:
            print(f"[{i}/{len(todo)}] {cell.domain} {cell.name}: done earlier, skipped")
        if result is not None:
            results.append(result)
            if not report_only:
                write_outputs(spec, results, plots=False)  # tables after every cell; plots at the end
    if results:
        write_outputs(spec, results)
        print(f"results: {Path(spec['out']) / 'results.md'}")
    if failed:
        print(f"{len(failed)} cell(s) failed (rerun the same command to retry them):\n  " + "\n  ".join(failed))
        return 1
    return 0
