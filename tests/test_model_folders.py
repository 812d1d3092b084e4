"""Damaged or edited model folders are refused with a clear error before anything runs on them.
docs/reliability.md, "Model folders"."""
import hashlib
import json

import pytest
import torch

from atp.cli import main
from atp.errors import ATPError
from helpers import random_gates, tiny_model

# ----------------------------------------------------------------------------- model folders

def test_eval_refuses_weights_that_do_not_fit_the_model_type(tiny_model_dir, tmp_path, capsys):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["model_type"] = "qwen2"  # q/k/v biases would be initialised at random
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"QUESTION": "q?", "CONTEXTS": ["c."], "final_decision": "yes"}) + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "pubmedqa", "--data", str(data),
                 "--max-length", "32", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "do not fit its config.json (model_type qwen2): missing 9 (model.layers.0.self_attn.k_proj.bias" in err
    assert "Refusing to run with re-initialised weights" in err


def _heterogeneous_export(tmp_path, tokenizer):
    from atp.export import build_pruned, save_pruned
    from atp.space import HeadMLPSpace

    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    return save_pruned(build_pruned(model, space.kept_structure(random_gates(space))), tokenizer, tmp_path / "het")


def _break(kind, folder):
    weights = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    if kind == "broken config.json":
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 4')
    elif kind == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:5000])
    elif kind == "zero-byte weights":
        weights.write_bytes(b"")
    elif kind == "no tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    elif kind == "pickle weights":
        torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
        weights.unlink()
    elif kind == "edited width":
        config["intermediate_size"] += 4
        (folder / "config.json").write_text(json.dumps(config))
    elif kind == "edited per-layer width":
        config["per_layer_config"]["1"]["intermediate_size"] += 4
        (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind, message", [
    ("broken config.json", r"config\.json is not a readable JSON config \(Expecting"),
    ("truncated weights", r"model\.safetensors is damaged \(5,000 bytes; .*cut short"),
    ("zero-byte weights", r"model\.safetensors is damaged \(0 bytes"),
    ("no tokenizer", r"has no tokenizer \(tokenizer\.json or tokenizer_config\.json\)"),
    ("pickle weights", r"holds only pickle weights \(pytorch_model\.bin\); atp loads safetensors only"),
    ("edited width", r"do not fit its config\.json \(model_type llama\): wrong shape 9"),
    ("edited per-layer width", r"do not fit its config\.json \(model_type atp_llama\): wrong shape 3"),
])
def test_damaged_model_folders(kind, message, tiny_model_dir, tmp_path, tokenizer):
    from atp.models import load_model

    folder = _heterogeneous_export(tmp_path, tokenizer) if "per-layer" in kind else tiny_model_dir
    _break(kind, folder)
    with pytest.raises(ATPError, match=message):
        load_model(str(folder))


def test_modified_modeling_file_is_refused(tmp_path, tokenizer, capsys):
    from atp.export import MODELING_FILE, load_pruned

    out = _heterogeneous_export(tmp_path, tokenizer)
    recorded = json.loads((out / "config.json").read_text())["atp_pruning"]["modeling_sha256"]
    assert recorded == hashlib.sha256((out / MODELING_FILE).read_bytes()).hexdigest()
    load_pruned(out)
    with open(out / MODELING_FILE, "a") as f:
        f.write("\nimport os  # a change someone made\n")
    with pytest.raises(ATPError, match=r"modeling_atp\.py is not the file atp exported .* trust_remote_code=True"):
        load_pruned(out)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"QUESTION": "q?", "CONTEXTS": ["c."], "final_decision": "yes"}) + "\n")
    assert main(["eval", "--model", str(out), "--task", "pubmedqa", "--data", str(data), "--max-length", "32",
                 "--max-new-tokens", "4"]) == 2
    assert "is not the file atp exported" in capsys.readouterr().err
