"""Crash-safe checkpoints: LoRA, generator, optimizers, scheduler and RNG, written atomically with a manifest.
In the --recovery full phase also every trained decoder weight (full.safetensors) and its AdamW state
(full_optimizer.safetensors; the optimizer's small settings go into state.pt). After the compaction of a --refit ls
run also the refit base weights (refit.safetensors).

Each checkpoint is a folder `checkpoints/step-NNNNNN` made in a temp folder and renamed into place. Its
`manifest.json` holds the SHA-256 of every file and the run's config fingerprint; a checkpoint whose
files do not match it (a crash, a full disk, a bit flip) is skipped with a warning in favour of the
previous one.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from .errors import ATPError
from .fsutil import atomic_dir

MANIFEST = "manifest.json"
REFIT = "refit.safetensors"  # the base weights --refit ls changed at the compaction (atp.refit)
REQUIRED = ("lora.safetensors", "state.pt")  # in every checkpoint; generator and decisions files depend on the run


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(run_dir: Path, step: int, peft_model, generator, optimizers: dict, scheduler, fingerprint: str,
         keep: int, decisions: tuple[dict, dict] | None = None, data_sha256: dict | None = None,
         full: tuple[dict, torch.optim.Optimizer, object] | None = None, model_sha256: dict | None = None,
         refit: tuple[dict, dict] | None = None) -> Path:
    """decisions: (gates, info) of a run whose decisions were fixed before tuning (two-stage baselines).
    data_sha256: the SHA-256 of each data file the run reads, recorded next to the fingerprint for --resume;
    model_sha256: the same of the base model's (and a teacher's) files (atp.options.model_sha256).
    full: (weights by name, optimizer, learning-rate scheduler) of the --recovery full phase.
    refit: (base weights by name, summary) of a compact model refit with --refit ls (refit.safetensors)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    lora = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(peft_model).items()}
    gen = {k: v.detach().contiguous().cpu() for k, v in generator.state_dict().items()} if generator is not None else {}
    weights = {k: v.detach().contiguous().cpu() for k, v in full[0].items()} if full is not None else {}
    refit_weights = {k: v.detach().contiguous().cpu() for k, v in refit[0].items()} if refit is not None else {}
    for what, tensors in (("LoRA weight", lora), ("generator weight", gen), ("decoder weight", weights),
                          ("refit weight", refit_weights)):
        for name, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ATPError(f"refusing to save the checkpoint of step {step}: {what} {name} holds NaN or Inf "
                               "values; the run diverged (the checkpoints so far are kept)")
    root = run_dir / "checkpoints"
    with atomic_dir(root / f"step-{step:06d}", f"the checkpoint of step {step}") as tmp:
        save_file(lora, str(tmp / "lora.safetensors"))
        if generator is not None:
            save_file(gen, str(tmp / "generator.safetensors"))
        if decisions is not None:
            gates, info = decisions
            (tmp / "decisions.json").write_text(json.dumps({"gates": {k: v.tolist() for k, v in gates.items()},
                                                             "info": info}))
        state = {
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
        }
        if full is not None:
            save_file(weights, str(tmp / "full.safetensors"))
            tensors, state["full_optimizer"] = split_optimizer_state(full[1].state_dict())
            save_file(tensors, str(tmp / "full_optimizer.safetensors"))
            state["full_scheduler"] = full[2].state_dict()
        if refit is not None:
            save_file(refit_weights, str(tmp / REFIT), metadata={"summary": json.dumps(refit[1])})
        torch.save(state, tmp / "state.pt")
        files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        manifest = {"step": step, "fingerprint": fingerprint, "files": files}
        if data_sha256 is not None:
            manifest["data_sha256"] = data_sha256
        if model_sha256 is not None:
            manifest["model_sha256"] = model_sha256
        (tmp / MANIFEST).write_text(json.dumps(manifest))
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return root / f"step-{step:06d}"


def verify(path: Path) -> dict:
    """The manifest of an intact checkpoint; ATPError saying what is wrong otherwise."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ATPError(f"{path.name}: unreadable manifest ({err})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ATPError(f"{path.name}: the manifest has no list of files and their checksums")
    absent = [name for name in REQUIRED if name not in files]
    if absent:
        raise ATPError(f"{path.name}: the manifest does not cover {', '.join(absent)}")
    if not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("fingerprint"), str):
        raise ATPError(f"{path.name}: the manifest has no step or config fingerprint")
    for name, digest in files.items():
        if "/" in name or name.startswith("."):
            raise ATPError(f"{path.name}: the manifest names an odd file {name!r}")
        if not (path / name).exists():
            raise ATPError(f"{path.name}: {name} is missing")
        if file_sha256(path / name) != digest:
            raise ATPError(f"{path.name}: {name} is corrupted (checksum mismatch)")
    return manifest


def latest_valid(run_dir: Path) -> tuple[Path, dict] | None:
    """Newest intact checkpoint; corrupted ones are reported on stderr and skipped."""
    for path in sorted((run_dir / "checkpoints").glob("step-*"), reverse=True):
        try:
            return path, verify(path)
        except ATPError as err:
            print(f"atp: warning: skipping checkpoint {err}", file=sys.stderr)
    return None


def load_decisions(path: Path, device="cpu") -> tuple[dict, dict]:
    """The fixed decisions (gates, info) saved with a checkpoint of a two-stage baseline run."""
    try:
        saved = json.loads((path / "decisions.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ATPError(f"{path.name}: no readable fixed decisions ({err})") from None
    return {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in saved["gates"].items()}, saved["info"]


def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict as its per-parameter tensors, named "INDEX.KEY" (for safetensors), and the rest."""
    tensors, rest = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                rest["state"].setdefault(index, {})[key] = value
    return tensors, rest


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of split_optimizer_state."""
    state = {int(index): dict(values) for index, values in rest["state"].items()}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        state.setdefault(int(index), {})[key] = value
    return {"param_groups": rest["param_groups"], "state": state}


def load_full(path: Path, weights: dict, optimizer, scheduler) -> None:
    """The --recovery full phase's decoder weights (into the tensors of `weights`, by name), AdamW state and
    learning-rate schedule."""
    from safetensors.torch import load_file

    if not (path / "full.safetensors").exists():
        raise ATPError(f"{path.name}: a checkpoint of the full recovery phase, but full.safetensors is missing")
    saved = load_file(str(path / "full.safetensors"))
    if set(saved) != set(weights):
        raise ATPError(f"{path.name}: full.safetensors holds other weights than this model trains "
                       f"({len(saved)} saved, {len(weights)} here)")
    with torch.no_grad():
        for name, tensor in weights.items():
            tensor.copy_(saved[name])
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(join_optimizer_state(load_file(str(path / "full_optimizer.safetensors")),
                                                   state["full_optimizer"]))
    scheduler.load_state_dict(state["full_scheduler"])


def load_refit(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The refit base weights and summary of a checkpoint saved after the compaction of a --refit ls run."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = path / REFIT
    if not file.exists():
        raise ATPError(f"{path.name}: a checkpoint of a --refit ls run after its compaction, but {REFIT} is missing")
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    try:
        summary = json.loads(metadata["summary"])
    except (KeyError, ValueError):
        raise ATPError(f"{path.name}: {REFIT} has no readable summary of the refit") from None
    return load_file(str(file)), summary


def load(path: Path, peft_model, generator, optimizers: dict, scheduler) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(path / "lora.safetensors")))
    if generator is not None:
        generator.load_state_dict(load_file(str(path / "generator.safetensors")))
    state = torch.load(path / "state.pt", weights_only=True)  # tensors and plain containers only
    for name, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][name])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
