"""atp bench on tiny models: ratios, sizes computed independently, CLI."""
import json

from atp.bench import benchmark, format_bench
from atp.cli import main
from atp.export import build_pruned, load_pruned, save_pruned
from atp.space import HeadMLPSpace
from helpers import tiny_model


def pruned_copy(tmp_path, tokenizer):
    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    gates = space.full_gates()
    gates["heads"][:, :3] = 0  # first KV group of every layer
    gates["mlp"][:, ::2] = 0
    model = build_pruned(model, space.kept_structure(gates))
    return save_pruned(model, tokenizer, tmp_path / "pruned"), space, gates


def test_benchmark_reports_sizes_and_ratios(tmp_path, tokenizer):
    path, space, gates = pruned_copy(tmp_path, tokenizer)
    dense, pruned = tiny_model("llama", True), load_pruned(path)
    result = benchmark({"dense": dense, "pruned": pruned}, repeats=2, prefill_length=16, batches=(1, 2),
                       new_tokens=3, decode_prompt=4)
    d, p = result["models"]["dense"], result["models"]["pruned"]
    assert d["params"] == space.total_params()
    assert p["params"] == space.total_params() - space.prunable_params() + float(space.remaining_prunable(gates))
    # KV cache: 2 KV heads x 8 dims x 3 layers x K and V x 4 bytes, and half of that after pruning one KV group
    assert d["kv_bytes_per_token"] == 2 * 2 * 8 * 3 * 4 and p["kv_bytes_per_token"] == d["kv_bytes_per_token"] // 2
    for key in ("prefill_b1_tokens_per_s", "prefill_b2_tokens_per_s", "decode_tokens_per_s"):
        assert d[key] > 0 and p[key] > 0
        assert abs(p["ratio_to_dense"][key] - p[key] / d[key]) < 1e-9
    assert "pruned" in format_bench(result)


def test_bench_cli(tmp_path, tokenizer, tiny_model_dir, capsys):
    path, _, _ = pruned_copy(tmp_path, tokenizer)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tiny_model_dir), "--model", str(path), "--repeats", "1",
                 "--prefill-length", "16", "--new-tokens", "2", "--out", str(out)]) == 0
    assert "x)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["models"]) == {str(tiny_model_dir), str(path)} and result["dtype"] == "float32"
    assert main(["bench", "--model", str(tiny_model_dir), "--prefill-length", "100000"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
