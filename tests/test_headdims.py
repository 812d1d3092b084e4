"""The "qk-dims" gate kind: query/key dimensions inside the heads, in blocks of RoPE pairs, one set per layer shared by
its heads. Masking equals the physically smaller model (q/k head size below v's, kept RoPE frequencies, the original
softmax scale, per-head q/k norms over the kept dimensions), counts equal an independent count of the exported weights,
exports reload with atp and with trust_remote_code alone, group lasso, baselines, GGUF refusal, training end to end."""
import dataclasses
import json

import pytest
import torch

from atp.baselines import SCORED, fixed_decisions, magnitude_scores
from atp.errors import ATPError
from atp.export import build_pruned, count_safetensors_params, load_pruned, save_pruned
from atp.generator import DecisionGenerator
from atp.gguf_export import export_gguf
from atp.kinds import KINDS
from atp.masking import GateController
from atp.options import ATPConfig
from atp.regularization import group_sq_norms, proximal_step
from atp.space import PruningSpace, ShapeRule
from atp.train import train
from helpers import (
    GEMMA_SHAPE,
    assert_loads_without_atp,
    block_of,
    close,
    ids,
    lm_batches,
    logits_under,
    model_for,
    stored,
    with_lora,
)

QK = "qk-dims"
KIND_SETS = [[QK], ["heads", QK, "mlp"], ["blocks", "heads", QK, "mlp"]]
# (family, GQA); tiny configs with head_dim 16: 8 RoPE pairs in 4 blocks of 2
CASES = [("llama", True), ("llama", False), ("qwen2", True), ("mistral", True), ("mistral", False), ("qwen3", True),
         ("gemma3_text", True)]


def make(family, gqa=True, layers=4, **overrides):
    """A tiny model with norms that are not all ones (a misplaced or wrongly normalised dimension shows)."""
    shape = GEMMA_SHAPE if family == "gemma3_text" else {"head_dim": 16, **({} if gqa else {"num_key_value_heads": 6})}
    return model_for(family, {**shape, **overrides}, layers=layers)


def space_for(model, kinds, **kw):
    return PruningSpace.from_config(model.config, mlp_block=4, kinds=kinds, qk_block=2, **kw)


def gates_for(space, seed=0):
    """Random 0/1 gates: layer 0 keeps every q/k dimension, layer 1 one block of pairs, the others random; layer 0
    keeps every head, layer 1 loses a KV group; with blocks, layer 2 loses its attention block, layer 3 its MLP."""
    g = torch.Generator().manual_seed(seed)
    gates = {k: (torch.rand(shape, generator=g) < 0.6).float() for k, shape in space.gate_shapes.items()}
    gates[QK][0] = 1
    gates[QK][1] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    gates[QK][2:, 1] = 1
    gates[QK][2:, 3] = 0  # not all kept
    if "heads" in gates:
        gates["heads"][0] = 1
        gates["heads"][1, : space.heads_per_kv] = 0
        gates["heads"][1, -1] = 1
    if "blocks" in gates:
        gates["blocks"] = torch.ones_like(gates["blocks"])
        gates["blocks"][2, 0] = 0
        gates["blocks"][3, 1] = 0
    return gates


def kept_dims(space, gates, layer) -> int:
    return int(gates[QK][layer].repeat_interleave(space.qk_block)[: space.head_dim // 2].sum()) * 2


def independent_count(model, space, gates) -> int:
    """Decoder-block parameters left, from the dense model's parameter names and shapes and the gates alone: q and k
    keep kept heads x kept q/k dimensions rows, v and o whole kept heads, per-head q/k norms the kept dimensions, MLP
    projections their channels; a removed block (or, with blocks, one with nothing left) keeps nothing."""
    arch, config = space.arch, model.config
    hidden, head_dim = config.hidden_size, space.head_dim
    per_kv = config.num_attention_heads // config.num_key_value_heads
    total = 0
    for name, p in model.named_parameters():
        if not name.startswith(arch.layers + "."):
            continue
        index, rest = name[len(arch.layers) + 1:].split(".", 1)
        layer = int(index)
        heads = gates["heads"][layer] if "heads" in gates else torch.ones(config.num_attention_heads)
        kv = heads.view(config.num_key_value_heads, per_kv).amax(1)
        mlp = gates["mlp"][layer] if "mlp" in gates else torch.ones(KINDS["mlp"].width(space))
        channels = int(mlp.repeat_interleave(space.mlp_block)[: config.intermediate_size].sum())
        block = block_of(arch, rest)
        if "blocks" in gates and (gates["blocks"][layer, block] == 0 or (heads.sum(), channels)[block] == 0):
            continue
        qk, h, k = kept_dims(space, gates, layer), int(heads.sum()), int(kv.sum())
        path = {role: arch.path(role) for role in ("q", "k", "v", "o", "gate", "up", "down")}
        kept = {f"{path['q']}.weight": h * qk * hidden, f"{path['q']}.bias": h * qk,
                f"{path['k']}.weight": k * qk * hidden, f"{path['k']}.bias": k * qk,
                f"{path['v']}.weight": k * head_dim * hidden, f"{path['v']}.bias": k * head_dim,
                f"{path['o']}.weight": hidden * h * head_dim,
                f"{path['gate']}.weight": channels * hidden, f"{path['up']}.weight": channels * hidden,
                f"{path['down']}.weight": hidden * channels,
                **{f"{arch.attention}.{norm}.weight": qk for norm in arch.head_norms}}
        total += kept.get(rest, p.numel())
    return total


# ----------------------------------------------------------------------------- the kind and its counts

def test_kind_shapes_options_and_soft_counts():
    assert list(KINDS) == ["blocks", "hidden", "heads", QK, "mlp"]  # finer than heads, MLP channels stay last
    model = make("llama")
    space = space_for(model, ["mlp", QK, "heads"])
    assert space.kinds == ("heads", QK, "mlp") and space.gate_shapes[QK] == (4, 4)
    full = PruningSpace.from_config(model.config, mlp_block=4)
    assert space.prunable_params() == full.prunable_params() and space.total_params() == full.total_params()
    assert float(space.remaining_prunable(space.full_gates())) == space.prunable_params()
    # one block of pairs closed in one layer: 2 * 2 dimensions of each of the 6 query and 2 KV heads, 48 columns each
    gates = space.full_gates()
    gates[QK][1, 2] = 0
    assert space.prunable_params() - float(space.remaining_prunable(gates)) == 4 * (6 + 2) * 48
    kept = space.kept_structure(gates)
    assert kept[1]["qk_pairs"] == [0, 1, 2, 3, 6, 7] and kept[0]["qk_pairs"] is None
    # soft gates: a differentiable count, lowered by closing q/k dimensions
    soft = {k: v.clone().requires_grad_(True) for k, v in space.full_gates().items()}
    space.remaining_ratio(soft).backward()
    assert bool((soft[QK].grad > 0).all()) and bool((soft["heads"].grad > 0).all())
    # a layer keeps one block of pairs
    assert space.fewest_gates()[QK].sum(1).tolist() == [1.0] * 4
    generator = DecisionGenerator(space, seed=0)
    assert generator.decisions()[QK].shape == (4, 4)
    assert abs(generator.calibrate_offset(space.remaining_ratio, 0.6) - 0.6) < 0.02


@pytest.mark.parametrize("family,gqa", CASES)
def test_counts_equal_an_independent_count(family, gqa):
    model = make(family, gqa)
    for kinds in KIND_SETS:
        space = space_for(model, kinds)
        gates = gates_for(space, seed=len(kinds))
        expected = independent_count(model, space, gates)
        assert float(space.remaining_prunable(gates)) == expected, kinds
        pruned = build_pruned(model, space.kept_structure(gates))
        assert sum(p.numel() for n, p in pruned.named_parameters() if n.startswith("model.layers.")) == expected


@pytest.mark.parametrize("family,gqa", CASES)
@pytest.mark.parametrize("kinds", KIND_SETS, ids="+".join)
def test_masked_forward_is_the_pruned_model(family, gqa, kinds):
    model = with_lora(make(family, gqa))
    space = space_for(model, kinds)
    gates = gates_for(space, seed=len(kinds))
    x = ids(length=14)  # longer than Gemma's sliding window
    masked = logits_under(model, space, gates, x, "both")
    assert not torch.allclose(masked, logits_under(model, space, space.full_gates(), x, "both"), atol=1e-3)
    merged = model.merge_and_unload()
    pruned = build_pruned(merged, space.kept_structure(gates))
    attention = pruned.model.layers[1].self_attn
    assert attention.qk_dim == 4 and attention.q_proj.out_features == attention.num_heads * 4
    assert attention.scaling == merged.model.layers[1].self_attn.scaling  # the original softmax scale
    assert pruned.config.atp_pruning["kept_qk_pairs"][1] == [4, 5]
    with torch.no_grad():
        close(pruned(x).logits, masked)
    assert sum(p.numel() for p in pruned.parameters()) == float(space.remaining_params(gates))


def test_q_k_norms_average_over_the_kept_dimensions():
    """Qwen3's per-head norms must normalise over the kept dimensions: a plain mask is not the pruned model."""
    model = make("qwen3")
    space = space_for(model, [QK])
    gates = gates_for(space)
    x = ids()
    controller = GateController(model, space)
    controller.set(gates)
    controller.masks["qk_scale"] = torch.ones_like(controller.masks["qk_scale"])  # a norm over head_dim
    with torch.no_grad():
        plain = model(x).logits
    controller.remove()
    pruned = build_pruned(model, space.kept_structure(gates))
    with torch.no_grad():
        assert float((pruned(x).logits - plain).abs().max()) > 1e-2
        close(pruned(x).logits, logits_under(model, space, gates, x, "frozen"))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_group_lasso_and_frozen_mode(family):
    model = with_lora(make(family))
    space = space_for(model, ["heads", QK])
    gates = gates_for(space)
    x = ids()
    norms = {key: value.detach() for key, value in group_sq_norms(model, space).items()}
    assert norms["qk"].shape == (space.num_layers, 4)
    layer = space.arch.decoder_layers(model.get_base_model())[2]
    rows = torch.tensor([2, 3, 10, 11])  # the dimensions of pair block 1 in a head of 16: pairs 2, 3 and 10, 11
    by_hand = 0.0
    for role, heads in (("q", space.num_heads), ("k", space.num_kv_heads)):
        weight = space.arch.projection(layer, role).lora_B["default"].weight.detach()
        by_hand += sum(float(weight[h * 16 + rows].pow(2).sum()) for h in range(heads))
    assert float(norms["qk"][2, 1]) == pytest.approx(by_hand, rel=1e-5)
    both, frozen = (logits_under(model, space, gates, x, mode) for mode in ("both", "frozen"))
    assert not torch.allclose(both, frozen, atol=1e-4)  # the LoRA pieces of pruned dimensions still act
    proximal_step(model, space, gates, threshold=1e9)
    after = group_sq_norms(model, space)["qk"].detach()
    assert float(after[gates[QK] == 0].abs().max()) == 0 and bool((after[gates[QK] == 1] > 0).all())
    both, frozen = (logits_under(model, space, gates, x, mode) for mode in ("both", "frozen"))
    torch.testing.assert_close(both, frozen, rtol=0, atol=1e-6)
    pruned = build_pruned(model.merge_and_unload(), space.kept_structure(gates))
    with torch.no_grad():
        close(pruned(x).logits, frozen)


# ----------------------------------------------------------------------------- exports

@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_export_loads_with_remote_code_alone(family, tmp_path, tokenizer):
    model = make(family)
    space = space_for(model, ["heads", QK, "mlp"])
    gates = gates_for(space, seed=2)
    x = ids()
    masked = logits_under(model, space, gates, x, "both")
    out = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"atp_{family}" and config["qk_pairs"] is None
    assert config["per_layer_config"]["1"]["qk_pairs"] == [4, 5]
    assert count_safetensors_params(out, prefix="model.layers.") == independent_count(model, space, gates)
    shapes = stored(out)
    heads = int(gates["heads"][1].sum())
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (heads * 4, model.config.hidden_size)
    attention = "model.layers.1.self_attn"
    assert shapes[f"{attention}.v_proj.weight"][0] == 4 * shapes[f"{attention}.k_proj.weight"][0]
    if family != "llama":
        assert shapes["model.layers.1.self_attn.q_norm.weight"] == (4,)
    loaded = load_pruned(out)
    with torch.no_grad():
        close(loaded(x).logits, masked)
    assert_loads_without_atp(out, x, masked, tmp_path)
    if family == "llama":  # a family GGUF export supports
        with pytest.raises(ATPError, match="layer 1 keeps 4 of the 16 query/key dimensions of a head .* GGUF cannot"):
            export_gguf(out, tmp_path / "m.gguf")
        assert not (tmp_path / "m.gguf").exists()


def test_bad_qk_pairs_in_a_config_are_refused(tmp_path, tokenizer):
    model = make("llama", layers=2)
    space = space_for(model, [QK])
    gates = space.full_gates()
    gates[QK][0, 0] = 0
    out = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["per_layer_config"]["0"]["qk_pairs"] = [2, 3, 4, 5, 6, 9]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ATPError, match=r"qk_pairs \[2, 3, 4, 5, 6, 9\] must list, in increasing order, some of the 8"):
        load_pruned(out)


# ----------------------------------------------------------------------------- baselines, bad input

def test_baselines_score_qk_dimensions(tokenizer):
    model = make("llama", layers=3)
    space = space_for(model, ["heads", QK, "mlp"])
    scores = magnitude_scores(model, space)
    layer = space.arch.decoder_layers(model)[1]
    square = sum(space.arch.projection(layer, role).weight.detach().pow(2).sum(1).view(-1, 16).sum(0)
                 for role in ("q", "k"))
    torch.testing.assert_close(scores[QK][1], (square[:8] + square[8:]).view(4, 2).sum(1).sqrt())
    for method in SCORED:
        if method == "activation":
            with pytest.raises(ATPError, match="--method activation does not support --space qk-dims: Wanda-sp"):
                fixed_decisions(method, model, space, 0.4, lm_batches(tokenizer), seed=0, device="cpu")
            continue
        gates, _ = fixed_decisions(method, model, space, 0.4, lm_batches(tokenizer), seed=0, device="cpu")
        assert gates[QK].shape == (3, 4) and bool((gates[QK].sum(1) >= 1).all()), method
        assert abs(float(space.remaining_ratio(gates)) - 0.6) <= 0.02, method


def test_bad_input_is_a_clear_error(train_file):
    model = make("llama")
    with pytest.raises(ATPError, match="--qk-block 8 puts all 8 RoPE pairs of a head in one block"):
        PruningSpace.from_config(model.config, kinds=[QK], qk_block=8)
    with pytest.raises(ATPError, match="qk_block must be a positive number"):
        PruningSpace.from_config(model.config, kinds=[QK], qk_block=0)
    with pytest.raises(ATPError, match="head_dim 15 is odd"):  # (transformers' RoPE refuses such configs too)
        dataclasses.replace(space_for(model, [QK]), head_dim=15)
    with pytest.raises(ATPError, match="--uniform exports the family's own config.* drop 'qk-dims'"):
        ShapeRule(uniform=True).check(space_for(model, ["heads", QK]))
    with pytest.raises(ATPError, match="--space: unknown kinds 'qk'; choose one or more of: blocks, hidden, heads, "
                                       "qk-dims, mlp"):
        space_for(model, ["qk"])
    base = {"model": "x", "domain": None, "train_files": [f"pubmedqa={train_file}"]}
    with pytest.raises(ATPError, match="--qk-block must be at least 1"):
        ATPConfig(**base, qk_block=0).validate()
    with pytest.raises(ATPError, match="--method activation does not support --space qk-dims"):
        ATPConfig(**base, method="activation", space=["heads", QK]).validate()


def test_options_and_fingerprints(tiny_model_dir):
    from atp.cli import build_parser, config_from_args
    from atp.options import fingerprint

    args = build_parser().parse_args(["prune", "--model", str(tiny_model_dir), "--space", "heads", "--space", "mlp",
                                      "--space", QK, "--qk-block", "1"])
    cfg = config_from_args(args, ATPConfig)
    assert (cfg.space, cfg.qk_block) == (["heads", "mlp", QK], 1)
    default = ATPConfig()
    assert fingerprint(dataclasses.replace(default, qk_block=2)) == fingerprint(default)  # inert without qk-dims
    with_qk = dataclasses.replace(default, space=["heads", QK])
    assert fingerprint(dataclasses.replace(with_qk, qk_block=2)) != fingerprint(with_qk)


# ----------------------------------------------------------------------------- training end to end

def test_train_prunes_qk_dimensions_end_to_end(tiny_model_dir, train_file, tmp_path):
    cfg = ATPConfig(model=str(tiny_model_dir), domain=None, train_files=[f"pubmedqa={train_file}"],
                    out=str(tmp_path / "run"), max_steps=8, batch_size=2, max_length=48, mlp_block=4, qk_block=1,
                    generator_every=1, generator_lr=3e-2, alpha=8.0, save_every=0, sparsity=0.4,
                    space=["heads", "mlp", QK])
    report = train(cfg, progress=False)
    model_dir = tmp_path / "run" / "model"
    assert report["logits_check"]["passed"]
    assert count_safetensors_params(model_dir) == report["exported_params"]
    assert abs(report["prunable_sparsity"] - 0.4) <= 0.03
    assert report["prunable_sparsity"] == pytest.approx(report["decisions_sparsity"], abs=1e-9)
    loaded = load_pruned(model_dir)
    with torch.no_grad():
        assert torch.isfinite(loaded(ids()).logits).all()
