"""The distillation teacher's top-k next-token log-probabilities, computed once and kept on disk.

With `--distill-top-k K` the distillation loss compares K + 1 buckets instead of the whole vocabulary: the
teacher's K most likely tokens and one bucket for the rest of its probability mass (atp.distill.topk_kd_loss).
Those targets depend only on the teacher and the training example, so they are computed once per

    (teacher's files, the tokenizer's files, the data files, --max-length, K, --distill-temperature)

and kept in $ATP_HOME/teacher-cache/<sha256 of those>/ (teacher.safetensors and a manifest.json holding the
file's SHA-256), where every epoch, seed, `atp compare` cell and resume reads them. Entries are keyed by the
SHA-256 of an example's token ids, and each is the teacher's output on that example alone, so batch order,
packing and DDP shards all read the same values. Log-probabilities are stored as float16 (their error at K = the
vocabulary size is far below the seed noise of the loss; tests/test_teacher_cache.py bounds it), ids as int32 and
the rest bucket's log-mass as float32. The teacher runs in float32 without autocast, so the precision of the run
does not enter the key.

Only this run's training rows are looked up: calibration batches (generator steps) still use the live teacher,
whatever the cache holds, so a run computes the same whether the cache was filled by it, by an earlier run or by
`atp compare`'s pre-pass.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import typing
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ATPError

FORMAT = 1
FILL_BATCH = 8  # examples per teacher forward while filling


class TopK(typing.NamedTuple):
    """Teacher targets at each position: the top-k token ids and their log-probabilities at temperature T, and
    the log of the probability left to every other token (-inf when none is left)."""
    ids: torch.Tensor  # [..., k] int64
    logprobs: torch.Tensor  # [..., k] float
    rest: torch.Tensor  # [...] float


def top_k_targets(logits: torch.Tensor, k: int, temperature: float) -> TopK:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
    return TopK(ids, values, rest)


def example_key(ids) -> bytes:
    """SHA-256 of an example's token ids (a list or a 1-d tensor)."""
    return hashlib.sha256(torch.as_tensor(ids, dtype=torch.long).cpu().numpy().tobytes()).digest()


def cache_root() -> Path:
    from .models import atp_home

    return atp_home() / "teacher-cache"


def identity(cfg, model_sha256: dict, data_sha256: dict, vocab_size: int) -> dict | None:
    """What the cached values depend on, or None where a file cannot be hashed (a hub model or teacher)."""
    role = "model" if cfg.teacher == "self" else "teacher"
    teacher, model = model_sha256.get(role), model_sha256.get("model")
    if not teacher or not model:
        return None
    digest = {name: stamp["sha256"] for name, stamp in teacher.items()}
    tokenizer = {name: stamp["sha256"] for name, stamp in model.items()
                 if name.startswith(("tokenizer", "special_tokens")) or name in ("vocab.json", "merges.txt")}
    return {"format": FORMAT, "teacher": digest, "tokenizer": tokenizer, "data": dict(sorted(data_sha256.items())),
            "max_length": cfg.max_length, "top_k": min(cfg.distill_top_k, vocab_size),
            "temperature": cfg.distill_temperature}


def key_of(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class TeacherCache:
    """The stored entries of one cache key, in memory: flat tensors over every position of every example, and
    an index from example key to (first position, length)."""

    def __init__(self, ident: dict, root: Path | None = None):
        self.ident, self.k = ident, ident["top_k"]
        self.folder = (root or cache_root()) / key_of(ident)
        self.index: dict[bytes, tuple[int, int]] = {}
        self.ids = torch.zeros((0, self.k), dtype=torch.int32)
        self.logprobs = torch.zeros((0, self.k), dtype=torch.float16)
        self.rest = torch.zeros((0,), dtype=torch.float32)
        self.allowed: set[bytes] | None = None  # the keys lookups may hit (this run's training rows)
        self.stats = {"key": self.folder.name, "top_k": self.k, "loaded_examples": 0, "computed_examples": 0,
                      "fill_seconds": 0.0, "corrupt_recomputed": False, "live_teacher_freed_at": None}

    # storage

    def load(self) -> None:
        """Read the stored entries; a file whose SHA-256 does not match its manifest (or that cannot be read) is
        reported and ignored, so its entries are computed again."""
        manifest_path, data_path = self.folder / "manifest.json", self.folder / "teacher.safetensors"
        if not manifest_path.exists():
            return
        from safetensors.torch import load_file

        from .checkpoint import file_sha256

        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("sha256") != file_sha256(data_path):
                raise ValueError("its SHA-256 does not match the manifest")
            tensors = load_file(str(data_path))
            keys, offsets = tensors["keys"], tensors["offsets"].tolist()
            if keys.shape[0] + 1 != len(offsets) or tensors["ids"].shape[1] != self.k:
                raise ValueError("its tables do not agree")
        except (OSError, ValueError, KeyError, json.JSONDecodeError, RuntimeError) as err:
            print(f"atp: warning: teacher cache {self.folder} is unreadable ({err}); computing it again",
                  file=sys.stderr)
            self.stats["corrupt_recomputed"] = True
            return
        self.ids, self.logprobs, self.rest = tensors["ids"], tensors["logprobs"], tensors["rest"]
        self.index = {bytes(keys[i].tolist()): (offsets[i], offsets[i + 1] - offsets[i]) for i in range(len(keys))}
        self.stats["loaded_examples"] = len(self.index)

    def save(self) -> None:
        from safetensors.torch import save_file

        from .checkpoint import file_sha256
        from .fsutil import atomic_dir

        keys = list(self.index)
        starts = [self.index[key] for key in keys]
        order = torch.cat([torch.arange(s, s + n) for s, n in starts]) if keys else torch.zeros(0, dtype=torch.long)
        offsets = torch.tensor([0] + [n for _, n in starts], dtype=torch.long).cumsum(0)
        tensors = {"keys": torch.tensor([list(key) for key in keys], dtype=torch.uint8).reshape(len(keys), 32),
                   "offsets": offsets, "ids": self.ids[order].contiguous(),
                   "logprobs": self.logprobs[order].contiguous(), "rest": self.rest[order].contiguous()}
        with atomic_dir(self.folder, "the teacher cache") as tmp:
            save_file(tensors, str(tmp / "teacher.safetensors"))
            manifest = {"sha256": file_sha256(tmp / "teacher.safetensors"), "examples": len(keys),
                        "positions": int(offsets[-1]), "identity": self.ident}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))

    # filling and reading

    def fill(self, rows: list[dict], teacher_logits, pad_id: int, device, progress: bool = False) -> int:
        """Compute the entries of the rows (tokenized examples) not stored yet, with `teacher_logits(batch)`, and
        store them all; returns how many were computed."""
        from tqdm.auto import tqdm

        from .data import pad
        from .models import rng_untouched

        todo, seen = [], set(self.index)
        for row in rows:
            key = example_key(row["input_ids"])
            if key not in seen:
                seen.add(key)
                todo.append((key, row))
        if not todo:
            return 0
        started = time.time()
        todo.sort(key=lambda item: len(item[1]["input_ids"]))  # similar lengths share a batch: less padding
        ids, logprobs, rest, at = [self.ids], [self.logprobs], [self.rest], self.ids.shape[0]
        bar = tqdm(range(0, len(todo), FILL_BATCH), desc="teacher cache", disable=not progress)
        with rng_untouched(), torch.no_grad():
            for start in bar:
                chunk = todo[start : start + FILL_BATCH]
                input_ids, attention_mask = pad([row["input_ids"] for _, row in chunk], pad_id)
                batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
                targets = top_k_targets(teacher_logits(batch), self.k, self.ident["temperature"])
                for r, (key, row) in enumerate(chunk):
                    n = len(row["input_ids"])
                    ids.append(targets.ids[r, :n].to("cpu", torch.int32))
                    logprobs.append(targets.logprobs[r, :n].to("cpu", torch.float16))
                    rest.append(targets.rest[r, :n].to("cpu", torch.float32))
                    self.index[key] = (at, n)
                    at += n
        self.ids, self.logprobs, self.rest = torch.cat(ids), torch.cat(logprobs), torch.cat(rest)
        self.save()
        self.stats["computed_examples"] += len(todo)
        self.stats["fill_seconds"] += round(time.time() - started, 2)
        return len(todo)

    def restrict(self, rows: list[dict]) -> None:
        """Let lookups hit only these rows (a run's training rows), so calibration batches use the live teacher
        whatever else the cache holds."""
        self.allowed = {example_key(row["input_ids"]) for row in rows}

    def lookup(self, inputs: dict, mask: torch.Tensor) -> TopK | None:
        """The targets of a batch (right-padded rows, or packed rows whose position_ids restart at each example),
        or None if one of its examples is not a cached training row. Padding positions get harmless values
        (the loss masks them)."""
        input_ids = inputs["input_ids"].cpu()
        mask = mask.cpu().bool()
        positions = inputs["position_ids"].cpu() if "position_ids" in inputs else None
        rows, width = input_ids.shape
        ids = torch.zeros((rows, width, self.k), dtype=torch.long)
        logprobs = torch.zeros((rows, width, self.k), dtype=torch.float32)
        rest = torch.full((rows, width), float("-inf"))
        for r in range(rows):
            real = int(mask[r].sum())
            starts = [0] if positions is None else torch.nonzero(positions[r, :real] == 0).flatten().tolist()
            for a, b in zip(starts, [*starts[1:], real]):
                key = example_key(input_ids[r, a:b])
                entry = self.index.get(key)
                if entry is None or (self.allowed is not None and key not in self.allowed) or entry[1] != b - a:
                    return None
                s, n = entry
                ids[r, a:b] = self.ids[s : s + n].long()
                logprobs[r, a:b] = self.logprobs[s : s + n].float()
                rest[r, a:b] = self.rest[s : s + n]
        device = inputs["input_ids"].device
        return TopK(ids.to(device), logprobs.to(device), rest.to(device))


def open_for_run(cfg, model_sha256: dict, data_sha256: dict, vocab_size: int, note=print) -> TeacherCache | None:
    """The cache of this run's teacher and data, its stored entries loaded; None (with a note) where the
    teacher's or the tokenizer's files cannot be hashed."""
    ident = identity(cfg, model_sha256, data_sha256, vocab_size)
    if ident is None:
        note("note: --distill-top-k without a teacher cache: a hub model's files cannot be hashed here, so the "
             "teacher runs on every step (download the model to a folder to cache it)")
        return None
    cache = TeacherCache(ident)
    cache.load()
    return cache


def fill_for_config(cfg, progress: bool = True) -> dict | None:
    """Fill the cache a run with this config would read (`atp compare`'s pre-pass), without training; returns
    its stats, or None when the config does not use a cache."""
    from .batching import load_training_examples, split_calibration, tokenize_all
    from .distill import ModelTeacher
    from .models import load_model
    from .options import data_sha256, model_sha256

    if not (cfg.distill and cfg.distill_top_k):
        return None
    cfg.validate()
    model, tokenizer = load_model(cfg.model, attn_implementation=cfg.attn_implementation)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and cfg.max_length > context:  # as the run clamps it
        cfg.max_length = context
    cache = open_for_run(cfg, model_sha256(cfg), data_sha256(cfg), model.config.vocab_size)
    if cache is None:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = (ModelTeacher(model, "self") if cfg.teacher == "self"
               else ModelTeacher.from_run(cfg.teacher, device, model.config.vocab_size))
    teacher.model.to(device)
    train_examples, _ = split_calibration(cfg, load_training_examples(cfg))
    rows, _ = tokenize_all(tokenizer, train_examples, cfg.max_length)
    if not rows:
        raise ATPError("the teacher cache has no training examples to compute")
    cache.fill(rows, teacher.logits, tokenizer.pad_token_id, device, progress)
    return cache.stats
