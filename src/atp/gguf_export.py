"""GGUF export for llama.cpp (llama-cli, llama-server, Ollama, LM Studio, llama-cpp-python).

Every fact about a family comes from its `atp.arch` entry (`gguf`, `gguf_per_layer`, `norms`, ...). Dense and
uniform models become the family's own GGUF architecture (`llama` for Llama and Mistral, `qwen2`, `qwen3`,
`gemma3`; Qwen2 with fewer query heads than hidden_size / head_dim becomes `llama`, which llama.cpp sizes by head
count). Heterogeneous Llama / Mistral / Qwen2 exports become `deci` GGUFs (llama.cpp's Nemotron-NAS architecture),
which read per-layer arrays for `attention.head_count`, `attention.head_count_kv` and `feed_forward_length`, 0
meaning a removed block. Families whose llama.cpp graph has one width for every layer (Qwen3, Gemma 3) are padded
to the widest layer with all-zero query heads, KV heads and MLP channels, which change no output. The `gguf`
package does the rest: tensor names, the writer, vocabulary and special-token metadata, quantization. llama.cpp's converter (convert_hf_to_gguf.py) is not installable from PyPI and needs its own,
newer gguf-py, so it is not imported; what it does beyond the `gguf` package is done here:
  - Q/K rows are permuted from Hugging Face's rotate-half order to llama.cpp's interleaved RoPE (`llama`, `deci`);
  - uneven GQA groups (a per-layer `kv_map`) are made even, exactly: each KV head's query heads are made
    contiguous (o_proj's columns follow), KV heads are duplicated and zero query heads padded so that every
    group has the same size (the cheapest choice per layer; the KV-cache cost is reported);
  - the BPE pre-tokenizer name is read from tokenizer.json's pre-tokenizer (the converter hashes token ids).
Quantized types need every matrix row length to be a multiple of the type's block size (32): otherwise the
export stops with an error naming the tensors, before anything is written.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .arch import ARCHS, PRUNED_PREFIX, Arch
from .errors import ATPError
from .fsutil import atomic_file, check_writable_file
from .kinds import gguf_problems, whole_heads

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT_BLOCK = {"q8_0": 32, "q4_0": 32}  # values per block of a quantized row (gguf's GGML_QUANT_SIZES)
ZERO_MLP = 32  # width of the all-zero MLP given to a layer that keeps attention but no MLP channels (see plan)

# tokenizer.json Split regexes of the Llama-3 and Qwen2 tokenizers, and llama.cpp's names for them
SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def _gguf():
    import gguf

    return gguf


def qtype_of(gguf_type: str):
    g = _gguf()
    if gguf_type not in GGUF_TYPES:
        raise ATPError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got '{gguf_type}'")
    return {"f32": g.GGMLQuantizationType.F32, "f16": g.GGMLQuantizationType.F16,
            "q8_0": g.GGMLQuantizationType.Q8_0, "q4_0": g.GGMLQuantizationType.Q4_0}[gguf_type]


def file_type_of(gguf_type: str):
    t = _gguf().LlamaFileType
    return {"f32": t.ALL_F32, "f16": t.MOSTLY_F16, "q8_0": t.MOSTLY_Q8_0, "q4_0": t.MOSTLY_Q4_0}[gguf_type]


# ---- shapes ----

def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.exists():
        raise ATPError(f"{model_dir} has no config.json; pass a Hugging Face model folder (e.g. OUT/model of atp prune)")
    return json.loads(path.read_text())


def gguf_families() -> str:
    return ", ".join(a.label for a in ARCHS.values() if a.gguf)


def family_of(config: dict) -> tuple[Arch, bool]:
    """(the family's atp.arch entry, heterogeneous?) or a clear error for what llama.cpp export does not cover."""
    model_type = config.get("model_type") or ""
    family = ARCHS.get(model_type.removeprefix(PRUNED_PREFIX))
    if family is None or family.gguf is None:
        raise ATPError(f"GGUF export supports {gguf_families()} models (and their atp exports); "
                       f"{config.get('architectures') or model_type} is not one of them")
    activation = config.get("hidden_act") or config.get("hidden_activation") or family.gguf_activation
    if activation != family.gguf_activation:
        raise ATPError(f"llama.cpp's {family.gguf} architecture uses the {family.gguf_activation} activation, but this "
                       f"model's is {activation}; GGUF export cannot hold it")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            raise ATPError(f"this model sets {key} {config[key]}, which llama.cpp's {family.gguf} does not apply; "
                           "GGUF export cannot hold it")
    scalar = config.get("query_pre_attn_scalar")
    if scalar is not None and scalar != head_dim_of(config):  # llama.cpp's gemma3 ignores a written attention.scale
        raise ATPError(f"this model scales attention scores by 1/sqrt(query_pre_attn_scalar {scalar}), and llama.cpp's "
                       f"{family.gguf} by 1/sqrt(head_dim {head_dim_of(config)}); GGUF export cannot hold it")
    if not family.gguf_biases and (config.get("attention_bias") or config.get("mlp_bias")):
        raise ATPError(f"this {family.label} model has attention or MLP biases, which llama.cpp's {family.gguf} "
                       "architecture does not read; GGUF export cannot hold it")
    return family, model_type != family.model_type and bool(config.get("per_layer_config"))


def layer_widths(config: dict) -> list[dict]:
    """Per layer: heads, kv_heads, ff and kv_map (None for even groups), from the global values and
    transformers' per_layer_config (which records only what differs)."""
    heads = config["num_attention_heads"]
    base = {"num_attention_heads": heads, "num_key_value_heads": config.get("num_key_value_heads") or heads,
            "intermediate_size": config["intermediate_size"], "kv_map": config.get("kv_map")}
    # keys are layer numbers as strings, zero-padded to a common width ("01" ... "29")
    per_layer = {int(k): v for k, v in (config.get("per_layer_config") or {}).items()}
    layers = []
    for i in range(config["num_hidden_layers"]):
        w = {**base, **per_layer.get(i, {})}
        if w.get("qk_pairs"):
            raise ATPError(f"layer {i} keeps {2 * len(w['qk_pairs'])} of the {head_dim_of(config)} query/key dimensions "
                           "of a head (--space qk-dims), which GGUF cannot hold: llama.cpp's key length is one value "
                           "for every layer and its RoPE rotates a fixed run of frequencies; export this model as a "
                           "Hugging Face folder, or prune without qk-dims")
        layers.append({"query_heads": w["num_attention_heads"], "kv_heads": w["num_key_value_heads"],
                       "ff": w["intermediate_size"], "kv_map": w["kv_map"]})
    return layers


def even_groups(heads: int, kv_heads: int, kv_map: list[int] | None) -> dict:
    """Make a layer's GQA groups even for llama.cpp, exactly.

    Returns q_order (the source query head at each new position, None for an all-zero padding head),
    kv_order (the source KV head of each new KV head; repeats are duplicates) and the group size. Of the
    group sizes that work (every KV head's g query heads split into ceil(g / size) copies, the last one
    padded with zero query heads), the one that adds the fewest projection rows is chosen, then the one
    with the smaller KV cache."""
    if kv_map is None:
        group = heads // kv_heads if kv_heads else 0
        return {"q_order": list(range(heads)), "kv_order": list(range(kv_heads)), "group": group}
    members = [[h for h, k in enumerate(kv_map) if k == kv] for kv in range(kv_heads)]
    best = None
    for size in range(1, max(len(m) for m in members) + 1):
        copies = [math.ceil(len(m) / size) for m in members]
        n_kv, n_q = sum(copies), size * sum(copies)
        cost = (2 * n_kv + 2 * n_q, n_kv)  # k, v rows + q rows, o columns; then KV cache
        if best is None or cost < best[0]:
            best = (cost, size, copies)
    _, size, copies = best
    q_order, kv_order = [], []
    for kv, (m, c) in enumerate(zip(members, copies)):
        q_order += m + [None] * (c * size - len(m))
        kv_order += [kv] * c
    return {"q_order": q_order, "kv_order": kv_order, "group": size}


def plan(config: dict) -> list[dict]:
    """What each layer becomes in the GGUF: query / KV head order, MLP width (see ZERO_MLP)."""
    layers = []
    n = config["num_hidden_layers"]
    for i, w in enumerate(layer_widths(config)):
        if (w["query_heads"] == 0) != (w["kv_heads"] == 0):
            raise ATPError(f"layer {i} keeps {w['query_heads']} query heads and {w['kv_heads']} KV heads; "
                           "llama.cpp needs both or neither")
        groups = even_groups(w["query_heads"], w["kv_heads"], w["kv_map"])
        # llama.cpp's deci graph skips the rest of a layer without MLP (dropping its attention output), and
        # the last layer's output-row selection happens there: such layers get an all-zero MLP instead.
        zero_mlp = w["ff"] == 0 and (w["query_heads"] > 0 or i == n - 1 or config.get("mlp_bias", False))
        layers.append({**w, **groups, "gguf_heads": len(groups["q_order"]), "gguf_kv_heads": len(groups["kv_order"]),
                       "gguf_ff": ZERO_MLP if zero_mlp else w["ff"], "zero_mlp": zero_mlp})
    return layers


def pad_to_uniform(layers: list[dict]) -> list[dict]:
    """Every layer as wide as the widest: KV groups padded with all-zero query heads, all-zero KV heads (with only
    zero query heads) added, MLPs padded with all-zero channels. A zero query head's o_proj columns are zero and a
    zero channel's down_proj column is zero, so the output is unchanged (also after q/k RMSNorm: norm(0) = 0)."""
    n_kv = max(l["gguf_kv_heads"] for l in layers)
    group = max(l["group"] for l in layers)
    ff = max(l["ff"] for l in layers)
    if not (n_kv and ff):
        raise ATPError("this model keeps no attention heads or no MLP channels in any layer; GGUF export cannot "
                       "hold it")
    padded = []
    for l in layers:
        kv_order = l["kv_order"] + [None] * (n_kv - len(l["kv_order"]))
        q_order = []
        for position in range(n_kv):
            members = l["q_order"][position * l["group"]:(position + 1) * l["group"]] if position < len(l["kv_order"]) else []
            q_order += members + [None] * (group - len(members))
        padded.append({**l, "q_order": q_order, "kv_order": kv_order, "group": group, "gguf_heads": len(q_order),
                       "gguf_kv_heads": n_kv, "gguf_ff": ff, "zero_mlp": False})
    return padded


def is_uniform(layers: list[dict]) -> bool:
    first = layers[0]
    return all(l["gguf_heads"] == first["gguf_heads"] and l["gguf_kv_heads"] == first["gguf_kv_heads"]
               and l["gguf_ff"] == first["gguf_ff"] for l in layers) and first["gguf_heads"] > 0 and first["gguf_ff"] > 0


# ---- tensors ----

def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ATPError(f"{model_dir} holds no .safetensors weights")
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name)
    return state


def rope_permute(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half row order -> llama.cpp's interleaved pairs, within each head."""
    if n_heads == 0:
        return rows
    return rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _heads(t: torch.Tensor, order: list, head_dim: int, dim: int = 0) -> torch.Tensor:
    """Pick heads (blocks of head_dim rows, or columns with dim=1) in `order`; None gives a zero head."""
    blocks = []
    for h in order:
        if h is None:
            shape = list(t.shape)
            shape[dim] = head_dim
            blocks.append(t.new_zeros(shape))
        else:
            blocks.append(t.narrow(dim, h * head_dim, head_dim))
    return torch.cat(blocks, dim=dim)


def _norm(state, name: str, family: Arch, size: int) -> torch.Tensor:
    """A norm's weight as llama.cpp multiplies by (family.norm_offset + weight; Gemma's converter adds the 1).
    A removed block (--space blocks) has no norm; the all-zero block that stands in for it gets ones."""
    return state[name] + family.norm_offset if name in state else torch.ones(size)


def _pad_rows(t: torch.Tensor, rows: int, dim: int = 0) -> torch.Tensor:
    """t with zero rows (or columns, dim=1) appended up to `rows`."""
    shape = list(t.shape)
    shape[dim] = rows - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def layer_tensors(state, family: Arch, i: int, layer: dict, head_dim: int, hidden: int, permute: bool):
    """(Hugging Face name, tensor) pairs of layer i as llama.cpp wants them."""
    prefix = f"{family.layers}.{i}."
    out = []
    o_bias = state.get(f"{prefix}{family.path('o')}.bias")
    if not layer["query_heads"] and o_bias is not None and o_bias.abs().max() > 0:
        raise ATPError(f"layer {i} keeps no attention heads but a nonzero o_proj bias, which llama.cpp cannot express")
    if layer["gguf_heads"]:
        out += [(f"{prefix}{n}.weight", _norm(state, f"{prefix}{n}.weight", family, hidden))
                for n in family.attention_norms]
        for role, order in (("q", layer["q_order"]), ("k", layer["kv_order"]), ("v", layer["kv_order"])):
            for kind in ("weight", "bias"):
                name = f"{prefix}{family.path(role)}.{kind}"
                if name not in state and not (kind == "weight" and not layer["query_heads"]):
                    continue
                # a removed attention block (--space blocks) padded to uniform widths has only zero heads
                t = _heads(state.get(name, torch.zeros(0, hidden)), order, head_dim)
                if permute and role != "v":
                    t = rope_permute(t, len(order))
                out.append((name, t))
        for norm in family.head_norms:  # one weight over head_dim, shared by every head
            name = f"{prefix}{family.attention}.{norm}.weight"
            t = _norm(state, name, family, head_dim)
            out.append((name, rope_permute(t, 1) if permute else t))
        o_name = f"{prefix}{family.path('o')}.weight"
        out.append((o_name, _heads(state.get(o_name, torch.zeros(hidden, 0)), layer["q_order"], head_dim, dim=1)))
        if o_bias is not None:
            out.append((f"{prefix}{family.path('o')}.bias", o_bias))
    if layer["gguf_ff"]:
        out += [(f"{prefix}{n}.weight", _norm(state, f"{prefix}{n}.weight", family, hidden)) for n in family.mlp_norms]
        width = layer["gguf_ff"]
        for role in ("gate", "up", "down"):
            weight, bias = f"{prefix}{family.path(role)}.weight", f"{prefix}{family.path(role)}.bias"
            # all-zero channels add nothing (see plan() and pad_to_uniform(); a down_proj bias is kept)
            if role == "down":
                out.append((weight, _pad_rows(state.get(weight, torch.zeros(hidden, 0)), width, dim=1)))
                if bias in state:
                    out.append((bias, state[bias]))
            else:
                out.append((weight, _pad_rows(state.get(weight, torch.zeros(0, hidden)), width)))
                if bias in state:
                    out.append((bias, _pad_rows(state[bias], width)))
    return out


def all_tensors(config: dict, state: dict, family: Arch, layers: list[dict], permute: bool):
    head_dim = head_dim_of(config)
    yield f"{family.embed}.weight", state[f"{family.embed}.weight"]
    for i, layer in enumerate(layers):
        yield from layer_tensors(state, family, i, layer, head_dim, config["hidden_size"], permute)
    yield f"{family.final_norm}.weight", _norm(state, f"{family.final_norm}.weight", family, config["hidden_size"])
    if f"{family.lm_head}.weight" in state and not config.get("tie_word_embeddings", False):
        yield f"{family.lm_head}.weight", state[f"{family.lm_head}.weight"]


def head_dim_of(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def quantize_all(named, arch_enum, n_layers: int, gguf_type: str):
    """[(gguf name, data, raw dtype)]; a clear error naming every matrix the type cannot hold."""
    g = _gguf()
    names = g.get_tensor_name_map(arch_enum, n_layers)
    qtype = qtype_of(gguf_type)
    block = g.GGML_QUANT_SIZES[qtype][0]
    out, bad = [], []
    for hf_name, tensor in named:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ATPError(f"internal error: no GGUF name for tensor {hf_name}")
        data = tensor.detach().to(torch.float32).numpy()
        if data.ndim == 1:  # norms and biases stay f32, as llama.cpp's converter keeps them
            out.append((name, data, None))
        elif data.shape[-1] % block:
            bad.append(f"{name} (rows of {data.shape[-1]})")
        else:
            out.append((name, data, qtype))
    if bad:
        raise ATPError(f"--gguf-type {gguf_type} stores rows in blocks of {block} values, and these matrices' row "
                       f"lengths are not multiples of {block}: {', '.join(bad[:6])}"
                       f"{f' and {len(bad) - 6} more' if len(bad) > 6 else ''}. Use --gguf-type f16 or f32, or prune "
                       f"with --mlp-block (or --round-to) a multiple of {block}")
    return [(name, g.quants.quantize(data, qtype) if qtype is not None else data, qtype) for name, data, qtype in out]


# ---- metadata ----

SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types


def attention_metadata(writer, config: dict, arch: str) -> None:
    """Sliding-window layers (Gemma 3), where the config has them."""
    types = config.get("layer_types") or []
    if SLIDING in types and config.get("sliding_window"):
        if arch != "gemma3":  # the architectures whose sliding layers this export writes and tests in llama.cpp
            raise ATPError(f"this model has sliding-window layers, which GGUF export writes for gemma3 only, not {arch}")
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern([t == SLIDING for t in types])


def rope_metadata(writer, model_dir: Path, config: dict, head_dim: int):
    """RoPE base and scaling; Llama-3 scaling becomes llama.cpp's rope_freqs tensor (per-frequency divisors).
    Per-layer-type RoPE (Gemma 3: full and sliding layers) writes the sliding layers' base as freq_base_swa."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if FULL in params:
        sliding = params.get(SLIDING) or {}
        if sliding.get("rope_type", "default") != "default":
            raise ATPError(f"GGUF export does not support RoPE scaling on sliding-window layers "
                           f"('{sliding['rope_type']}')")
        writer.add_rope_freq_base_swa(float(sliding.get("rope_theta", 10000.0)))
        params = params[FULL]
    elif config.get("rope_local_base_freq") is not None:
        writer.add_rope_freq_base_swa(float(config["rope_local_base_freq"]))
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return None
    if kind == "llama3":
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        from .arch import register

        register()
        hf_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
        plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        return ("rope_freqs.weight", (plain / scaled.float()).float())
    raise ATPError(f"GGUF export does not support RoPE scaling '{kind}' (supported: default, linear, llama3)")


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        kinds = []  # llama.cpp's BPE never adds a prefix space
    name = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        name = "gpt-2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        name = "smollm"
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    if name is None or (normalizer is not None and not (normalizer == "NFC" and name == "qwen2")):
        raise ATPError(f"GGUF export: the tokenizer's pre-tokenizer ({pre.get('type')}: {kinds or 'with a prefix space'}"
                       f"{f', normalizer {normalizer}' if normalizer else ''}) is not one llama.cpp is known to "
                       "reproduce here (GPT-2 / SmolLM / Llama-3 / Qwen2 byte-level BPE)")
    return name


def check_tokenizer(tokenizer_json: dict, where) -> str:
    """The llama.cpp pre-tokenizer name of a tokenizer.json that GGUF export can hold, else a clear error."""
    model = tokenizer_json.get("model", {})
    decoder = (tokenizer_json.get("decoder") or {}).get("type")
    if not (model.get("type") == "BPE" and decoder == "ByteLevel" and not model.get("byte_fallback")):
        # SentencePiece-style vocabularies (Llama 2, Mistral v0.1) need the scores of tokenizer.model, which
        # llama.cpp merges by; that path is not built or tested here
        raise ATPError(f"GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, Qwen2); "
                       f"{where} holds a {model.get('type')} model with a {decoder} decoder"
                       f"{' and byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}")
    return pre_tokenizer_name(tokenizer_json)


def vocab_metadata(writer, model_dir: Path, vocab_size: int) -> dict:
    """Tokens, types, merges, special tokens and chat template from the model's tokenizer files."""
    g = _gguf()
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise ATPError(f"{model_dir} has no tokenizer.json; save the model's (fast) tokenizer beside it")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    pre = check_tokenizer(tokenizer_json, path)
    vocab, tokenizer_model = g.vocab.BpeVocab(model_dir), "gpt2"
    tokens, types = [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(kind)
    for added in tokenizer_json.get("added_tokens", []):  # special ones are control tokens, the rest user-defined
        if added["id"] < len(types):
            types[added["id"]] = g.TokenType.CONTROL if added.get("special") else g.TokenType.USER_DEFINED
    if len(tokens) > vocab_size:
        raise ATPError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    for i in range(len(tokens), vocab_size):  # embedding rows beyond the tokenizer, as llama.cpp's converter pads
        tokens.append(f"[PAD{i}]")
        types.append(g.TokenType.UNUSED)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = g.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.update(_adds_special_tokens(model_dir, special.special_token_ids))
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer_model": tokenizer_model, "pre": pre, "tokens": len(tokens),
            "special_token_ids": dict(special.special_token_ids), "chat_template": special.chat_template is not None}


def _adds_special_tokens(model_dir: Path, ids: dict) -> dict:
    """Whether the tokenizer puts BOS / EOS around a text, as it actually behaves."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ATPError(f"could not load the tokenizer in {model_dir}: {err}") from None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return {"bos": "bos" in ids and len(with_special) > len(plain) and with_special[0] == ids["bos"],
            "eos": "eos" in ids and len(with_special) > len(plain) and with_special[-1] == ids["eos"]}


# ---- writing ----

# ---- checks before the work (atp export, and atp prune --gguf before training) ----

def check_target(path, overwrite: bool, flag: str = "--gguf", inputs: dict | None = None) -> Path:
    """The GGUF path is a file name in a writable folder, not among the command's inputs, and an existing file is
    replaced only with --overwrite."""
    from .rundir import check_not_inside_inputs, check_out_path

    path = check_out_path(path, flag)
    check_not_inside_inputs(path, inputs or {}, flag)
    if path.is_dir():
        raise ATPError(f"{flag} {path} is a folder; give a file name ending in .gguf")
    if path.exists() and not overwrite:
        raise ATPError(f"{flag} {path} already exists; pass --overwrite to replace it")
    return check_writable_file(path, flag)


def check_prune_options(cfg) -> None:
    """What `atp prune --gguf`'s options alone show the GGUF could not hold (called by ATPConfig.validate)."""
    if not cfg.gguf or not cfg.prune:
        return
    gguf_problems(cfg, QUANT_BLOCK.get(cfg.gguf_type))


def check_source_model(model_config: dict, tokenizer, cfg) -> None:
    """What the loaded model shows the GGUF could not hold: family, tokenizer, widths of quantized rows (called
    by `atp prune --gguf` before training)."""
    family_of(model_config)
    if not getattr(tokenizer, "is_fast", False):
        raise ATPError(f"--gguf needs the model's fast tokenizer (tokenizer.json); {cfg.model} has none")
    check_tokenizer(json.loads(tokenizer.backend_tokenizer.to_str()), f"the tokenizer of {cfg.model}")
    block = QUANT_BLOCK.get(cfg.gguf_type)
    if block is None:
        return
    head_dim = head_dim_of(model_config)
    attention = head_dim if cfg.prune and whole_heads(cfg.space) else head_dim * model_config["num_attention_heads"]
    widths = {"hidden_size": model_config["hidden_size"], "intermediate_size": model_config["intermediate_size"],
              "attention width (heads x head_dim)" if attention != head_dim else "head_dim": attention}
    bad = [f"{name} {value}" for name, value in widths.items() if value % block]
    if bad:
        raise ATPError(f"--gguf-type {cfg.gguf_type} stores rows in blocks of {block} values, and {cfg.model} has "
                       f"{', '.join(bad)}, not multiples of {block}; use --gguf-type f16 or f32")


def export_gguf(model_dir, out_path, gguf_type: str = "f16", *, overwrite: bool = True) -> dict:
    """Write MODEL_DIR (a Hugging Face folder: dense, uniform or heterogeneous atp export) as a GGUF file.
    Returns a summary: architecture, per-layer widths, KV-cache cost of evening GQA groups, etc."""
    g = _gguf()
    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_path.suffix != ".gguf":
        raise ATPError(f"the GGUF output path should end in .gguf, got {out_path}")
    qtype_of(gguf_type)
    check_target(out_path, overwrite)
    config = read_config(model_dir)
    family, heterogeneous = family_of(config)
    layers = plan(config)
    arch, rotate_half = family.gguf, family.gguf_rotate_half
    if not is_uniform(layers):
        if family.gguf_per_layer:
            arch, rotate_half = family.gguf_per_layer, False
        else:
            layers = pad_to_uniform(layers)
    if family.gguf_full_query and arch == family.gguf and \
            layers[0]["gguf_heads"] * head_dim_of(config) != config["hidden_size"]:
        arch, rotate_half = "llama", False  # e.g. llama.cpp's qwen2 wants query width == hidden; llama reads biases
    arch_enum = next(a for a, name in g.MODEL_ARCH_NAMES.items() if name == arch)
    head_dim = head_dim_of(config)
    state = load_state(model_dir)
    named = list(all_tensors(config, state, family, layers, not rotate_half))

    writer = g.GGUFWriter(None, arch)
    attention_metadata(writer, config, arch)
    writer.add_name(config.get("_name_or_path") or model_dir.name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    per_layer = arch == "deci"
    writer.add_feed_forward_length([l["gguf_ff"] for l in layers] if per_layer else layers[0]["gguf_ff"])
    writer.add_head_count([l["gguf_heads"] for l in layers] if per_layer else layers[0]["gguf_heads"])
    writer.add_head_count_kv([l["gguf_kv_heads"] for l in layers] if per_layer else layers[0]["gguf_kv_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type_of(gguf_type))
    rope_freqs = rope_metadata(writer, model_dir, config, head_dim)
    vocab = vocab_metadata(writer, model_dir, config["vocab_size"])
    tensors = quantize_all(named, arch_enum, config["num_hidden_layers"], gguf_type)
    if rope_freqs is not None:
        tensors.append((rope_freqs[0], rope_freqs[1].numpy(), None))
    for name, data, raw in tensors:
        writer.add_tensor(name, data, raw_dtype=raw)

    with atomic_file(out_path, "the GGUF file") as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    kv_source = sum(l["kv_heads"] for l in layers)
    kv_gguf = sum(l["gguf_kv_heads"] for l in layers)
    return {
        "path": str(out_path), "architecture": arch, "gguf_type": gguf_type, "bytes": out_path.stat().st_size,
        "heterogeneous": heterogeneous,
        "layers": [{"query_heads": l["gguf_heads"], "kv_heads": l["gguf_kv_heads"], "ff": l["gguf_ff"],
                    "source_query_heads": l["query_heads"], "source_kv_heads": l["kv_heads"], "source_ff": l["ff"]} for l in layers],
        # KV cache per token: K and V, head_dim values each, per KV head (f16 cache, llama.cpp's default)
        "kv_cache_bytes_per_token": 2 * kv_gguf * head_dim * 2,
        "kv_cache_added_fraction": (kv_gguf - kv_source) / kv_source if kv_source else 0.0,
        "duplicated_kv_heads": kv_gguf - kv_source,
        "padded_query_heads": sum(l["gguf_heads"] - l["query_heads"] for l in layers),
        "zero_mlp_layers": [i for i, l in enumerate(layers) if l["zero_mlp"]],
        "padded_mlp_channels": sum(l["gguf_ff"] - l["ff"] for l in layers if not l["zero_mlp"]),
        "vocab": vocab,
    }


def format_export(summary: dict) -> str:
    lines = [f"wrote {summary['path']}: {summary['architecture']} GGUF, {summary['gguf_type']}, "
             f"{summary['bytes'] / 2**20:.1f} MiB, {len(summary['layers'])} layers"]
    if summary["duplicated_kv_heads"] or summary["padded_query_heads"]:
        lines.append(f"uneven GQA groups made even: {summary['duplicated_kv_heads']} duplicated KV heads "
                     f"(KV cache +{summary['kv_cache_added_fraction']:.1%}), {summary['padded_query_heads']} zero query heads")
    if summary["zero_mlp_layers"]:
        lines.append(f"layers {summary['zero_mlp_layers']} keep no MLP channels: written with an all-zero MLP of "
                     f"{ZERO_MLP} channels (llama.cpp's deci graph needs one; the output is unchanged)")
    if summary["padded_mlp_channels"]:
        lines.append(f"llama.cpp's {summary['architecture']} has one MLP width for every layer: "
                     f"{summary['padded_mlp_channels']} all-zero MLP channels pad the narrower layers")
    lines.append(f"KV cache {summary['kv_cache_bytes_per_token']:,} bytes per token (f16)")
    return "\n".join(lines)


# ---- command line ----

def add_export_arguments(parser):
    parser.add_argument("--model", required=True, help="model folder (e.g. OUT/model of atp prune), embedded name or hub id")
    parser.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    parser.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES,
                        help="tensor type: f32, f16 (default), q8_0 or q4_0 (quantized with the gguf package)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT.gguf")
    parser.add_argument("--check", action=__import__("argparse").BooleanOptionalAction, default=None,
                        help="load the file in llama.cpp and compare its logits with transformers on a short text "
                             "(default: when llama-cpp-python is installed)")
    return parser


def check_against_transformers(model_dir, gguf_path, text: str = "The patient was treated with aspirin. "
                               "The court held that the statute applies to the case.") -> dict:
    """Top-1 agreement and max |logit diff| of llama.cpp (the GGUF) against transformers (the folder)."""
    from . import llamacpp
    from .models import load_model

    model, tokenizer = load_model(str(model_dir))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:64]
    llm = llamacpp.load(gguf_path, n_ctx=max(64, len(ids)), f32_cache=True)
    result = llamacpp.agreement(llamacpp.hf_logits(model, ids), llamacpp.logits(llm, ids))
    llm.close()
    result["tokens"] = len(ids)
    return result


# set in tests only: the check's child process crashes before loading llama.cpp, with a real SIGSEGV (a null read),
# or with SIGILL where the variable says "SIGILL"
CRASH_HOOK = "_ATP_TEST_CHECK_SEGFAULT"
AMX_HINT = ("a llama.cpp (llama-cpp-python) built with ggml's AMX backend crashes every q8_0 / q4_0 file on Intel "
            "CPUs with AMX (llama.cpp issue 20824): rebuild it without AMX, with CFLAGS and CXXFLAGS "
            "'-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' (`make gguf` does)")
NATIVE_HINT = ("an illegal instruction: this llama.cpp (llama-cpp-python) was compiled for another CPU, e.g. a "
               "GGML_NATIVE wheel built on another machine and copied or cached here; rebuild it on this machine "
               "(`make gguf` keys its cached wheel by the CPU)")


def crash_message(signum: int, gguf_path) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    cause = {signal.SIGKILL: "It was killed from outside (out of memory?)",
             signal.SIGILL: f"Likely cause: {NATIVE_HINT}"}.get(signum, f"Likely cause: {AMX_HINT}")
    return (f"llama.cpp died of {name} while checking {gguf_path} (in a child process, so atp itself went on); "
            f"the GGUF file was written and is kept. {cause}; or skip the check with --no-check")


def check_in_child(model_dir, gguf_path) -> dict:
    """check_against_transformers in a child process, so that a crash of llama.cpp (a signal, e.g. SIGSEGV) becomes
    an ATPError naming it instead of the end of this process. The child imports the same atp (this sys.path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with tempfile.TemporaryDirectory(prefix="atp-gguf-check-") as folder:
        result_path = Path(folder) / "result.json"
        code = "from atp.gguf_export import check_child_main; check_child_main()"
        sys.stdout.flush()
        sys.stderr.flush()
        done = subprocess.run([sys.executable, "-c", code, str(model_dir), str(gguf_path), str(result_path)],
                              env=env, check=False)
        if done.returncode < 0:
            raise ATPError(crash_message(-done.returncode, gguf_path))
        if done.returncode != 0 or not result_path.exists():  # a bug: the child printed its traceback above
            raise RuntimeError(f"the llama.cpp check of {gguf_path} failed in its child process "
                               f"(exit status {done.returncode}); its error is printed above")
        result = json.loads(result_path.read_text())
    if "error" in result:
        raise ATPError(result["error"])
    return result


def check_child_main() -> None:
    """The check's child process: argv MODEL_DIR GGUF RESULT_JSON; an ATPError is passed on in the result."""
    model_dir, gguf_path, result_path = sys.argv[1:4]
    if os.environ.get(CRASH_HOOK):
        import ctypes
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.environ[CRASH_HOOK] == "SIGILL":
            os.kill(os.getpid(), signal.SIGILL)
        ctypes.string_at(0)
    try:
        result = check_against_transformers(model_dir, gguf_path)
    except ATPError as err:
        result = {"error": str(err)}
    Path(result_path).write_text(json.dumps(result))


def run_export_command(args) -> int:
    from .models import resolve_model

    model_dir = resolve_model(args.model)
    check_target(args.gguf, args.overwrite, inputs={"--model": model_dir})
    summary = export_gguf(model_dir, args.gguf, args.gguf_type, overwrite=args.overwrite)
    print(format_export(summary))
    check = args.check
    if check is None:
        import importlib.util

        check = importlib.util.find_spec("llama_cpp") is not None
    if check:
        result = check_in_child(model_dir, args.gguf)
        print(f"llama.cpp vs transformers on {result['tokens']} tokens: top-1 agreement {result['top1_agreement']:.3f}, "
              f"max |logit diff| {result['max_abs_logit_diff']:.3g} (largest |logit| {result['max_abs_logit']:.3g})")
    return 0
