"""Checks of a model folder's files that loading needs before anything is built: its config.json read as a dict,
its safetensors weights present and whole, and a loaded model's weights all found and fitting."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ATPError


def read_config(folder: Path) -> dict:
    """A model folder's config.json as a dict with a model_type, or an ATPError saying what is wrong."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ATPError(f"{path} is not a readable JSON config ({err}); restore it from the original model") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ATPError(f"{path} has no model_type; it is not a Hugging Face model config")
    return config


def check_weights(folder: Path) -> None:
    """The folder holds safetensors weights, each file complete; pickle weights are refused."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ATPError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); atp loads safetensors "
                           "only, since unpickling a file can run code in it. Convert it where you trust the file: "
                           "AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path)")
        raise ATPError(f"{folder} holds no model weights (*.safetensors)")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            size = file.stat().st_size if file.exists() else 0
            raise ATPError(f"{file} is damaged ({size:,} bytes; {err}); it was probably cut short by a full disk "
                           "or an interrupted copy: copy or export the model again") from None


def check_loaded(model, info: dict, where) -> None:
    """Refuse a model some of whose weights were not in the checkpoint (they would be random) or did not fit."""
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or [])
    if missing or unexpected or mismatched:
        parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                 if keys]
        raise ATPError(f"the weights in {where} do not fit its config.json (model_type "
                       f"{model.config.model_type if model is not None else '?'}): {'; '.join(parts)}. "
                       "Refusing to run with re-initialised weights; check config.json against the weights")
