"""--packing: whole examples packed into rows of exactly max_length tokens, positions restarting at each example,
no attention across examples; the loss equals the sum of the examples' losses unpacked."""
import contextlib
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from atp.batching import batches, check_packing
from atp.data import Example, collate, collate_packed, pack, tokenize_example
from atp.distill import SelfTeacher
from atp.errors import ATPError
from atp.options import ATPConfig
from atp.train import train
from helpers import FAMILIES, tiny_model


def single_token_words(tokenizer, n=40):
    """Words that are one token each (after a space) in this tokenizer, whichever texts it was trained on, so the
    examples' lengths in tokens, and so the padding figures below, do not depend on the tokenizer."""
    words = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 3)
    words = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1][:n]
    assert len(words) >= 10, f"the test tokenizer has too few whole words: {words}"
    return words


def short_examples(words, n=24, seed=0):
    """Prompts of 2-14 words and responses of 1-8: about 12 to 32 tokens each."""
    rng = random.Random(seed)
    return [Example(f"Question: {' '.join(rng.choices(words, k=rng.randint(2, 14)))}\nSummary:",
                    " " + " ".join(rng.choices(words, k=rng.randint(1, 8)))) for _ in range(n)]


@pytest.fixture
def short_file(tmp_path, tokenizer):
    """A summarization file (task hqs) of short records of varied lengths."""
    rng = random.Random(1)
    words = single_token_words(tokenizer)
    path = tmp_path / "hqs.jsonl"
    path.write_text("".join(json.dumps({"CHQ": " ".join(rng.choices(words, k=rng.randint(1, 24))),
                                        "Summary": " ".join(rng.choices(words, k=rng.randint(1, 6)))}) + "\n"
                            for _ in range(80)))
    return path


def test_pack_keeps_examples_whole_and_in_first_fit_order():
    lengths = [5, 9, 3, 8, 2, 7, 10, 1, 6, 4]
    rows = list(pack(range(len(lengths)), lengths, 10, open_rows=3))
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each example once, never split
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    # first fit: 5+3+2 is full at example 4 and goes out; 10 fills a row of its own; 9+1 is full at example 7
    assert rows[:3] == [[0, 2, 4], [6], [1, 7]]
    assert list(pack(range(len(lengths)), lengths, 10, open_rows=3)) == rows  # deterministic
    # more open rows than allowed: the oldest goes out part-filled
    assert list(pack([0, 1, 2], [6, 6, 6], 10, open_rows=1)) == [[0], [1], [2]]
    with pytest.raises(ATPError, match="cannot pack an example of 11 tokens"):
        list(pack([0], [11], 10))


def tokenized(tokenizer, max_length=64, n=6):
    rows = [tokenize_example(tokenizer, e, max_length) for e in short_examples(single_token_words(tokenizer), n)]
    assert max(len(r["input_ids"]) for r in rows) < max_length  # none truncated
    return rows


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_sum_of_unpacked_losses(family, attn, tokenizer):
    model = tiny_model(family, attn=attn)
    rows = tokenized(tokenizer)
    lengths = [len(r["input_ids"]) for r in rows]
    assert any(label == -100 for r in rows for label in r["labels"])  # prompts carry no loss
    width = max(sum(lengths[:3]), sum(lengths[3:])) + 3  # two packed rows of 3 examples and some padding
    inputs, real = collate_packed([rows[:3], rows[3:]], tokenizer.pad_token_id, width)
    assert inputs["input_ids"].shape == (2, width) and "attention_mask" not in inputs
    assert int(real.sum()) == sum(lengths)
    tokens = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    with torch.no_grad():
        packed = model(**inputs, num_items_in_batch=tokens, use_cache=False)
        total, logits = 0.0, []
        for r in rows:  # each example alone, unpadded
            one = collate([r], tokenizer.pad_token_id)
            out = model(**one, use_cache=False)
            total += out.loss.double() * sum(label != -100 for label in r["labels"][1:])
            logits.append(out.logits[0])
    assert float(packed.loss) * tokens == pytest.approx(float(total), rel=1e-5)
    flat = torch.cat([packed.logits[0][real[0]], packed.logits[1][real[1]]])
    torch.testing.assert_close(flat, torch.cat(logits), rtol=1e-5, atol=1e-5)


def test_packed_gradients_equal_unpacked(tokenizer):
    model = tiny_model("llama", attn="sdpa")
    rows = tokenized(tokenizer, n=4)
    tokens = sum(sum(label != -100 for label in r["labels"][1:]) for r in rows)
    inputs, _ = collate_packed([rows], tokenizer.pad_token_id, sum(len(r["input_ids"]) for r in rows) + 5)
    model(**inputs, num_items_in_batch=tokens, use_cache=False).loss.backward()
    packed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    unpacked = collate(rows, tokenizer.pad_token_id)  # padded batch, same normalisation
    model(**unpacked, num_items_in_batch=tokens, use_cache=False).loss.backward()
    for a, p in zip(packed, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_packed_batches_fill_rows_and_count_tokens(tokenizer):
    rows = tokenized(tokenizer, max_length=128, n=80)  # 12 to 32 tokens each: four or more to a row
    width, size = 128, 4
    stream = batches(rows, size, tokenizer.pad_token_id, seed=3, pack_width=width)
    first = [next(stream) for _ in range(3)]
    again = batches(rows, size, tokenizer.pad_token_id, seed=3, pack_width=width)
    for a in first:  # the same seed gives the same batches (what resume relies on)
        b = next(again)
        assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs) and a.tokens == b.tokens
    for batch in first:
        assert batch.inputs["input_ids"].shape == (size, width) and batch.total == size * width
        assert batch.real == int(batch.mask.sum()) and batch.tokens == int((batch.inputs["labels"] != -100).sum())
    padded = sum(b.total - b.real for b in first) / sum(b.total for b in first)
    unpacked = batches(rows, size, tokenizer.pad_token_id, seed=3)
    plain = [next(unpacked) for _ in range(12)]  # padded to each batch's longest
    assert all(b.real == int(b.mask.sum()) and b.total == b.mask.numel() for b in plain)
    plain_padded = sum(b.total - b.real for b in plain) / sum(b.total for b in plain)
    assert padded < 0.1 < plain_padded, (padded, plain_padded)
    # two processes: each gets its half of the same global rows, the counts are the global batch's
    halves = [batches(rows, size // 2, tokenizer.pad_token_id, seed=3, rank=r, world=2, pack_width=width)
              for r in (0, 1)]
    a, b = next(halves[0]), next(halves[1])
    counts = (first[0].tokens, first[0].real, first[0].total)
    assert (a.tokens, a.real, a.total) == (b.tokens, b.real, b.total) == counts
    torch.testing.assert_close(torch.cat([a.inputs["input_ids"], b.inputs["input_ids"]])[[0, 2, 1, 3]],
                               first[0].inputs["input_ids"])


def test_self_teacher_reads_packed_batches(tokenizer):
    model = tiny_model("qwen3", attn="sdpa")
    rows = tokenized(tokenizer, n=3)
    inputs, real = collate_packed([rows], tokenizer.pad_token_id, sum(len(r["input_ids"]) for r in rows) + 2)
    teacher = SelfTeacher(model, contextlib.nullcontext)
    packed = teacher.logits(inputs)[0][real[0]]
    alone = torch.cat([teacher.logits(collate([r], tokenizer.pad_token_id))[0] for r in rows])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_check_packing_refuses_a_model_that_attends_across_examples():
    model = tiny_model("llama", attn="sdpa")
    check_packing(model)

    class IgnoresPositions(torch.nn.Module):  # e.g. remote code that builds its own causal mask
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, position_ids=None, **kw):
            return self.inner(input_ids=input_ids, **kw)

    with pytest.raises(ATPError, match="--packing is not exact for this model .* run without --packing"):
        check_packing(IgnoresPositions(model))


def run_cfg(model_dir, data, out, **kw):
    values = dict(model=str(model_dir), domain=None, train_files=[f"hqs={data}"], out=str(out), sparsity=0.4,
                  mlp_block=4, max_steps=12, batch_size=4, max_length=128, generator_every=1, generator_frac=0.5,
                  generator_lr=3e-2, alpha=8.0, log_every=2, save_every=4, keep_checkpoints=3, lr=1e-3)
    values.update(kw)
    return ATPConfig(**values)


def test_packed_run_exports_reports_throughput_and_resumes(tiny_model_dir, short_file, tmp_path):
    import shutil

    plain = train(run_cfg(tiny_model_dir, short_file, tmp_path / "plain"), progress=False)
    packed = train(run_cfg(tiny_model_dir, short_file, tmp_path / "packed", packing=True), progress=False)
    assert packed["logits_check"]["passed"] and abs(packed["prunable_sparsity"] - 0.4) <= 0.05
    for report in (plain, packed):
        assert report["train_tokens"] > 0 and report["train_tokens_per_second"] > 0
    # what is left is the gaps of rows that no remaining example fitted (examples here are 15 to 50 tokens)
    assert packed["pad_fraction"] < min(0.1, plain["pad_fraction"] / 2), (packed["pad_fraction"], plain["pad_fraction"])
    # 12 steps x 4 rows x 128 tokens, less the little padding left in rows that went out part-filled
    assert packed["train_tokens"] == round(12 * 4 * 128 * (1 - packed["pad_fraction"]))
    assert packed["train_tokens"] > 1.5 * plain["train_tokens"]  # the padded batches are one example per row
    # resume from the checkpoint of step 8 reproduces the packed batches and so the model, bit for bit
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "packed", run)
    shutil.rmtree(run / "checkpoints" / "step-000012")
    shutil.rmtree(run / "model")
    (run / "report.json").unlink()
    cfg = run_cfg(tiny_model_dir, short_file, run, packing=True)
    resumed = train(cfg, progress=False, resume=True)
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (tmp_path / "packed", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["train_tokens"] < packed["train_tokens"]  # counted since the resume
