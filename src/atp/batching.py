"""The training data of a run as the recipe consumes it: examples loaded and split off for calibration, tokenized,
and served as endless shuffled global batches (sharded per process, optionally packed); the packing check; the
texts that logits checks run on. `cfg` below is the run's ATPConfig."""
from __future__ import annotations

import random
import typing

import torch

from .errors import ATPError


def load_training_examples(cfg) -> list:
    """The training examples a run's config names: its domain's, then each --train-file's."""
    from . import data

    examples = []
    if cfg.domain:
        examples += data.domain_examples(data.load_domain(cfg.domain, cfg.data_dir), "train")
    for entry in cfg.train_files:
        if "=" not in entry:
            raise ATPError(f"--train-file takes TASK=PATH, got '{entry}'")
        task_name, path = entry.split("=", 1)
        task = data.get_task(task_name)
        records = data.split(task.load(path), "train")
        examples += [task.train_example(r) for r in records]
    return examples


def split_calibration(cfg, examples: list) -> tuple[list, list]:
    """Training and calibration examples: when pruning, the first calib_fraction of them are held out."""
    calib_count = max(1, int(len(examples) * cfg.calib_fraction)) if cfg.prune else 0
    return examples[calib_count:], examples[:calib_count]


def tokenize_all(tokenizer, examples, max_length):
    """Token rows of the examples that keep a predicted token, and how many were truncated."""
    from .data import tokenize_example

    rows, truncated = [], 0
    for example in examples:
        row = tokenize_example(tokenizer, example, max_length)
        truncated += bool(row.pop("truncated", False))
        if any(label != -100 for label in row["labels"][1:]):  # a first token is never predicted
            rows.append(row)
    return rows, truncated


class Batch(typing.NamedTuple):
    """One global batch as this process sees it."""
    inputs: dict  # this process's shard: the model's keyword arguments
    tokens: int  # label tokens in the whole global batch (what the loss is normalised by)
    mask: torch.Tensor  # this shard's real (non-padding) tokens
    real: int  # real tokens in the whole global batch
    total: int  # tokens the whole global batch occupies, padding included


def batches(rows, batch_size, pad_id, seed, rank=0, world=1, pack_width: int | None = None):
    """Endless shuffled global batches of batch_size * world rows (each epoch reshuffled with its own seed).
    Yields this process's shard, collated, and the number of label tokens in the whole global batch, so
    that the loss is normalised by the global count: N processes then compute what one process would.
    pack_width: rows are packed examples (atp.data.pack over the same shuffled order, epochs running on into
    each other) of exactly that many tokens, instead of single examples padded to the shard's longest."""
    from .data import collate, collate_packed, pack

    size = batch_size * world

    def label_tokens(chosen):
        return max(1, sum(sum(label != -100 for label in rows[i]["labels"][1:]) for i in chosen))

    if pack_width is not None:
        lengths = [len(row["input_ids"]) for row in rows]
        packed, group = pack(shuffled(len(rows), seed), lengths, pack_width), []
        for indices in packed:
            group.append(indices)
            if len(group) < size:
                continue
            real = sum(lengths[i] for indices in group for i in indices)
            inputs, mask = collate_packed([[rows[i] for i in indices] for indices in group[rank::world]], pad_id,
                                          pack_width)
            yield Batch(inputs, label_tokens([i for indices in group for i in indices]), mask, real, size * pack_width)
            group = []
        return
    epoch = 0
    while True:
        order = list(range(len(rows)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            chosen = order[start : start + size]
            lengths = [len(rows[i]["input_ids"]) for i in chosen]
            total = sum(len(lengths[r::world]) * max(lengths[r::world]) for r in range(world))  # each shard padded
            inputs = collate([rows[i] for i in chosen[rank::world]], pad_id)
            yield Batch(inputs, label_tokens(chosen), inputs["attention_mask"].bool(), sum(lengths), total)
        epoch += 1


def shuffled(n: int, seed: int):
    """Endless indices 0 .. n-1, each epoch in its own shuffled order (the order `batches` uses)."""
    epoch = 0
    while True:
        order = list(range(n))
        random.Random(seed * 7919 + epoch).shuffle(order)
        yield from order
        epoch += 1


def sample_texts(tokenizer, examples, n=4, max_length=128):
    """A padded batch of the first n examples' texts: the probe that logits checks run on."""
    texts = [(e.prompt + e.response)[:2000] for e in examples[:n]]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)


def check_packing(model, attn_implementation=None) -> None:
    """--packing relies on the model reading example boundaries from restarting position_ids (transformers'
    packed-sequence masks). Check on two short made-up sequences that the packed logits equal the logits of each
    alone; a model that attends across the boundary is refused rather than trained wrongly."""
    from .data import collate_packed

    lengths = (5, 9)
    vocab = model.config.vocab_size
    seqs = [[(3 + 7 * i + 13 * j) % vocab for i in range(n)] for j, n in enumerate(lengths)]
    rows = [[{"input_ids": ids, "labels": ids} for ids in seqs]]
    inputs, _ = collate_packed(rows, 0, sum(lengths) + 2)
    device = next(model.parameters()).device
    with torch.no_grad():
        packed = model(input_ids=inputs["input_ids"].to(device), position_ids=inputs["position_ids"].to(device),
                       use_cache=False).logits[0].float()
        alone = [model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float() for ids in seqs]
    reference = torch.cat(alone)
    diff = float((packed[: len(reference)] - reference).abs().max())
    allowed = 1e-3 * max(1.0, float(reference.abs().max()))
    if not diff <= allowed:
        what = attn_implementation or model.config._attn_implementation
        raise ATPError(f"--packing is not exact for this model ({type(model).__name__}, attention {what}): two "
                       f"packed examples give logits {diff:.3g} away from each example alone, so it attends across "
                       "example boundaries; run without --packing")
