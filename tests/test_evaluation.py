import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from atp.data import SummarizationTask, Task, get_task
from atp.errors import ATPError
from atp.evaluation import (
    add_eval_arguments,
    evaluate,
    evaluate_domain,
    format_table,
    generate,
    multiple_choice,
    option_scores,
    perplexity,
    rouge,
    run_eval_command,
    summarization,
)
from helpers import tiny_model, write_jsonl

TEXTS = ["The patient was treated with aspirin.", "The court held that the statute applies.",
         "Telephone counseling promoted screening."]
MEDNLI = [
    {"sentence1": "The patient was treated with aspirin.", "sentence2": "The patient got a drug.",
     "gold_label": "entailment"},
    {"sentence1": "The court held that the statute applies.", "sentence2": "The patient has no fever.",
     "gold_label": "neutral"},
    {"sentence1": "No fever today. " * 20, "sentence2": "The patient is febrile.", "gold_label": "contradiction"},
]


def eval_args(*argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_perplexity_matches_a_manual_loop(tokenizer):
    model = tiny_model("llama", seed=1)
    out = perplexity(model, tokenizer, TEXTS, window=200, batch_size=2)
    ids = []
    for text in TEXTS:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    assert out["windows"] == 1 and out["tokens"] == len(ids) - 1
    assert out["nll"] == pytest.approx(nll, rel=1e-5) and out["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_windows_are_non_overlapping(tokenizer):
    model = tiny_model("qwen2", seed=2)
    n = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXTS)
    out = perplexity(model, tokenizer, TEXTS, window=8, batch_size=3)
    assert out["windows"] == math.ceil(n / 8) - (n % 8 == 1)  # a 1-token tail predicts nothing
    assert out["tokens"] == n - out["windows"] - (n % 8 == 1)
    same = perplexity(model, tokenizer, TEXTS, window=8, batch_size=1)
    assert same["nll"] == pytest.approx(out["nll"], rel=1e-5)
    per_window = out["per_record"]  # one (summed NLL, tokens) row per window, for bootstrap intervals
    assert len(per_window["nll"]) == out["windows"] and sum(per_window["tokens"]) == out["tokens"]
    assert sum(per_window["nll"]) / out["tokens"] == pytest.approx(out["nll"], rel=1e-6)
    with pytest.raises(ATPError, match="no text"):
        perplexity(model, tokenizer, [], window=8)


def manual_option_sums(model, tokenizer, prompt, options, max_length):
    sums = []
    longest = max(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"][-(max_length - longest):]
    for option in options:
        o = tokenizer(option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([p + o])).logits[0].log_softmax(-1)
        sums.append(sum(logprobs[len(p) - 1 + k, o[k]].item() for k in range(len(o))))
    return sums


def test_multiple_choice_matches_manual_log_likelihoods(tokenizer):
    model = tiny_model("mistral", gqa=False, seed=3)
    task = get_task("mednli")
    scores = option_scores(model, tokenizer, task, MEDNLI, batch_size=2, max_length=40)  # row 3 is cut
    for record, (sums, counts, gold) in zip(MEDNLI, scores):
        prompt, options, expected_gold = task.choices(record)
        assert gold == expected_gold
        assert counts == [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options]
        assert sums == pytest.approx(manual_option_sums(model, tokenizer, prompt, options, 40), abs=1e-4)
    metrics = multiple_choice(model, tokenizer, task, MEDNLI, batch_size=3, max_length=40)
    acc = sum(max(range(3), key=lambda k: s[k]) == g for s, _, g in scores) / 3
    acc_norm = sum(max(range(3), key=lambda k: s[k] / c[k]) == g for s, c, g in scores) / 3
    picks = [max(range(3), key=lambda k: s[k] / c[k]) for s, c, _ in scores]
    golds = [g for _, _, g in scores]
    majority = max(golds.count(g) for g in golds) / 3
    same = max(picks.count(p) for p in picks) / 3
    assert metrics == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm),
                       "majority": pytest.approx(majority), "same_answer": pytest.approx(same), "n": 3,
                       "per_record": {"acc": [float(max(range(3), key=lambda k: s[k]) == g) for s, _, g in scores],
                                      "acc_norm": [float(p == g) for p, g in zip(picks, golds)]}}
    assert 1 / 3 <= majority <= 1 and 1 / 3 <= same <= 1


def test_multiple_choice_on_shared_rows_is_batch_independent(shared_data, tokenizer):
    model = tiny_model("llama", seed=4)
    task = get_task("casehold")
    records = task.load(shared_data / "legal" / "casehold_train.jsonl")[:3]
    one = option_scores(model, tokenizer, task, records, batch_size=1, max_length=96)
    three = option_scores(model, tokenizer, task, records, batch_size=3, max_length=96)
    for (a, ca, ga), (b, cb, gb) in zip(one, three):
        assert a == pytest.approx(b, abs=1e-4) and ca == cb and ga == gb
    prompt, options, _ = task.choices(records[0])
    assert one[0][0] == pytest.approx(manual_option_sums(model, tokenizer, prompt, options, 96), abs=1e-4)


def test_rouge_of_identical_strings_is_100():
    out = rouge(["Who manufactures cetirizine?"], ["Who manufactures cetirizine?"])
    assert out == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "n": 1,
                   "per_record": {"rouge1": [100.0], "rouge2": [100.0], "rougeL": [100.0]}}
    assert rouge(["aspirin"], ["statute"])["rouge1"] == 0.0


def test_left_padded_generation_equals_unbatched(tokenizer):
    model = tiny_model("llama", seed=5)
    prompts = ["Question: The patient was treated with aspirin.\nSummary:", "Question: Why?\nSummary:",
               "Case: The court held that the statute applies to the whole case.\nSummary:"]
    batched = generate(model, tokenizer, prompts, batch_size=3, max_new_tokens=6, max_length=64)
    single = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=6, max_length=64)[0] for p in prompts]
    assert batched == single
    assert all("\n" not in text for text in batched)


def test_summarization_pipeline_on_tiny_model(tokenizer):
    model = tiny_model("qwen2", seed=6)
    rows = [{"CHQ": "who makes bromocriptine? i need it.", "Summary": "Who makes bromocriptine?"},
            {"CHQ": "SUBJECT: nulytely\nMESSAGE: where do i order it", "Summary": "Where can I buy nulytely?"}]
    out = summarization(model, tokenizer, get_task("hqs"), rows, batch_size=2, max_new_tokens=5, max_length=64)
    assert out["n"] == 2 and all(0 <= out[k] <= 100 for k in ("rouge1", "rouge2", "rougeL"))


def test_evaluate_refuses_an_unknown_task_kind_before_scoring_anything():
    class Classification(Task):
        name, domain, kind = "triage", "healthcare", "classification"

    # the known task comes first: nothing is scored (the model is None) before the unknown kind is refused
    tasks = [(get_task("mednli"), MEDNLI), (Classification(), [{"text": "a"}])]
    with pytest.raises(ATPError, match="task triage has kind 'classification', which atp cannot evaluate; "
                                       "kinds: multiple_choice, summarization, perplexity"):
        evaluate(None, None, tasks)


def test_evaluate_restores_mode_and_caps(tokenizer):
    model = tiny_model("llama", seed=7).train()
    tasks = [(get_task("mednli"), MEDNLI),
             (get_task("legal_text"), [{"text": t} for t in TEXTS]),
             (get_task("mednli"), MEDNLI[:2])]
    results = evaluate(model, tokenizer, tasks, limit=2, batch_size=2, max_length=48)
    assert model.training
    assert list(results) == ["mednli", "legal_text", "mednli#2"]
    assert results["mednli"]["n"] == 2 and results["legal_text"]["n"] == 2
    table = format_table(results)
    assert table.splitlines()[0].split() == ["task", "|", "metric", "|", "value"]
    assert "legal_text" in table and "ppl" in table and "acc_norm" in table


def test_default_cap_applies_to_summarization_only(tokenizer):
    model = tiny_model("llama", seed=9)
    task = SummarizationTask("tiny_sum", "legal", "source", "summary", "Text", eval_cap=1)
    rows = [{"source": t, "summary": t} for t in TEXTS]
    kwargs = dict(batch_size=2, max_length=32, max_new_tokens=3)
    assert evaluate(model, tokenizer, [(task, rows)], **kwargs)["tiny_sum"]["n"] == 1
    assert evaluate(model, tokenizer, [(task, rows)], limit=0, **kwargs)["tiny_sum"]["n"] == 3
    assert evaluate(model, tokenizer, [(get_task("mednli"), MEDNLI)], **kwargs)["mednli"]["n"] == 3


def test_evaluate_domain_on_shared_data(shared_data, tokenizer):
    model = tiny_model("llama", seed=8)
    results = evaluate_domain(model, tokenizer, "legal", data_dir=shared_data, limit=2, max_length=64)
    assert set(results) == {"casehold", "legal_text"} and results["casehold"]["n"] == 2


def test_run_eval_command_writes_json_and_table(shared_data, tiny_model_dir, tmp_path, capsys):
    with open(shared_data / "healthcare" / "pubmedqa_train.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(3)]
    data = write_jsonl(tmp_path / "pubmedqa.jsonl", rows)
    out = tmp_path / "results" / "eval.json"
    args = eval_args("--model", str(tiny_model_dir), "--task", "pubmedqa", "--data", str(data),
                     "--max-length", "64", "--max-new-tokens", "8", "--out", str(out), "--device", "cpu")
    assert run_eval_command(args) == 0
    report = json.loads(out.read_text())
    assert report["model"] == str(tiny_model_dir) and report["tasks"]["pubmedqa"]["n"] == 3
    assert 0 <= report["tasks"]["pubmedqa"]["acc"] <= 1 and report["sources"]["pubmedqa"] == str(data)
    printed = capsys.readouterr().out
    assert "pubmedqa | acc" in printed and "acc_norm" in printed
    assert not list(out.parent.glob("*.tmp"))


def test_run_eval_command_on_written_rows(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mednli.jsonl", MEDNLI)
    bills = write_jsonl(tmp_path / "billsum.jsonl", [{"source": "SECTION 1. This Act may be cited as the Act.",
                                                       "summary": "The Act."}])
    args = eval_args("--model", str(tiny_model_dir), "--task", "mednli", "--data", str(data), "--task", "billsum",
                     "--data", str(bills), "--max-length", "64", "--max-new-tokens", "4", "--device", "cpu")
    assert run_eval_command(args) == 0
    printed = capsys.readouterr().out
    assert "mednli" in printed and "billsum | rougeL" in printed


def test_run_eval_command_bad_inputs(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    with pytest.raises(ATPError, match="unknown task 'nope'; valid tasks: pubmedqa"):
        run_eval_command(eval_args("--model", model, "--task", "nope", "--data", "x.jsonl"))
    with pytest.raises(ATPError, match="unknown domain 'nope'; valid domains: healthcare, legal"):
        run_eval_command(eval_args("--model", model, "--domain", "nope"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "yes"}\n{"QUESTION": \n')
    with pytest.raises(ATPError, match=r"bad\.jsonl:2: malformed JSON"):
        run_eval_command(eval_args("--model", model, "--task", "pubmedqa", "--data", str(bad)))
    with pytest.raises(ATPError, match="one --data per --task"):
        run_eval_command(eval_args("--model", model, "--task", "pubmedqa", "--task", "hqs", "--data", str(bad)))
    with pytest.raises(ATPError, match="either --domain or --task"):
        run_eval_command(eval_args("--model", model, "--domain", "legal", "--task", "casehold"))
    with pytest.raises(ATPError, match="--domain NAME or --task NAME"):
        run_eval_command(eval_args("--model", model))
    with pytest.raises(ATPError, match="task chat is for training only .kind 'chat'.; atp eval scores pubmedqa, "):
        run_eval_command(eval_args("--model", model, "--task", "chat", "--data", str(bad)))
    with pytest.raises(ATPError, match="--limit"):
        run_eval_command(eval_args("--model", model, "--domain", "legal", "--limit", "-1"))
