"""Compaction (issue 33): once decisions are fixed, the trained model, its LoRA and the LoRA optimizer's state lose
the pruned structures; the loss, the gradients of every kept entry and the next optimizer step are the masked
model's, and a run resumes across the compaction bit for bit."""
import json

import pytest
import torch
from safetensors.torch import load_file

from atp.cli import main
from atp.compaction import compact, compact_optimizer
from atp.masking import GateController
from atp.space import PruningSpace
from helpers import interrupted_copy, prune_argv, tiny_model

SPACES = {"heads+mlp": ["heads", "mlp"], "blocks": ["blocks", "heads", "mlp"], "hidden": ["hidden", "heads", "mlp"],
          "qk-dims": ["heads", "qk-dims", "mlp"]}


def with_lora(model, seed=1):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():  # B starts at zero; give every factor a value, so that slicing mistakes show
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return peft_model


def random_gates(space, seed=3):
    generator = torch.Generator().manual_seed(seed)
    gates = {k: (torch.rand(shape, generator=generator) > 0.35).float() for k, shape in space.gate_shapes.items()}
    if "blocks" in gates:
        gates["blocks"][0] = 1  # leave something in the first layer
    if "hidden" in gates:
        gates["hidden"][0, 0] = 1
    return gates


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("space_name", list(SPACES))
def test_compact_model_has_the_masked_loss_gradients_and_next_step(family, space_name):
    extra = {"hidden_block": 8} if space_name == "hidden" else {"qk_block": 1} if space_name == "qk-dims" else {}
    peft_model = with_lora(tiny_model(family, True))
    space = PruningSpace.from_config(peft_model.config, mlp_block=4, kinds=SPACES[space_name], **extra)
    if not space.exact:
        pytest.skip(f"{space_name} is not exact for {family}: it is never compacted")
    gates = random_gates(space)
    controller = GateController(peft_model, space, mode="both")
    controller.set(gates)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    loss_and_grads(peft_model, ids)  # one step, so that the optimizer has moments to carry over
    optimizer.step()
    masked_loss, masked_grads = loss_and_grads(peft_model, ids)
    names = {p: n for n, p in peft_model.named_parameters()}
    small, dense, mapping = compact(peft_model, space.kept_structure(gates), lambda m: None)
    controller.remove()
    new_optimizer = compact_optimizer(optimizer, mapping, lambda params: torch.optim.AdamW(params, lr=1e-2))
    compact_loss, compact_grads = loss_and_grads(small, ids)
    assert torch.allclose(compact_loss, masked_loss, atol=1e-5), (compact_loss, masked_loss)
    new_names = {p: n for n, p in small.named_parameters()}
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in dense.parameters())
    for param, (old, slicer) in mapping.items():
        expected = slicer(masked_grads[names[old]])
        assert torch.allclose(compact_grads[new_names[param]], expected, atol=1e-5), new_names[param]
        # the next AdamW step gets the same gradients in both models (equal within float noise, just checked), so
        # that only the carried-over moments can differ; Adam divides by their root, which turns 1e-5 of gradient
        # noise into up to lr on a near-zero gradient
        param.grad = expected.clone()
    # the next AdamW step moves every kept entry as it would have moved in the masked model
    for p in (p for p in peft_model.parameters() if p.grad is not None):
        p.grad = masked_grads[names[p]]
    optimizer.step()
    new_optimizer.step()
    for param, (old, slicer) in mapping.items():
        assert torch.allclose(param, slicer(old.detach()), atol=1e-6), new_names[param]


def run_argv(model_dir, train_file, out, *extra):
    return prune_argv(model_dir, train_file, out, "--max-steps", "8", "--generator-every", "1", "--save-every", "1",
                      "--keep-checkpoints", "20", "--distill", "0.5", *extra)


def weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.parametrize("method, recovery", [("atp", "lora"), ("taylor", "lora"), ("atp", "full")])
def test_runs_compact_and_resume_across_the_compaction_bit_for_bit(method, recovery, tiny_model_dir, train_file,
                                                                   tmp_path, capsys):
    whole = tmp_path / "whole"
    assert main(run_argv(tiny_model_dir, train_file, whole, "--method", method, "--recovery", recovery)) == 0
    report = json.loads((whole / "report.json").read_text())
    step = report["compaction"]["step"]
    assert step == (0 if method == "taylor" else 4)  # generator_frac 0.6 of 8 steps: the freeze at step 4
    assert report["compaction"]["base_params_after"] < report["compaction"]["base_params_before"]
    assert report["compaction"].get("max_abs_logit_diff", 0) <= report["compaction"].get("allowed", 1)
    assert report["logits_check"]["passed"] and report["pruned_lora_group_norm_sum"] == 0
    reference = weights(whole)
    for resume_after in sorted({max(step - 1, 1), step + 1}):  # one checkpoint before the compaction, one after
        run = interrupted_copy(whole, tmp_path / f"from-{resume_after}", resume_after)
        assert main(["prune", "--resume", str(run)]) == 0
        resumed = weights(run)
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), resume_after


def test_no_compact_trains_the_masked_model_to_a_close_result(tiny_model_dir, train_file, tmp_path):
    runs = {}
    for flag in ("--compact", "--no-compact"):
        run = tmp_path / flag
        assert main(run_argv(tiny_model_dir, train_file, run, flag)) == 0
        runs[flag] = json.loads((run / "report.json").read_text())
    assert "compaction" in runs["--compact"] and "compaction" not in runs["--no-compact"]
    assert runs["--compact"]["exported_params"] == runs["--no-compact"]["exported_params"]
    a, b = weights(tmp_path / "--compact"), weights(tmp_path / "--no-compact")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_compaction_under_bf16_autocast_checks_in_fp32(tiny_model_dir, train_file, tmp_path, recwarn):
    """The check compares fp32 logits even when training runs under bf16 autocast (was: both sides in bf16, and
    the rounding of two differently shaped models failed it on SmolLM2)."""
    run = tmp_path / "run"
    assert main(run_argv(tiny_model_dir, train_file, run, "--mixed-precision", "bf16", "--save-every", "0")) == 0
    compaction = json.loads((run / "report.json").read_text())["compaction"]
    assert compaction["max_abs_logit_diff"] < 1e-4 * max(1.0, compaction["allowed"] / 1e-3)
    assert compaction["mean_lora_step_seconds_compact"] > 0 and compaction["mean_lora_step_seconds_masked"] > 0
    assert not [w for w in recwarn if "base_model_name_or_path" in str(w.message)]  # peft's bookkeeping kept
