"""A run does not depend on whether its model was prepared in the same process.
docs/reliability.md, "Reproducibility"."""
import random

import numpy as np
import torch

from atp.cli import main
from helpers import prune_argv, tiny_model

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
