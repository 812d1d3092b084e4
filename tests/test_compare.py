"""`atp compare` on a tiny model: outputs, skipping finished cells, relative performance."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from atp.cli import main
from atp.compare import CompareSpec, cell_config, cells
from atp.errors import ATPError
from atp.report import precision_note, relative_performance, summarize


@pytest.fixture
def tiny_compare(tmp_path, tiny_model_dir, shared_data):
    """A healthcare data dir cut from the shared files, and a compare config on the tiny model."""
    data = tmp_path / "data" / "healthcare"
    data.mkdir(parents=True)
    for name, n in (("pubmedqa_train.jsonl", 40), ("hqs_train.jsonl", 30)):
        lines = (shared_data / "healthcare" / name).read_text().splitlines()[:n]
        (data / name).write_text("\n".join(lines) + "\n")
    config = yaml.safe_load((Path(__file__).parent / "compare_tiny.yaml").read_text())
    config.update(model=str(tiny_model_dir), out=str(tmp_path / "out"), data_dir=str(tmp_path / "data"))
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / "out"


def test_compare_writes_outputs_and_skips_finished_cells(tiny_compare, monkeypatch, capsys):
    import atp.evaluation
    import atp.train

    path, out = tiny_compare
    assert main(["compare", "--config", str(path), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert "5 cells" in listed and "taylor-s0.4-seed1" in listed and "to run" in listed

    assert main(["compare", "--config", str(path)]) == 0
    results = json.loads((out / "results.json").read_text())
    names = [c["name"] for c in results["cells"]]
    assert names == ["dense", "dense-lora-seed0", "atp-s0.4-seed0", "taylor-s0.4-seed0", "taylor-s0.4-seed1"]
    rows = {(r["method"], r["sparsity"]): r for r in results["summary"]["healthcare"]["rows"]}
    assert rows[("dense-lora", 0.0)]["relative"][0] == pytest.approx(1.0)
    assert rows[("taylor", 0.4)]["relative"][1] is not None  # two seeds: a std
    assert abs(rows[("taylor", 0.4)]["measured_sparsity"][0] - 0.4) < 0.03
    markdown = (out / "results.md").read_text()
    assert "## healthcare" in markdown and "dense + LoRA" in markdown and "taylor" in markdown and " ± " in markdown
    assert "| pubmedqa ratio | hqs ratio |" in markdown
    assert "pubmed_text ppl@32" in markdown  # perplexity at the extra (training-length) window
    assert "| 0.4 | taylor | relative (informative tasks) | 1 |" in markdown  # atp - taylor on their common seed
    assert "Always giving the most common answer scores pubmedqa" in markdown
    # what --mixed-precision auto (the default) chose is kept with each trained cell; one choice per method: no note
    for cell in results["cells"][1:]:
        assert cell["report"]["precision"]["requested"] == "auto", cell["name"]
        assert cell["report"]["precision"]["mixed_precision"] == "no"  # ATP_CPU_FLAGS="" in the tests
    assert "different precisions" not in markdown
    dev_file = out.parent / "data" / "healthcare" / "pubmedqa_train.jsonl"
    dev = [json.loads(line) for line in dev_file.read_text().splitlines()]
    golds = [r["final_decision"] for r in dev[-8:][:2]]  # dev: the last 20% of 40 records; eval limit 2
    assert results["summary"]["healthcare"]["majority"] == {"pubmedqa": max(golds.count(g) for g in golds) / 2}
    ratios = rows[("dense-lora", 0.0)]["ratios"]
    assert ratios and all(value == pytest.approx(1.0) for value, _ in ratios.values()), ratios
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["healthcare_kept_s0.4.png", "healthcare_metrics.png"]
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)

    # A second invocation retrains and re-evaluates nothing.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("healthcare/*/result.json")}

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(atp.train, "train", forbidden)
    monkeypatch.setattr(atp.evaluation, "evaluate_domain", forbidden)
    assert main(["compare", "--config", str(path)]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 5
    assert {p: p.stat().st_mtime_ns for p in out.glob("healthcare/*/result.json")} == stamps

    # A cell trained but not evaluated (stopped during evaluation) is evaluated without retraining.
    monkeypatch.undo()
    monkeypatch.setattr(atp.train, "train", forbidden)
    (out / "healthcare" / "atp-s0.4-seed0" / "result.json").unlink()
    assert main(["compare", "--config", str(path)]) == 0
    assert (out / "healthcare" / "atp-s0.4-seed0" / "result.json").exists()

    # Changed training settings are refused instead of mixing results.
    config = yaml.safe_load(path.read_text())
    config["train"]["max_steps"] = 4
    path.write_text(yaml.safe_dump(config))
    (out / "healthcare" / "atp-s0.4-seed0" / "result.json").unlink()
    capsys.readouterr()
    assert main(["compare", "--config", str(path), "--dry-run"]) == 0
    assert "atp-s0.4-seed0                     to run (an earlier run with other settings there is replaced)" \
        in capsys.readouterr().out
    with pytest.raises(ATPError, match="different settings"):
        from atp.compare import run_compare
        run_compare(path)


def test_compare_config_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("methods: [atp, wanda]\n")
    assert main(["compare", "--config", str(path)]) == 2
    assert "unknown methods ['wanda']" in capsys.readouterr().err
    path.write_text("train: {sparsity: 0.3}\n")
    assert main(["compare", "--config", str(path)]) == 2
    assert "set per cell" in capsys.readouterr().err
    path.write_text("variants: {taylor: {lam: 0}}\n")
    assert main(["compare", "--config", str(path)]) == 2
    assert "name of a built-in method" in capsys.readouterr().err
    path.write_text("variants: {atp-x: {seed: 3}}\nmethods: [atp-x]\n")
    assert main(["compare", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "variant 'atp-x'" in err and "['seed']" in err
    path.write_text("variants: {atp-x: {restart_lr: true}}\nmethods: [atp-y]\n")
    assert main(["compare", "--config", str(path)]) == 2
    assert "unknown methods ['atp-y']" in capsys.readouterr().err
    for key in ("atp@0.45", "taylor", "dense-lora@0.4"):  # no such sparsity; method not listed; references have none
        path.write_text(f"sparsities: [0.4]\nmethods: [atp]\ncell_seeds: {{'{key}': [0, 1]}}\n")
        assert main(["compare", "--config", str(path)]) == 2
        assert f"cell_seeds key '{key}'" in capsys.readouterr().err
    path.write_text("methods: [atp, taylor]\nbase: random\n")
    assert main(["compare", "--config", str(path)]) == 2
    assert "base 'random'" in capsys.readouterr().err
    path.write_text("cell_seeds: {atp: 3}\n")
    assert main(["compare", "--config", str(path)]) == 2
    assert "list of integer seeds" in capsys.readouterr().err
    # a wrong type is named instead of ending in a TypeError (or iterating over a string)
    for text, message in (("sparsities: 0.4", "sparsities in {} must be a list such as [0.4, 0.5], got 0.4"),
                          ("domains: healthcare", "domains in {} must be a list such as [healthcare, legal], got "
                                                  "'healthcare'"),
                          ("seeds: [0, true]", "seeds in {} must be a list such as [0, 1], got [0, True]"),
                          ("train: [max_steps]", "train in {} must be a mapping of option: value, got ['max_steps']"),
                          ("references: maybe", "references in {} must be true or false, got 'maybe'"),
                          ("wanda: 1", "compare config {} has unknown keys ['wanda']; valid keys: ")):
        path.write_text(text + "\n")
        assert main(["compare", "--config", str(path)]) == 2
        assert message.format(path) in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("methods: [atp, taylor, atp]", "methods in {} lists 'atp' twice; a repeat runs the same cells again and counts "
                                    "them twice in results.md: list each value once"),
    ("seeds: [0, 1, 0]", "seeds in {} lists 0 twice"),
    ("sparsities: [0.4, 0.5, 0.4]", "sparsities in {} lists 0.4 twice"),
    ("sparsities: [0.4, 0.40000001]", "sparsities in {} lists 0.4 and 0.40000001, which name the same cells (-s0.4)"),
    ("domains: [healthcare, legal, healthcare]", "domains in {} lists 'healthcare' twice"),
    ("cell_seeds: {atp: [0, 1, 1]}", "cell_seeds['atp'] in {} lists seed 1 twice"),
    ("variants:\n  v: {lam: 0.5}\n  v: {lam: 2.0}\nmethods: [v]",
     "compare config {}, line 3: key 'v' appears a second time in the same mapping (YAML would silently keep only "
     "the last); keep one"),
])
def test_compare_refuses_repeated_values(text, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    for dry_run in ([], ["--dry-run"]):
        assert main(["compare", "--config", str(path), *dry_run]) == 2
        assert f"atp: error: {message.format(path)}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("settings, message", [
    ({"max_length": 1}, "eval: max_length in {} must be a whole number of at least 2, got 1"),
    ({"max_length": 32, "max_new_tokens": 32}, "eval: max_new_tokens (32) in {} must be smaller than max_length (32)"),
    ({"max_new_tokens": 600}, "eval: max_new_tokens (600) in {} must be smaller than max_length (512)"),
    ({"ppl_windows": [32, 1]}, "eval: ppl_windows in {} must be a list of window lengths of at least 2 tokens"),
])
def test_compare_refuses_eval_lengths_that_leave_nothing_to_score(settings, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"eval": settings}))
    assert main(["compare", "--config", str(path), "--dry-run"]) == 2
    assert f"atp: error: {message.format(path)}" in capsys.readouterr().err


def test_compare_variants_are_methods_with_their_own_options(tiny_compare, capsys):
    path, out = tiny_compare
    config = yaml.safe_load(path.read_text())
    config.update(methods=["atp", "atp-restart", "taylor-r", "lora-6"], cell_seeds={},
                  variants={"atp-restart": {"restart_lr": True, "generator_frac": 0.3},
                            "taylor-r": {"method": "taylor", "lr": 1e-4},
                            "lora-6": {"prune": False, "max_steps": 6}})
    path.write_text(yaml.safe_dump(config))
    spec = CompareSpec.load(path)
    by_name = {c.name: c for c in cells(spec)}
    assert set(by_name) == {"dense", "dense-lora-seed0", "atp-s0.4-seed0", "atp-restart-s0.4-seed0",
                            "taylor-r-s0.4-seed0", "lora-6-s0.4-seed0"}
    # dense + LoRA at another budget: the same run as the reference but for max_steps
    lora, reference = (cell_config(spec, by_name[n]) for n in ("lora-6-s0.4-seed0", "dense-lora-seed0"))
    assert (lora.prune, lora.max_steps, reference.max_steps) == (False, 6, 3)
    assert dataclasses.replace(lora, max_steps=3, out=reference.out) == reference
    config["variants"]["lora-6"]["prune"] = True
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ATPError, match="variant 'lora-6'.*prune may only be false"):
        CompareSpec.load(path)
    restart = cell_config(spec, by_name["atp-restart-s0.4-seed0"])
    assert (restart.method, restart.restart_lr, restart.generator_frac, restart.max_steps) == ("atp", True, 0.3, 3)
    taylor = cell_config(spec, by_name["taylor-r-s0.4-seed0"])
    assert (taylor.method, taylor.lr, taylor.sparsity) == ("taylor", 1e-4, 0.4)
    assert cell_config(spec, by_name["atp-s0.4-seed0"]).restart_lr  # the default


def result(method, sparsity, seed, pubmedqa, hqs, ppl):
    metrics = {"pubmedqa": {"acc": pubmedqa, "acc_norm": pubmedqa, "n": 10},
               "hqs": {"rouge1": hqs + 2, "rouge2": 1.0, "rougeL": hqs, "n": 10},
               "pubmed_text": {"ppl": ppl, "nll": 0.0, "tokens": 100, "windows": 2, "n": 5}}
    return {"domain": "healthcare", "method": method, "sparsity": sparsity, "seed": seed, "metrics": metrics,
            "cell_seconds": 1.0, "report": {"prunable_sparsity": sparsity}}


def test_relative_performance_by_hand():
    # reference: mean of two dense-LoRA seeds -> pubmedqa 0.5, hqs rougeL 40, ppl 10
    results = [result("dense-lora", 0.0, 0, 0.4, 30.0, 8.0), result("dense-lora", 0.0, 1, 0.6, 50.0, 12.0),
               result("atp", 0.4, 0, 0.5, 20.0, 20.0), result("atp", 0.4, 1, 0.25, 40.0, 10.0)]
    summary = summarize(results)["healthcare"]
    assert summary["primary_metrics"] == {"pubmedqa": "acc_norm", "hqs": "rougeL", "pubmed_text": "ppl"}
    atp_row = next(r for r in summary["rows"] if r["method"] == "atp")
    # seed 0: (0.5/0.5 + 20/40 + 10/20) / 3 = 2/3; seed 1: (0.25/0.5 + 40/40 + 10/10) / 3 = 5/6
    mean, std = atp_row["relative"]
    assert mean == pytest.approx((2 / 3 + 5 / 6) / 2)
    assert std == pytest.approx(abs(5 / 6 - 2 / 3) / 2 ** 0.5)
    assert atp_row["metrics"]["hqs rougeL"][0] == pytest.approx(30.0)
    assert summary["at_chance"] == [] and "relative_above_chance" not in atp_row
    # pubmedqa at chance: dense + LoRA (0.5) does not beat always answering the majority class (0.6)
    summary = summarize(results, majority={"healthcare": {"pubmedqa": 0.6}})["healthcare"]
    assert summary["at_chance"] == ["pubmedqa"]
    atp_row = next(r for r in summary["rows"] if r["method"] == "atp")
    # seed 0: (20/40 + 10/20) / 2 = 0.5; seed 1: (40/40 + 10/10) / 2 = 1
    assert atp_row["relative_above_chance"][0] == pytest.approx(0.75)
    assert atp_row["relative"][0] == pytest.approx((2 / 3 + 5 / 6) / 2)  # unchanged
    assert summarize(results, majority={"healthcare": {"pubmedqa": 0.5}})["healthcare"]["at_chance"] == ["pubmedqa"]
    assert summarize(results, majority={"healthcare": {"pubmedqa": 0.45}})["healthcare"]["at_chance"] == []
    value, ratios = relative_performance(results[2]["metrics"], {"pubmedqa": {"acc": 1.0}}, {"pubmedqa": "acc"})
    assert value == pytest.approx(0.5) and ratios == {"pubmedqa": pytest.approx(0.5)}


def test_paired_differences_come_from_per_record_values():
    def cell(method, seed, correct, rouge, nll):
        return {"domain": "healthcare", "method": method, "sparsity": 0.4 if method != "dense-lora" else 0.0,
                "seed": seed, "cell_seconds": 1.0, "report": {},
                "metrics": {"pubmedqa": {"acc_norm": sum(correct) / len(correct), "per_record": {"acc_norm": correct}},
                            "hqs": {"rougeL": sum(rouge) / len(rouge), "per_record": {"rougeL": rouge}},
                            "pubmed_text": {"ppl": 2.718281828 ** (sum(nll) / (10 * len(nll))),
                                            "per_record": {"nll": nll, "tokens": [10] * len(nll)}}}}
    good, bad = [1.0] * 30 + [0.0] * 10, [1.0] * 10 + [0.0] * 30
    results = [cell("dense-lora", 0, good, [40.0] * 40, [20.0] * 40),
               cell("atp", 0, good, [30.0, 32.0] * 20, [25.0] * 40), cell("atp", 1, good, [31.0] * 40, [25.0] * 40),
               cell("taylor", 0, bad, [30.0, 32.0] * 20, [30.0] * 40), cell("taylor", 1, bad, [31.0] * 40, [30.0] * 40),
               cell("random", 0, good, [30.0, 32.0] * 20, [25.0] * 40)]
    diffs = {(d["b"], d["measure"]): d for d in summarize(results)["healthcare"]["differences"]}
    accuracy = diffs[("taylor", "pubmedqa acc_norm")]
    assert accuracy["diff"] == pytest.approx(0.5) and accuracy["low"] > 0.3 and accuracy["seeds"] == [0, 1]
    rouge = diffs[("taylor", "hqs rougeL")]
    assert rouge["diff"] == 0.0 and rouge["verdict"] == "tie"  # identical per-record values
    ppl = diffs[("taylor", "pubmed_text ppl")]  # exp(2.5) - exp(3.0), lower is better
    assert ppl["diff"] == pytest.approx(2.718281828 ** 2.5 - 2.718281828 ** 3.0) and ppl["high"] < 0
    assert not ppl["higher_is_better"] and diffs[("random", "pubmedqa acc_norm")]["seeds"] == [0]
    # relative: mean of (acc ratio, rouge ratio, ppl ratio) against dense + LoRA; taylor lower on two of three
    assert diffs[("taylor", "relative (informative tasks)")]["low"] > 0
    # another base, and no dense + LoRA reference: per-task differences only, taken the other way round
    summary = summarize(results[1:], base="taylor")["healthcare"]
    diffs = {(d["a"], d["b"], d["measure"]): d for d in summary["differences"]}
    assert set(diffs) == {("taylor", m, f"{t} {k}") for m in ("atp", "random")
                          for t, k in (("pubmedqa", "acc_norm"), ("hqs", "rougeL"), ("pubmed_text", "ppl"))}
    assert diffs[("taylor", "atp", "pubmedqa acc_norm")]["diff"] == pytest.approx(-0.5)
    assert diffs[("taylor", "atp", "pubmed_text ppl")]["low"] > 0


def test_a_failed_cell_does_not_stop_the_comparison(tiny_compare, monkeypatch, capsys):
    import atp.compare

    path, out = tiny_compare
    real = atp.compare.run_cell

    def fail_atp(spec, cell, progress=True):
        if cell.method == "atp":
            raise ATPError("exported model does not match the masked model")
        return real(spec, cell, progress)

    monkeypatch.setattr(atp.compare, "run_cell", fail_atp)
    assert main(["compare", "--config", str(path)]) == 1
    printed = capsys.readouterr().out
    assert "atp-s0.4-seed0: FAILED" in printed and "1 cell(s) failed" in printed
    assert (out / "healthcare" / "atp-s0.4-seed0" / "error.txt").read_text().startswith("exported model")
    names = [c["name"] for c in json.loads((out / "results.json").read_text())["cells"]]
    assert "atp-s0.4-seed0" not in names and "taylor-s0.4-seed1" in names  # later cells still ran


def test_cell_order_first_seeds_then_rounds_of_extra_seeds():
    spec = CompareSpec(domains=["healthcare", "legal"], sparsities=[0.4, 0.5], methods=["atp", "taylor"],
                       cell_seeds={"atp@0.4": [0, 1, 2], "taylor@0.4": [0, 1, 2]})
    names = [f"{c.domain[0]}:{c.name}" for c in cells(spec)]
    skipped = [c.name for c in cells(dataclasses.replace(spec, cell_seeds={"taylor@0.5": []}))]
    assert "taylor-s0.5-seed0" not in skipped and "taylor-s0.4-seed0" in skipped and "atp-s0.5-seed0" in skipped
    assert names[:4] == ["h:dense", "h:dense-lora-seed0", "l:dense", "l:dense-lora-seed0"]
    assert names[4:12] == ["h:atp-s0.4-seed0", "h:taylor-s0.4-seed0", "l:atp-s0.4-seed0", "l:taylor-s0.4-seed0",
                           "h:atp-s0.5-seed0", "h:taylor-s0.5-seed0", "l:atp-s0.5-seed0", "l:taylor-s0.5-seed0"]
    assert names[12:] == ["h:atp-s0.4-seed1", "h:taylor-s0.4-seed1", "l:atp-s0.4-seed1", "l:taylor-s0.4-seed1",
                          "h:atp-s0.4-seed2", "h:taylor-s0.4-seed2", "l:atp-s0.4-seed2", "l:taylor-s0.4-seed2"]


# ----------------------------------------------------------------------------- compare configs

@pytest.mark.parametrize("change, message", [
    ({"eval": {"limit": "x"}}, "eval: limit in {path} must be a number of examples per task (0: all), null, or a "
                               "mapping of domain (healthcare, legal) to one, got 'x'"),
    ({"eval": {"limit": {"healthcare": 2, "medical": 3}}}, "eval: limit in {path} must be"),
    ({"eval": {"limit": {"healthcare": -1}}}, "eval: limit in {path} must be"),
    ({"eval": {"batch_size": 0}}, "eval: batch_size in {path} must be a whole number of at least 1, got 0"),
    ({"eval": {"ppl_windows": 32}}, "eval: ppl_windows in {path} must be a list of window lengths"),
    ({"seeds": [-1]}, "{path}: cell healthcare dense-lora-seed-1: --seed must be a whole number from 0 to"),
    ({"train": {"max_steps": "3"}}, "max_steps in `train` of {path} must be a whole number, got '3'"),
    ({"train": {"lam": float("inf")}}, "lam in `train` of {path} must be a finite number or null, got inf"),
    ({"train": {"generator_frac": 2.0}}, "{path}: cell healthcare dense-lora-seed0: --generator-frac must be in "
                                         "[0, 1]"),
    ({"train": {"lora_targets": ["qkv", ""]}}, "{path}: cell healthcare dense-lora-seed0: --lora-targets must be a "
                                               "non-empty list of module names"),
    ({"variants": {"v": {"lora_mask": 1}}, "methods": ["v"]}, "lora_mask in variant 'v' of {path} must be a string"),
    ({"methods": "atp"}, "methods in {path} must be a list such as [atp, taylor], got 'atp'"),
    ({"variants": {"v": {"method": "taylor", "decide_only": True}}, "methods": ["v"]},
     "{path}: cell healthcare v-s0.4-seed0: decide_only makes no model to evaluate"),
    ({"data_dir": "MISSING_HQS"}, "{path}: domain healthcare needs {data}/healthcare/hqs_train.jsonl (task hqs), "
                                  "which is not there; check data_dir"),
])
def test_compare_dry_run_checks_what_the_run_will_use(change, message, tmp_path, shared_data, capsys):
    import yaml

    data = tmp_path / "data"
    (data / "healthcare").mkdir(parents=True)
    (data / "healthcare" / "pubmedqa_train.jsonl").write_text((shared_data / "healthcare" /
                                                               "pubmedqa_train.jsonl").read_text())
    config = {"out": str(tmp_path / "out"), "data_dir": str(shared_data), **change}
    if config["data_dir"] == "MISSING_HQS":
        config["data_dir"] = str(data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", "--config", str(path), "--dry-run"]) == 2
    assert f"atp: error: {message.format(path=path, data=data)}" in capsys.readouterr().err


def test_precision_note_names_the_cells_of_a_method_that_trained_in_different_precisions():
    def cell(method, seed, choice):
        report = {"precision": {"requested": "auto", "mixed_precision": choice}} if choice else {}
        return {"method": method, "name": f"{method}-s0.4-seed{seed}", "report": report}

    same = [cell("atp", 0, "bf16"), cell("atp", 1, "bf16"), cell("taylor", 0, "no"), cell("dense", 0, None)]
    assert precision_note(same) is None  # methods may differ from each other: that is what a variant can set
    note = precision_note([*same, cell("atp", 2, "no")])
    assert note.startswith("**Cells of one method trained in different precisions**")
    assert "atp: bf16 in atp-s0.4-seed0, atp-s0.4-seed1, no in atp-s0.4-seed2" in note and "taylor" not in note
