"""Shared fixtures: a tiny model folder (tiny models themselves: helpers.py), a tokenizer trained here, the domain data
folder (../shared/data, or generated rows in its formats where it is absent) and the real_data marker."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from synthetic_data import FILES, write_synthetic_data

from helpers import FAMILIES, tiny_config, tiny_model  # noqa: F401 (test files may import them from here too)

# Tiny models gain nothing from threads, and oversubscribed cores make them far slower.
torch.set_num_threads(1)
# --mixed-precision auto (the default) reads the CPU's flags: the tests run fp32 on every machine, in this process and
# the atp processes they start, unless a test forces the flags (tests/test_precision.py forces each path).
os.environ.setdefault("ATP_CPU_FLAGS", "")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATP_DATA_DIR", REPO.parent / "shared" / "data"))

REAL_DATA = all((SHARED_DATA / name).exists() for name in FILES)


LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def pytest_configure(config):
    config.addinivalue_line("markers", "real_data: asserts what only the real ../shared/data gives (run where it "
                                       "exists, e.g. CI; `make test-real-data` selects these alone)")
    config.addinivalue_line("markers", "llamacpp: runs GGUF files in llama.cpp (the gguf extra, `make gguf`; "
                                       "`make test-gguf` selects these alone)")


def pytest_report_header(config):
    where = f"real domain data at {SHARED_DATA}" if REAL_DATA else \
        f"no real domain data at {SHARED_DATA}: generated rows stand in, real_data tests are deselected"
    runtime = "llama.cpp installed" if LLAMA_CPP else "llama.cpp not installed (`make gguf`): llamacpp tests are deselected"
    return [f"atp: {where}", f"atp: {runtime}"]


def pytest_collection_modifyitems(config, items):
    if not LLAMA_CPP and os.environ.get("ATP_REQUIRE_LLAMACPP") == "1":
        raise pytest.UsageError("ATP_REQUIRE_LLAMACPP=1 but llama_cpp is not importable: run `make gguf`")
    if not LLAMA_CPP:
        marked = [item for item in items if item.get_closest_marker("llamacpp")]
        if marked:
            items[:] = [item for item in items if not item.get_closest_marker("llamacpp")]
            config.hook.pytest_deselected(items=marked)
    if REAL_DATA:
        return
    marked = [item for item in items if item.get_closest_marker("real_data")]
    if marked and config.getoption("markexpr", "").strip() == "real_data":
        raise pytest.UsageError(f"-m real_data needs the real domain data, which is not at {SHARED_DATA} "
                                "(set ATP_DATA_DIR)")
    if marked:
        items[:] = [item for item in items if not item.get_closest_marker("real_data")]
        config.hook.pytest_deselected(items=marked)


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory) -> Path:
    """The domain data folder: ../shared/data (or $ATP_DATA_DIR) when present, else generated rows in the
    same files and public field formats (tests/synthetic_data.py)."""
    if REAL_DATA:
        return SHARED_DATA
    return write_synthetic_data(tmp_path_factory.mktemp("synthetic_data"))


@pytest.fixture
def train_file(tmp_path, shared_data):
    """60 PubMedQA rows as a JSONL file of their own."""
    rows = [json.loads(line) for line in open(shared_data / "healthcare" / "pubmedqa_train.jsonl")][:60]
    path = tmp_path / "pubmedqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, shared_data):
    """A small byte-level BPE tokenizer trained once on a few texts and PubMedQA rows, saved."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["The patient was treated with aspirin.", "The court held that the statute applies."] * 20
    path = shared_data / "healthcare" / "pubmedqa_train.jsonl"
    if path.exists():
        with open(path) as f:
            for _, line in zip(range(60), f):
                row = json.loads(line)
                texts.append(row["QUESTION"] + " " + " ".join(row["CONTEXTS"]))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir):
    """A fresh copy per test: calling a fast tokenizer with padding leaves padding state in its backend,
    which would leak into tokenizers that later tests save."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """Save a tiny llama + tokenizer as an HF folder and return its path."""
    model = tiny_model("llama", gqa=True)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def earlier_run(tiny_model_dir, train_file, tmp_path):
    """A finished `atp prune` run in tmp_path/run, and a snapshot of its files."""
    from atp.cli import main
    from helpers import prune_argv, snapshot

    run = tmp_path / "run"
    assert main(prune_argv(tiny_model_dir, train_file, run)) == 0
    before = snapshot(run)
    assert {"config.yaml", "report.json", "log.jsonl", "model/config.json"} <= set(before)
    return run, before
