"""Helpers shared by the test files (fixtures live in conftest.py). Test files import from here, never from
each other."""
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from atp.arch import ARCHS
from atp.kinds import KINDS

# ----------------------------------------------------------------------------- tiny models

FAMILIES = list(ARCHS)  # every family in atp's architecture table
EXTRA = {  # per family, beyond the shared tiny sizes
    "mistral": {"sliding_window": None},
    # every other layer slides over 4 tokens, so that sliding and global layers differ on 12-token inputs
    "gemma3_text": {"sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 8},
}
# Gemma3-270M's attention shape, scaled down: 4 query heads over 1 KV head, head_dim 16 with hidden 48
GEMMA_SHAPE = {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 16}


def tiny_config(family: str = "llama", gqa: bool = True, vocab_size: int = 512, **overrides):
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2 if gqa else 6,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(EXTRA.get(family, {}))
    kwargs.update(overrides)
    return ARCHS[family].config_cls()(**kwargs)


def tiny_model(family: str = "llama", gqa: bool = True, seed: int = 0, attn: str = "eager", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, gqa, **overrides)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is small; widen it so that pruning differences are visible in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1 and p.abs().sum() > 0 and not torch.all(p == 1):
                p.normal_(0, 0.05)
    return model.eval()


def model_for(family, overrides=None, attn="eager", layers=5):
    """A tiny model whose norms are not all ones, so that a lost or misplaced norm shows."""
    model = tiny_model(family, True, attn=attn, num_hidden_layers=layers, **(overrides or {}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tiny(family="llama", **kw):
    """The GGUF tests' tiny model: head_dim 32 and hidden 64, so that q8_0 / q4_0 blocks of 32 fit every row."""
    values = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=32, intermediate_size=128)
    if family == "gemma3_text":  # llama.cpp's gemma3 scales attention by 1/sqrt(head_dim)
        values["query_pre_attn_scalar"] = 32
    values.update(kw)
    return tiny_model(family, True, **values)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0))
    with torch.no_grad():  # non-zero B so that the LoRA path matters
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return peft_model


# ----------------------------------------------------------------------------- inputs

def ids(n=2, length=12, vocab=512, seed=1):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def lm_batches(tokenizer, n=2):
    texts = ["The patient was treated with aspirin and recovered after two weeks of care.",
             "Does the court hold that the statute applies to the appeal of the defendant?",
             "Mitochondrial function in the heart declines with age in most of the patients.",
             "The randomized trial compared two doses of the drug in adults with asthma."]
    out = []
    for i in range(n):
        batch = tokenizer(texts[2 * i: 2 * i + 2], return_tensors="pt", padding=True)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out.append(dict(batch))
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- gates

def random_gates(space, seed=0, keep=0.6):
    g = torch.Generator().manual_seed(seed)
    gates = {k: (torch.rand(shape, generator=g) < keep).float() for k, shape in space.gate_shapes.items()}
    gates["heads"][0] = 1.0  # one full layer
    gates["heads"][1, : space.heads_per_kv] = 0.0  # a whole KV group gone
    return gates


def block_gates(space, seed=0):
    """Random head and channel gates (of every kind, selected or not) on 5 layers: layer 0 without attention
    (the first layer, whose cache would track the length), layer 1 without either block, layer 2 without its
    MLP, layer 3 with its attention block kept but none of its heads (so the block goes too), layer 4 whole."""
    gates = random_gates(dataclasses.replace(space, kinds=["heads", "mlp", "blocks"]), seed=seed)
    gates["blocks"] = torch.ones(space.num_layers, 2)
    gates["blocks"][0, 0] = 0
    gates["blocks"][1] = 0
    gates["blocks"][2, 1] = 0
    gates["heads"][3] = 0
    gates["heads"][4] = 1
    return gates


def heterogeneous_gates(space):
    """Uneven heads and channels on the GGUF tests' tiny model (3 layers of 8 heads over 2 KV heads)."""
    gates = space.full_gates()
    gates["heads"][0, [5, 7]] = 0        # groups of 4 and 2: uneven
    gates["heads"][1, [0, 1, 2, 3, 5]] = 0  # one group of 3
    gates["mlp"][1, :] = 0               # attention but no MLP
    gates["heads"][2, :] = 0             # no attention
    gates["mlp"][2, 1:3] = 0
    return gates


# ----------------------------------------------------------------------------- masked forward and references

def masked_logits(model, space, gates, x):
    """Logits of the model under the gates; the hooks are removed afterwards."""
    from atp.masking import GateController

    ctl = GateController(model, space)
    ctl.set(gates)
    with torch.no_grad():
        logits = model(x).logits
    ctl.remove()
    return logits


def logits_under(model, space, gates, x, mode):
    from atp.masking import GateController

    ctl = GateController(model, space, mode=mode)
    ctl.set(gates)
    with torch.no_grad():
        logits = model(x).logits
    ctl.remove()
    return logits


def _base(module):
    return getattr(module, "base_layer", module)


def frozen_removed(model, space, gates, output_only=False):
    """A copy whose FROZEN weights of pruned structures are zero (LoRA untouched), built by hand:
    rows (and biases) of q per head, k/v per fully pruned KV head, gate/up per channel; columns of o and down."""
    from atp.masking import decoder_layers

    model = copy.deepcopy(model)
    hd = space.head_dim
    with torch.no_grad():
        for index, layer in enumerate(decoder_layers(model)):
            attn, mlp = layer.self_attn, layer.mlp
            heads = gates["heads"][index]
            kv = KINDS["heads"].kv_gates(space, heads)
            channels = KINDS["mlp"].channel_mask(space, gates["mlp"][index])
            for h in torch.nonzero(heads == 0).flatten().tolist():
                _base(attn.o_proj).weight[:, h * hd:(h + 1) * hd] = 0
                if not output_only:
                    _base(attn.q_proj).weight[h * hd:(h + 1) * hd] = 0
                    if _base(attn.q_proj).bias is not None:
                        _base(attn.q_proj).bias[h * hd:(h + 1) * hd] = 0
            for c in torch.nonzero(channels == 0).flatten().tolist():
                _base(mlp.down_proj).weight[:, c] = 0
                if not output_only:
                    _base(mlp.gate_proj).weight[c] = 0
                    _base(mlp.up_proj).weight[c] = 0
            if output_only:
                continue
            for g in torch.nonzero(kv == 0).flatten().tolist():
                for proj in (attn.k_proj, attn.v_proj):
                    _base(proj).weight[g * hd:(g + 1) * hd] = 0
                    if _base(proj).bias is not None:
                        _base(proj).bias[g * hd:(g + 1) * hd] = 0
    return model


# ----------------------------------------------------------------------------- counts and exports

def block_of(arch, rest) -> int:
    """0 for a parameter of a layer's attention block (its norms included), 1 for one of its MLP block."""
    if rest.startswith(arch.attention + ".") or rest.split(".")[0] in arch.attention_norms:
        return 0
    return 1


def independent_count(model, space, gates) -> int:
    """Parameters left, from the dense model's parameter names and shapes and the gates (of every kind) alone: a
    removed block (or, in a space with blocks, one with no heads / channels left) loses everything under it and
    its norms; a kept block loses the rows / columns of pruned query heads, fully pruned KV heads and channels."""
    arch, config = space.arch, model.config
    total = 0
    for name, p in model.named_parameters():
        if not name.startswith(arch.layers + "."):
            total += p.numel()
            continue
        index, rest = name[len(arch.layers) + 1:].split(".", 1)
        layer = int(index)
        heads = gates["heads"][layer]
        per_kv = config.num_attention_heads // config.num_key_value_heads
        kv = heads.view(config.num_key_value_heads, per_kv).amax(1)
        channels = gates["mlp"][layer].repeat_interleave(space.mlp_block)[:config.intermediate_size]
        left = (heads, channels)[block_of(arch, rest)]  # with blocks, a block with nothing left goes as a whole
        if gates["blocks"][layer, block_of(arch, rest)] == 0 or ("blocks" in space.kinds and left.sum() == 0):
            continue
        kept = {f"{arch.path('q')}.weight": heads.mean(), f"{arch.path('q')}.bias": heads.mean(),
                f"{arch.path('k')}.weight": kv.mean(), f"{arch.path('k')}.bias": kv.mean(),
                f"{arch.path('v')}.weight": kv.mean(), f"{arch.path('v')}.bias": kv.mean(),
                f"{arch.path('o')}.weight": heads.mean(),
                f"{arch.path('gate')}.weight": channels.mean(), f"{arch.path('gate')}.bias": channels.mean(),
                f"{arch.path('up')}.weight": channels.mean(), f"{arch.path('up')}.bias": channels.mean(),
                f"{arch.path('down')}.weight": channels.mean()}
        total += round(p.numel() * float(kept.get(rest, 1.0)))
    return total


def close(actual, masked):
    """fp32 rounding grows with the logits (Gemma's scaled embedding and 1 + weight norms make them larger)."""
    torch.testing.assert_close(actual, masked, rtol=0, atol=1e-5 * max(1.0, float(masked.abs().max())))


def stored(path) -> dict:
    """Tensor name -> shape in a folder's model.safetensors, read from its header."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


LOAD_WITHOUT_ATP = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    path, data = sys.argv[1], load_file(sys.argv[2])
    for attn in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation=attn).eval()
        with torch.no_grad():
            diff = (model(data["ids"]).logits - data["logits"]).abs().max().item()
        assert diff < 1e-5, (attn, diff)
    prompt = data["ids"][:1, :5]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = prompt
        for _ in range(6):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq), (cached, seq)
    from peft import LoraConfig, get_peft_model
    tuned = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"]))
    tuned.train()
    tuned(data["ids"], labels=data["ids"]).loss.backward()
    assert any(p.grad is not None for n, p in tuned.named_parameters() if "lora_" in n)
    assert "atp" not in sys.modules, "atp was imported"
    print("ok")
""")


def assert_loads_without_atp(out, x, masked, tmp_path) -> None:
    """In a fresh interpreter without atp on the path, the export at `out` (remote code) gives `masked` on `x`,
    with eager and sdpa attention and with cached generation."""
    from safetensors.torch import save_file

    save_file({"ids": x, "logits": masked}, str(tmp_path / "ref.safetensors"))
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITHOUT_ATP)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "ref.safetensors")],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ----------------------------------------------------------------------------- GGUF and llama.cpp

GGUF_TEXTS = ["The patient was treated with aspirin 325 mg twice daily.",
              "The court held that the statute applies; see 42 U.S.C. § 1983.\nIt's  done — isn't it?",
              "Résumé: naïve café, 1234567 tokens, <s> and </s> inline."]
# f32 weights and an f32 KV cache: llama.cpp and transformers differ by float rounding only (about 1e-6 here)
F32_BOUND = 1e-4


def read_gguf(path):
    """A GGUF file's metadata fields, and tensor name -> (shape, type name)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors}


def llama_cpp_runtime():
    return pytest.importorskip("llama_cpp",
                               reason="the gguf extra (llama-cpp-python) is not installed; make test installs it")


def prompt_ids(tokenizer, n=48):
    ids = tokenizer(" ".join(GGUF_TEXTS), add_special_tokens=False)["input_ids"]
    return ids[:n]


def compare(model, gguf_path, ids):
    """llama.cpp's agreement with transformers on `ids`, and the loaded llama.cpp model."""
    from atp import llamacpp

    llm = llamacpp.load(gguf_path, n_ctx=128, f32_cache=True)
    return llamacpp.agreement(llamacpp.hf_logits(model, ids), llamacpp.logits(llm, ids)), llm


# ----------------------------------------------------------------------------- runs, checkpoints and processes

def cfg_for(model_dir, train_file, out, **kw):
    """A 4-step ATP config at sparsity 0.4 on a PubMedQA file, the generator every step."""
    from atp.options import ATPConfig

    values = dict(model=str(model_dir), domain=None, train_files=[f"pubmedqa={train_file}"], out=str(out),
                  sparsity=0.4, mlp_block=1, max_steps=4, batch_size=2, max_length=64, generator_every=1,
                  generator_frac=0.75, generator_lr=3e-2, alpha=8.0, log_every=2, save_every=0, lr=1e-3,
                  calib_batches=2)
    values.update(kw)
    return ATPConfig(**values)


def short_cfg(model_dir, train_file, out, **kw):
    """An 8-step ATP config on a PubMedQA file in MLP blocks of 4, the generator every step."""
    from atp.options import ATPConfig

    return ATPConfig(model=str(model_dir), domain=None, train_files=[f"pubmedqa={train_file}"], out=str(out),
                     max_steps=8, batch_size=2, max_length=48, mlp_block=4, generator_every=1, generator_lr=3e-2,
                     alpha=8.0, save_every=0, **kw)


def prune_argv(model_dir, train_file, out, *extra):
    """`atp prune` on a tiny model folder and a PubMedQA file: two short steps, no checkpoints."""
    return ["prune", "--model", str(model_dir), "--domain", "", "--train-file", f"pubmedqa={train_file}",
            "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--max-length", "48", "--mlp-block", "4",
            "--save-every", "0", *extra]


def small_checkpoint_parts():
    """What a checkpoint holds, for a tiny Llama: (LoRA model, generator, optimizers, schedule)."""
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
    from atp import checkpoint

    peft_model, generator, optimizers, schedule = parts
    run_dir.mkdir(parents=True, exist_ok=True)  # a run's folder exists before its first checkpoint
    return checkpoint.save(run_dir, step, peft_model, generator, optimizers, schedule, "fp", keep=5)


def dead_pid() -> int:
    """The PID of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def snapshot(folder) -> dict:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupted_copy(finished, where, after: int):
    """A copy of a finished run folder as if killed right after its checkpoint of step `after`: the later checkpoints,
    the model and report.json gone. For --resume tests."""
    shutil.copytree(finished, where)
    for later in (where / "checkpoints").glob("step-*"):
        if int(later.name[5:]) > after:
            shutil.rmtree(later)
    shutil.rmtree(where / "model")
    (where / "report.json").unlink()
    return where
