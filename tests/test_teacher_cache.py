"""--distill-top-k: the top-k + rest-bucket KL, and the teacher cache under $ATP_HOME (atp.teacher_cache)."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atp.distill import kd_loss, topk_kd_loss
from atp.teacher_cache import TeacherCache, example_key, top_k_targets
from helpers import cfg_for, tiny_model


def test_top_k_with_the_whole_vocabulary_is_the_full_kl():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 31) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    for t in (1.0, 2.0):
        student = torch.randn(2, 5, 31, requires_grad=True)
        full = kd_loss(student, teacher, mask, t, tokens=9)
        top = topk_kd_loss(student, top_k_targets(teacher, 31, t), mask, t, tokens=9)
        assert float(top.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
        (g_full,), (g_top,) = (torch.autograd.grad(x, student) for x in (full, top))
        assert torch.allclose(g_full, g_top, atol=1e-6)
        # stored as float16, the loss moves by far less than a training step does
        t16 = top_k_targets(teacher, 31, t)
        t16 = t16._replace(logprobs=t16.logprobs.half())
        assert float(topk_kd_loss(student, t16, mask, t, tokens=9).detach()) == pytest.approx(float(full.detach()),
                                                                                       rel=2e-3)
    # fewer buckets: the teacher's top 3 tokens and the rest of its mass, by hand
    student = torch.randn(2, 5, 31)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    top_p, ids = p.topk(3, -1)
    top_q = q.gather(-1, ids)
    rest_p, rest_q = 1 - top_p.sum(-1), 1 - top_q.sum(-1)
    manual = (top_p * (top_p / top_q).log()).sum(-1) + rest_p * (rest_p / rest_q).log()
    expected = (manual * mask).sum() / mask.sum()
    got = topk_kd_loss(student, top_k_targets(teacher, 3, 1.0), mask)
    assert float(got) == pytest.approx(float(expected), rel=1e-4)
    assert float(topk_kd_loss(teacher, top_k_targets(teacher, 3, 1.0), mask)) == pytest.approx(0.0, abs=1e-5)


def tiny_rows(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 500, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]


def model_logits(model):
    from atp.distill import model_inputs

    return lambda batch: model(**model_inputs(batch)).logits


IDENT = {"format": 1, "teacher": {"model.safetensors": "x"}, "tokenizer": {}, "data": {}, "max_length": 64,
         "top_k": 8, "temperature": 1.0}


def test_a_corrupted_cache_is_recomputed_with_a_warning(tmp_path, capsys):
    model, rows = tiny_model("llama").eval(), tiny_rows()
    cache = TeacherCache(IDENT, root=tmp_path)
    assert cache.fill(rows, model_logits(model), 0, "cpu") == len(rows)
    again = TeacherCache(IDENT, root=tmp_path)
    again.load()
    assert len(again.index) == len(rows) and again.fill(rows, model_logits(model), 0, "cpu") == 0
    assert torch.equal(again.logprobs[again.index[example_key(rows[3]["input_ids"])][0]],
                       cache.logprobs[cache.index[example_key(rows[3]["input_ids"])][0]])
    data = cache.folder / "teacher.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte in the values: the file still parses, its SHA-256 does not match
    data.write_bytes(bytes(raw))
    broken = TeacherCache(IDENT, root=tmp_path)
    capsys.readouterr()
    broken.load()
    err = capsys.readouterr().err
    assert "atp: warning: teacher cache" in err and "SHA-256 does not match the manifest" in err
    assert not broken.index and broken.stats["corrupt_recomputed"]
    assert broken.fill(rows, model_logits(model), 0, "cpu") == len(rows)
    fixed = TeacherCache(IDENT, root=tmp_path)
    fixed.load()
    assert "warning" not in capsys.readouterr().err  # the recomputed file matches its manifest
    assert len(fixed.index) == len(rows)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left


def test_packed_rows_read_the_entries_of_their_examples(tmp_path):
    from atp.data import collate, collate_packed

    model, rows = tiny_model("llama").eval(), tiny_rows(6, seed=1)
    for row in rows:
        row["labels"] = row["input_ids"]
    cache = TeacherCache(IDENT, root=tmp_path)
    cache.fill(rows, model_logits(model), 0, "cpu")
    packed, real = collate_packed([rows[:3], rows[3:5]], 0, 64)
    got = cache.lookup(packed, real)
    plain = collate(rows[:3], 0)
    alone = cache.lookup(plain, plain["attention_mask"].bool())
    at = 0
    for i, row in enumerate(rows[:3]):
        n = len(row["input_ids"])
        assert torch.equal(got.ids[0, at : at + n], alone.ids[i, :n])
        assert torch.equal(got.logprobs[0, at : at + n], alone.logprobs[i, :n])
        # each entry is the teacher's output on its example alone
        with torch.no_grad():
            own = top_k_targets(model(torch.tensor([row["input_ids"]])).logits, 8, 1.0)
        assert torch.allclose(got.logprobs[0, at : at + n], own.logprobs[0], atol=1e-2)
        at += n
    # a row whose example is not cached, or not among the rows a run may read, is a miss
    stranger = torch.tensor([tiny_rows(1, seed=9)[0]["input_ids"]])
    assert cache.lookup({"input_ids": stranger}, torch.ones_like(stranger, dtype=torch.bool)) is None
    cache.restrict(rows[:2])
    assert cache.lookup(plain, plain["attention_mask"].bool()) is None


def count_teacher_forwards(monkeypatch):
    from atp import distill

    calls = {"n": 0}
    original = distill.SelfTeacher.logits

    def counted(self, batch):
        calls["n"] += 1
        return original(self, batch)

    monkeypatch.setattr(distill.SelfTeacher, "logits", counted)
    return calls


def test_the_cache_is_reused_and_missed_when_an_input_changes(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from atp.train import train

    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    calls = count_teacher_forwards(monkeypatch)

    def run(name, **kw):
        calls["n"] = 0
        values = dict(max_steps=2, distill=0.5, distill_top_k=16, method="magnitude")
        values.update(kw)
        report = train(cfg_for(tiny_model_dir, train_file, tmp_path / name, **values), progress=False)
        return report, calls["n"]

    first, forwards = run("a")
    cached = first["teacher_cache"]
    assert cached["computed_examples"] > 0 and cached["loaded_examples"] == 0
    assert forwards == -(-cached["computed_examples"] // 8)  # only the fill ran the teacher
    assert cached["live_teacher_freed_at"] == 0  # a two-stage run has no generator steps
    second, forwards = run("b", seed=3)
    assert second["teacher_cache"]["computed_examples"] == 0 and forwards == 0
    assert second["teacher_cache"]["loaded_examples"] == cached["computed_examples"]
    assert second["teacher_cache"]["key"] == cached["key"]
    # another max length, and changed data, are other keys
    longer, _ = run("c", max_length=48)
    assert longer["teacher_cache"]["key"] != cached["key"] and longer["teacher_cache"]["computed_examples"] > 0
    lines = open(train_file).read().splitlines()
    train_file.write_text("\n".join(lines[:-1]) + "\n")  # one example fewer
    more, _ = run("d")
    assert more["teacher_cache"]["key"] != cached["key"] and more["teacher_cache"]["loaded_examples"] == 0
    # another teacher (the base model's weights changed) is another key
    weights = tiny_model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[name] = tensors[name] * 1.5
    from safetensors.torch import save_file

    save_file(tensors, str(weights), metadata={"format": "pt"})
    other, _ = run("e")
    assert other["teacher_cache"]["key"] not in (cached["key"], more["teacher_cache"]["key"])
    assert other["teacher_cache"]["loaded_examples"] == 0
    assert len(list((tmp_path / "home" / "teacher-cache").iterdir())) == 4


def test_atp_run_with_the_cache_frees_the_teacher_and_resumes_bit_exact(tiny_model_dir, train_file, tmp_path,
                                                                        monkeypatch):
    from atp.train import train

    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    calls = count_teacher_forwards(monkeypatch)
    values = dict(max_steps=6, distill=0.5, distill_top_k=16, generator_frac=0.5, save_every=3, keep_checkpoints=3,
                  log_every=1)
    report = train(cfg_for(tiny_model_dir, train_file, tmp_path / "run", **values), progress=False)
    fill = -(-report["teacher_cache"]["computed_examples"] // 8)
    assert calls["n"] == fill + 3  # the fill, then one generator step in each of steps 1-3 (live teacher)
    assert report["teacher_cache"]["live_teacher_freed_at"] == 3  # compacted at the freeze: no dense copy kept
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[0]["kd_loss"] == pytest.approx(0.0, abs=1e-3) and log[-1]["kd_loss"] > 0
    # resume after the compaction reproduces the model bit for bit, from the same cache
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run", run)
    shutil.rmtree(run / "checkpoints" / "step-000006")
    shutil.rmtree(run / "model")
    (run / "report.json").unlink()
    resumed = train(cfg_for(tiny_model_dir, train_file, run, **values), progress=False, resume=True)
    assert resumed["teacher_cache"]["computed_examples"] == 0
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (tmp_path / "run", run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_top_k_option_is_checked_and_changes_the_fingerprint():
    from atp.errors import ATPError
    from atp.options import ATPConfig, fingerprint

    with pytest.raises(ATPError, match="--distill-top-k must be at least 0"):
        ATPConfig(distill_top_k=-1).validate()
    default = fingerprint(ATPConfig())
    assert fingerprint(ATPConfig(distill_top_k=16)) != default == fingerprint(ATPConfig(distill_top_k=0))
    assert fingerprint(ATPConfig(distill=0, distill_top_k=16)) == fingerprint(ATPConfig(distill=0))  # inert then


def test_packed_full_recovery_run_reads_every_batch_from_the_cache(tiny_model_dir, train_file, tmp_path, monkeypatch):
    from atp.train import train

    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    calls = count_teacher_forwards(monkeypatch)
    report = train(cfg_for(tiny_model_dir, train_file, tmp_path / "run", max_steps=4, generator_frac=0.5, distill=0.5,
                           distill_top_k=16, packing=True, compact=False, recovery="full"), progress=False)
    fill = -(-report["teacher_cache"]["computed_examples"] // 8)
    assert calls["n"] == fill + 2  # packed training batches never ran the live teacher: only generator steps 1-2
    assert report["teacher_cache"]["live_teacher_freed_at"] == 2  # no dense copy for the full recovery
    assert report["logits_check"]["passed"]


def test_compare_fills_each_cache_once_before_the_cells(tiny_model_dir, train_file, tmp_path, monkeypatch):
    import yaml

    from atp import teacher_cache
    from atp.compare import CompareSpec, cells, fill_teacher_caches
    from atp.train import train

    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    config = yaml.safe_load((Path(__file__).parent / "compare_tiny.yaml").read_text())
    config.update(model=str(tiny_model_dir), out=str(tmp_path / "cmp"))
    config["train"]["distill_top_k"] = 16
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    spec = CompareSpec.load(path)
    filled = []
    monkeypatch.setattr(teacher_cache, "fill_for_config", lambda cfg, progress: filled.append(cfg) or None)
    fill_teacher_caches(spec, cells(spec), progress=False)
    assert len(filled) == 1  # atp and taylor cells (three seeds) share teacher, data and length
    config["train"]["distill_top_k"] = 0
    path.write_text(yaml.safe_dump(config))
    filled.clear()
    fill_teacher_caches(CompareSpec.load(path), cells(CompareSpec.load(path)), progress=False)
    assert not filled
    monkeypatch.undo()
    # the pre-pass fills what the run then reads, without computing anything again
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    cfg = cfg_for(tiny_model_dir, train_file, tmp_path / "run", max_steps=2, distill_top_k=16)
    stats = teacher_cache.fill_for_config(dataclasses.replace(cfg), progress=False)
    report = train(cfg, progress=False)
    assert stats["computed_examples"] > 0 and report["teacher_cache"]["key"] == stats["key"]
    assert report["teacher_cache"]["computed_examples"] == 0
    assert report["teacher_cache"]["loaded_examples"] == stats["computed_examples"]


def test_the_paper_recipe_runs_with_the_teacher_cache(tiny_model_dir, train_file, tmp_path, monkeypatch):
    """Generator steps without distillation (the preset) and LoRA steps reading the cache, in one run."""
    import json as _json

    from atp.cli import main
    from helpers import prune_argv

    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    argv = prune_argv(tiny_model_dir, train_file, run, "--recipe", "paper", "--distill", "0.5", "--distill-top-k", "16",
                      "--max-steps", "6", "--generator-every", "1", "--lam", "5")
    assert main(argv) == 0
    report = _json.loads((run / "report.json").read_text())
    assert report["logits_check"]["passed"] and report["teacher_cache"]["computed_examples"] > 0
    log = [_json.loads(line) for line in open(run / "log.jsonl")]
    assert all("generator_kd_loss" not in r for r in log) and any("kd_loss" in r for r in log)
