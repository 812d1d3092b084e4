"""Physical removal: merge LoRA, slice out pruned heads, KV heads and channels, save, load back, verify.

The result is a normal HF folder (safetensors, config, tokenizer):
  - uniform: every layer keeps the same widths with even GQA groups, so the config is the family's own
    (e.g. LlamaConfig) and any runtime that reads HF checkpoints loads it;
  - heterogeneous: widths differ per layer and live in transformers' `per_layer_config`; the folder carries
    `modeling_atp.py` (see `atp.hf_modeling`) named in `auto_map`, for `trust_remote_code=True`.
`atp_pruning` in the config records the original indices of the kept query heads, per layer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import hf_modeling
from .arch import ARCHS, arch_for, check_supported, register
from .errors import ATPError
from .fsutil import atomic_dir
from .kinds import KINDS
from .masking import base_model

CONFIG_KEY = "atp_pruning"
MODELING_FILE = "modeling_atp.py"
# keys of a dense config that describe the saved object rather than the architecture
_NOT_ARCHITECTURE = ("architectures", "auto_map", "model_type", "transformers_version", "per_layer_config", CONFIG_KEY,
                     "_name_or_path", "dtype", "torch_dtype")


def sliced_state(model, kept_structure: list[dict], head_dim: int) -> dict[str, torch.Tensor]:
    """The (LoRA-merged) model's state dict with only the kept rows and columns of every decoder layer."""
    dense = base_model(model)
    arch = arch_for(dense.config)
    state = dict(dense.state_dict())
    for layer, kept in enumerate(kept_structure):
        for kind in KINDS.values():
            for role, (rows, cols) in kind.slices(kept, head_dim).items():
                prefix = f"{arch.layers}.{layer}.{arch.path(role)}"
                weight = state[f"{prefix}.weight"]
                if rows is not None:
                    weight = weight.index_select(0, rows.to(weight.device))
                    if f"{prefix}.bias" in state:
                        state[f"{prefix}.bias"] = state[f"{prefix}.bias"].index_select(0, rows.to(weight.device)).clone()
                if cols is not None:
                    weight = weight.index_select(1, cols.to(weight.device))
                state[f"{prefix}.weight"] = weight.clone()
    return state


def layer_widths(kept_structure: list[dict]) -> list[dict]:
    """Per layer, the config entries each gate kind records (head counts, kv_map, intermediate_size)."""
    return [{key: value for kind in KINDS.values() for key, value in kind.widths(kept).items()}
            for kept in kept_structure]


def uniform_allowed(config, widths: list[dict]) -> bool:
    """Can these widths be written as the family's own config (same numbers in every layer, even groups)?"""
    first = widths[0]
    if any(w != first for w in widths) or first["kv_map"] is not None:
        return False
    if first["num_attention_heads"] == 0 or first["intermediate_size"] == 0:
        return False
    return not arch_for(config).heads_divide_hidden or config.hidden_size % first["num_attention_heads"] == 0


def pruned_config(config, kept_structure: list[dict]):
    """The config of the pruned model: the family's own when the widths allow it, else heterogeneous."""
    if config.model_type not in ARCHS:
        raise ATPError(f"cannot export model type '{config.model_type}'; supported families: {', '.join(ARCHS)}")
    values = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    values["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    widths = layer_widths(kept_structure)
    if uniform_allowed(config, widths):
        values.update({k: v for k, v in widths[0].items() if k != "kv_map"})
        new = type(config)(**values)
    else:
        config_cls, model_cls = ARCHS[config.model_type].pruned_classes
        # kv_map's global value is written too, so that generic config readers (e.g. AutoTokenizer) parse the file
        new = config_cls(**values, kv_map=None, per_layer_config=dict(enumerate(widths)))
        new.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.{config_cls.__name__}",
                        "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{model_cls.__name__}"}
    setattr(new, CONFIG_KEY, {"kept_heads": [k["heads"] for k in kept_structure]})
    return new


def is_heterogeneous(config) -> bool:
    return bool(getattr(config, "is_heterogeneous", False))


def build_pruned(model, kept_structure: list[dict]):
    """A new, physically smaller model holding the kept weights of a plain (LoRA-merged) CausalLM."""
    from transformers import AutoModelForCausalLM

    dense = base_model(model)
    config = pruned_config(dense.config, kept_structure)
    state = sliced_state(dense, kept_structure, config.head_dim)
    with torch.device("meta"):
        if is_heterogeneous(config):
            pruned = ARCHS[dense.config.model_type].pruned_classes[1](config)
        else:
            pruned = AutoModelForCausalLM.from_config(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = pruned.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ATPError(f"internal error: pruned weights do not fit the pruned model: {missing[:5]} {unexpected[:5]}")
    device = dense.model.embed_tokens.weight.device
    with torch.device(device):
        pruned.model.rotary_emb = type(dense.model.rotary_emb)(config=config)
    if config.tie_word_embeddings:
        pruned.tie_weights()
    pruned.config.use_cache = True
    return pruned.eval()


def count_safetensors_params(path) -> int:
    """Parameters stored in a folder's safetensors files (tied weights stored once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def is_pruned_checkpoint(path) -> bool:
    config = Path(path) / "config.json"
    return config.exists() and CONFIG_KEY in json.loads(config.read_text())


def load_pruned(path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, device="cpu"):
    """Load any checkpoint `save_pruned` wrote (uniform or heterogeneous), from safetensors only."""
    from transformers import AutoModelForCausalLM

    register()
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        raise ATPError(f"{path} holds no .safetensors weights")
    if "layers" in json.loads((path / "config.json").read_text()).get(CONFIG_KEY, {}):
        return _load_legacy(path, dtype, attn_implementation).to(device).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                     use_safetensors=True)
    except (OSError, ValueError) as err:
        raise ATPError(f"could not load the pruned model in {path}: {err}") from None
    return model.to(device).eval()


def _load_legacy(path: Path, dtype, attn_implementation):
    """Exports of atp 0.1.0 (widths under `atp_pruning.layers` in a family config): same weights, new config."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    dense = AutoConfig.from_pretrained(path)
    arch = check_supported(dense)
    records = json.loads((path / "config.json").read_text())[CONFIG_KEY]["layers"]
    kept = [{"heads": r["kept_heads"], "kv_heads": list(range(r["num_kv_heads"])), "kv_map": r["kv_map"],
             "channels": list(range(r["intermediate_size"]))} for r in records]
    config = pruned_config(dense, kept)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = arch.pruned_classes[1](config)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    state = {k: v.to(dtype) for k, v in state.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def save_pruned(model, tokenizer, out_dir, *, overwrite: bool = False, extra_files: dict[str, str] | None = None,
                verify=None) -> Path:
    """Save to a temp folder beside `out_dir`, run `verify(tmp_path)` if given, then move into place.
    Heterogeneous models get `modeling_atp.py` (atp.hf_modeling, defining their family's classes) beside
    their weights, for trust_remote_code loading."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ATPError(f"{out_dir} already exists; pass --overwrite to replace it")
    with atomic_dir(out_dir, "the model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if is_heterogeneous(model.config):
            source = Path(hf_modeling.__file__).read_text() + arch_for(model.config).modeling_footer()
            (tmp / MODELING_FILE).write_text(source)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if verify is not None:
            verify(tmp)
    return out_dir
