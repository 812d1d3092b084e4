"""Physical removal: merge LoRA, slice out pruned heads, KV heads and channels, save, load back, verify.

A pruned checkpoint is a normal HF folder (safetensors, config, tokenizer) whose config carries
`atp_pruning.layers`: per layer the kept query heads, KV heads, each query head's KV index and the
MLP width. Layers may keep uneven numbers of query heads per KV head; attention then gathers each
query head's KV head instead of repeating them uniformly.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .errors import ATPError
from .fsutil import atomic_dir
from .masking import base_model

CONFIG_KEY = "atp_pruning"


def _pruned_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    family = sys.modules[type(self).__mro__[1].__module__]
    shape = hidden_states.shape[:-1]
    num_q, num_kv, head_dim = self.atp_num_heads, self.atp_num_kv_heads, self.head_dim
    query = self.q_proj(hidden_states).view(*shape, num_q, head_dim).transpose(1, 2)
    key = self.k_proj(hidden_states).view(*shape, num_kv, head_dim).transpose(1, 2)
    value = self.v_proj(hidden_states).view(*shape, num_kv, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = family.apply_rotary_pos_emb(query, key, cos, sin)
    if num_q == 0:
        if cache is not None:  # a tiny placeholder keeps the cache's length and batch bookkeeping right
            placeholder = hidden_states.new_zeros(shape[0], 1, shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx, kwargs=kwargs)
        return self.o_proj(hidden_states.new_zeros(*shape, 0)), None
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    if self.atp_kv_index is not None:
        key = key.index_select(1, self.atp_kv_index)
        value = value.index_select(1, self.atp_kv_index)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, family.eager_attention_forward)
    extra = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
    output, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **extra,
        **kwargs,
    )
    return self.o_proj(output.reshape(*shape, num_q * head_dim).contiguous()), weights


_PRUNED_CLASSES: dict[type, type] = {}


def _pruned_class(cls: type) -> type:
    if cls not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[cls] = type("Pruned" + cls.__name__, (cls,), {"forward": _pruned_attention_forward})
    return _PRUNED_CLASSES[cls]


def _new_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A Linear keeping the given output rows / input columns of `linear` (copied)."""
    weight = linear.weight
    if rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    if cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    bias = linear.bias
    if bias is not None and rows is not None:
        bias = bias.index_select(0, rows.to(bias.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        if weight.device.type != "meta":
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
    return new


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads, dtype=torch.long).unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


def shrink_layer(layer, kept: dict, head_dim: int) -> None:
    """Keep only the listed heads, KV heads and channels of one decoder layer (original indices)."""
    attn, mlp = layer.self_attn, layer.mlp
    q_rows, kv_rows = _head_rows(kept["heads"], head_dim), _head_rows(kept["kv_heads"], head_dim)
    channels = torch.tensor(kept["channels"], dtype=torch.long)
    attn.q_proj = _new_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = _new_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = _new_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = _new_linear(attn.o_proj, cols=q_rows)
    mlp.gate_proj = _new_linear(mlp.gate_proj, rows=channels)
    mlp.up_proj = _new_linear(mlp.up_proj, rows=channels)
    mlp.down_proj = _new_linear(mlp.down_proj, cols=channels)
    mlp.intermediate_size = len(kept["channels"])
    set_layer_shape(attn, len(kept["heads"]), len(kept["kv_heads"]), kept["kv_map"])


def set_layer_shape(attn, num_heads: int, num_kv_heads: int, kv_map: list[int]) -> None:
    counts = [kv_map.count(g) for g in range(num_kv_heads)]
    even = num_heads > 0 and len(set(counts)) == 1 and kv_map == sorted(kv_map)
    attn.atp_num_heads, attn.atp_num_kv_heads = num_heads, num_kv_heads
    attn.atp_kv_index = None if even or num_heads == 0 else torch.tensor(kv_map, dtype=torch.long)
    attn.num_key_value_groups = counts[0] if even else 1
    if not isinstance(attn, tuple(_PRUNED_CLASSES.values())):
        attn.__class__ = _pruned_class(type(attn))


def layer_records(kept_structure: list[dict]) -> list[dict]:
    return [
        {
            "num_heads": len(k["heads"]),
            "num_kv_heads": len(k["kv_heads"]),
            "kv_map": k["kv_map"],
            "intermediate_size": len(k["channels"]),
            "kept_heads": k["heads"],
        }
        for k in kept_structure
    ]


def prune_model_(model, kept_structure: list[dict], head_dim: int) -> None:
    """Slice a plain (LoRA-merged) CausalLM in place and record the shapes in its config."""
    for layer, kept in zip(base_model(model).model.layers, kept_structure):
        shrink_layer(layer, kept, head_dim)
    model.config.__dict__[CONFIG_KEY] = {"layers": layer_records(kept_structure)}


def is_pruned_checkpoint(path) -> bool:
    config = Path(path) / "config.json"
    return config.exists() and CONFIG_KEY in json.loads(config.read_text())


def count_safetensors_params(path) -> int:
    """Parameters stored in a folder's safetensors files (tied weights stored once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                total += math.prod(f.get_slice(name).get_shape())
    return total


def load_pruned(path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, device="cpu"):
    """Load a pruned checkpoint written by `save_pruned`; weights are read with safetensors only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    records = getattr(config, CONFIG_KEY, None) or json.loads((path / "config.json").read_text()).get(CONFIG_KEY)
    if not records:
        raise ATPError(f"{path} is not an atp pruned checkpoint (config.json has no '{CONFIG_KEY}')")
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer, rec in zip(model.model.layers, records["layers"]):
        kept = {
            "heads": list(range(rec["num_heads"])),
            "kv_heads": list(range(rec["num_kv_heads"])),
            "kv_map": rec["kv_map"],
            "channels": list(range(rec["intermediate_size"])),
        }
        shrink_layer(layer, kept, head_dim)
    model.to_empty(device=device)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file), device=str(device)))
    if not state:
        raise ATPError(f"{path} holds no .safetensors weights")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ATPError(f"weights in {path} do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def save_pruned(model, tokenizer, out_dir, *, overwrite: bool = False, extra_files: dict[str, str] | None = None,
                verify=None) -> Path:
    """Save to a temp folder beside `out_dir`, run `verify(tmp_path)` if given, then move into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ATPError(f"{out_dir} already exists; pass --overwrite to replace it")
    with atomic_dir(out_dir, "the model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if verify is not None:
            verify(tmp)
    return out_dir
