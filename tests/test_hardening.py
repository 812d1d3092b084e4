"""Bad input and bad environments, class by class: each gets a clear ATPError (or a clean `atp: error:` line
from the CLI) instead of a traceback or silently wrong output. docs/reliability.md lists them."""
import errno
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from atp import checkpoint, validation
from atp.cli import main
from atp.errors import ATPError
from atp.fsutil import atomic_dir, clean_stale_temps, read_yaml_mapping
from helpers import dead_pid, prune_argv, random_gates, snapshot, tiny_model


def small_checkpoint_parts():
    from peft import LoraConfig, get_peft_model

    from atp.generator import DecisionGenerator
    from atp.space import HeadMLPSpace

    model = tiny_model("llama")
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], task_type="CAUSAL_LM"))
    generator = DecisionGenerator(space, hidden=8)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return peft_model, generator, {"lora": opt}, schedule


def save_checkpoint(run_dir, step, parts):
    peft_model, generator, optimizers, schedule = parts
    run_dir.mkdir(parents=True, exist_ok=True)  # a run's folder exists before its first checkpoint
    return checkpoint.save(run_dir, step, peft_model, generator, optimizers, schedule, "fp", keep=5)


# ----------------------------------------------------------------------------- where results are written

@pytest.mark.parametrize("code, reason", [(errno.EROFS, "read-only file system"),
                                          (errno.EPERM, "immutable"),
                                          (errno.EACCES, "permission denied")])
def test_unwritable_run_dir_is_a_clear_error(code, reason, tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    # root ignores file modes (and chattr +i needs a file system that has it), so the OS's refusal is simulated
    from pathlib import Path

    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self == tmp_path / "run":
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(prune_argv(tiny_model_dir, train_file, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert f"atp: error: cannot write {tmp_path / 'run'}: " in err and reason in err


def test_run_dir_under_a_file(tiny_model_dir, train_file, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(prune_argv(tiny_model_dir, train_file, tmp_path / "afile" / "run")) == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("failure", ["oserror", "torch"])
def test_full_disk_while_saving_a_checkpoint(failure, tmp_path, monkeypatch):
    parts = small_checkpoint_parts()

    def full_disk(obj, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ATPError, match=r"no space left on device while writing the checkpoint of step 3 to "
                                       r".*step-000003; .* MiB free there"):
        save_checkpoint(tmp_path / "run", 3, parts)
    assert os.listdir(tmp_path / "run" / "checkpoints") == []  # no half-written folder, no temp


def test_cli_translates_os_and_input_errors(monkeypatch, capsys):
    import atp.models

    cases = [
        (OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/model.safetensors"),
         "no space left on device while writing /data/runs/x/model.safetensors"),
        (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"), "no space left on device"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "cannot write /ro/out: read-only file system"),
        (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "not UTF-8 text (invalid start byte at byte 0)"),
    ]
    for error, message in cases:
        def fail(name, error=error):
            raise error

        monkeypatch.setattr(atp.models, "resolve_model", fail)
        assert main(["prepare", "--model", "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("atp: error: ") and message in err and "Traceback" not in err
    monkeypatch.setattr(atp.models, "resolve_model", lambda name: 1 / 0)  # a bug keeps its traceback
    with pytest.raises(ZeroDivisionError):
        main(["prepare", "--model", "x"])


def test_eval_out_is_checked_before_evaluating(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import atp.models

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(atp.models, "load_model", never)
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"QUESTION": "q?", "CONTEXTS": ["c."], "final_decision": "yes"}) + "\n")
    (tmp_path / "afile").write_text("x")
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "pubmedqa", "--data", str(data), "--out"]
    assert main(argv + [str(tmp_path / "afile" / "eval.json")]) == 2
    assert f"cannot write --out file to {tmp_path / 'afile' / 'eval.json'}: {tmp_path / 'afile'} is a file" in \
        capsys.readouterr().err
    (tmp_path / "afolder").mkdir()
    assert main(argv + [str(tmp_path / "afolder")]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


# ----------------------------------------------------------------------------- data and config files

def test_jsonl_deep_nesting_and_huge_integers(tmp_path):
    from atp.data import get_task, read_jsonl

    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"QUESTION": "q"}\n{"a": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(ATPError, match=r"deep\.jsonl:2: the JSON is nested too deeply"):
        read_jsonl(deep)
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": ' + "9" * 5000 + "}\n")
    with pytest.raises(ATPError, match=r"huge\.jsonl:1: unreadable JSON value: Exceeds the limit"):
        get_task("pubmedqa").load(huge)


def test_binary_or_deeply_nested_yaml_config(tiny_model_dir, tmp_path, capsys):
    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(ATPError, match=r"config file .*run\.yaml is not a YAML text file"):
        read_yaml_mapping(binary, "config file", {"model"})
    assert main(["prune", "--config", str(binary), "--model", str(tiny_model_dir)]) == 2
    assert "is not a YAML text file" in capsys.readouterr().err
    nested = tmp_path / "nested.yaml"
    nested.write_text("model: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ATPError, match=r"config file .*nested\.yaml is nested too deeply to read"):
        read_yaml_mapping(nested, "config file", {"model"})


def test_synthetic_data_has_the_public_formats(tmp_path, shared_data):
    """The generated stand-in for ../shared/data loads in every domain task, with the real files' field names."""
    from synthetic_data import FILES, write_synthetic_data

    from atp.data import load_domain
    from conftest import REAL_DATA, SHARED_DATA

    root = write_synthetic_data(tmp_path / "gen")
    assert write_synthetic_data(tmp_path / "again").joinpath("legal/casehold_train.jsonl").read_text() == \
        (root / "legal/casehold_train.jsonl").read_text()  # deterministic
    for domain in ("healthcare", "legal"):
        for task, records in load_domain(domain, root):
            assert len(records) >= 30
            assert all(task.train_example(r).response for r in records)
    if REAL_DATA:
        for name in FILES:
            real = json.loads((SHARED_DATA / name).open().readline())
            made = json.loads((root / name).open().readline())
            assert set(made) == set(real), name


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


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("manifest", [{"step": 2, "fingerprint": "fp"}, [], "null", {"step": 2, "fingerprint": "fp",
                                      "files": {}}, {"files": []}])
def test_manifest_without_a_file_list_is_corrupt(manifest, tmp_path, capsys):
    parts = small_checkpoint_parts()
    run = tmp_path / "run"
    first = save_checkpoint(run, 1, parts)
    second = save_checkpoint(run, 2, parts)
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (second / "manifest.json").write_text(text)
    found = checkpoint.latest_valid(run)
    assert found is not None and found[0] == first
    assert "atp: warning: skipping checkpoint step-000002" in capsys.readouterr().err


def test_checkpoint_save_refuses_nan_weights(tmp_path):
    parts = small_checkpoint_parts()
    lora = next(p for n, p in parts[0].named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora[0, 0] = float("nan")
    with pytest.raises(ATPError, match=r"refusing to save the checkpoint of step 4: LoRA weight .*lora_B.* NaN"):
        save_checkpoint(tmp_path / "run", 4, parts)
    assert not (tmp_path / "run" / "checkpoints" / "step-000004").exists()
    with torch.no_grad():
        lora[0, 0] = 0.0
        parts[1].inputs[0, 0] = float("inf")
    with pytest.raises(ATPError, match="generator weight inputs holds NaN or Inf"):
        save_checkpoint(tmp_path / "run", 4, parts)


# ----------------------------------------------------------------------------- option values

def test_bench_argument_checks(tiny_model_dir, capsys):
    base = ["bench", "--model", str(tiny_model_dir), "--repeats", "1", "--prefill-length", "16", "--new-tokens", "2"]

    def run(flag, value):
        argv = list(base)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        return main(argv), capsys.readouterr().err

    assert run("--new-tokens", "0") == (2, "atp: error: --new-tokens must be a whole number of at least 1, got 0\n")
    assert run("--prefill-length", "0")[1].startswith("atp: error: --prefill-length must be a whole number of at least 1")
    assert run("--repeats", "0")[0] == 2
    code, err = run("--new-tokens", "1000")
    assert code == 2 and "32 prompt tokens + 1000 new tokens exceed the model's context of 256" in err


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_device_checks_shared_by_eval_and_bench(command, tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"QUESTION": "q?", "CONTEXTS": ["c."], "final_decision": "yes"}) + "\n")
    argv = ["eval", "--model", str(tiny_model_dir), "--task", "pubmedqa", "--data", str(data)] if command == "eval" \
        else ["bench", "--model", str(tiny_model_dir), "--prefill-length", "16", "--repeats", "1"]
    assert main(argv + ["--device", "bogus"]) == 2
    assert "atp: error: --device 'bogus' is not a device; use cpu, cuda or cuda:N" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, on any machine
    assert main(argv + ["--device", "cuda"]) == 2
    assert "use --device cpu" in capsys.readouterr().err


def test_option_value_checks(tiny_model_dir, monkeypatch):
    import transformers.utils

    from atp.models import load_model

    with pytest.raises(ATPError, match="--attn-implementation must be one of eager, .*sdpa.*got 'flash'"):
        validation.attn_implementation("flash")
    with pytest.raises(ATPError, match="--attn-implementation must be one of"):  # every load checks it (prune too)
        load_model(str(tiny_model_dir), attn_implementation="flash")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    with pytest.raises(ATPError, match="--attn-implementation flash_attention_2 needs the flash-attn package"):
        validation.attn_implementation("flash_attention_2")
    assert validation.attn_implementation("sdpa") == "sdpa" and validation.attn_implementation(None) is None
    with pytest.raises(ATPError, match="--mixed-precision must be one of no, bf16, fp16, got 'fp32'"):
        validation.mixed_precision("fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ATPError, match="--mixed-precision fp16 needs a CUDA GPU"):
        validation.mixed_precision("fp16")
    assert validation.mixed_precision("bf16") == "bf16"
    for bad in ("q_proj,v_proj", [], ["q_proj", ""], [3]):
        with pytest.raises(ATPError, match="--lora-targets must be a non-empty list of module names"):
            validation.lora_targets(bad)
    model = tiny_model("llama")
    with pytest.raises(ATPError, match=r"--lora-targets qkv, lm_head: no such linear layer .*they have down_proj, "
                                       r"gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        validation.lora_targets_in(model, ["q_proj", "qkv", "lm_head"])
    assert validation.lora_targets_in(model, ["q_proj", "down_proj"]) == ["q_proj", "down_proj"]
    for bad in (-1, 2**32, True, 1.5, "3"):
        with pytest.raises(ATPError, match="--seed must be a whole number from 0 to 4294967295"):
            validation.seed(bad)
    assert validation.seed(2**32 - 1) == 2**32 - 1


# ----------------------------------------------------------------------------- interrupted writes

def test_stale_temps_of_dead_processes_are_cleaned(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = [run / f".model.tmp-{dead}-abcd1234", run / ".model.tmp-x1y2z3w4",  # older atp: no pid
             run / "checkpoints" / f".step-000030.tmp-{dead}-0a1b2c3d", run / f".report.json.tmp-{dead}-qwertyui"]
    for path in stale[:3]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 1000)
    stale[3].write_text("{")
    kept = [run / f".model.tmp-{alive}-live0000", run / ".hidden", run / "notes.tmp", run / "checkpoints" / "step-000020"]
    for path in kept:
        path.mkdir()
    (run / f".export.old-{dead}").mkdir()  # died between moving `export` aside and moving the new one in
    removed = clean_stale_temps(run)
    assert sorted(removed) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (run / "export").is_dir() and not (run / f".export.old-{dead}").exists()


def test_a_write_killed_with_sigkill_is_cleaned_on_the_next_write(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from atp.fsutil import atomic_dir
        with atomic_dir({str(tmp_path / 'model')!r}, "the model") as tmp:
            (tmp / "model.safetensors").write_bytes(b"0" * 100000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == -9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.tmp-")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_new_run_cleans_what_a_killed_export_left(tiny_model_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 0
    leftover = run / f".model.tmp-{dead_pid()}-abcdefgh"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    assert main(prune_argv(tiny_model_dir, train_file, run, "--overwrite")) == 0
    assert not leftover.exists() and f"removed {leftover}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- reproducibility

def _stand_in_for_gguf(monkeypatch, tmp_path, tokenizer):
    """An embedded model 'tiny-embedded' whose preparation runs the real code on a tiny model (no GGUF)."""
    import transformers

    import atp.models

    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(atp.models.EMBEDDED, "tiny-embedded", ("none", "0"))
    monkeypatch.setattr(atp.models, "_embedded_gguf", lambda name: tmp_path / "tiny.gguf")
    real_model, real_tokenizer = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, *a, **kw: tiny_model("llama", seed=5) if "gguf_file" in kw else real_model(path, *a, **kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda path, *a, **kw: tokenizer if "gguf_file" in kw else real_tokenizer(path, *a, **kw))


def test_preparing_a_model_leaves_the_random_streams_alone(tmp_path, tokenizer, monkeypatch):
    from atp.models import load_model

    _stand_in_for_gguf(monkeypatch, tmp_path, tokenizer)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    load_model("tiny-embedded")  # prepares it (a fresh model with random init), then loads it
    assert (tmp_path / "home" / "models" / "tiny-embedded" / "model.safetensors").exists()
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])


def test_a_run_does_not_depend_on_whether_its_model_was_prepared_in_it(tmp_path, tokenizer, train_file, monkeypatch):
    from safetensors.torch import load_file

    _stand_in_for_gguf(monkeypatch, tmp_path, tokenizer)
    models = []
    for name in ("first", "second"):  # the first run prepares the model, the second finds it prepared
        prepared = (tmp_path / "home" / "models" / "tiny-embedded").exists()
        assert prepared == (name == "second")
        assert main(prune_argv("tiny-embedded", train_file, tmp_path / name, "--max-steps", "6")) == 0
        models.append(load_file(str(tmp_path / name / "model" / "model.safetensors")))
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


# ----------------------------------------------------------------------------- replacing an earlier run

def test_overwrite_checks_every_input_before_touching_the_earlier_run(earlier_run, tiny_model_dir, train_file,
                                                                      tmp_path, capsys):
    run, before = earlier_run
    broken_model = tmp_path / "broken-model"
    broken_model.mkdir()
    (broken_model / "config.json").write_text('{"model_type": "llama", "hidden_size": 4')
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"QUESTION": "q?"\n')
    cases = [(prune_argv(tiny_model_dir, tmp_path / "typo.jsonl", run, "--overwrite"), "typo.jsonl not found"),
             (prune_argv(tiny_model_dir, bad_json, run, "--overwrite"), "bad.jsonl:1: malformed JSON"),
             (prune_argv(broken_model, train_file, run, "--overwrite"), "config.json is not a readable JSON config"),
             (prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--lora-targets", "qkv"),
              "--lora-targets qkv: no such linear layer")]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert snapshot(run) == before, message


def test_overwrite_restores_the_earlier_run_when_the_new_one_fails_before_its_first_checkpoint(
        earlier_run, tiny_model_dir, train_file, monkeypatch, capsys):
    import atp.regularization as reg

    run, before = earlier_run
    real = reg.ratio_loss
    monkeypatch.setattr(reg, "ratio_loss", lambda ratio, target: real(ratio, target) * float("nan"))
    argv = prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--generator-every", "1", "--max-steps", "3")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "ratio_loss became nan at step 1" in err and "the earlier run in" in err
    assert snapshot(run) == before
    monkeypatch.undo()
    assert main(argv) == 0  # the same run, healthy: it replaces the earlier one
    assert "max_steps: 3" in (run / "config.yaml").read_text()
    assert json.loads((run / "report.json").read_text())["config"]["max_steps"] == 3
    assert not list(run.glob(".replaced-run-*"))


def test_a_run_killed_while_replacing_is_rolled_back_by_the_next_run(earlier_run, tiny_model_dir, train_file,
                                                                      capsys):
    run, before = earlier_run
    argv = prune_argv(tiny_model_dir, train_file, run, "--overwrite", "--max-steps", "2000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "atp.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 300
    while not (list(run.glob(".replaced-run-*")) and (run / "config.yaml").exists()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it replaced the earlier one"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert "max_steps: 2000" in (run / "config.yaml").read_text() and not (run / "model").exists()
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 2  # no --overwrite: the restored run is kept
    err = capsys.readouterr().err
    assert f"restored the run in {run} that an interrupted run (process {proc.pid}) was replacing" in err
    assert "already exists and is not empty" in err
    assert snapshot(run) == before


def test_demo_follows_the_overwrite_rule(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["demo", "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "2", "--max-length", "32",
            "--limit", "1"]
    assert main(argv) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(argv + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "demo_results.json").exists()
    assert main(argv) == 2  # a finished demo is not replaced without --overwrite either


# ----------------------------------------------------------------------------- config value types

@pytest.mark.parametrize("yaml_text, message", [
    ("prune: 'false'", "prune in config file {path} must be true or false, got 'false' (a string; write it without "
                       "quotes)"),
    ("max_steps: 2.5", "max_steps in config file {path} must be a whole number, got 2.5"),
    ("lr: 1e-4", "lr in config file {path} must be a finite number, got '1e-4' (a string: YAML reads 1e-4 as text; "
                 "write 1.0e-4)"),
    ("alpha: .inf", "alpha in config file {path} must be a finite number, got inf"),
    ("train_files: pubmedqa=data.jsonl", "train_files in config file {path} must be a list of strings such as [a, b], "
                                         "got 'pubmedqa=data.jsonl' (a single string; write [pubmedqa=data.jsonl])"),
    ("lora_targets: q_proj", "lora_targets in config file {path} must be a list of strings"),
    ("calib_max_length: '16'", "calib_max_length in config file {path} must be a whole number or null"),
    ("seed: -1", "--seed must be a whole number from 0 to 4294967295, got -1"),
    ("mixed_precision: fp32", "--mixed-precision must be one of no, bf16, fp16, got 'fp32'"),
    ("train_files: [pubmedqa]", "--train-file takes TASK=PATH (e.g. pubmedqa=data.jsonl), got 'pubmedqa'"),
])
def test_yaml_config_values_are_type_checked(yaml_text, message, tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text + "\n")
    assert main(["prune", "--config", str(path), "--model", str(tiny_model_dir), "--out", str(tmp_path / "r")]) == 2
    assert f"atp: error: {message.format(path=path)}" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_overwrite_false_as_a_string_keeps_the_earlier_run(earlier_run, tiny_model_dir, train_file, tmp_path, capsys):
    run, before = earlier_run
    path = tmp_path / "run.yaml"
    path.write_text("overwrite: 'false'\n")
    assert main(prune_argv(tiny_model_dir, train_file, run, "--config", str(path))) == 2
    assert "overwrite in config file" in capsys.readouterr().err
    assert snapshot(run) == before


def test_python_api_values_are_type_checked():
    from atp.config import ATPConfig

    for values, message in [({"prune": "false"}, "--prune must be true or false, got 'false'"),
                            ({"sparsity": "0.4"}, "--sparsity must be a finite number, got '0.4'"),
                            ({"space": "heads"}, "--space must be a list of strings"),
                            ({"max_steps": True}, "--max-steps must be a whole number, got True"),
                            ({"lora_targets": []}, "--lora-targets must be a non-empty list of module names")]:
        with pytest.raises(ATPError, match=re.escape(message)):
            ATPConfig(**values).validate()


# ----------------------------------------------------------------------------- non-finite values

@pytest.mark.parametrize("flag", ["--alpha", "--lam", "--lr", "--generator-lr", "--check-tolerance", "--temperature",
                                  "--offset", "--generator-clip"])
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_float_options_are_refused(flag, value, tiny_model_dir, train_file, tmp_path, capsys):
    assert main(prune_argv(tiny_model_dir, train_file, tmp_path / "run", flag, value)) == 2
    assert f"atp: error: {flag} must be a finite number, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_weighted_loss_is_checked_not_only_its_terms(tiny_model_dir, train_file, tmp_path, capsys):
    # alpha 1e39 is a finite float, but inf in float32: alpha * ratio loss is not finite though both terms are
    argv = prune_argv(tiny_model_dir, train_file, tmp_path / "run", "--alpha", "1e39", "--generator-every", "1")
    assert main(argv) == 2
    assert re.search(r"atp: error: generator_loss became (nan|inf) at step 1", capsys.readouterr().err)
    assert not (tmp_path / "run" / "model").exists()


def test_export_refuses_a_sparsity_far_from_the_target(tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    import atp.train

    # what a NaN generator gives: every gate closed (0 heads, 0 channels), while the logits check still passes
    monkeypatch.setattr(atp.train.PruneRecipe, "final_decisions",
                        lambda self: {k: torch.zeros_like(v) for k, v in self.space.full_gates().items()})
    assert main(prune_argv(tiny_model_dir, train_file, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert re.search(r"refusing to export: the pruned model has prunable sparsity 0\.9\d+, but the target is 0\.4 "
                     r"\(more than 0\.0\d+ apart\)", err), err
    assert not (tmp_path / "run" / "model").exists()


def test_sparsity_tolerance_is_005_unless_the_decisions_are_coarser():
    from transformers import LlamaConfig

    from atp.config import ATPConfig
    from atp.space import PruningSpace
    from atp.train import sparsity_tolerance

    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, head_dim=64)
    assert sparsity_tolerance(ATPConfig(), PruningSpace.from_config(smollm2, mlp_block=32)) == 0.05
    # the tiny test model in blocks of 32 channels: one block is 0.099 of the prunable parameters
    tiny = PruningSpace.from_config(tiny_model("llama").config, mlp_block=32)
    step = 32 * 48 * 3 / tiny.prunable_params()
    assert tiny.largest_step() == pytest.approx(step)
    assert sparsity_tolerance(ATPConfig(mlp_block=32), tiny) == pytest.approx(2 * step)
    assert sparsity_tolerance(ATPConfig(mlp_block=32, uniform=True), tiny) == pytest.approx(2 * 3 * step)


def test_logits_check_fails_on_non_finite_logits(tiny_model_dir, tokenizer):
    from atp.config import ATPConfig
    from atp.models import load_model
    from atp.space import HeadMLPSpace
    from atp.train import verify_export

    model, _ = load_model(str(tiny_model_dir))
    space = HeadMLPSpace.from_config(model.config, mlp_block=4)
    probe = tokenizer(["The patient was treated.", "The court held."], return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**probe).logits.float()
    verify_export(ATPConfig(prune=False), space, space.full_gates(), model, probe, reference, {}, tiny_model_dir)
    for bad in (float("inf"), float("nan")):
        poisoned = reference.clone()
        poisoned[0, 0, 0] = bad
        check = {}
        with pytest.raises(ATPError, match="the masked model's logits hold NaN or Inf values"):
            verify_export(ATPConfig(prune=False), space, space.full_gates(), model, probe, poisoned, check,
                          tiny_model_dir)
        assert check["passed"] is False


def test_nan_weights_stop_the_run_at_its_next_checkpoint(tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    import atp.train

    real = atp.train.PruneRecipe.lora_step

    def poisoned(self, step, new_decisions):
        real(self, step, new_decisions)
        if step == 2:
            lora = next(p for n, p in self.peft_model.named_parameters() if "lora_B" in n)
            with torch.no_grad():
                lora[0, 0] = float("nan")

    monkeypatch.setattr(atp.train.PruneRecipe, "lora_step", poisoned)
    run = tmp_path / "run"
    assert main(prune_argv(tiny_model_dir, train_file, run, "--save-every", "1", "--max-steps", "3")) == 2
    assert re.search(r"atp: error: refusing to save the checkpoint of step 2: LoRA weight \S*lora_B\S* holds NaN",
                     capsys.readouterr().err)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]
    checkpoint.verify(run / "checkpoints" / "step-000001")
    assert not (run / "model").exists()


# ----------------------------------------------------------------------------- resume and changed data

def test_resume_refuses_changed_training_data(tiny_model_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(prune_argv(tiny_model_dir, train_file, run, "--save-every", "1")) == 0
    manifest = json.loads((run / "checkpoints" / "step-000002" / "manifest.json").read_text())
    digest = hashlib.sha256(train_file.read_bytes()).hexdigest()
    assert manifest["data_sha256"] == {str(train_file): digest}
    assert json.loads((run / "report.json").read_text())["data_sha256"] == {str(train_file): digest}
    assert main(["prune", "--resume", str(run)]) == 0  # unchanged data resumes
    lines = train_file.read_text().splitlines()
    train_file.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # same rows, another order
    assert main(["prune", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {run}: the training data {train_file} changed (SHA-256 {digest[:12]}... then" in err


def test_domain_data_hashes_follow_the_files_not_the_folder(tmp_path, shared_data):
    import shutil

    from atp.config import ATPConfig, check_same_data, data_sha256, fingerprint

    copy = tmp_path / "data"
    shutil.copytree(shared_data / "healthcare", copy / "healthcare")
    cfg = ATPConfig(data_dir=str(copy))
    recorded = data_sha256(cfg)
    assert recorded == {name: hashlib.sha256((copy / name).read_bytes()).hexdigest()
                        for name in ("healthcare/pubmedqa_train.jsonl", "healthcare/hqs_train.jsonl")}
    check_same_data(recorded, ATPConfig(data_dir=str(shared_data)), "--resume r")  # same files, another folder
    assert fingerprint(cfg) == fingerprint(ATPConfig(data_dir=str(copy)))
    with open(copy / "healthcare" / "hqs_train.jsonl", "a") as f:
        f.write("\n")
    with pytest.raises(ATPError, match=r"--resume r: the training data healthcare/hqs_train\.jsonl changed"):
        check_same_data(recorded, cfg, "--resume r")


# ----------------------------------------------------------------------------- compare configs

@pytest.mark.parametrize("change, message", [
    ({"eval": {"limit": "x"}}, "eval: limit in {path} must be a number of examples per task (0: all), null, or a "
                               "mapping of domain (healthcare, legal) to one, got 'x'"),
    ({"eval": {"limit": {"healthcare": 2, "medical": 3}}}, "eval: limit in {path} must be"),
    ({"eval": {"limit": {"healthcare": -1}}}, "eval: limit in {path} must be"),
    ({"eval": {"batch_size": 0}}, "eval: batch_size in {path} must be a whole number of at least 1, got 0"),
    ({"eval": {"ppl_windows": 32}}, "eval: ppl_windows in {path} must be a list of window lengths"),
    ({"seeds": [-1]}, "{path}: cell healthcare dense-lora-seed-1: --seed must be a whole number from 0 to"),
    ({"train": {"max_steps": "3"}}, "max_steps in `train` of {path} must be a whole number, got '3'"),
    ({"train": {"lam": float("inf")}}, "lam in `train` of {path} must be a finite number, got inf"),
    ({"train": {"generator_frac": 2.0}}, "{path}: cell healthcare dense-lora-seed0: --generator-frac must be in "
                                         "[0, 1]"),
    ({"train": {"lora_targets": ["qkv", ""]}}, "{path}: cell healthcare dense-lora-seed0: --lora-targets must be a "
                                               "non-empty list of module names"),
    ({"variants": {"v": {"lora_mask": 1}}, "methods": ["v"]}, "lora_mask in variant 'v' of {path} must be a string"),
    ({"methods": "atp"}, "methods in {path} must be a list such as [atp, taylor], got 'atp'"),
    ({"data_dir": "MISSING_HQS"}, "{path}: domain healthcare needs {data}/healthcare/hqs_train.jsonl (task hqs), "
                                  "which is not there; check data_dir"),
])
def test_compare_dry_run_checks_what_the_run_will_use(change, message, tmp_path, shared_data, capsys):
    import yaml

    data = tmp_path / "data"
    (data / "healthcare").mkdir(parents=True)
    (data / "healthcare" / "pubmedqa_train.jsonl").write_text((shared_data / "healthcare" /
                                                               "pubmedqa_train.jsonl").read_text())
    config = {"out": str(tmp_path / "out"), "data_dir": str(shared_data), **change}
    if config["data_dir"] == "MISSING_HQS":
        config["data_dir"] = str(data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--dry-run"]) == 2
    assert f"atp: error: {message.format(path=path, data=data)}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a failed run and its rerun

def test_a_failed_run_does_not_block_its_rerun(tiny_model_dir, train_file, tmp_path, monkeypatch, capsys):
    import atp.regularization as reg

    run = tmp_path / "run"
    real = reg.ratio_loss
    monkeypatch.setattr(reg, "ratio_loss", lambda ratio, target: real(ratio, target) * float("nan"))
    argv = prune_argv(tiny_model_dir, train_file, run, "--generator-every", "1")
    assert main(argv) == 2
    assert "ratio_loss became nan at step 1" in capsys.readouterr().err
    assert not run.exists()  # the failed run leaves the folder as it found it: absent
    monkeypatch.undo()
    assert main(argv) == 0  # the corrected rerun, without --overwrite


def test_what_a_run_without_checkpoints_left_is_replaceable(tiny_model_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("max_steps: 2\n")  # e.g. an older atp, or a run killed before its checkpoint
    (run / "log.jsonl").write_text('{"step": 1}\n')
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 0
    assert f"replacing config.yaml, log.jsonl in {run}, left by a run that stopped before its first checkpoint" in \
        capsys.readouterr().err
    (run / "checkpoints").mkdir()  # a run with checkpoints (or a report, or a model) needs --overwrite
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 2
    assert "pass --overwrite" in capsys.readouterr().err
