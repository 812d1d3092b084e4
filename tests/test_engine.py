"""Pruning space, generator, masked forward and physical removal on tiny random models."""
import copy

import pytest
import torch

from atp.errors import ATPError
from atp.export import build_pruned, count_safetensors_params, load_pruned, save_pruned
from atp.generator import DecisionGenerator
from atp.masking import GateController
from atp.space import HeadMLPSpace
from helpers import FAMILIES, ids, masked_logits, random_gates, tiny_model, with_lora

CASES = [(family, gqa) for family in FAMILIES for gqa in (True, False)]


@pytest.mark.parametrize("family,gqa", CASES)
def test_param_counts_match_model(family, gqa):
    model = tiny_model(family, gqa)
    space = HeadMLPSpace.from_config(model.config, mlp_block=5)
    assert space.total_params() == sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    assert space.prunable_params() == blocks
    assert float(space.remaining_prunable(space.full_gates())) == blocks


def test_smollm2_shaped_space_counts():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    space = HeadMLPSpace.from_config(config)
    # independent arithmetic for SmolLM2-135M: 134,515,008 parameters, embeddings about a fifth
    assert space.total_params() == 134_515_008
    assert abs((space.total_params() - space.prunable_params()) / space.total_params() - 0.21) < 0.01


@pytest.mark.parametrize("family,gqa", CASES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_all_gates_on_equals_unmasked(family, gqa, attn):
    model = with_lora(tiny_model(family, gqa, attn=attn))
    space = HeadMLPSpace.from_config(model.config)
    x = ids()
    with torch.no_grad():
        plain = model(x).logits
        ctl = GateController(model, space)
        ctl.set(space.full_gates())
        masked = model(x).logits
    assert torch.equal(plain, masked)


def test_gate_equals_deleting_by_hand():
    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=1)
    gates = space.full_gates()
    gates["heads"][1, 4] = 0
    gates["mlp"][2, 7] = 0
    x = ids()
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        hd = space.head_dim
        by_hand.model.layers[1].self_attn.o_proj.weight[:, 4 * hd:5 * hd] = 0
        by_hand.model.layers[2].mlp.gate_proj.weight[7] = 0
        by_hand.model.layers[2].mlp.up_proj.weight[7] = 0
        ctl = GateController(model, space)
        ctl.set(gates)
        torch.testing.assert_close(model(x).logits, by_hand(x).logits, rtol=0, atol=1e-6)
        ctl.set(None)
        assert not torch.allclose(model(x).logits, by_hand(x).logits, atol=1e-4)


@pytest.mark.parametrize("family,gqa", CASES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_export_equals_masked_and_counts(family, gqa, attn, tmp_path, tokenizer):
    model = with_lora(tiny_model(family, gqa, attn=attn))
    space = HeadMLPSpace.from_config(model.config, mlp_block=3)
    gates = random_gates(space)
    x = ids()
    masked = masked_logits(model, space, gates, x)
    merged = model.merge_and_unload()
    merged = build_pruned(merged, space.kept_structure(gates))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, masked, rtol=0, atol=1e-5)
    out = save_pruned(merged, tokenizer, tmp_path / "model")
    loaded = load_pruned(out, attn_implementation=attn)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, masked, rtol=0, atol=1e-5)
    expected = space.total_params() - space.prunable_params() + float(space.remaining_prunable(gates))
    assert count_safetensors_params(out) == expected
    assert sum(p.numel() for p in loaded.parameters()) == expected
    # generation with the KV cache matches a no-cache greedy loop
    prompt = x[:1, :5]
    with torch.no_grad():
        cached = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(6):
            nxt = loaded(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq)


def test_layer_with_no_heads_or_channels(tmp_path, tokenizer):
    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=8)
    gates = space.full_gates()
    gates["heads"][1] = 0
    gates["mlp"][2] = 0
    x = ids()
    masked = masked_logits(model, space, gates, x)
    model = build_pruned(model, space.kept_structure(gates))
    out = save_pruned(model, tokenizer, tmp_path / "m")
    loaded = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, masked, rtol=0, atol=1e-5)
        # KV cache with a head-less layer: cached generation equals a no-cache greedy loop,
        # and reordering the cache's batch (as beam search and option scoring do) works
        cached = loaded.generate(x[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
        seq = x[:, :4]
        for _ in range(4):
            seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(cached, seq)
        out = loaded(x[:, :4], use_cache=True)
        cache = out["past_key_values"] if "past_key_values" in out else out["cache"]
        cache.batch_select_indices(torch.tensor([0, 0, 1]))
        assert cache.get_seq_length() == 4


def test_save_refuses_existing_dir(tmp_path, tokenizer):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user file")
    model = tiny_model("llama", True)
    with pytest.raises(ATPError, match="--overwrite"):
        save_pruned(model, tokenizer, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "user file"


def test_unsupported_architecture_named():
    from transformers import GPT2Config

    with pytest.raises(ATPError, match="supported families: gemma3_text, llama, mistral, qwen2, qwen3"):
        HeadMLPSpace.from_config(GPT2Config())


def test_generator_starts_kept_and_gradients_flow():
    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    gen = DecisionGenerator(space, seed=0)
    assert all(bool((g == 1).all()) for g in gen.decisions().values())
    gen.train()
    ctl = GateController(model, space)
    ctl.set(gen(step=0))
    loss = model(ids(), labels=ids()).loss + space.remaining_ratio(ctl_gates := gen(step=1))
    loss.backward()
    grads = [p.grad for p in gen.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # same step -> same sample (identical decisions across processes), different steps differ in noise
    a, b = gen(step=5), gen(step=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(ctl_gates) == {"heads", "mlp"}
