"""Pruned models (LLaMA, Mistral, Qwen2, Qwen3, Gemma 3, ...) whose layers keep different numbers of heads and MLP channels.

Written by atp. A heterogeneous checkpoint carries this file as `modeling_atp.py`, ending in one line that
defines its family's classes (`family_classes`, from the family's entry in atp's architecture table), and
names them in the config's `auto_map`, so `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`
needs only torch and transformers. `import atp` registers the same classes, so atp users need no remote code.

Per-layer widths use transformers' `per_layer_config`: `num_attention_heads`, `num_key_value_heads`,
`intermediate_size`, and `kv_map` (each query head's KV head) for layers whose query heads are not spread
evenly over their KV heads. A layer may keep no heads or no MLP channels at all. `skip` (transformers' name)
lists a layer's removed blocks, "attention" and/or "mlp" (recorded with 0 heads / 0 channels): such a block
has no weights, no norm and no bias, adds nothing to the residual stream, and an attention block without
heads keeps no KV cache. `qk_pairs` lists a layer's kept RoPE pairs of query/key dimensions (pair p: dimensions p
and p + head_dim/2), the same in every head: its queries and keys are 2 * len(qk_pairs) wide, rotated at the kept
pairs' frequencies, its values and the softmax scale keep the full head_dim.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import warnings

import torch
import transformers
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


@contextlib.contextmanager
def global_access(config):
    """Let the family's own constructors read the global (dense) values of per-layer attributes."""
    quiet = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    before_level, before_access = quiet.level, config.allow_global_per_layer_attribute_access
    quiet.setLevel(logging.ERROR)
    config.allow_global_per_layer_attribute_access = True
    try:
        yield config
    finally:
        config.allow_global_per_layer_attribute_access = before_access
        quiet.setLevel(before_level)


BLOCKS = ("attention", "mlp")  # what a layer's `skip` may name


def skipped(config) -> list:
    """The removed blocks of a layer config (a homogeneous config removes none)."""
    return list(getattr(config, "skip", None) or [])


def check_layer(config, layer_idx) -> None:
    heads, kv_heads, kv_map = config.num_attention_heads, config.num_key_value_heads, config.kv_map
    skip = skipped(config)
    if any(block not in BLOCKS for block in skip):
        raise ValueError(f"layer {layer_idx}: skip {skip} may name only {', '.join(BLOCKS)}")
    if ("attention" in skip and heads) or ("mlp" in skip and config.intermediate_size):
        raise ValueError(f"layer {layer_idx}: a skipped block must record 0 heads / 0 channels, got heads={heads}, "
                         f"intermediate_size={config.intermediate_size} with skip {skip}")
    if min(heads, kv_heads, config.intermediate_size) < 0 or (heads == 0) != (kv_heads == 0):
        raise ValueError(f"layer {layer_idx}: invalid widths heads={heads}, kv_heads={kv_heads}, "
                         f"intermediate_size={config.intermediate_size}")
    if kv_map is not None:
        if len(kv_map) != heads or sorted(set(kv_map)) != list(range(kv_heads)):
            raise ValueError(f"layer {layer_idx}: kv_map {kv_map} must give each of the {heads} query heads "
                             f"one of the {kv_heads} KV heads, using each KV head")
    elif heads and heads % kv_heads:
        raise ValueError(f"layer {layer_idx}: {heads} query heads do not split evenly over {kv_heads} KV heads; give kv_map")
    pairs = getattr(config, "qk_pairs", None)
    if pairs is not None:
        half = config.head_dim // 2
        if not pairs or list(pairs) != sorted(set(pairs)) or not all(isinstance(p, int) and 0 <= p < half for p in pairs):
            raise ValueError(f"layer {layer_idx}: qk_pairs {pairs} must list, in increasing order, some of the "
                             f"{half} RoPE pairs of a head (0 to {half - 1})")


class PrunedConfigMixin:
    """Per-layer widths replace the family's global head-divisibility check."""

    kv_map: list | None = None
    qk_pairs: list | None = None

    def validate(self):
        family = next(klass for klass in type(self).__mro__ if "__class_validators__" in vars(klass))
        for validator in family.__class_validators__:
            if validator.__name__ != "validate_architecture":
                validator(self)
        if self.head_dim is None:
            raise ValueError("a pruned config needs an explicit head_dim")
        for layer_idx in range(self.num_hidden_layers):
            check_layer(self.per_layer_config[layer_idx] if self.is_heterogeneous else self, layer_idx)

    @property
    def kv_sharing_modes(self):
        """Read by transformers' caches: a layer without heads gets a `DummyLayer`, which stores nothing. Layer 0
        never does: caches read the sequence length from it (`get_seq_length()`; a DummyLayer has none since
        transformers 5.25), so a layer 0 without heads keeps a one-channel placeholder instead."""
        if not self.is_heterogeneous:
            return None
        modes = [None] + ["reuse" if self.per_layer_config[i].num_attention_heads == 0 else None
                          for i in range(1, self.num_hidden_layers)]
        return modes if "reuse" in modes else None


class AbsentAttention(nn.Module):
    """A removed attention block: nothing added to the residual stream, and nothing stored but the length
    placeholder where the cache holds an ordinary layer (see `keep_cache_length`)."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        keep_cache_length(hidden_states, self.layer_idx, kwargs)
        return hidden_states.new_zeros(()), None


class AbsentMLP(nn.Module):
    """A removed MLP block."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(())


def _stores_nothing(cache, layer_idx) -> bool:
    layers = getattr(cache, "layers", None)
    return layers is not None and layer_idx < len(layers) and type(layers[layer_idx]).__name__ == "DummyLayer"


def keep_cache_length(hidden_states, layer_idx: int, kwargs: dict) -> None:
    """For a layer without heads: caches built from the config hold a DummyLayer here (`kv_sharing_modes`), which
    stores nothing. Others (layer 0, a cache built without the config, a model without any heads) get a
    one-channel placeholder that keeps the sequence length."""
    cache = kwargs.pop("cache", None)
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    if cache is not None and not _stores_nothing(cache, layer_idx):
        placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
        cache.update(placeholder, placeholder, layer_idx, kwargs=kwargs)


class PrunedAttentionMixin:
    """The family's attention with any number of query and KV heads, including none."""

    def __init__(self, config, layer_idx):
        check_layer(config, layer_idx)  # from_pretrained does not run the config's validate
        safe = copy.copy(config)  # the family constructor divides by these
        safe.num_attention_heads = max(1, config.num_attention_heads)
        safe.num_key_value_heads = max(1, config.num_key_value_heads)
        super().__init__(safe, layer_idx)
        self.config = config
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        kv_map = config.kv_map
        self.num_key_value_groups = 1 if kv_map else max(1, self.num_heads) // max(1, self.num_kv_heads)
        self.kv_map = list(kv_map or [])  # a plain list: meta-device loading leaves no buffer to fill
        self._kv_index = {}
        if self.num_heads == 0:
            hidden = config.hidden_size
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(self, name, nn.Linear(hidden, 0, bias=getattr(self, name).bias is not None))
            self.o_proj = nn.Linear(0, hidden, bias=self.o_proj.bias is not None)
        # kept RoPE pairs of the query/key dimensions: pair p is dimension p and p + head_dim / 2 (rotate_half), at
        # the frequency of p; values keep the whole head_dim, and the scale stays 1/sqrt(head_dim)-based
        pairs = list(getattr(config, "qk_pairs", None) or [])
        half = self.head_dim // 2
        self.qk_index = pairs + [p + half for p in pairs]  # a plain list, like kv_map
        self.qk_dim = len(self.qk_index) or self.head_dim
        self._qk_index = {}
        if pairs:
            hidden = config.hidden_size
            self.q_proj = nn.Linear(hidden, self.num_heads * self.qk_dim, bias=self.q_proj.bias is not None)
            self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.qk_dim, bias=self.k_proj.bias is not None)
            for name in ("q_norm", "k_norm"):  # per-head norms (Qwen3, Gemma 3) over the kept dimensions
                norm = getattr(self, name, None)
                if norm is not None:
                    norm.weight = nn.Parameter(norm.weight.detach().new_empty(self.qk_dim))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        shape, head_dim = hidden_states.shape[:-1], self.head_dim
        if self.num_heads == 0:
            keep_cache_length(hidden_states, self.layer_idx, {**kwargs, "cache": cache})
            return self.o_proj(hidden_states.new_zeros(*shape, 0)), None
        query = self.q_proj(hidden_states).view(*shape, self.num_heads, self.qk_dim)
        key = self.k_proj(hidden_states).view(*shape, self.num_kv_heads, self.qk_dim)
        if hasattr(self, "q_norm"):  # per-head norms over head_dim (Qwen3)
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(*shape, self.num_kv_heads, head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        if self.qk_index:  # the kept pairs' frequencies
            index = self._qk_index.get(cos.device)
            if index is None:
                index = self._qk_index[cos.device] = torch.tensor(self.qk_index, dtype=torch.long, device=cos.device)
            cos, sin = cos.index_select(-1, index), sin.index_select(-1, index)
        query, key = self.family.apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        if self.kv_map:
            index = self._kv_index.get(key.device)
            if index is None:
                index = self._kv_index[key.device] = torch.tensor(self.kv_map, dtype=torch.long, device=key.device)
            key, value = key.index_select(1, index), value.index_select(1, index)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          self.family.eager_attention_forward)
        sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        extra = {"sliding_window": sliding_window} if sliding_window is not None else {}
        output, weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **extra, **kwargs,
        )
        return self.o_proj(output.reshape(*shape, self.num_heads * head_dim).contiguous()), weights


class PrunedCausalLMMixin:
    """Builds the family's model, then gives every layer its own attention and MLP widths; a skipped block
    and the norms that exist only for it (`block_norms`) are replaced by modules without weights."""

    block_norms = {"attention": ("input_layernorm",), "mlp": ("post_attention_layernorm",)}

    def __init__(self, config):
        with global_access(config):
            super().__init__(config)
        for layer_idx, layer in enumerate(self.model.layers):
            layer_config = config.per_layer_config[layer_idx] if config.is_heterogeneous else config
            skip = skipped(layer_config)
            with warnings.catch_warnings():  # a layer without heads or channels has 0-size projections
                warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
                layer.self_attn = (AbsentAttention(layer_idx) if "attention" in skip
                                   else self.attention_class(layer_config, layer_idx))
                layer.mlp = AbsentMLP() if "mlp" in skip else self.mlp_class(layer_config)
            for block in skip:
                for norm in self.block_norms[block]:
                    setattr(layer, norm, nn.Identity())
        self.post_init()


PRUNED_CLASSES = {}  # dense model_type -> (pruned config class, pruned CausalLM class), as built


def family_classes(model_type: str, config_class: str, modeling: str, prefix: str, block_norms: dict | None = None):
    """The pruned (config, CausalLM) classes of one family: subclasses of transformers' `config_class` and of
    `<prefix>Attention`, `<prefix>MLP`, `<prefix>ForCausalLM` in the module `modeling`. block_norms: per block,
    the layer's norms that go with it. Built once per family."""
    if model_type not in PRUNED_CLASSES:
        family = importlib.import_module(modeling)
        name = f"Atp{prefix}"
        config_cls = type(f"{name}Config", (PrunedConfigMixin, getattr(transformers, config_class)),
                          {"model_type": f"atp_{model_type}"})
        attention_cls = type(f"{name}Attention", (PrunedAttentionMixin, getattr(family, f"{prefix}Attention")),
                             {"family": family})
        model_cls = type(f"{name}ForCausalLM", (PrunedCausalLMMixin, getattr(family, f"{prefix}ForCausalLM")), {
            "config_class": config_cls,
            "attention_class": attention_cls,
            "mlp_class": getattr(family, f"{prefix}MLP"),
            **({"block_norms": block_norms} if block_norms is not None else {}),
        })
        PRUNED_CLASSES[model_type] = config_cls, model_cls
    return PRUNED_CLASSES[model_type]
