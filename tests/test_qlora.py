"""--quantize-base nf4 / int8 (QLoRA base weights through bitsandbytes, on CPU here): the gate hooks, LoRA and
distillation run on the quantized layers; the export dequantizes, merges LoRA, slices and passes the logits check."""
import json

import pytest
import torch
from safetensors.torch import load_file

from atp.errors import ATPError
from atp.masking import GateController
from atp.options import ATPConfig
from atp.quantize import dequantize_and_merge, dequantized_weight, is_quantized, quantize_base
from atp.space import PruningSpace
from atp.train import train
from conftest import tiny_model


def cfg(model_dir, train_file, out, **kw):
    values = dict(model=str(model_dir), domain=None, train_files=[f"pubmedqa={train_file}"], out=str(out),
                  sparsity=0.4, mlp_block=4, max_steps=10, batch_size=4, max_length=64, generator_every=1,
                  generator_lr=3e-2, alpha=8.0, log_every=1, save_every=0, lr=1e-3, quantize_base="nf4")
    values.update(kw)
    return ATPConfig(**values)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_gates_and_lora_on_quantized_layers_match_the_dequantized_merge(kind):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert quantize_base(model, kind) == 3 * 7
    q = model.model.layers[0].self_attn.q_proj
    assert is_quantized(q) and q.weight.dtype == (torch.uint8 if kind == "nf4" else torch.int8)
    original = dense["model.layers.0.self_attn.q_proj.weight"]
    error = (dequantized_weight(q) - original).abs()
    assert 0 < float(error.mean()) < 0.25 * float(original.abs().mean())  # quantized, close (4 bits: ~17%)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "o_proj", "down_proj"]))
    assert "bnb" in type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__module__
    with torch.no_grad():  # LoRA B is zero at the start: give it something to merge
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    space = PruningSpace.from_config(model.config, mlp_block=4)
    gates = space.full_gates()
    gates["heads"][0, :3] = 0
    gates["mlp"][1, ::2] = 0
    ids = torch.tensor([[1, 17, 40, 99, 7, 250, 3, 8]])
    for mode in ("both", "frozen"):  # hooks on the LoRA wrapper, and on its bitsandbytes base_layer
        controller = GateController(peft_model, space, mode=mode)
        with torch.no_grad():
            open_, masked = peft_model(input_ids=ids).logits, None
            controller.set(gates)
            masked = peft_model(input_ids=ids).logits
        controller.remove()
        assert (masked - open_).abs().max() > 1e-3, mode  # the gates act on the quantized model
    controller = GateController(peft_model, space, mode="both")
    controller.set(gates)
    with torch.no_grad():
        reference = peft_model(input_ids=ids).logits
    controller.remove()
    merged = dequantize_and_merge(peft_model)
    assert not any(is_quantized(m) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    controller = GateController(merged, space, mode="both")
    controller.set(gates)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference, atol=1e-4)
    controller.remove()


def test_qlora_run_distills_exports_and_checks(tiny_model_dir, train_file, tmp_path):
    report = train(cfg(tiny_model_dir, train_file, tmp_path / "nf4"), progress=False)
    check = report["logits_check"]
    assert check["passed"] and check["quantize_base"] == "nf4" and check["max_abs_logit_diff"] <= check["allowed"]
    assert check["max_abs_logit_diff"] < 1e-4 and "float64_diff" not in check  # NF4: fp32 rounding only
    assert abs(report["prunable_sparsity"] - 0.4) <= 0.05
    log = [json.loads(line) for line in open(tmp_path / "nf4" / "log.jsonl")]
    assert all("kd_loss" in r for r in log) and max(r["kd_loss"] for r in log) > 0  # distillation ran on it
    exported = load_file(str(tmp_path / "nf4" / "model" / "model.safetensors"))
    dense = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(exported["model.embed_tokens.weight"], dense["model.embed_tokens.weight"])  # not quantized
    assert all(t.dtype == torch.float32 for t in exported.values())
    # the same run without quantization exports other weights (LoRA trained on another base)
    plain = train(cfg(tiny_model_dir, train_file, tmp_path / "fp32", quantize_base="none"), progress=False)
    assert plain["logits_check"]["passed"]
    other = load_file(str(tmp_path / "fp32" / "model" / "model.safetensors"))
    layer = "model.layers.0.self_attn.o_proj.weight"
    if exported[layer].shape == other[layer].shape:
        assert not torch.allclose(exported[layer], other[layer], atol=1e-4)


@pytest.mark.parametrize("values, message", [
    ({"quantize_base": "nf2"}, "--quantize-base must be one of none, nf4, int8"),
    ({"recovery": "full"}, "--recovery full trains the base weights"),
    ({"method": "magnitude"}, "--method magnitude scores the dense base weights"),
])
def test_options_quantization_cannot_go_with(tmp_path, values, message):
    with pytest.raises(ATPError, match=message):
        cfg("m", "f", tmp_path / "x", **values).validate()


def test_int8_run_checks_against_its_own_tolerance(tiny_model_dir, train_file, tmp_path):
    """LLM.int8 quantizes activations too: the check allows 5% of the largest logit, recorded in report.json,
    and does not fall back to the float64 recheck (which would not see the quantized reference)."""
    report = train(cfg(tiny_model_dir, train_file, tmp_path / "int8", quantize_base="int8", max_steps=6),
                   progress=False)
    check = json.loads((tmp_path / "int8" / "report.json").read_text())["logits_check"]
    assert check == report["logits_check"] and check["passed"] and "float64_diff" not in check
    assert check["tolerance"] == 5e-2
    assert 1e-3 * check["max_abs_logit"] < check["max_abs_logit_diff"] <= check["allowed"]
