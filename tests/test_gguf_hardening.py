"""GGUF export under faults (issue 31): llama.cpp built without AMX, a llama.cpp crash in the export's check (a real
SIGSEGV of a real child process), `atp prune --gguf` problems refused before training, and the temp file of an
export killed with kill -9 removed by the next export of the same file."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from atp import gguf_export, llamacpp
from atp.cli import main
from atp.errors import ATPError
from atp.train import PruneRecipe
from helpers import tiny_model


def save_tiny(tmp_path, tokenizer):
    """A tiny Llama whose widths (hidden 64, head_dim 32, MLP 128) fit q8_0 / q4_0 blocks of 32."""
    model = tiny_model("llama", True, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       intermediate_size=128)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- llama.cpp's AMX backend ----

def test_amx_features_are_read_from_the_system_info():
    info = "CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 1 | AMX_BF16 = 0 | REPACK = 1 | "
    assert llamacpp.amx_features(info) == ["AMX_INT8"]
    assert llamacpp.amx_features(info.replace("AMX_INT8 = 1", "AMX_INT8 = 0")) == []


@pytest.mark.llamacpp
def test_llama_cpp_is_built_without_amx():
    pytest.importorskip("llama_cpp")
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert llamacpp.amx_features() == [], f"llama.cpp was built with AMX, which crashes q8_0 / q4_0 files: {info}"


# ---- the export's llama.cpp check runs in a child process ----

def test_a_crash_in_the_export_check_is_a_clear_error(tmp_path, tokenizer, monkeypatch, capsys):
    model = save_tiny(tmp_path, tokenizer)
    out = tmp_path / "m.gguf"
    monkeypatch.setenv(gguf_export.CRASH_HOOK, "1")  # the child segfaults (a real null read) where llama.cpp loads
    assert main(["export", "--model", str(model), "--gguf", str(out), "--gguf-type", "q8_0", "--check"]) == 2
    err = capsys.readouterr().err
    assert f"llama.cpp died of SIGSEGV while checking {out}" in err
    assert "was written and is kept" in err and "-mno-amx-int8" in err and "--no-check" in err
    assert out.stat().st_size > 0 and gguf_export.read_config(model)  # this process went on; the file is whole
    import gguf

    assert len(gguf.GGUFReader(str(out)).tensors) > 0


def test_an_illegal_instruction_in_the_export_check_names_a_build_for_another_cpu(tmp_path, tokenizer, monkeypatch,
                                                                                    capsys):
    model = save_tiny(tmp_path, tokenizer)
    out = tmp_path / "m.gguf"
    monkeypatch.setenv(gguf_export.CRASH_HOOK, "SIGILL")  # a real SIGILL of the child, as from a wheel built elsewhere
    assert main(["export", "--model", str(model), "--gguf", str(out), "--gguf-type", "f16", "--check"]) == 2
    err = capsys.readouterr().err
    assert f"llama.cpp died of SIGILL while checking {out}" in err
    assert "compiled for another CPU" in err and "rebuild it on this machine" in err and "-mno-amx" not in err
    assert out.stat().st_size > 0


@pytest.mark.llamacpp
def test_the_check_in_a_child_gives_the_same_numbers(tmp_path, tokenizer, capsys):
    pytest.importorskip("llama_cpp")
    model = save_tiny(tmp_path, tokenizer)
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(model), "--gguf", str(out), "--gguf-type", "q8_0", "--check"]) == 0
    in_process = gguf_export.check_against_transformers(model, out)
    assert gguf_export.check_in_child(model, out) == in_process
    assert (f"top-1 agreement {in_process['top1_agreement']:.3f}, max |logit diff| "
            f"{in_process['max_abs_logit_diff']:.3g}") in capsys.readouterr().out


def test_an_error_in_the_check_child_stays_an_atp_error(tmp_path, tokenizer):
    model = save_tiny(tmp_path, tokenizer)
    # llama.cpp's loader refuses the missing file (or, without llama.cpp, the install hint): the child's ATPError
    with pytest.raises(ATPError, match="no GGUF file at .*missing.gguf|llama-cpp-python"):
        gguf_export.check_in_child(model, tmp_path / "missing.gguf")


# ---- atp prune --gguf: problems refused before training ----

def prune_args(model, train_file, tmp_path, *extra):
    return ["prune", "--model", str(model), "--domain", "", "--train-file", f"pubmedqa={train_file}",
            "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2", "--max-length", "32",
            "--save-every", "0", *extra]


@pytest.fixture
def no_training(monkeypatch):
    def train_loop(self, first_step):
        raise AssertionError("training started")

    monkeypatch.setattr(PruneRecipe, "train_loop", train_loop)


def test_prune_refuses_an_existing_gguf_without_overwrite(tmp_path, tokenizer, train_file, no_training, capsys):
    model = save_tiny(tmp_path, tokenizer)
    target = tmp_path / "old.gguf"
    target.write_bytes(b"the user's model")
    assert main(prune_args(model, train_file, tmp_path, "--gguf", str(target))) == 2
    assert f"--gguf {target} already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert target.read_bytes() == b"the user's model" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,message", [
    ("under a file", "is a file, not a folder"),
    ("a folder", "is a folder; give a file name"),
    ("qk-dims", "--gguf cannot hold a model pruned with --space qk-dims"),
    ("mlp-block", "--gguf-type q8_0 stores rows in blocks of 32 values, but this run keeps MLP widths in steps of 8"),
    ("model width", "has hidden_size 48, head_dim 8, not multiples of 32"),
    ("family", "scales attention scores by 1/sqrt(query_pre_attn_scalar 16), and llama.cpp's gemma3 by 1/sqrt"),
])
def test_prune_gguf_problems_fail_before_training(case, message, tmp_path, tokenizer, train_file, no_training,
                                                   capsys):
    model = save_tiny(tmp_path, tokenizer)
    gguf = tmp_path / "m.gguf"
    extra = []
    if case == "under a file":
        (tmp_path / "afile").write_text("x")
        gguf = tmp_path / "afile" / "m.gguf"
    elif case == "a folder":
        gguf.mkdir()
    elif case == "qk-dims":
        extra = ["--space", "heads", "--space", "qk-dims"]
    elif case == "mlp-block":
        extra = ["--gguf-type", "q8_0", "--mlp-block", "8"]
    elif case in ("model width", "family"):
        model = tmp_path / "other"
        changes = {} if case == "model width" else {"query_pre_attn_scalar": 16}  # a Gemma 3 llama.cpp misreads
        tiny_model("llama" if case == "model width" else "gemma3_text", True, **changes).save_pretrained(model)
        tokenizer.save_pretrained(model)
        extra = ["--gguf-type", "q8_0", "--mlp-block", "32"] if case == "model width" else []
    assert main(prune_args(model, train_file, tmp_path, "--gguf", str(gguf), *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()


# ---- a GGUF export killed mid-write ----

KILLED_EXPORT = textwrap.dedent("""
    import sys, time
    import gguf
    from atp.gguf_export import export_gguf

    def stop_mid_write(self, **kwargs):  # header, metadata and tensor infos are written: wait to be killed
        self.write_ti_data_to_file()
        for f in self.fout:
            f.flush()
        print("writing", flush=True)
        time.sleep(600)

    gguf.GGUFWriter.write_tensors_to_file = stop_mid_write
    export_gguf(sys.argv[1], sys.argv[2], "f16")
""")


def test_a_killed_export_leaves_a_temp_that_the_next_export_removes(tmp_path, tokenizer, capsys):
    model = save_tiny(tmp_path, tokenizer)
    target = tmp_path / "out" / "m.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(model), str(target)], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        temps = list(target.parent.glob(".m.gguf.*"))
        assert [t.name.startswith(f".m.gguf.tmp-{child.pid}-") for t in temps] == [True]
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    leftover = temps[0]
    assert leftover.stat().st_size > 1000 and not target.exists()  # the partial GGUF, left by the killed process
    gguf_export.export_gguf(model, target, "f16")
    assert not leftover.exists() and sorted(p.name for p in target.parent.iterdir()) == ["m.gguf"]
    assert f"removed {leftover}, left by an interrupted write" in capsys.readouterr().err
