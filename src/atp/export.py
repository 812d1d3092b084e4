"""Physical removal: merge LoRA, slice out pruned heads, KV heads and channels, drop removed blocks, save,
load back, verify.

The result is a normal HF folder (safetensors, config, tokenizer):
  - uniform: every layer keeps the same widths with even GQA groups, so the config is the family's own
    (e.g. LlamaConfig) and any runtime that reads HF checkpoints loads it;
  - heterogeneous: widths differ per layer and live in transformers' `per_layer_config` (removed blocks under
    `skip`, with no weights left); the folder carries `modeling_atp.py` (see `atp.hf_modeling`) named in
    `auto_map`, for `trust_remote_code=True`.
`atp_pruning` in the config records the original indices of the kept query heads, per layer, of the kept
hidden channels where those were pruned (the model then has a smaller hidden_size), and of the kept RoPE pairs
of query/key dimensions where those were pruned (`qk_pairs`, heterogeneous exports only).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from . import hf_modeling
from .arch import ARCHS, ATTENTION_ROLES, MLP_ROLES, arch_for, check_supported, register
from .errors import ATPError
from .fsutil import atomic_dir
from .kinds import KINDS, legacy_kept
from .masking import base_model
from .modelfiles import check_loaded, check_weights, read_config

CONFIG_KEY = "atp_pruning"
MODELING_FILE = "modeling_atp.py"
ROLES = ATTENTION_ROLES + MLP_ROLES
# keys of a dense config that describe the saved object rather than the architecture
_NOT_ARCHITECTURE = ("architectures", "auto_map", "model_type", "transformers_version", "per_layer_config", CONFIG_KEY,
                     "_name_or_path", "dtype", "torch_dtype")


def slice_plan(arch, kept_structure: list[dict], head_dim: int) -> tuple[dict[str, list], tuple[str, ...]]:
    """How pruning slices each decoder projection: {module path: [(dim, kept indices), ...] in the order they
    apply} (dim 0: output rows, 1: input columns), and the path prefixes of removed blocks. The export slices
    weights with it; compaction (atp.compaction) slices LoRA factors and optimizer state the same way."""
    ops, gone = {}, []
    for layer, kept in enumerate(kept_structure):
        gone += [f"{arch.layers}.{layer}.{name}." for kind in KINDS.values() for name in kind.dropped(kept, arch)]
        for kind in KINDS.values():
            for role, (rows, cols) in kind.slices(kept, head_dim).items():
                path = arch.path(role) if role in ROLES else f"{arch.attention}.{role}"  # per-head q/k norms
                steps = ops.setdefault(f"{arch.layers}.{layer}.{path}", [])
                steps += [(dim, index) for dim, index in ((0, rows), (1, cols)) if index is not None]
    return ops, tuple(gone)


def sliced_state(model, kept_structure: list[dict], head_dim: int) -> dict[str, torch.Tensor]:
    """The (LoRA-merged) model's state dict with only the kept rows and columns of every decoder layer, and
    nothing of its removed blocks; with hidden channels pruned, only their kept channels everywhere."""
    dense = base_model(model)
    arch = arch_for(dense.config)
    state = dict(dense.state_dict())
    ops, gone = slice_plan(arch, kept_structure, head_dim)
    for key in [k for k in state if k.startswith(gone)] if gone else []:
        del state[key]
    for prefix, steps in ops.items():
        if f"{prefix}.weight" not in state:  # in a removed block
            continue
        weight = state[f"{prefix}.weight"]
        for dim, index in steps:
            weight = weight.index_select(dim, index.to(weight.device))
            if dim == 0 and f"{prefix}.bias" in state:
                state[f"{prefix}.bias"] = state[f"{prefix}.bias"].index_select(0, index.to(weight.device)).clone()
        state[f"{prefix}.weight"] = weight.clone()
    for kind in KINDS.values():  # what a kind changes outside the layers (e.g. a smaller hidden size)
        kind.slice_outside(state, kept_structure, arch, dense.config)
    return state


def layer_widths(kept_structure: list[dict]) -> list[dict]:
    """Per layer, the config entries each gate kind records (head counts, kv_map, intermediate_size)."""
    return [{key: value for kind in KINDS.values() for key, value in kind.widths(kept).items()}
            for kept in kept_structure]


def uniform_allowed(config, widths: list[dict], hidden_size: int | None = None) -> bool:
    """Can these widths (with this hidden size, by default the config's) be written as the family's own config
    (same numbers in every layer, even groups)?"""
    first = widths[0]
    hidden_size = hidden_size or config.hidden_size
    if any(w != first for w in widths) or first["kv_map"] is not None or first.get("skip") or first.get("qk_pairs"):
        return False
    if first["num_attention_heads"] == 0 or first["intermediate_size"] == 0:
        return False
    return not arch_for(config).heads_divide_hidden or hidden_size % first["num_attention_heads"] == 0


def pruned_config(config, kept_structure: list[dict]):
    """The config of the pruned model: the family's own when the widths allow it, else heterogeneous."""
    if config.model_type not in ARCHS:
        raise ATPError(f"cannot export model type '{config.model_type}'; supported families: {', '.join(ARCHS)}")
    values = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    values["head_dim"] = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for kind in KINDS.values():
        values.update(kind.export_config(kept_structure))
    widths = layer_widths(kept_structure)
    if uniform_allowed(config, widths, values["hidden_size"]):
        values.update({k: v for k, v in widths[0].items() if k not in ("kv_map", "skip")})
        new = type(config)(**values)
    else:
        config_cls, model_cls = ARCHS[config.model_type].pruned_classes
        # kv_map's global value is written too, so that generic config readers (e.g. AutoTokenizer) parse the file
        extra = {key: value for kind in KINDS.values() for key, value in kind.heterogeneous_config(widths).items()}
        new = config_cls(**values, kv_map=None, **extra, per_layer_config=dict(enumerate(widths)))
        new.auto_map = {"AutoConfig": f"{MODELING_FILE[:-3]}.{config_cls.__name__}",
                        "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{model_cls.__name__}"}
    record = {key: value for kind in KINDS.values() for key, value in kind.export_record(kept_structure).items()}
    setattr(new, CONFIG_KEY, record)
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
    _copy_meta_buffers(pruned, dense)
    for kind in KINDS.values():
        kind.finish_export(pruned, dense.config, arch_for(dense.config))
    if config.tie_word_embeddings:
        pruned.tie_weights()
    pruned.config.use_cache = True
    return pruned.eval()


def _copy_meta_buffers(pruned, dense) -> None:
    """Non-persistent buffers the meta-device build left empty (e.g. Gemma 3's embedding scale) take the dense
    model's values; pruning changes no buffer outside the layers it rebuilds."""
    dense_buffers = dict(dense.named_buffers())
    for name, buffer in list(pruned.named_buffers()):
        if buffer.is_meta:
            if name not in dense_buffers or dense_buffers[name].shape != buffer.shape:
                raise ATPError(f"internal error: no dense value for the buffer {name} of the pruned model")
            owner, _, leaf = name.rpartition(".")
            pruned.get_submodule(owner)._buffers[leaf] = dense_buffers[name].clone()


def count_safetensors_params(path, prefix: str = "") -> int:
    """Parameters stored in a folder's safetensors files (tied weights stored once), of the tensors whose names
    start with `prefix` (e.g. the decoder layers')."""
    from safetensors import safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    total += math.prod(f.get_slice(name).get_shape())
    return total


def is_pruned_checkpoint(path) -> bool:
    config = Path(path) / "config.json"
    return config.exists() and CONFIG_KEY in json.loads(config.read_text())


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_modeling_file(path) -> None:
    """The shipped modeling_atp.py (run by trust_remote_code loading) must be the file the export recorded; a
    folder that ships it, or names code in auto_map, without a recorded hash is refused (deleting the hash must
    not turn the check off). atp itself never runs the file: `import atp` registers the same classes."""
    path = Path(path)
    config = read_config(path)
    record = config.get(CONFIG_KEY)
    recorded = record.get("modeling_sha256") if isinstance(record, dict) else None
    shipped = path / MODELING_FILE
    if recorded is None:
        if shipped.exists() or "auto_map" in config:
            what = f"ships {MODELING_FILE}" if shipped.exists() else "names Python code in auto_map"
            raise ATPError(f"{path} {what}, but its config.json records no {CONFIG_KEY}.modeling_sha256 to check "
                           "that code against (atp exports record it; a folder without it may run anything with "
                           "trust_remote_code=True). Restore config.json from the original export, or re-export")
        return
    if not isinstance(recorded, str):
        raise ATPError(f"{path}/config.json: {CONFIG_KEY}.modeling_sha256 must be a SHA-256 string, got {recorded!r}")
    if not shipped.exists():  # nothing to run: transformers refuses the auto_map, atp uses its own classes
        return
    actual = hashlib.sha256(shipped.read_bytes()).hexdigest()
    if actual != recorded:
        raise ATPError(f"{shipped} is not the file atp exported (SHA-256 {actual[:16]}..., recorded "
                       f"{recorded[:16]}... in config.json); loading with trust_remote_code=True would run it. "
                       "Restore it from the original export, or re-export the model")


def load_pruned(path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, device="cpu"):
    """Load any checkpoint `save_pruned` wrote (uniform or heterogeneous), from safetensors only."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    register()
    path = Path(path)
    check_weights(path)
    verify_modeling_file(path)  # first, whatever the config says: no branch below skips it
    if "layers" in read_config(path).get(CONFIG_KEY, {}):
        try:
            return _load_legacy(path, dtype, attn_implementation).to(device).eval()
        except RuntimeError as err:  # strict load_state_dict: the widths in config.json do not fit the weights
            raise ATPError(f"the weights in {path} do not fit its config.json: {str(err).splitlines()[0]}") from None
    try:  # the registered classes load it; the folder's modeling_atp.py is never run
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                           use_safetensors=True, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ATPError(f"could not load the pruned model in {path}: {str(err).splitlines()[0]}") from None
    check_loaded(model, info, path)
    return model.to(device).eval()


def _load_legacy(path: Path, dtype, attn_implementation):
    """Exports of atp 0.1.0 (widths under `atp_pruning.layers` in a family config): same weights, new config."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    dense = AutoConfig.from_pretrained(path, trust_remote_code=False)
    arch = check_supported(dense)
    records = json.loads((path / "config.json").read_text())[CONFIG_KEY]["layers"]
    kept = [legacy_kept(record) for record in records]
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
    modeling = None
    if is_heterogeneous(model.config):  # atp.hf_modeling plus the line defining this family's classes
        modeling = Path(hf_modeling.__file__).read_text() + arch_for(model.config).modeling_footer()
    if modeling is not None:  # recorded so that loaders can check the code trust_remote_code runs
        setattr(model.config, CONFIG_KEY, {**getattr(model.config, CONFIG_KEY, {}), "modeling_sha256": _sha256(modeling)})
    with atomic_dir(out_dir, "the model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if modeling is not None:
            (tmp / MODELING_FILE).write_bytes(modeling.encode("utf-8"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if verify is not None:
            verify(tmp)
    return out_dir
