"""atp plan: the memory planner's parts add up, follow the options as they should, count what a real run holds,
and read every kind of model argument."""
import json

import pytest
import torch

from atp.cli import main
from atp.errors import ATPError
from atp.generator import DecisionGenerator
from atp.plan import GIB, PlanOptions, generator_params, load_config, plan_memory
from atp.space import PruningSpace
from conftest import REPO, tiny_config, tiny_model


def test_parts_add_up_and_follow_the_options():
    config = tiny_config("llama")
    plan = plan_memory(config, PlanOptions(device="cpu", mixed_precision="no"))
    assert plan.train_peak == sum(plan.parts.values()) and plan.peak == max(plan.train_peak, plan.export_peak)
    assert plan.parts["base_weights"] == plan.params * 4 == PruningSpace.from_config(config).total_params() * 4

    half = plan_memory(config, PlanOptions(mixed_precision="no", dtype="bf16"))
    assert half.parts["base_weights"] * 2 == plan.parts["base_weights"]

    nf4 = plan_memory(config, PlanOptions(mixed_precision="no", quantize_base="nf4"))
    space = PruningSpace.from_config(config)
    projections = 3 * (48 * 48 + 2 * 48 * 16 + 48 * 48 + 3 * 48 * 64)
    assert nf4.parts["base_weights"] == pytest.approx(projections * (0.5 + 1 / 64 + 4 / 16384)
                                                      + (space.total_params() - projections) * 4, abs=1)
    assert "dequant_buffer" in nf4.parts and "dequant_buffer" not in plan.parts
    int8 = plan_memory(config, PlanOptions(mixed_precision="no", quantize_base="int8"))
    assert nf4.parts["base_weights"] < int8.parts["base_weights"] < plan.parts["base_weights"]

    # FSDP shards the base weights over N (plus one gathered layer); DDP and the replicated LoRA state do not
    ddp = plan_memory(config, PlanOptions(mixed_precision="no", processes=4))
    fsdp = plan_memory(config, PlanOptions(mixed_precision="no", processes=4, sharding="fsdp"))
    assert ddp.parts["base_weights"] == plan.parts["base_weights"]
    assert fsdp.parts["base_weights"] == plan.parts["base_weights"] // 4
    assert fsdp.parts["gathered_layer"] == projections // 3 * 4
    for name in ("lora", "gradients", "optimizer_state", "generator", "activations"):
        assert fsdp.parts[name] == ddp.parts[name] == plan.parts[name]
    assert plan.parts["optimizer_state"] == 2 * plan.parts["gradients"] == 2 * plan.parts["lora"]

    # checkpointing keeps less; the micro-batch scales activations; no distillation, no buffers
    checkpointed = plan_memory(config, PlanOptions(mixed_precision="no", gradient_checkpointing=True))
    assert checkpointed.parts["activations"] < plan.parts["activations"]
    double = plan_memory(config, PlanOptions(mixed_precision="no", batch_size=8))
    assert double.parts["activations"] == 2 * plan.parts["activations"]
    assert "distillation" not in plan_memory(config, PlanOptions(mixed_precision="no", distill=0)).parts
    assert "generator" not in plan_memory(config, PlanOptions(mixed_precision="no", prune=False)).parts

    # auto, atp prune's default precision: bf16 activations on a GPU, fp32 (the larger of its choices) on a CPU
    auto_gpu, auto_cpu = plan_memory(config, PlanOptions()), plan_memory(config, PlanOptions(device="cpu"))
    assert auto_cpu.parts["activations"] == plan.parts["activations"]
    assert auto_gpu.parts["activations"] * 2 == plan.parts["activations"]
    bf16 = plan_memory(config, PlanOptions(mixed_precision="bf16"))
    assert bf16.parts["activations"] == auto_gpu.parts["activations"]


def test_counts_match_the_real_generator_and_lora():
    from peft import LoraConfig, get_peft_model

    config = tiny_config("llama")
    space = PruningSpace.from_config(config, mlp_block=4)
    generator = DecisionGenerator(space, hidden=16)
    assert generator_params(space, 16) == sum(p.numel() for p in generator.parameters())
    opts = PlanOptions(mlp_block=4, generator_hidden=16, lora_r=4)
    peft_model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=list(opts.lora_targets)))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert plan_memory(config, opts).parts["lora"] == 4 * lora


def test_activations_match_the_saved_tensors_of_a_real_step():
    """The per-layer count against what autograd actually keeps in a LoRA forward (sdpa, fp32), within 10%."""
    from peft import LoraConfig, get_peft_model

    config = tiny_config("llama", vocab_size=512)
    opts = PlanOptions(batch_size=2, max_length=32, lora_r=4, distill=0, prune=False, mixed_precision="no")
    model = tiny_model("llama", attn="sdpa")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=list(opts.lora_targets)))
    saved = {}

    def keep(tensor):
        if tensor.is_floating_point() and tensor.numel() > 64:  # not the parameters' small pieces
            saved[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(3, 512, (2, 32))
    weights = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        peft_model(input_ids=ids)
    measured = sum(size for (ptr, _), size in saved.items() if ptr not in weights)
    plan = plan_memory(config, opts)
    predicted = plan.parts["activations"]
    assert abs(predicted - measured) / measured < 0.1, (predicted, measured)


def test_model_arguments_and_cli(tmp_path, tiny_model_dir, capsys):
    for where in (tiny_model_dir, tiny_model_dir / "config.json"):
        assert load_config(str(where)).hidden_size == 48
    assert main(["plan", "--model", str(REPO / "benchmarks" / "configs" / "llama-3-8b.json"), "--dtype", "bf16",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert 8.0e9 < plan["params"] < 8.1e9  # Llama-3-8B's published size
    assert plan["parts"]["base_weights"] == plan["params"] * 2
    assert main(["plan", "--model", str(REPO / "benchmarks" / "configs" / "llama-3-70b.json"), "--dtype", "bf16",
                 "--processes", "8", "--sharding", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "70.6B parameters" in out and "per process" in out
    assert main(["plan", "--model", str(REPO / "benchmarks" / "configs" / "llama-3-70b.json"), "--quantize-base",
                 "nf4", "--processes", "2", "--sharding", "fsdp"]) == 2
    assert "atp refuses it" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ATPError, match="no model_type"):
        load_config(str(bad))
    assert main(["plan", "--model", str(tiny_model_dir), "--quantize-base", "nf3"]) == 2
    assert "--quantize-base must be one of none, nf4, int8" in capsys.readouterr().err
    assert plan["peak"] / GIB > 16
