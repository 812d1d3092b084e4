"""The architecture table: every family's entry describes its tiny model; Qwen3 (per-head q/k norms) end to end."""
import json

import pytest
import torch
from safetensors import safe_open

from atp.arch import ARCHS, arch_for, check_supported
from atp.errors import ATPError
from atp.export import build_pruned, count_safetensors_params, load_pruned, save_pruned
from atp.space import PruningSpace, ShapeRule
from helpers import FAMILIES, ids, masked_logits, random_gates, tiny_model, with_lora

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.mark.parametrize("family, overrides", [
    ("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True}), ("mistral", {}), ("qwen2", {}),
    ("qwen3", {}), ("qwen3", {"attention_bias": True}), ("gemma3_text", {}), ("gemma3_text", {"attention_bias": True}),
])
def test_table_entry_describes_the_model(family, overrides):
    model = tiny_model(family, True, **overrides)
    arch = check_supported(model.config)
    assert arch is ARCHS[family] and type(model.config).__name__ == arch.config_class
    layer = arch.decoder_layers(model)[1]
    names = dict(model.named_parameters())
    qkv_bias, o_bias, mlp_bias = arch.biases(model.config)
    for role in ROLES:
        module = arch.projection(layer, role)
        assert isinstance(module, torch.nn.Linear)
        assert names[f"{arch.layers}.1.{arch.path(role)}.weight"] is module.weight
        expected_bias = qkv_bias if role in "qkv" else o_bias if role == "o" else mlp_bias
        assert (module.bias is not None) == bool(expected_bias), role
    for norm in arch.norms:
        assert names[f"{arch.layers}.1.{norm}.weight"].shape == (model.config.hidden_size,)
    for norm in arch.head_norms:
        assert names[f"{arch.layers}.1.{arch.attention}.{norm}.weight"].shape == (model.config.head_dim,)
    # every parameter of a decoder layer is a projection, a norm or a per-head norm: the counts cover them all
    known = {f"{arch.path(r)}.{p}" for r in ROLES for p in ("weight", "bias")}
    known |= {f"{n}.weight" for n in arch.norms} | {f"{arch.attention}.{n}.weight" for n in arch.head_norms}
    assert {n.split(".1.", 1)[1] for n in names if n.startswith(f"{arch.layers}.1.")} <= known
    space = PruningSpace.from_config(model.config, mlp_block=5)
    assert space.total_params() == sum(p.numel() for p in model.parameters())
    assert space.prunable_params() == sum(p.numel() for n, p in names.items() if n.startswith(f"{arch.layers}."))


def test_pruned_types_map_back_to_their_family():
    for family, arch in ARCHS.items():
        config_cls, model_cls = arch.pruned_classes
        assert config_cls.model_type == f"atp_{family}" and model_cls.config_class is config_cls
        assert arch_for(config_cls()) is arch
    with pytest.raises(ATPError, match="not supported; supported families: gemma3_text, llama, mistral, qwen2, qwen3"):
        arch_for(type("C", (), {"model_type": "atp_gpt2"})())


def _qwen3(seed=0, **overrides):
    """A tiny Qwen3 whose per-head q/k norms are not all ones, so that a lost or misplaced norm shows."""
    model = tiny_model("qwen3", True, seed=seed, attention_bias=True, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def _independent_count(model, kept_structure) -> int:
    """Parameters left after removing pruned heads, KV heads and channels, from the dense model's shapes."""
    config, hd = model.config, model.config.head_dim
    total = sum(p.numel() for p in model.parameters())
    for kept in kept_structure:
        gone_q = config.num_attention_heads - len(kept["heads"])
        gone_kv = config.num_key_value_heads - len(kept["kv_heads"])
        gone_ch = config.intermediate_size - len(kept["channels"])
        hidden, bias = config.hidden_size, int(config.attention_bias)
        total -= gone_q * hd * (hidden + bias) + gone_q * hd * hidden  # q rows (+ bias), o columns
        total -= 2 * gone_kv * hd * (hidden + bias)  # k and v rows (+ bias)
        total -= gone_ch * 3 * hidden  # gate and up rows, down columns
    return total


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen3_masking_is_deletion_and_exports_load(attn, tmp_path, tokenizer):
    model = with_lora(_qwen3(attn=attn))
    space = PruningSpace.from_config(model.config, mlp_block=4)
    gates = random_gates(space)
    gates["heads"][2] = 0  # a layer without attention keeps its q/k norms (they are per layer, not per head)
    x = ids()
    masked = masked_logits(model, space, gates, x)
    pruned = build_pruned(model.merge_and_unload(), space.kept_structure(gates))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, masked, rtol=0, atol=1e-5)
    out = save_pruned(pruned, tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "atp_qwen3"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_atp.AtpQwen3ForCausalLM"
    expected = _independent_count(model.get_base_model(), space.kept_structure(gates))
    assert count_safetensors_params(out) == expected
    assert expected == space.total_params() - space.prunable_params() + float(space.remaining_prunable(gates))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        norms = [n for n in f.keys() if n.endswith(("q_norm.weight", "k_norm.weight"))]
        assert len(norms) == 2 * space.num_layers
        assert all(f.get_slice(n).get_shape() == [space.head_dim] for n in norms)
    loaded = load_pruned(out, attn_implementation=attn)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, masked, rtol=0, atol=1e-5)
        cached = loaded.generate(x[:1, :5], max_new_tokens=5, do_sample=False, pad_token_id=0)
        seq = x[:1, :5]
        for _ in range(5):
            seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)


def test_qwen3_uniform_export_is_a_plain_qwen3_checkpoint(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = with_lora(_qwen3(seed=1))
    space = PruningSpace.from_config(model.config, mlp_block=4)
    noise = torch.Generator().manual_seed(4)
    scores = {k: torch.randn(shape, generator=noise) for k, shape in space.gate_shapes.items()}
    gates = ShapeRule(uniform=True).project(space, random_gates(space, keep=0.5), scores)
    x = ids()
    masked = masked_logits(model, space, gates, x)
    out = save_pruned(build_pruned(model.merge_and_unload(), space.kept_structure(gates)), tokenizer, tmp_path / "u")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in loaded.parameters()) == _independent_count(model.get_base_model(),
                                                                             space.kept_structure(gates))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, masked, rtol=0, atol=1e-5)


def test_qwen3_train_end_to_end(tmp_path, tokenizer, train_file):
    from atp.options import ATPConfig
    from atp.train import train

    path = tmp_path / "tiny-qwen3"
    _qwen3().save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg = ATPConfig(model=str(path), domain=None, train_files=[f"pubmedqa={train_file}"], out=str(tmp_path / "run"),
                    max_steps=8, batch_size=2, max_length=48, mlp_block=4, sparsity=0.4, generator_every=1,
                    generator_lr=3e-2, alpha=8.0, save_every=0)
    report = train(cfg, progress=False)
    assert report["logits_check"]["passed"] and report["export_format"] == "heterogeneous"
    assert count_safetensors_params(tmp_path / "run" / "model") == report["exported_params"]
    assert report["dense_params"] == sum(p.numel() for p in _qwen3().parameters())
    assert abs(report["prunable_sparsity"] - 0.4) <= 0.03


def test_families_are_listed_once():
    import atp.hf_modeling
    import atp.models
    import atp.space

    for module, name in ((atp.models, "SUPPORTED_MODEL_TYPES"), (atp.hf_modeling, "PER_LAYER_KEYS"),
                         (atp.space, "FAMILIES")):
        assert not hasattr(module, name), name
    assert FAMILIES == list(ARCHS)
