"""The "hidden" gate kind (Minitron's embedding-channel pruning): one set of hidden channels for the embeddings,
every layer, every norm and the LM head. The masked forward (norms over the kept channels) equals the physically
smaller model, counts equal an independent count of the exported weights, exports reload (the family's own
checkpoint for uniform widths, remote code otherwise), group lasso, baselines, --sparsity-of, training end to end."""
import dataclasses
import json

import pytest
import torch

from atp.arch import ARCHS
from atp.baselines import SCORED, fixed_decisions, magnitude_scores
from atp.errors import ATPError
from atp.export import build_pruned, count_safetensors_params, load_pruned, save_pruned
from atp.generator import DecisionGenerator
from atp.kinds import KINDS
from atp.masking import GateController
from atp.options import ATPConfig
from atp.regularization import group_sq_norms, proximal_step
from atp.space import PruningSpace, ShapeRule
from atp.train import check_reachable, train
from helpers import (
    F32_BOUND,
    GEMMA_SHAPE,
    assert_loads_without_atp,
    block_of,
    close,
    compare,
    heterogeneous_gates,
    ids,
    llama_cpp_runtime,
    lm_batches,
    logits_under,
    model_for,
    prompt_ids,
    read_gguf,
    stored,
    tiny,
    with_lora,
)

ALL = ["blocks", "hidden", "heads", "mlp"]
KIND_SETS = [["hidden"], ["hidden", "heads", "mlp"], ALL]
# (family, GQA); tiny configs: hidden 48 in 12 blocks of 4 channels
CASES = [("llama", True), ("qwen2", True), ("mistral", True), ("mistral", False), ("qwen3", True),
         ("gemma3_text", True)]


def make(family, gqa=True, tie=False, layers=4, **overrides):
    """A tiny model with norms that are not all ones (a misplaced or wrongly normalised channel shows)."""
    shape = GEMMA_SHAPE if family == "gemma3_text" else ({} if gqa else {"num_key_value_heads": 6})
    return model_for(family, {**shape, "tie_word_embeddings": tie, **overrides}, layers=layers)


def space_for(model, kinds, **kw):
    return PruningSpace.from_config(model.config, mlp_block=4, kinds=kinds, hidden_block=4, **kw)


def gates_for(space, seed=0, keep_hidden=7):
    """Random 0/1 gates of the space's kinds; `keep_hidden` random hidden blocks kept."""
    g = torch.Generator().manual_seed(seed)
    gates = {k: (torch.rand(shape, generator=g) < 0.6).float() for k, shape in space.gate_shapes.items()}
    if "hidden" in gates:
        gates["hidden"] = torch.zeros_like(gates["hidden"])
        gates["hidden"][0, torch.randperm(KINDS["hidden"].width(space), generator=g)[:keep_hidden]] = 1
    if "heads" in gates:
        gates["heads"][0] = 1
        gates["heads"][1, : space.heads_per_kv] = 0  # a whole KV group
    if "blocks" in gates:
        gates["blocks"] = torch.ones_like(gates["blocks"])
        gates["blocks"][1, 0] = 0  # no attention
        gates["blocks"][2, 1] = 0  # no MLP
    return gates


def independent_count(model, space, gates) -> tuple[int, int]:
    """(decoder-block parameters, all parameters) left, from the dense model's parameter names and shapes and the
    gates alone: every hidden axis keeps the kept hidden channels; q/k/v/o and gate/up/down also keep only their
    heads / channels; a removed block (or one with nothing left, in a space with blocks) keeps nothing."""
    arch, config = space.arch, model.config
    size = config.hidden_size
    hidden = gates.get("hidden", torch.ones(1, KINDS["hidden"].width(space)))[0]
    kept_hidden = int(hidden.repeat_interleave(space.hidden_block)[:size].sum())
    per_kv = config.num_attention_heads // config.num_key_value_heads
    blocks = outside = 0
    for name, p in model.named_parameters():
        if not name.startswith(arch.layers + "."):
            outside += p.numel() // size * kept_hidden  # embeddings and LM head [vocab, H], final norm [H]
            continue
        index, rest = name[len(arch.layers) + 1:].split(".", 1)
        layer = int(index)
        heads = gates["heads"][layer] if "heads" in gates else torch.ones(config.num_attention_heads)
        kv = heads.view(config.num_key_value_heads, per_kv).amax(1)
        mlp = gates["mlp"][layer] if "mlp" in gates else torch.ones(KINDS["mlp"].width(space))
        channels = mlp.repeat_interleave(space.mlp_block)[:config.intermediate_size]
        block = block_of(arch, rest)
        if "blocks" in gates and (gates["blocks"][layer, block] == 0 or (heads, channels)[block].sum() == 0):
            continue
        q, k, c = int(heads.sum()) * space.head_dim, int(kv.sum()) * space.head_dim, int(channels.sum())
        path = {role: arch.path(role) for role in ("q", "k", "v", "o", "gate", "up", "down")}
        kept = {f"{path['q']}.weight": q * kept_hidden, f"{path['q']}.bias": q,
                f"{path['k']}.weight": k * kept_hidden, f"{path['k']}.bias": k,
                f"{path['v']}.weight": k * kept_hidden, f"{path['v']}.bias": k,
                f"{path['o']}.weight": kept_hidden * q, f"{path['o']}.bias": kept_hidden,
                f"{path['gate']}.weight": c * kept_hidden, f"{path['gate']}.bias": c,
                f"{path['up']}.weight": c * kept_hidden, f"{path['up']}.bias": c,
                f"{path['down']}.weight": kept_hidden * c, f"{path['down']}.bias": kept_hidden,
                **{f"{norm}.weight": kept_hidden for norm in arch.norms}}
        blocks += kept.get(rest, p.numel())  # per-head q/k norms (over head_dim) stay whole
    return blocks, blocks + outside


# ----------------------------------------------------------------------------- the kind, counts, sparsity

def test_kind_shapes_and_counts_with_soft_gates():
    model = make("llama")
    space = space_for(model, ALL)
    assert space.kinds == ("blocks", "hidden", "heads", "mlp")  # registry order, hidden before the finer kinds
    assert space.gate_shapes["hidden"] == (1, 12)  # one row for the whole model
    full = PruningSpace.from_config(model.config, mlp_block=4)
    assert (space.prunable_params(), space.total_params()) == (full.prunable_params(), full.total_params())
    assert float(space.remaining_params(space.full_gates())) == space.total_params()
    gates = gates_for(space)
    blocks, total = independent_count(model, space, gates)
    assert float(space.remaining_prunable(gates)) == blocks and float(space.remaining_params(gates)) == total
    sparsity = space.sparsity(gates)
    assert sparsity["prunable_sparsity"] == pytest.approx(1 - blocks / space.prunable_params(), abs=1e-12)
    assert sparsity["model_sparsity"] == pytest.approx(1 - total / space.total_params(), abs=1e-12)
    assert sparsity["remaining_params"] == total
    of_model = dataclasses.replace(space, sparsity_of="model")
    assert float(of_model.remaining_ratio(gates)) == pytest.approx(total / space.total_params(), rel=1e-6)
    assert float(space.remaining_ratio(gates)) == pytest.approx(blocks / space.prunable_params(), rel=1e-6)
    # soft gates: the count is a differentiable surrogate, and closing hidden channels lowers it
    soft = {k: v.clone().requires_grad_(True) for k, v in space.full_gates().items()}
    of_model.remaining_ratio(soft).backward()
    assert bool((soft["hidden"].grad > 0).all()) and bool((soft["heads"].grad > 0).all())
    # a model keeps one hidden block: the most a hidden space removes
    fewest = space.fewest_gates()
    assert fewest["hidden"].tolist() == [[1.0] + [0.0] * 11] and fewest["heads"].sum() == 0
    most = 1 - independent_count(model, space, fewest)[1] / space.total_params()
    check_reachable(of_model, most - 0.02)
    with pytest.raises(ATPError, match=f"can remove at most {most:.4f} of the whole model's parameters"):
        check_reachable(of_model, most)


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
    blocks, total = independent_count(merged, space, gates)
    pruned = build_pruned(merged, space.kept_structure(gates))
    assert pruned.config.hidden_size == 28 and pruned.config.atp_pruning["kept_hidden"] == \
        space.kept_structure(gates)[0]["hidden"]
    with torch.no_grad():
        close(pruned(x).logits, masked)
    assert sum(p.numel() for p in pruned.parameters()) == total == float(space.remaining_params(gates))
    assert sum(p.numel() for n, p in pruned.named_parameters() if n.startswith("model.layers.")) == blocks


def test_a_plain_mask_is_not_the_pruned_model():
    """The norms must average over the kept channels: without that the masked model is not the export."""
    model = make("qwen2")
    space = space_for(model, ["hidden"])
    gates = gates_for(space)
    x = ids()
    controller = GateController(model, space)
    controller.set(gates)
    controller.masks["hidden_scale"] = torch.ones(())  # a norm over hidden_size, as a plain mask gives
    with torch.no_grad():
        plain = model(x).logits
    controller.remove()
    pruned = build_pruned(model, space.kept_structure(gates))
    with torch.no_grad():
        assert float((pruned(x).logits - plain).abs().max()) > 1e-2


def test_residual_stream_is_zero_on_pruned_channels():
    model = with_lora(make("gemma3_text"))
    space = space_for(model, ["hidden", "heads", "mlp"])
    gates = gates_for(space)
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
             for layer in space.arch.decoder_layers(model.get_base_model())]
    logits_under(model, space, gates, ids(), "frozen")
    for hook in hooks:
        hook.remove()
    pruned_channels = KINDS["hidden"].channel_mask(space, gates["hidden"])[0] == 0
    assert len(seen) == space.num_layers
    assert all(float(out[..., pruned_channels].abs().max()) == 0 for out in seen)
    assert all(float(out[..., ~pruned_channels].abs().max()) > 0 for out in seen)


# ----------------------------------------------------------------------------- exports

@pytest.mark.parametrize("family,gqa", CASES)
def test_uniform_export_is_a_plain_checkpoint(family, gqa, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = with_lora(make(family, gqa))
    space = space_for(model, ["hidden"])
    gates = gates_for(space, keep_hidden=9)  # 36 channels: a multiple of every head count here
    x = ids(length=14)
    masked = logits_under(model, space, gates, x, "both")
    merged = model.merge_and_unload()
    _, total = independent_count(merged, space, gates)
    out = save_pruned(build_pruned(merged, space.kept_structure(gates)), tokenizer, tmp_path / "u")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["hidden_size"] == 36 and "auto_map" not in config
    assert not (out / "modeling_atp.py").exists() and count_safetensors_params(out) == total
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(loaded).__name__ == f"{ARCHS[family].prefix}ForCausalLM"
    with torch.no_grad():
        close(loaded(x).logits, masked)


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_tied_embeddings_stay_tied_and_exact(family, tmp_path, tokenizer):
    """Gemma scales its embedding by sqrt(hidden_size): the kept columns carry sqrt(48 / 36), and the final norm
    takes the inverse, so the tied LM head gives the same logits."""
    from transformers import AutoModelForCausalLM

    model = with_lora(make(family, tie=True))
    space = space_for(model, ["hidden", "heads", "mlp"])
    gates = gates_for(space, keep_hidden=9)
    gates["heads"] = torch.ones_like(gates["heads"])
    gates["mlp"] = torch.ones_like(gates["mlp"])  # uniform widths: the family's own checkpoint
    x = ids(length=14)
    masked = logits_under(model, space, gates, x, "both")
    merged = model.merge_and_unload()
    _, total = independent_count(merged, space, gates)
    out = save_pruned(build_pruned(merged, space.kept_structure(gates)), tokenizer, tmp_path / "t")
    assert "lm_head.weight" not in stored(out) and count_safetensors_params(out) == total
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.get_input_embeddings().weight
    if family == "gemma3_text":
        assert float(loaded.model.embed_tokens.embed_scale) == pytest.approx(36 ** 0.5)
    with torch.no_grad():
        close(loaded(x).logits, masked)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_heterogeneous_export_loads_with_remote_code_alone(family, tmp_path, tokenizer):
    model = make(family, layers=4)
    space = space_for(model, ALL)
    gates = gates_for(space, seed=2)
    x = ids()
    masked = logits_under(model, space, gates, x, "both")
    _, total = independent_count(model, space, gates)
    out = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"atp_{family}" and config["hidden_size"] == 28
    assert count_safetensors_params(out) == total
    shapes = stored(out)
    assert shapes["model.embed_tokens.weight"] == (512, 28) and shapes["model.norm.weight"] == (28,)
    assert shapes["lm_head.weight"] == (512, 28)
    loaded = load_pruned(out)
    with torch.no_grad():
        close(loaded(x).logits, masked)
    assert_loads_without_atp(out, x, masked, tmp_path)


def test_uniform_rule_keeps_llama_head_counts_dividing_the_kept_hidden_size():
    model = make("llama")
    space = space_for(model, ["hidden", "heads", "mlp"])
    rule = ShapeRule(uniform=True)
    sizes = set()
    for seed in range(6):
        noise = torch.Generator().manual_seed(seed)
        scores = {k: torch.randn(shape, generator=noise) for k, shape in space.gate_shapes.items()}
        hard = rule.project(space, {k: (v > -0.3).float() for k, v in scores.items()}, scores)
        kept = space.kept_structure(hard)
        hidden = len(kept[0]["hidden"] or range(48))
        heads = {len(layer["heads"]) for layer in kept}
        assert len(heads) == 1 and hidden % heads.pop() == 0
        sizes.add(hidden)
        assert type(build_pruned(model, kept).config).__name__ == "LlamaConfig"
    assert any(size % 3 for size in sizes)  # a kept size that 3 and 6 heads would not divide


# ----------------------------------------------------------------------------- group lasso, generator, baselines

def test_group_lasso_drives_hidden_lora_pieces_to_zero():
    model = with_lora(make("qwen3"))
    space = space_for(model, ["hidden", "heads", "mlp"])
    gates = gates_for(space)
    norms = {key: value.detach() for key, value in group_sq_norms(model, space).items()}
    assert norms["hidden"].shape == (space.num_layers, 12)
    layer = space.arch.decoder_layers(model.get_base_model())[2]

    def piece(role, block):
        wrapper = space.arch.projection(layer, role)
        if role in ("o", "down"):
            return wrapper.lora_B["default"].weight.detach()[block * 4:(block + 1) * 4]
        return wrapper.lora_A["default"].weight.detach()[:, block * 4:(block + 1) * 4]

    roles = ("q", "k", "v", "gate", "up", "o", "down")
    by_hand = sum(float(piece(role, 5).pow(2).sum()) for role in roles)
    assert float(norms["hidden"][2, 5]) == pytest.approx(by_hand, rel=1e-5)
    x = ids()
    before = logits_under(model, space, gates, x, "both")
    proximal_step(model, space, gates, threshold=1e9)
    after = group_sq_norms(model, space)["hidden"].detach()
    pruned = gates["hidden"][0] == 0
    assert float(after[:, pruned].abs().max()) == 0 and bool((after[:, ~pruned] > 0).all())
    assert torch.equal(after[:, ~pruned], norms["hidden"][:, ~pruned])
    # the LoRA pieces of pruned channels never reached the masked model's output
    torch.testing.assert_close(logits_under(model, space, gates, x, "both"), before, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_under(model, space, gates, x, "frozen"), before, rtol=0, atol=1e-6)


def test_generator_decides_hidden_channels_for_the_whole_model():
    space = space_for(make("llama"), ["hidden", "heads", "mlp"])
    generator = DecisionGenerator(space, seed=0)
    assert generator.decisions()["hidden"].shape == (1, 12)
    generator.train()
    space.remaining_ratio(generator(step=0)).backward()
    assert float(generator.heads["hidden"][0].weight.grad.abs().sum()) > 0
    with torch.no_grad():
        generator.shift_hidden.fill_(-100.0)  # every hidden logit says prune: the best block stays
    decided = generator.decisions()["hidden"]
    assert int(decided.sum()) == 1 and int(decided.argmax()) == int(generator.logits()["hidden"].argmax())
    generator = DecisionGenerator(space, seed=1)
    assert abs(generator.calibrate_offset(space.remaining_ratio, 0.6) - 0.6) < 0.01


def test_baselines_score_hidden_channels(tokenizer):
    model = make("llama", layers=3)
    space = space_for(model, ["hidden", "heads", "mlp"])
    scores = magnitude_scores(model, space)
    assert scores["hidden"].shape == (1, 12)
    square = torch.zeros(48)
    for layer in space.arch.decoder_layers(model):
        for role in ("q", "k", "v", "gate", "up"):
            square += space.arch.projection(layer, role).weight.detach().pow(2).sum(0)
        for role in ("o", "down"):
            square += space.arch.projection(layer, role).weight.detach().pow(2).sum(1)
    torch.testing.assert_close(scores["hidden"][0], square.view(12, 4).sum(1).sqrt())
    for method in SCORED:
        if method == "activation":
            with pytest.raises(ATPError, match="--method activation does not support --space hidden"):
                fixed_decisions(method, model, space, 0.4, lm_batches(tokenizer), seed=0, device="cpu")
            continue
        gates, _ = fixed_decisions(method, model, space, 0.4, lm_batches(tokenizer), seed=0, device="cpu")
        assert gates["hidden"].shape == (1, 12) and 1 <= gates["hidden"].sum() < 12, method
        assert abs(float(space.remaining_ratio(gates)) - 0.6) <= 0.02, method


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error(monkeypatch, train_file, tmp_path):
    model = make("llama")
    with pytest.raises(ATPError, match="--hidden-block 48 puts all 48 hidden channels in one block"):
        PruningSpace.from_config(model.config, kinds=["hidden"], hidden_block=48)
    with pytest.raises(ATPError, match="--sparsity-of must be one of prunable, model"):
        PruningSpace.from_config(model.config, sparsity_of="blocks")
    base = {"model": "x", "domain": None, "train_files": [f"pubmedqa={train_file}"]}
    with pytest.raises(ATPError, match="--sparsity-of must be one of prunable, model, got 'all'"):
        ATPConfig(**base, sparsity_of="all").validate()
    with pytest.raises(ATPError, match="--hidden-block must be at least 1"):
        ATPConfig(**base, hidden_block=0).validate()
    with pytest.raises(ATPError, match="--method activation does not support --space hidden: Wanda-sp"):
        ATPConfig(**base, method="activation", space=["heads", "hidden"]).validate()
    ATPConfig(**base, method="magnitude", space=["heads", "hidden"]).validate()
    # a family whose residual-stream norms are not RMSNorms
    monkeypatch.setitem(ARCHS, "llama", dataclasses.replace(ARCHS["llama"], rms_norms=False))
    with pytest.raises(ATPError, match="--space hidden needs RMSNorm everywhere .* LLaMA-2/3, SmolLM2 models are not"):
        PruningSpace.from_config(model.config, kinds=["hidden", "heads"])
    PruningSpace.from_config(model.config, kinds=["heads"])  # other kinds do not care
    monkeypatch.undo()
    # a model that says it is Llama but carries a LayerNorm on its residual stream
    model.model.norm = torch.nn.LayerNorm(48)
    with pytest.raises(ATPError, match="this model has a LayerNorm on its residual stream"):
        GateController(model, space_for(model, ["hidden"]))


def test_options_and_fingerprints(tiny_model_dir):
    from atp.cli import build_parser, config_from_args
    from atp.options import fingerprint

    args = build_parser().parse_args(["prune", "--model", str(tiny_model_dir), "--space", "heads", "--space", "mlp",
                                      "--space", "hidden", "--sparsity-of", "model", "--hidden-block", "8"])
    cfg = config_from_args(args, ATPConfig)
    assert (cfg.space, cfg.sparsity_of, cfg.hidden_block) == (["heads", "mlp", "hidden"], "model", 8)
    default = ATPConfig()
    assert fingerprint(dataclasses.replace(default, sparsity_of="prunable", hidden_block=16)) == fingerprint(default)
    assert fingerprint(dataclasses.replace(default, sparsity_of="model")) != fingerprint(default)
    with_hidden = dataclasses.replace(default, space=["heads", "hidden"])
    assert fingerprint(dataclasses.replace(with_hidden, hidden_block=16)) != fingerprint(with_hidden)


# ----------------------------------------------------------------------------- training end to end

@pytest.mark.parametrize("sparsity_of", ["prunable", "model"])
def test_train_prunes_hidden_channels_end_to_end(sparsity_of, tiny_model_dir, train_file, tmp_path):
    cfg = ATPConfig(model=str(tiny_model_dir), domain=None, train_files=[f"pubmedqa={train_file}"],
                    out=str(tmp_path / "run"), max_steps=8, batch_size=2, max_length=48, mlp_block=4, hidden_block=4,
                    generator_every=1, generator_lr=3e-2, alpha=8.0, save_every=0, sparsity=0.4,
                    space=["heads", "mlp", "hidden"], sparsity_of=sparsity_of)
    report = train(cfg, progress=False)
    model_dir = tmp_path / "run" / "model"
    assert report["logits_check"]["passed"] and report["sparsity_of"] == sparsity_of
    assert count_safetensors_params(model_dir) == report["exported_params"]
    dense_blocks = report["prunable_params"]
    assert report["prunable_sparsity"] == pytest.approx(
        1 - count_safetensors_params(model_dir, prefix="model.layers.") / dense_blocks, abs=1e-12)
    assert report["model_sparsity"] == pytest.approx(1 - report["exported_params"] / report["dense_params"], abs=1e-12)
    assert abs(report[f"{sparsity_of}_sparsity"] - 0.4) <= 0.03
    assert report[f"{sparsity_of}_sparsity"] == pytest.approx(report["decisions_sparsity" if sparsity_of == "prunable"
                                                                     else "decisions_model_sparsity"], abs=1e-9)
    loaded = load_pruned(model_dir)
    assert loaded.config.hidden_size == report["hidden_size"] == stored(model_dir)["model.norm.weight"][0]
    with torch.no_grad():
        assert torch.isfinite(loaded(ids()).logits).all()


def test_train_hidden_alone_exports_a_plain_checkpoint(tiny_model_dir, train_file, tmp_path):
    """Hidden channels alone shrink every count in proportion: a quarter of the model is 12 of the 48 channels, and
    with 36 channels (6 heads divide it) every layer keeps its widths, so the export is a plain LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM

    cfg = ATPConfig(model=str(tiny_model_dir), domain=None, train_files=[f"pubmedqa={train_file}"],
                    out=str(tmp_path / "run"), max_steps=6, batch_size=2, max_length=48, hidden_block=4,
                    generator_every=1, generator_lr=3e-2, alpha=8.0, save_every=0, sparsity=0.25, space=["hidden"],
                    sparsity_of="model")
    report = train(cfg, progress=False)
    assert report["logits_check"]["passed"] and report["export_format"] == "uniform"
    assert report["hidden_size"] == 36 and report["model_sparsity"] == pytest.approx(0.25, abs=1e-12)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.hidden_size == 36


# ----------------------------------------------------------------------------- GGUF (llama.cpp)

def gguf_folder(kind, tmp_path, tokenizer):
    """test_gguf's tiny Llama (hidden 64, head_dim 32) with one of its two hidden blocks of 32 pruned: hidden 32,
    which its 4 kept heads divide (uniform) or with test_gguf's uneven heads and channels (heterogeneous)."""
    model = tiny("llama")
    space = PruningSpace.from_config(model.config, mlp_block=32, kinds=["hidden", "heads", "mlp"], hidden_block=32)
    gates = {**space.full_gates(), **(heterogeneous_gates(space) if kind == "heterogeneous" else {})}
    if kind == "uniform":
        gates["heads"][:, 4:] = 0
    gates["hidden"][0, 0] = 0
    path = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / kind)
    return path, load_pruned(path)


@pytest.mark.parametrize("kind,arch", [("uniform", "llama"), ("heterogeneous", "deci")])
def test_gguf_export_reads_the_smaller_hidden_size(kind, arch, tmp_path, tokenizer):
    from atp.gguf_export import export_gguf

    path, _ = gguf_folder(kind, tmp_path, tokenizer)
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 32
    summary = export_gguf(path, tmp_path / "m.gguf", "q8_0")
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    assert fields["general.architecture"] == arch == summary["architecture"]
    assert fields[f"{arch}.embedding_length"] == 32 and fields[f"{arch}.attention.key_length"] == 32
    assert tensors["token_embd.weight"] == ((32, 512), "Q8_0") and tensors["output_norm.weight"] == ((32,), "F32")
    assert tensors["blk.0.attn_q.weight"][0][0] == 32 and tensors["blk.0.ffn_down.weight"][0][1] == 32


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["uniform", "heterogeneous"])
def test_llama_cpp_runs_a_hidden_pruned_model(kind, tmp_path, tokenizer):
    from atp.gguf_export import export_gguf

    llama_cpp_runtime()
    path, model = gguf_folder(kind, tmp_path, tokenizer)
    export_gguf(path, tmp_path / "m.gguf", "f32")
    result, _ = compare(model, tmp_path / "m.gguf", prompt_ids(tokenizer))
    assert result["top1_agreement"] == 1.0, result
    assert result["max_abs_logit_diff"] <= F32_BOUND * max(1.0, result["max_abs_logit"]), result


# ----------------------------------------------------------------------------- massive activations

def with_massive_channel(model, channel, scale=1e4):
    """The model with one residual channel (an embedding column) far larger than the rest, like SmolLM2's."""
    with torch.no_grad():
        model.get_input_embeddings().weight[:, channel] *= scale
    return model


def test_outlier_blocks_finds_the_block_of_a_massive_channel():
    from atp.kinds.hidden import outlier_blocks

    model = make("llama")
    space = space_for(model, ["hidden"])  # 12 blocks of 4 channels
    rows = [ids(seed=s)[0].tolist() for s in range(3)]
    assert outlier_blocks(space, model, rows, 100.0).sum() == 0  # a random model has none
    with_massive_channel(model, 13)
    found = outlier_blocks(space, model, rows, 100.0)
    assert found.shape == (1, KINDS["hidden"].width(space)) and torch.nonzero(found[0]).flatten().tolist() == [3]
    model.train()  # the scan runs in eval mode and leaves the mode as it was
    outlier_blocks(space, model, rows, 100.0)
    assert model.training


def test_shape_rule_keeps_the_protected_gates():
    space = space_for(make("llama"), ["heads", "hidden"])
    keep = torch.zeros(1, KINDS["hidden"].width(space))
    keep[0, 5] = 1
    rule = ShapeRule(keep={"hidden": keep})
    hard = {k: torch.zeros(shape) for k, shape in space.gate_shapes.items()}
    out = rule.project(space, hard, {k: torch.zeros(shape) for k, shape in space.gate_shapes.items()})
    assert out["hidden"][0, 5] == 1 and out["hidden"].sum() == 2  # the protected block and min_kept's first
    assert out["heads"].sum() == 0  # other kinds untouched
    assert ShapeRule().project(space, hard, hard)["hidden"][0, 5] == 0


@pytest.mark.parametrize("protect", [100.0, 0.0])
def test_train_never_prunes_a_massive_channel(protect, tiny_model_dir, tokenizer, train_file, tmp_path):
    from atp.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    massive = tmp_path / "massive"
    with_massive_channel(model, 30).save_pretrained(massive)
    tokenizer.save_pretrained(massive)
    cfg = ATPConfig(model=str(massive), domain=None, train_files=[f"pubmedqa={train_file}"],
                    out=str(tmp_path / "run"), max_steps=6, batch_size=2, max_length=48, hidden_block=4,
                    generator_every=1, generator_lr=3e-2, alpha=8.0, save_every=0, sparsity=0.5, space=["hidden"],
                    sparsity_of="model", protect_outliers=protect)
    report = train(cfg, progress=False)
    assert report["logits_check"]["passed"]
    if protect:
        assert report["protected_hidden_blocks"] == [30 // 4]
        assert report["hidden_size"] < model.config.hidden_size
        embedding = load_pruned(tmp_path / "run" / "model").get_input_embeddings().weight
        column_peaks = embedding.abs().amax(0)
        assert column_peaks.max() > 100 * column_peaks.median()  # the massive channel is still there
    else:
        assert report["protected_hidden_blocks"] == []


def test_protect_outliers_is_checked_and_fingerprinted_only_with_hidden():
    from atp.options import fingerprint

    with pytest.raises(ATPError, match="--protect-outliers must be at least 0"):
        ATPConfig(protect_outliers=-1.0).validate()
    default = ATPConfig()
    assert fingerprint(dataclasses.replace(default, protect_outliers=0.0)) == fingerprint(default)
    with_hidden = dataclasses.replace(default, space=["heads", "hidden"])
    assert fingerprint(dataclasses.replace(with_hidden, protect_outliers=0.0)) != fingerprint(with_hidden)
