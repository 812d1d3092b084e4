"""The "blocks" gate kind: a layer's whole attention or MLP block with one decision, for every family in atp.arch.
Masking equals physical removal, counts equal an independent count of the exported weights, removed blocks leave
no weights, norms or KV cache behind, and exports reload with atp and with trust_remote_code alone."""
import json

import pytest
import torch
from safetensors import safe_open

from atp.baselines import SCORED, fixed_decisions
from atp.bench import _kv_bytes_per_token
from atp.errors import ATPError
from atp.export import build_pruned, count_safetensors_params, load_pruned, save_pruned
from atp.generator import DecisionGenerator
from atp.kinds import KINDS, check_kinds
from atp.masking import decoder_layers
from atp.regularization import group_sq_norms, proximal_step
from atp.space import PruningSpace, ShapeRule
from atp.train import train
from helpers import (
    FAMILIES,
    assert_loads_without_atp,
    block_gates,
    frozen_removed,
    ids,
    independent_count,
    lm_batches,
    logits_under,
    model_for,
    short_cfg,
    tiny_model,
    with_lora,
)

ALL = ["heads", "mlp", "blocks"]
BIASED = {"llama": {"attention_bias": True, "mlp_bias": True}, "qwen3": {"attention_bias": True}}
# every family, plus the ones whose o_proj / down_proj carry biases (a removed block loses them too)
CASES = [(family, {}) for family in FAMILIES] + [(family, BIASED[family]) for family in BIASED if family in FAMILIES]


def test_registry_order_and_options():
    assert list(KINDS) == ["blocks", "hidden", "heads", "qk-dims", "mlp"] and KINDS["blocks"].exact
    assert check_kinds(["mlp", "blocks", "heads"]) == ("blocks", "heads", "mlp")  # coarsest first
    space = PruningSpace.from_config(tiny_model("llama", True).config, mlp_block=4, kinds=ALL)
    assert space.gate_shapes == {"blocks": (3, 2), "heads": (3, 6), "mlp": (3, 16)}
    gates = {"blocks": torch.ones(3, 2), "heads": torch.ones(3, 6), "mlp": torch.ones(3, 16)}
    gates["heads"][1] = 0  # every head of layer 1 pruned: its attention block goes, with its norm
    gates["blocks"][2, 1] = 0  # a removed MLP block removes its channels
    effective = space.effective_gates(gates)
    assert effective["blocks"].tolist() == [[1, 1], [0, 1], [1, 0]]
    assert effective["mlp"][2].sum() == 0 and effective["mlp"][1].sum() == 16
    removed = space.prunable_params() - float(space.remaining_prunable(gates))
    assert removed == (6 * 8 * 48 * 2 + 2 * 2 * 8 * 48 + 48) + (3 * 48 * 64 + 48)
    with pytest.raises(ATPError, match="--uniform gives every layer the same shape, so it cannot remove whole blocks"):
        ShapeRule(uniform=True).check(space)
    ShapeRule(round_to=8).check(space)
    # everything in the decoder blocks can go, norms included
    zeros = {k: torch.zeros(v) for k, v in space.gate_shapes.items()}
    assert float(space.remaining_prunable(zeros)) == 0


@pytest.mark.parametrize("family, overrides", CASES)
def test_counts_equal_an_independent_count(family, overrides):
    model = model_for(family, overrides)
    for kinds in (ALL, ["blocks"], ["blocks", "mlp"]):
        space = PruningSpace.from_config(model.config, mlp_block=4, kinds=kinds)
        full = PruningSpace.from_config(model.config, mlp_block=4)
        assert (space.prunable_params(), space.total_params()) == (full.prunable_params(), full.total_params())
        assert float(space.remaining_prunable(space.full_gates())) == space.prunable_params()
        gates = block_gates(space)
        selected = {k: v for k, v in gates.items() if k in kinds}
        as_given = {k: v if k in kinds else torch.ones_like(v) for k, v in gates.items()}
        expected = independent_count(model, space, as_given)
        assert space.total_params() - space.prunable_params() + float(space.remaining_prunable(selected)) == expected


@pytest.mark.parametrize("family, overrides", CASES)
def test_masking_is_physical_removal(family, overrides, tmp_path, tokenizer):
    model = with_lora(model_for(family, overrides))
    space = PruningSpace.from_config(model.config, mlp_block=4, kinds=ALL)
    gates = block_gates(space)
    x = ids()
    masked = logits_under(model, space, gates, x, "both")
    dense = logits_under(model, space, space.full_gates(), x, "both")
    assert not torch.allclose(masked, dense, atol=1e-3)
    pruned = build_pruned(model.merge_and_unload(), space.kept_structure(gates))
    arch = space.arch
    layers = arch.decoder_layers(pruned)
    assert type(getattr(layers[0], arch.attention)).__name__ == "AbsentAttention"
    assert type(getattr(layers[1], arch.mlp)).__name__ == "AbsentMLP"
    assert not any(True for _ in layers[1].parameters())  # nothing left of a layer without either block
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, masked, rtol=0, atol=1e-5)
    out = save_pruned(pruned, tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    skips = {int(k): v.get("skip") for k, v in config["per_layer_config"].items()}
    assert skips == {0: ["attention"], 1: ["attention", "mlp"], 2: ["mlp"], 3: ["attention"], 4: None}
    layer = config["per_layer_config"]
    assert layer["0"]["num_attention_heads"] == layer["0"]["num_key_value_heads"] == 0
    assert layer["3"]["num_attention_heads"] == 0
    assert layer["1"]["intermediate_size"] == layer["2"]["intermediate_size"] == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        assert all(0 not in f.get_slice(n).get_shape() for n in names)  # no placeholder weights
    gone = [f"{arch.layers}.1.",
            *(f"{arch.layers}.{i}.{n}." for i in (0, 3) for n in (arch.attention, *arch.attention_norms)),
            *(f"{arch.layers}.2.{n}." for n in (arch.mlp, *arch.mlp_norms))]
    assert not [n for n in names if n.startswith(tuple(gone))]
    expected = independent_count(model.get_base_model(), space, gates)
    assert count_safetensors_params(out) == expected
    assert expected == space.total_params() - space.prunable_params() + float(space.remaining_prunable(gates))
    for attn in ("eager", "sdpa"):
        loaded = load_pruned(out, attn_implementation=attn)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, masked, rtol=0, atol=1e-5)
    # KV cache: nothing stored for layers without attention but layer 0, whose one-channel placeholder keeps the
    # length (caches read it there); cached generation equals a no-cache greedy loop
    with torch.no_grad():
        result = loaded(x[:, :4], use_cache=True)
        cache = result["cache"] if "cache" in result else result["past_key_values"]
        assert [type(c).__name__ == "DummyLayer" for c in cache.layers] == [False, True, False, True, False]
        assert cache.layers[0].keys.shape[1::2] == (1, 1)  # one channel, one KV head
        assert cache.get_seq_length() == 4
        cached = loaded.generate(x[:1, :5], max_new_tokens=5, do_sample=False, pad_token_id=0)
        seq = x[:1, :5]
        for _ in range(5):
            seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)
    kept = space.kept_structure(gates)
    assert _kv_bytes_per_token(model.get_base_model()) == 2 * 4 * 5 * 2 * 8  # K and V, fp32, 5 layers x 2 KV heads
    assert _kv_bytes_per_token(loaded) == 2 * 4 * 8 * (len(kept[2]["kv_heads"]) + 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_with_remote_code_alone(family, tmp_path, tokenizer):
    model = model_for(family)
    space = PruningSpace.from_config(model.config, mlp_block=4, kinds=ALL)
    gates = block_gates(space, seed=1)
    x = ids()
    masked = logits_under(model, space, gates, x, "both")
    out = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m")
    assert_loads_without_atp(out, x, masked, tmp_path)


def test_no_attention_left_anywhere_still_generates(tmp_path, tokenizer):
    """Without any attention a cache has no layer to track the length: each layer then keeps a one-channel
    placeholder, and generation still matches the no-cache loop."""
    model = model_for("llama")
    space = PruningSpace.from_config(model.config, mlp_block=4, kinds=["blocks"])
    gates = {"blocks": torch.tensor([[0.0, 1.0]] * space.num_layers)}
    x = ids()
    masked = logits_under(model, space, gates, x, "both")
    loaded = load_pruned(save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, masked, rtol=0, atol=1e-5)
        cached = loaded.generate(x[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
        seq = x[:1, :5]
        for _ in range(4):
            seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq) and _kv_bytes_per_token(loaded) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_mode_equals_both_once_pruned_lora_is_zero(family):
    model = with_lora(model_for(family, BIASED.get(family)))
    space = PruningSpace.from_config(model.config, mlp_block=4, kinds=ALL)
    gates = block_gates(space)
    x = ids()
    both, frozen = (logits_under(model, space, gates, x, mode) for mode in ("both", "frozen"))
    assert not torch.allclose(both, frozen, atol=1e-4)  # the LoRA pieces of pruned groups still act
    # frozen mode masks exactly the frozen weights of pruned structures: heads and channels as in test_kinds,
    # and every frozen weight and bias of a removed block's projections
    by_hand = frozen_removed(model, space, gates)
    left = (gates["heads"], gates["mlp"])  # a block with nothing left goes as a whole, output bias included
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(by_hand)):
            for column, roles in enumerate((("q", "k", "v", "o"), ("gate", "up", "down"))):
                if gates["blocks"][index, column] == 0 or left[column][index].sum() == 0:
                    for role in roles:
                        base = space.arch.projection(layer, role).base_layer
                        base.weight.zero_()
                        if base.bias is not None:
                            base.bias.zero_()
        torch.testing.assert_close(frozen, by_hand(x).logits, rtol=0, atol=1e-6)
    proximal_step(model, space, gates, threshold=1e9)
    norms = group_sq_norms(model, space)
    assert norms["attention_block"].shape == norms["mlp_block"].shape == (space.num_layers, 1)
    assert norms["attention_block"].flatten().tolist()[:2] == [0, 0] and norms["mlp_block"][1:3].sum() == 0
    assert norms["attention_block"][3] == 0  # every head pruned: the head groups zeroed the whole block's LoRA
    assert bool((norms["attention_block"][[2, 4]] > 0).all()) and bool((norms["mlp_block"][[0, 3, 4]] > 0).all())
    both, frozen = (logits_under(model, space, gates, x, mode) for mode in ("both", "frozen"))
    assert torch.equal(both, frozen)
    pruned = build_pruned(model.merge_and_unload(), space.kept_structure(gates))
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, frozen, rtol=0, atol=1e-5)


def test_block_gates_scale_the_finer_kinds_and_carry_gradients():
    space = PruningSpace.from_config(model_for("llama").config, mlp_block=4, kinds=ALL)
    gen = DecisionGenerator(space, seed=0)
    gen.train()
    space.remaining_ratio(gen(step=0)).backward()
    assert all(float(head.weight.grad.abs().sum()) > 0 for head in gen.heads["blocks"])
    gates = block_gates(space)
    effective = space.effective_gates(gates)
    assert effective["blocks"].tolist() == [[0, 1], [0, 0], [1, 0], [0, 1], [1, 1]]
    assert effective["heads"][:2].sum() == 0 and effective["mlp"][1:3].sum() == 0
    assert torch.equal(effective["heads"][2], gates["heads"][2]) and torch.equal(effective["mlp"][3], gates["mlp"][3])
    kept = space.kept_structure(gates)
    assert [layer["skip"] for layer in kept] == [["attention"], ["attention", "mlp"], ["mlp"], ["attention"], []]
    assert kept[0]["heads"] == kept[3]["heads"] == [] and kept[2]["channels"] == []


def test_scored_baselines_select_blocks(tokenizer):
    model = tiny_model("llama", True)
    space = PruningSpace.from_config(model.config, mlp_block=4, kinds=ALL)
    for method in SCORED:
        gates, _ = fixed_decisions(method, model, space, 0.4, lm_batches(tokenizer), seed=0, device="cpu")
        assert set(gates) == set(ALL) and gates["blocks"].shape == (3, 2)
        assert abs(float(space.remaining_ratio(gates)) - 0.6) <= 0.02
    only = PruningSpace.from_config(model.config, kinds=["blocks"])
    gates, _ = fixed_decisions("magnitude", model, only, 0.2, [], seed=0, device="cpu")
    assert int((gates["blocks"] == 0).sum()) >= 1


def test_train_with_blocks_hits_the_target_and_passes_the_export_check(tiny_model_dir, train_file, tmp_path):
    report = train(short_cfg(tiny_model_dir, train_file, tmp_path / "run", space=ALL, sparsity=0.4), progress=False)
    assert report["logits_check"]["passed"]
    assert count_safetensors_params(tmp_path / "run" / "model") == report["exported_params"]
    assert abs(report["prunable_sparsity"] - 0.4) <= 0.02
    # blocks alone: coarse steps, but whatever it removes leaves the export exact and the count right
    report = train(short_cfg(tiny_model_dir, train_file, tmp_path / "only", space=["blocks"], sparsity=0.2),
                   progress=False)
    assert report["logits_check"]["passed"]
    assert count_safetensors_params(tmp_path / "only" / "model") == report["exported_params"]
    assert any(layer.get("skip") for layer in report["layers"])
    assert abs(report["prunable_sparsity"] - report["decisions_sparsity"]) < 1e-9



def test_ratio_loss_is_finite_when_everything_is_pruned():
    from atp.regularization import ratio_loss

    soft = torch.tensor(0.3, requires_grad=True)
    ratio = torch.tensor(0.0) + soft - soft.detach()  # straight-through: all pruned, soft gradient
    loss = ratio_loss(ratio, 0.6)
    loss.backward()
    assert torch.isfinite(loss) and float(soft.grad) < 0  # descending raises the ratio
    above = torch.tensor(0.5)
    assert torch.equal(ratio_loss(above, 0.6), torch.abs(torch.log(above) - torch.log(torch.tensor(0.6))))
