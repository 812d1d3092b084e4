"""Bad input, class by class: data and config files, option values, config value types, numbers that are
not finite, data changed under --resume. Each gets a clear ATPError (or a clean `atp: error:` line from the
CLI) instead of a traceback or silently wrong output. docs/reliability.md lists them."""
import hashlib
import json
import re

import pytest
import torch

from atp import checkpoint, validation
from atp.cli import main
from atp.errors import ATPError
from atp.fsutil import read_yaml_mapping
from helpers import prune_argv, snapshot, tiny_model

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
    with pytest.raises(ATPError, match="--mixed-precision must be one of no, bf16, fp16, auto, got 'fp32'"):
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


# ----------------------------------------------------------------------------- config value types

@pytest.mark.parametrize("yaml_text, message", [
    ("prune: 'false'", "prune in config file {path} must be true or false, got 'false' (a string; write it without "
                       "quotes)"),
    ("max_steps: 2.5", "max_steps in config file {path} must be a whole number, got 2.5"),
    ("lr: 1e-4", "lr in config file {path} must be a finite number or null, got '1e-4' (a string: YAML reads 1e-4 "
                 "as text; write 1.0e-4)"),
    ("alpha: .inf", "alpha in config file {path} must be a finite number, got inf"),
    ("train_files: pubmedqa=data.jsonl", "train_files in config file {path} must be a list of strings such as [a, b], "
                                         "got 'pubmedqa=data.jsonl' (a single string; write [pubmedqa=data.jsonl])"),
    ("lora_targets: q_proj", "lora_targets in config file {path} must be a list of strings"),
    ("calib_max_length: '16'", "calib_max_length in config file {path} must be a whole number or null"),
    ("seed: -1", "--seed must be a whole number from 0 to 4294967295, got -1"),
    ("mixed_precision: fp32", "--mixed-precision must be one of no, bf16, fp16, auto, got 'fp32'"),
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
    from atp.options import ATPConfig

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
    # options a --recipe sets take null too (the recipe's value), and --lr (the model width's default)
    nullable = flag in ("--lam", "--generator-lr", "--temperature", "--generator-clip", "--lr")
    assert f"atp: error: {flag} must be a finite number{' or null' if nullable else ''}, got {value}" in \
        capsys.readouterr().err
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
    # (without compaction: a compacted run exports the model it trained, not these decisions)
    assert main(prune_argv(tiny_model_dir, train_file, tmp_path / "run", "--no-compact")) == 2
    err = capsys.readouterr().err
    assert re.search(r"refusing to export: the pruned model has prunable sparsity 0\.9\d+, but the target is 0\.4 "
                     r"\(more than 0\.0\d+ apart\)", err), err
    assert not (tmp_path / "run" / "model").exists()


def test_sparsity_tolerance_is_005_unless_the_decisions_are_coarser():
    from transformers import LlamaConfig

    from atp.options import ATPConfig
    from atp.space import PruningSpace
    from atp.verify import sparsity_tolerance

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
    from atp.models import load_model
    from atp.options import ATPConfig
    from atp.space import HeadMLPSpace
    from atp.verify import verify_export

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

    from atp.options import ATPConfig, check_same_data, data_sha256, fingerprint

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
