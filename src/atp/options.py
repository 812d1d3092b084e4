"""`ATPConfig`, the options of `atp prune`: the recipe's own (`atp.config.RecipeOptions`) and the pruning space's
(`atp.kinds`: --space and each kind's options), with the full check of a config, the run's record helpers (data
and model stamps), and the config fingerprint that decides whether a run can be resumed or a compare cell reused."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from . import kinds
from .config import LATER_OPTIONS as RECIPE_LATER_OPTIONS
from .config import NON_SEMANTIC, RecipeOptions, upgrade_record
from .config import check_types as check_field_types
from .errors import ATPError
from .fsutil import read_yaml_mapping
from .schedule import Schedule

__all__ = ["LATER_OPTIONS", "NON_SEMANTIC", "ATPConfig", "check_same_data", "check_same_model", "check_types",
           "config_from_record", "data_sha256", "fingerprint", "inert_options", "model_sha256", "resume_config"]


@dataclass
class ATPConfig(*reversed(kinds.OPTION_MIXINS), RecipeOptions):
    """Every option of `atp prune`: the recipe's, then --space and the kinds' options."""

    def validate(self) -> None:
        """Every value checked before any work starts: types, ranges, choices, and the training data named."""
        from . import validation
        from .baselines import SCORED, check_kinds_scored, check_method
        from .gguf_export import check_prune_options
        from .quantize import check_options

        check_types(dataclasses.asdict(self))
        validation.seed(self.seed)
        validation.mixed_precision(self.mixed_precision)
        validation.lora_targets(self.lora_targets)
        self.check_values()
        kinds.check_options(self)
        check_options(self)
        check_method(self.method)
        check_prune_options(self)
        if self.prune:
            check_kinds_scored(self.method, self.space)
        self.check_combinations(self.method in SCORED)
        self.check_data_names()

    def check_data_names(self) -> None:
        """The domain exists; each --train-file is TASK=PATH with a known task and a file (or hub id) there."""
        from . import data

        if self.domain:
            data.get_domain(self.domain)
        for entry in self.train_files:
            task, sep, path = entry.partition("=")
            if not sep or not task or not path:
                raise ATPError(f"--train-file takes TASK=PATH (e.g. pubmedqa=data.jsonl), got {entry!r}")
            data.get_task(task)
            if not Path(path).expanduser().exists() and not data._is_hub_id(path):
                raise ATPError(f"--train-file {entry}: data file {path} not found")

    @classmethod
    def yaml_values(cls, path) -> dict:
        """The option values in a YAML file (a mapping of field names; unknown keys are an error). A record
        written before issue 15 has mask_lora, which became lora_mask."""
        values = upgrade_record(read_yaml_mapping(path, "config file", {f.name for f in dataclasses.fields(cls)}
                                                  | {"mask_lora"}))
        check_types(values, f"config file {path}")
        return values


def check_types(values: dict, where: str | None = None) -> None:
    """Each value has its ATPConfig field's type; the error names the key (in `where`) or the flag. Unknown keys
    are left to the caller."""
    check_field_types(values, ATPConfig, where)


def data_sha256(cfg: ATPConfig) -> dict[str, str]:
    """SHA-256 of each data file the run reads (domain files by their path under the data folder, --train-file
    paths as given); hub datasets and missing files are left out."""
    from . import data
    from .checkpoint import file_sha256

    files = {}
    if cfg.domain:
        root = data.resolve_data_dir(cfg.data_dir)
        for _, path in data.domain_files(cfg.domain, cfg.data_dir):
            files[str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)] = path
    for entry in cfg.train_files:
        path = entry.partition("=")[2]
        files[path] = Path(path).expanduser()
    return {key: file_sha256(path) for key, path in files.items() if path.is_file()}


def check_same_data(recorded: dict | None, cfg: ATPConfig, where: str) -> None:
    """Refuse to resume when a data file the run read has changed (checkpoints before issue 19 recorded none)."""
    if not isinstance(recorded, dict):
        return
    now = data_sha256(cfg)
    for key in sorted(set(recorded) | set(now)):
        if recorded.get(key) != now.get(key):
            state = ("is no longer there" if key not in now else "was not read then" if key not in recorded else
                     f"changed (SHA-256 {recorded[key][:12]}... then, {now[key][:12]}... now)")
            raise ATPError(f"{where}: the training data {key} {state}; resume with the data the run used, or "
                           "start a new run")


# the files of a model folder that decide what a run computes: config, tokenizer, atp's modeling file, weights
MODEL_FILES = ("config.json", "modeling_atp.py", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "vocab.json", "merges.txt", "special_tokens_map.json", "*.safetensors", "*.safetensors.index.json")


def _file_stamps(folder: Path, recorded) -> dict[str, dict]:
    """name -> {sha256, size, mtime_ns} of a model folder's MODEL_FILES.

    A full SHA-256 rather than a hash of the safetensors headers: new weights of the same shapes (another
    fine-tune saved over the folder) have the same headers and size. Its cost is one read of the weights when a
    run starts (they are read to load them anyway; seconds for a 1B model). A resume re-reads only a file whose
    size or mtime differs from the record, so an untouched model costs nothing, and a copied or touched one is
    still compared by content."""
    from .checkpoint import file_sha256

    recorded = recorded if isinstance(recorded, dict) else {}
    stamps = {}
    for pattern in MODEL_FILES:
        for path in sorted(folder.glob(pattern)):
            if not path.is_file():
                continue
            stat = path.stat()
            before = recorded.get(path.name)
            same = (isinstance(before, dict) and before.get("size") == stat.st_size
                    and before.get("mtime_ns") == stat.st_mtime_ns and isinstance(before.get("sha256"), str))
            digest = before["sha256"] if same else file_sha256(path)
            stamps[path.name] = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return stamps


def model_sha256(cfg: ATPConfig, recorded=None) -> dict[str, dict]:
    """The base model's files (role "model") and, with --distill from a run, the teacher's ("teacher"), as
    `_file_stamps`; a hub model is left out. `recorded`: an earlier result, whose digests of files unchanged in
    size and mtime are reused."""
    from .models import resolve_model

    recorded = recorded if isinstance(recorded, dict) else {}
    folders = {"model": Path(resolve_model(cfg.model))}  # an embedded model: its prepared folder
    if cfg.distill and cfg.teacher != "self":
        teacher = Path(cfg.teacher).expanduser()
        folders["teacher"] = teacher / "model" if (teacher / "model").is_dir() else teacher
    return {role: _file_stamps(folder, recorded.get(role)) for role, folder in folders.items() if folder.is_dir()}


def check_same_model(recorded, cfg: ATPConfig, where: str) -> dict[str, dict]:
    """Refuse to resume when a file of the base model or the teacher changed (checkpoints before issue 31 record
    none and resume as before); the files' stamps now."""
    now = model_sha256(cfg, recorded)
    if not isinstance(recorded, dict):
        return now
    for role in sorted(set(recorded) | set(now)):
        then, current = recorded.get(role), now.get(role, {})
        then = then if isinstance(then, dict) else {}
        for name in sorted(set(then) | set(current)):
            old = then[name].get("sha256") if isinstance(then.get(name), dict) else None
            new = current[name]["sha256"] if name in current else None
            if old == new:
                continue
            state = ("is no longer there" if new is None else "was not there then" if old is None else
                     f"changed (SHA-256 {str(old)[:12]}... then, {new[:12]}... now)")
            who = "base model" if role == "model" else role
            raise ATPError(f"{where}: the {who}'s {name} {state}; resume with the {who} the run used, or start a "
                           "new run")
    return now


# options added after runs were first recorded, with the value that reproduces those runs: a recorded
# config without them gets that value, and the fingerprint leaves them out at that value, so older runs
# stay resumable and their compare cells stay valid
LATER_OPTIONS = {**RECIPE_LATER_OPTIONS, **kinds.recorded_defaults()}


def inert_options(cfg: ATPConfig) -> set[str]:
    """Options that cannot change what this run computes (left out of its fingerprint)."""
    from .baselines import SCORED

    restarted = Schedule.from_config(dataclasses.replace(cfg, restart_lr=True))
    inert = set() if restarted.lr_restart_step else {"restart_lr"}
    if cfg.recovery != "full":
        inert.add("recovery_lr")
    if not Schedule.from_config(cfg).learns_decisions:  # no LoRA steps under the generator's decisions
        inert |= {"lasso", "lora_mask", "lora_decisions"}
    if not cfg.prune or cfg.method in SCORED or cfg.decisions_from:  # no generator at all
        inert |= {"generator_batches", "generator_clip", "generator_ema", "ratio_penalty", "generator_gates",
                  "distill_generator", "generator_init"}
    if not cfg.prune:
        inert.add("compact")
    if cfg.distill == 0:
        inert |= {"distill_temperature", "teacher", "distill_top_k", "distill_generator"}
    inert |= kinds.inert_options(cfg.space)
    return inert


def config_from_record(values: dict) -> ATPConfig:
    """An ATPConfig from a recorded config.yaml / report (older records lack the later options)."""
    return ATPConfig(**{**LATER_OPTIONS, **upgrade_record(values)})


def fingerprint(cfg: ATPConfig) -> str:
    skip = set(NON_SEMANTIC) | inert_options(cfg)
    values = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in skip and not (k in LATER_OPTIONS and v == LATER_OPTIONS[k])}
    if "lora_mask" not in values:  # recorded before issue 15 as mask_lora (True: both paths)
        values["mask_lora"] = True
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def resume_config(run_dir, overrides: dict) -> ATPConfig:
    """The config recorded in RUN_DIR, with only non-semantic overrides allowed."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ATPError(f"--resume {run_dir}: no config.yaml there; is it an atp run directory?")
    recorded = {**LATER_OPTIONS, **ATPConfig.yaml_values(path)}
    changed = sorted(k for k, v in overrides.items() if k not in NON_SEMANTIC and k in recorded and recorded[k] != v)
    if changed:
        detail = ", ".join(f"{k}: {recorded[k]!r} -> {overrides[k]!r}" for k in changed)
        raise ATPError(f"--resume {run_dir}: that run was made with a different config ({detail}); "
                       "resume with the same options, or start a new run")
    recorded.update({k: v for k, v in overrides.items() if k in NON_SEMANTIC})
    recorded["out"] = str(run_dir)
    return ATPConfig(**recorded)
