"""The model families atp supports, as one table: where each family keeps its attention and MLP weights.

A new family is one `Arch` entry in `ARCHS`. Everything else (pruning space, masks, group lasso, baselines,
export, the pruned heterogeneous classes in `atp.hf_modeling`, test fixtures) reads this table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import ATPError

ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
PRUNED_PREFIX = "atp_"  # model_type of a heterogeneous export: atp_<family>


@dataclass(frozen=True)
class Arch:
    model_type: str
    label: str  # models of the family, for messages
    config_class: str  # in transformers
    modeling: str  # transformers module with <prefix>Attention, <prefix>MLP, <prefix>ForCausalLM:
    prefix: str  # the classes the pruned heterogeneous model subclasses
    biases: Callable  # config -> (q/k/v bias, o_proj bias, MLP bias), read from the config where the family has a flag
    heads_divide_hidden: bool = False  # the family's config rejects head counts that do not divide hidden_size
    head_norms: tuple[str, ...] = ()  # norms inside attention over head_dim, shared by all heads (Qwen3 q_norm, k_norm)
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")  # per layer, over hidden_size
    attention_norms: tuple[str, ...] = ("input_layernorm",)  # those of `norms` that go with the attention block
    rms_norms: bool = True  # every norm over hidden_size is an RMSNorm (hidden pruning renormalises over kept channels)
    norm_offset: float = 0.0  # an RMSNorm multiplies by (norm_offset + weight) (Gemma: 1)
    embed_scale: bool = False  # the embedding output is multiplied by sqrt(hidden_size) (Gemma)
    # GGUF export (llama.cpp): the architecture name (a value of gguf.MODEL_ARCH_NAMES) of dense and uniform models
    gguf: str | None = None
    gguf_rotate_half: bool = False  # llama.cpp runs that architecture's RoPE in Hugging Face's rotate-half order
    gguf_full_query: bool = False  # it needs heads x head_dim == hidden_size; other widths are written as `llama`
    gguf_per_layer: str | None = None  # the architecture that holds per-layer head counts and MLP widths, if any;
    # without one, a heterogeneous model is padded to uniform widths with zero heads and channels (exact)
    gguf_biases: bool = True  # that architecture reads q/k/v/o and MLP biases
    gguf_activation: str = "silu"  # the MLP activation llama.cpp uses for it (config hidden_act / hidden_activation)
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    @property
    def mlp_norms(self) -> tuple[str, ...]:
        """The norms that go with the MLP block (the rest of `norms`)."""
        return tuple(n for n in self.norms if n not in self.attention_norms)

    def block_norms(self) -> dict[str, tuple[str, ...]]:
        """Per block (transformers' per_layer_config `skip` names), the layer's norms that exist only for it."""
        return {"attention": self.attention_norms, "mlp": self.mlp_norms}

    def path(self, role: str) -> str:
        """A projection's name inside a decoder layer, e.g. 'self_attn.q_proj'."""
        return f"{self.attention if role in ATTENTION_ROLES else self.mlp}.{getattr(self, role)}"

    def projection(self, layer, role: str):
        parent = getattr(layer, self.attention if role in ATTENTION_ROLES else self.mlp)
        return getattr(parent, getattr(self, role))

    def decoder_layers(self, model):
        for name in self.layers.split("."):
            model = getattr(model, name)
        return model

    def config_cls(self):
        import transformers

        return getattr(transformers, self.config_class)

    @property
    def pruned_classes(self):
        """(config class, CausalLM class) of the heterogeneous pruned model."""
        from . import hf_modeling

        return hf_modeling.family_classes(self.model_type, self.config_class, self.modeling, self.prefix,
                                          self.block_norms())

    def modeling_footer(self) -> str:
        """The lines that define this family's pruned classes in a shipped `modeling_atp.py`."""
        config_cls, model_cls = self.pruned_classes
        return (f"\n\n{config_cls.__name__}, {model_cls.__name__} = family_classes({self.model_type!r}, "
                f"{self.config_class!r}, {self.modeling!r}, {self.prefix!r}, {self.block_norms()!r})\n")


ARCHS = {a.model_type: a for a in (
    Arch("llama", "LLaMA-2/3, SmolLM2", "LlamaConfig", "transformers.models.llama.modeling_llama", "Llama",
         biases=lambda c: (c.attention_bias, c.attention_bias, c.mlp_bias), heads_divide_hidden=True,
         gguf="llama", gguf_per_layer="deci"),
    Arch("mistral", "Mistral", "MistralConfig", "transformers.models.mistral.modeling_mistral", "Mistral",
         biases=lambda c: (False, False, False), gguf="llama", gguf_per_layer="deci"),
    Arch("qwen2", "Qwen2", "Qwen2Config", "transformers.models.qwen2.modeling_qwen2", "Qwen2",
         biases=lambda c: (True, False, False), gguf="qwen2", gguf_rotate_half=True, gguf_full_query=True,
         gguf_per_layer="deci"),
    Arch("qwen3", "Qwen3", "Qwen3Config", "transformers.models.qwen3.modeling_qwen3", "Qwen3",
         biases=lambda c: (c.attention_bias, c.attention_bias, False), head_norms=("q_norm", "k_norm"),
         gguf="qwen3", gguf_rotate_half=True, gguf_biases=False),
    # Gemma 3 (text): norms before and after attention and MLP, per-head q/k norms, sliding and global layers,
    # a scaled embedding (a buffer, not a parameter)
    Arch("gemma3_text", "Gemma 3", "Gemma3TextConfig", "transformers.models.gemma3.modeling_gemma3", "Gemma3",
         biases=lambda c: (c.attention_bias, c.attention_bias, False), head_norms=("q_norm", "k_norm"),
         heads_divide_hidden=True, norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm"),
         attention_norms=("input_layernorm", "post_attention_layernorm"), norm_offset=1.0, embed_scale=True,
         gguf="gemma3", gguf_rotate_half=True, gguf_biases=False, gguf_activation="gelu_pytorch_tanh"),
)}


def check_supported(config) -> Arch:
    """The table entry of a dense model's config, or a clear error."""
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise ATPError(
            f"model type '{config.model_type}' is not supported; supported families: {', '.join(sorted(ARCHS))} "
            f"({'; '.join(a.label for a in ARCHS.values())})"
        )
    return arch


def arch_for(config) -> Arch:
    """The table entry of a dense model or of a pruned export (model_type atp_<family>)."""
    model_type = config.model_type
    if model_type.startswith(PRUNED_PREFIX) and model_type[len(PRUNED_PREFIX):] in ARCHS:
        return ARCHS[model_type[len(PRUNED_PREFIX):]]
    return check_supported(config)


def register() -> None:
    """Make AutoConfig / AutoModelForCausalLM know every family's pruned model type without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for arch in ARCHS.values():
        config_cls, model_cls = arch.pruned_classes
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:  # already registered, e.g. by an earlier import under another module name
            pass
