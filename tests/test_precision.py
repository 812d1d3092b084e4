"""--mixed-precision auto (issue 33): bf16 only where the hardware has native bf16 matmuls and they measure faster."""
import json
from pathlib import Path

import pytest
import torch

from atp import precision
from atp.cli import main
from helpers import prune_argv

CPU = torch.device("cpu")


def never_measured(hidden, intermediate):
    raise AssertionError("the micro-benchmark ran on a CPU without native bf16")


@pytest.mark.parametrize("flags", [set(), {"avx2", "fma", "avx512f"}, {"avx512f", "avx512_vnni", "amx_tile"}])
def test_auto_never_picks_bf16_on_a_cpu_without_native_bf16(flags):
    choice = precision.choose("auto", CPU, 576, 1536, flags=flags, measure=never_measured)
    assert choice["mixed_precision"] == "no" and choice["cpu_bf16_flags"] == []
    assert "neither AMX nor AVX512-BF16" in choice["reason"]


@pytest.mark.parametrize("flags", [{"avx512_bf16"}, {"amx_bf16", "amx_tile"}])
@pytest.mark.parametrize("speedup, picked", [(3.5, "bf16"), (1.2, "bf16"), (1.1, "no"), (0.03, "no")])
def test_auto_picks_bf16_where_the_flags_exist_and_it_measures_faster(flags, speedup, picked):
    seen = {}

    def measure(hidden, intermediate):
        seen["shape"] = (hidden, intermediate)
        return speedup

    choice = precision.choose("auto", CPU, 576, 1536, flags=flags, measure=measure)
    assert choice["mixed_precision"] == picked and seen["shape"] == (576, 1536)
    assert choice["bf16_matmul_speedup"] == speedup and choice["cpu_bf16_flags"] == sorted(flags & {"avx512_bf16",
                                                                                                   "amx_bf16"})


def test_a_given_precision_is_used_as_given():
    for value in ("no", "bf16"):
        assert precision.choose(value, CPU, 8, 8, flags=set(), measure=never_measured)["mixed_precision"] == value


def test_the_micro_benchmark_and_the_flags_read_this_machine():
    assert precision.bf16_speedup(64, 128, tokens=32, repeats=1) > 0
    assert isinstance(precision.cpu_flags(), set) and precision.cpu_name()


@pytest.mark.parametrize("flags, speedup, picked", [(set(), None, "no"), ({"avx512_bf16"}, 2.0, "bf16")])
def test_prune_records_the_choice(flags, speedup, picked, tiny_model_dir, train_file, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "bf16_speedup", lambda h, i: speedup)
    run = tmp_path / "run"
    assert main(prune_argv(tiny_model_dir, train_file, run, "--mixed-precision", "auto")) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["precision"]["mixed_precision"] == picked and report["precision"]["requested"] == "auto"
    assert report["config"]["mixed_precision"] == "auto"


@pytest.mark.parametrize("forced, native", [("", []), ("avx2 fma", []), ("avx512_bf16", ["avx512_bf16"]),
                                            ("amx_bf16,avx512f", ["amx_bf16"])])
def test_atp_cpu_flags_forces_either_path(monkeypatch, forced, native):
    monkeypatch.setenv("ATP_CPU_FLAGS", forced)
    assert precision.cpu_flags() == set(forced.replace(",", " ").split())
    choice = precision.choose("auto", CPU, 576, 1536, measure=lambda h, i: 2.0 if native else never_measured(h, i))
    assert choice["cpu_bf16_flags"] == native
    assert choice["mixed_precision"] == ("bf16" if native else "no")


def test_without_atp_cpu_flags_the_cpu_is_read(monkeypatch):
    monkeypatch.delenv("ATP_CPU_FLAGS", raising=False)
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.partition(":")[2].split() for line in text.splitlines() if line.startswith("flags")), [])
    assert precision.cpu_flags() == set(flags)


def test_mlp_shape_reads_plain_per_layer_and_mlp_less_configs():
    from transformers import GPT2Config, LlamaConfig

    assert precision.mlp_shape(LlamaConfig(hidden_size=64, intermediate_size=176)) == (64, 176)
    assert precision.mlp_shape(GPT2Config(n_embd=32)) == (32, 128)  # no intermediate_size: 4 x hidden


def test_auto_reads_the_model_shape_only_to_time_it(monkeypatch):
    def unread():
        raise AssertionError("the model's shape was read on a CPU without native bf16")

    assert precision.choose("auto", CPU, unread, unread, flags=set())["mixed_precision"] == "no"
    assert precision.choose("auto", CPU, lambda: 64, lambda: 128, flags={"avx512_bf16"},
                            measure=lambda h, i: 1.5 if (h, i) == (64, 128) else 0.0)["mixed_precision"] == "bf16"


@pytest.mark.parametrize("forced, picked", [("avx512_bf16", "bf16"), ("avx2", "no")])
def test_several_processes_decide_by_the_flags_alone(monkeypatch, tmp_path, forced, picked):
    from atp.options import ATPConfig
    from atp.train import PruneRecipe

    monkeypatch.setenv("ATP_CPU_FLAGS", forced)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(precision, "bf16_speedup", lambda h, i: pytest.fail("timed with several processes"))
    recipe = PruneRecipe.__new__(PruneRecipe)
    recipe.cfg = ATPConfig(model=str(tmp_path / "no-model"), mixed_precision="auto")
    choice = recipe.choose_precision()
    assert choice["mixed_precision"] == picked and "bf16_matmul_speedup" not in choice
