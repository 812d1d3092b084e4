"""Evaluation harness: perplexity, multiple-choice log-likelihood, greedy summarization with ROUGE.

Also the `atp eval` command (add_eval_arguments / run_eval_command).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .data import DOMAINS, TASKS, get_domain, get_task, load_domain, pad, prefix_ids, split
from .errors import ATPError
from .fsutil import write_text_atomic


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _inference(model):
    """Eval mode and no grad; the previous train/eval mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _pad_id(tokenizer) -> int:
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return value if value is not None else 0


def _left_pad(seqs: list[list[int]], pad_id: int, device):
    """Left-padded input_ids, attention_mask and position ids that start at 0 on each row's first token."""
    ids, mask = pad(seqs, pad_id, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _cache_name(model) -> str:
    """The forward() keyword for a KV cache: `cache` in recent transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrappers
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _keep_tail(head: list[int], body: list[int], room: int) -> list[int]:
    """head + body in at most room tokens: the body is cut from the left, the head kept while it fits."""
    if len(head) + len(body) <= room:
        return head + body
    if room <= len(head):
        return body[len(body) - room:]
    return head + body[len(body) - (room - len(head)):]


def _batches(order: list[int], batch_size: int, desc: str):
    steps = range(0, len(order), batch_size)
    for start in tqdm(steps, desc=desc, leave=False, disable=None):
        yield order[start:start + batch_size]


# ----------------------------------------------------------------------------- perplexity

def perplexity(model, tokenizer, texts: list[str], window: int = 512, batch_size: int = 4) -> dict:
    """Texts joined with eos separators, cut into non-overlapping windows; each window scored on its own.

    tokens is the number of predicted tokens (window length - 1 per window); nll is per token, in nats.
    """
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    window = min(window, limit) if limit else window
    if window < 2:
        raise ATPError(f"perplexity window must be at least 2 tokens, got {window}")
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
    windows = [stream[i:i + window] for i in range(0, len(stream), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ATPError("perplexity: no text to score")
    device, pad_id = _device(model), _pad_id(tokenizer)
    window_nll, window_tokens = [], []
    with _inference(model):
        for rows in _batches(list(range(len(windows))), batch_size, "perplexity"):
            ids, mask = pad([windows[r] for r in rows], pad_id)
            labels = ids.masked_fill(mask == 0, -100)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            shifted = labels[:, 1:].to(device)
            per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=-100, reduction="none")
            window_nll += per_token.sum(dim=1).tolist()
            window_tokens += (shifted != -100).sum(dim=1).tolist()
    total_tokens = sum(window_tokens)
    nll = sum(window_nll) / total_tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": total_tokens, "windows": len(windows),
            "per_record": {"nll": window_nll, "tokens": window_tokens, "id": content_ids(windows)}}


def content_ids(items: list) -> list[str]:
    """One id per item from its content (a record's fields, a window's tokens), for pairing per-record results
    of two evaluations by record rather than by position; a repeated item gets "#2", "#3", ... appended."""
    ids, seen = [], Counter()
    for item in items:
        digest = hashlib.sha256(json.dumps(item, sort_keys=True, default=str).encode()).hexdigest()[:16]
        seen[digest] += 1
        ids.append(digest if seen[digest] == 1 else f"{digest}#{seen[digest]}")
    return ids


# ----------------------------------------------------------------------------- multiple choice

def option_scores(model, tokenizer, task, records, batch_size: int = 4, max_length: int = 512):
    """For each record: (summed log-likelihood of each option, option token counts, gold index).

    The prompts of a batch run once (left-padded, with a KV cache); each option then continues from its
    prompt's cache. Prompts are cut from the left so that prompt + longest option fits max_length.
    """
    head = prefix_ids(tokenizer)
    items = []
    for record in records:
        prompt, options, gold = task.choices(record)
        option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"][:max_length - 1] for o in options]
        if any(len(o) == 0 for o in option_ids):
            raise ATPError(f"task {task.name}: an option tokenizes to nothing: {options!r:.120}")
        body = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompt_ids = _keep_tail(head, body, max(1, max_length - max(len(o) for o in option_ids)))
        if not prompt_ids:  # an empty prompt: condition on a separator token
            prompt_ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else _pad_id(tokenizer)]
        items.append((prompt_ids, option_ids, gold))

    device, pad_id = _device(model), _pad_id(tokenizer)
    results = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # less padding per batch
    with _inference(model):
        for batch in _batches(order, batch_size, task.name):
            ids, mask, positions = _left_pad([items[i][0] for i in batch], pad_id, device)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        logits_to_keep=1)
            first = out.logits[:, -1].float().log_softmax(-1)  # predicts each option's first token
            cache = out["cache"] if "cache" in out else out["past_key_values"]
            rows = [(b, j) for b, i in enumerate(batch) for j in range(len(items[i][1]))]
            owner = torch.tensor([b for b, _ in rows], device=device)
            cache.batch_select_indices(owner)
            options = [items[batch[b]][1][j] for b, j in rows]
            opt_ids, opt_mask = pad(options, pad_id)
            width = opt_ids.shape[1]
            opt_positions = positions[owner, -1:] + 1 + torch.arange(width, device=device)
            opt_mask = torch.cat([mask[owner], opt_mask.to(device)], 1)  # prompt (cached) + option tokens
            logits = model(input_ids=opt_ids.to(device), attention_mask=opt_mask, position_ids=opt_positions,
                           **{_cache_name(model): cache}).logits.float()
            logprobs = logits.log_softmax(-1)
            sums = {}
            for r, ((b, j), o) in enumerate(zip(rows, options)):
                target = torch.tensor(o, device=device)
                total = first[b, target[0]] + logprobs[r, torch.arange(len(o) - 1, device=device), target[1:]].sum()
                sums[(b, j)] = total.item()
            for b, i in enumerate(batch):
                n_opt = len(items[i][1])
                results[i] = ([sums[(b, j)] for j in range(n_opt)], [len(o) for o in items[i][1]], items[i][2])
    return results


def _argmax(values):
    return max(range(len(values)), key=lambda k: (values[k], -k))  # ties go to the first option


def multiple_choice(model, tokenizer, task, records, batch_size: int = 4, max_length: int = 512) -> dict:
    """acc: option with the highest summed log-likelihood; acc_norm: highest mean log-likelihood per token.
    majority: accuracy of always giving the most common gold answer of these records; same_answer: share
    of records that get the model's most frequent acc_norm answer (1.0: one answer for everything)."""
    scores = option_scores(model, tokenizer, task, records, batch_size, max_length)
    acc = sum(_argmax(s) == gold for s, _, gold in scores)
    picks = [_argmax([x / n for x, n in zip(s, counts)]) for s, counts, _ in scores]
    acc_norm = sum(pick == gold for pick, (_, _, gold) in zip(picks, scores))
    n = len(scores)
    majority = Counter(gold for _, _, gold in scores).most_common(1)[0][1]
    same = Counter(picks).most_common(1)[0][1]
    per_record = {"acc": [float(_argmax(s) == gold) for s, _, gold in scores],
                  "acc_norm": [float(pick == gold) for pick, (_, _, gold) in zip(picks, scores)]}
    return {"acc": acc / n, "acc_norm": acc_norm / n, "majority": majority / n, "same_answer": same / n, "n": n,
            "per_record": per_record}


# ----------------------------------------------------------------------------- summarization

class _FirstLineDone(StoppingCriteria):
    """A row is done once its new text has a newline after some non-blank text (leading newlines are skipped)."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


def generate(model, tokenizer, prompts: list[str], batch_size: int = 4, max_new_tokens: int = 48,
             max_length: int = 512) -> list[str]:
    """Greedy continuations (new tokens only, cut at the first newline), left-padded batches."""
    head = prefix_ids(tokenizer)
    room = max_length - max_new_tokens - len(head)
    if room < 1:
        raise ATPError(f"max_length {max_length} leaves no room for a prompt after {max_new_tokens} new tokens")
    seqs = [_keep_tail(head, tokenizer(p, add_special_tokens=False)["input_ids"], room + len(head)) for p in prompts]
    pad_id = _pad_id(tokenizer)
    seqs = [s or [pad_id] for s in seqs]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=tokenizer.eos_token_id)
    device = _device(model)
    outputs = [""] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    with _inference(model):
        for batch in _batches(order, batch_size, "generate"):
            ids, mask, _ = _left_pad([seqs[i] for i in batch], pad_id, device)
            stop = StoppingCriteriaList([_FirstLineDone(tokenizer, ids.shape[1])])
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, stopping_criteria=stop)
            for row, i in enumerate(batch):
                text = tokenizer.decode(out[row, ids.shape[1]:], skip_special_tokens=True)
                outputs[i] = text.strip().split("\n")[0].strip()
    return outputs


def rouge(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-1/2/L F-measure x 100 (Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_record = {"rouge1": [], "rouge2": [], "rougeL": []}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for key, values in per_record.items():
            values.append(100 * scores[key].fmeasure)
    n = len(predictions)
    return {key: sum(values) / n for key, values in per_record.items()} | {"n": n, "per_record": per_record}


def summarization(model, tokenizer, task, records, batch_size: int = 4, max_new_tokens: int = 48,
                  max_length: int = 512) -> dict:
    pairs = [task.source_target(r) for r in records]
    predictions = generate(model, tokenizer, [p for p, _ in pairs], batch_size, max_new_tokens, max_length)
    return rouge(predictions, [ref for _, ref in pairs])


# ----------------------------------------------------------------------------- tasks and domains

def evaluated_records(task, records: list, limit: int | None) -> list:
    """The records `evaluate` scores: limit None: the task's eval_cap; 0: all; N: the first N."""
    cap = task.eval_cap if limit is None else (limit or None)
    records = records[:cap] if cap else records
    if not records:
        raise ATPError(f"task {task.name}: no records to evaluate")
    return records


def majority_levels(domain: str, data_dir=None, limit: int | None = None) -> dict[str, float]:
    """Per multiple-choice task of a domain's dev split: the accuracy of always giving the most common
    gold answer on the records `evaluate_domain` scores (no model needed)."""
    levels = {}
    for task, records in load_domain(domain, data_dir):
        if task.kind == "multiple_choice":
            golds = [task.choices(r)[2] for r in evaluated_records(task, split(records, "dev"), limit)]
            levels.setdefault(task.name, Counter(golds).most_common(1)[0][1] / len(golds))
    return levels


def _multiple_choice_task(model, tokenizer, task, records, batch_size, max_length, **_) -> dict:
    metrics = multiple_choice(model, tokenizer, task, records, batch_size, max_length)
    metrics["per_record"]["id"] = content_ids(records)
    return metrics


def _summarization_task(model, tokenizer, task, records, batch_size, max_length, max_new_tokens, **_) -> dict:
    metrics = summarization(model, tokenizer, task, records, batch_size, max_new_tokens, max_length)
    metrics["per_record"]["id"] = content_ids(records)
    return metrics


def _perplexity_task(model, tokenizer, task, records, batch_size, max_length, ppl_windows=(), **_) -> dict:
    """Perplexity at max_length windows; also ppl@W for each W in ppl_windows (e.g. the training length)."""
    texts = [task.text(r) for r in records]
    metrics = {**perplexity(model, tokenizer, texts, max_length, batch_size), "n": len(records)}
    for window in ppl_windows:
        metrics[f"ppl@{window}"] = perplexity(model, tokenizer, texts, window, batch_size)["ppl"]
    return metrics


# task kind -> its metrics on (model, tokenizer, task, records, batch_size, max_length, max_new_tokens)
EVALUATORS = {"multiple_choice": _multiple_choice_task, "summarization": _summarization_task,
              "perplexity": _perplexity_task}


def evaluate(model, tokenizer, tasks_with_records, limit: int | None = None, batch_size: int = 4,
             max_length: int = 512, max_new_tokens: int = 48, ppl_windows=()) -> dict:
    """{task name: metrics}. Each task's metrics hold `per_record` values too (for paired intervals), with an
    `id` per record (perplexity: per window) to pair them by.

    limit None: each task's eval_cap (set for summarization tasks only); 0: all records; N: the first N.
    ppl_windows: extra perplexity window lengths, reported as ppl@W (e.g. the training length).
    """
    tasks_with_records = list(tasks_with_records)
    for task, _ in tasks_with_records:  # before any (slow) scoring
        if task.kind not in EVALUATORS:
            raise ATPError(f"task {task.name} has kind '{task.kind}', which atp cannot evaluate; "
                           f"kinds: {', '.join(EVALUATORS)}")
    results = {}
    for task, records in tasks_with_records:
        records = evaluated_records(task, records, limit)
        metrics = EVALUATORS[task.kind](model, tokenizer, task, records, batch_size, max_length,
                                        max_new_tokens=max_new_tokens, ppl_windows=tuple(ppl_windows))
        key, k = task.name, 2
        while key in results:  # the same task twice (two files)
            key, k = f"{task.name}#{k}", k + 1
        results[key] = metrics
    return results


def evaluate_domain(model, tokenizer, domain: str, data_dir=None, limit: int | None = None, **kwargs) -> dict:
    """Evaluate on the dev split of every task of a domain (for dense vs pruned comparisons)."""
    tasks = [(task, split(records, "dev")) for task, records in load_domain(domain, data_dir)]
    return evaluate(model, tokenizer, tasks, limit=limit, **kwargs)


def format_table(results: dict) -> str:
    """Plain text table: task | metric | value."""
    rows = [("task", "metric", "value")]
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if isinstance(value, (dict, list)):  # per-record values
                continue
            if isinstance(value, float):
                value = f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
            rows.append((task, metric, str(value)))
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- atp eval

def add_eval_arguments(parser):
    parser.add_argument("--model", default="smollm2-135m",
                        help="model folder, hub id or embedded name (default: smollm2-135m)")
    parser.add_argument("--task", action="append", metavar="NAME",
                        help=f"task to evaluate, repeatable: {', '.join(TASKS)}")
    parser.add_argument("--data", action="append", metavar="FILE",
                        help="JSONL in the task's public field format (or a hub id owner/name[:config][@split]) for "
                             "the --task in the same position; the whole file is evaluated. Without --data a task "
                             "uses the dev split of its default file in the data dir")
    parser.add_argument("--domain", metavar="NAME",
                        help=f"evaluate the dev split of every task of a domain: {', '.join(DOMAINS)}")
    parser.add_argument("--data-dir", help="domain data dir (default: $ATP_DATA_DIR, else ../shared/data)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="at most N records per task; default: all, except that summarization tasks "
                             "of a --domain (or default file) dev split are capped to keep CPU runs short "
                             "(100 records; multilexsum 60); 0 means no cap")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512,
                        help="tokens per sequence; longer prompts are cut from the left (default 512)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="summary length cap (default 48)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    parser.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out results file")
    return parser


def _eval_inputs(args) -> list[tuple]:
    """(task, records, source description) for each task the arguments name."""
    if args.domain and (args.task or args.data):
        raise ATPError("use either --domain or --task/--data, not both")
    if args.domain:
        get_domain(args.domain)
        return [(t, split(r, "dev"), f"{args.domain} dev split") for t, r in load_domain(args.domain, args.data_dir)]
    if not args.task:
        raise ATPError("pass --domain NAME or --task NAME (with --data FILE)")
    data = args.data or []
    if data and len(data) != len(args.task):
        raise ATPError(f"give one --data per --task ({len(args.task)} tasks, {len(data)} files)")
    inputs = []
    for i, name in enumerate(args.task):
        task = get_task(name)
        if task.kind not in EVALUATORS:
            raise ATPError(f"task {name} is for training only (kind '{task.kind}'); atp eval scores "
                           f"{', '.join(n for n, t in TASKS.items() if t.kind in EVALUATORS)}")
        if data:
            inputs.append((task, task.load(data[i]), data[i]))
        else:
            inputs.append((task, split(task.load(None, args.data_dir), "dev"), f"{task.default_file} dev split"))
    return inputs


def run_eval_command(args) -> int:
    from . import validation
    from .models import load_model
    from .rundir import check_output_file

    for flag in ("batch_size", "max_length", "max_new_tokens"):
        validation.at_least(getattr(args, flag), 1, flag)
    if args.limit is not None and args.limit < 0:
        raise ATPError("--limit must be 0 (no cap) or more")
    if args.max_new_tokens >= args.max_length:
        raise ATPError("--max-new-tokens must be smaller than --max-length")
    device = str(validation.device(args.device))
    if args.out is not None:  # before the evaluation, not after it
        inputs = {"--model": args.model, **{f"--data #{i + 1}": d for i, d in enumerate(args.data or [])}}
        if args.data_dir:
            inputs["--data-dir"] = args.data_dir
        check_output_file(args.out, "--out", overwrite=args.overwrite, inputs=inputs)
    start = time.time()
    inputs = _eval_inputs(args)  # data errors come before the (slow) model load
    model, tokenizer = load_model(args.model)
    model.to(device)
    limit = 0 if args.limit is None and args.data else args.limit  # a file given with --data is read whole
    results = evaluate(model, tokenizer, [(t, r) for t, r, _ in inputs], limit=limit,
                       batch_size=args.batch_size, max_length=args.max_length, max_new_tokens=args.max_new_tokens)
    seconds = time.time() - start
    print(format_table(results))
    print(f"({seconds:.0f} s)")
    if args.out is not None:
        report = {
            "model": args.model,
            "domain": args.domain,
            "tasks": results,
            "sources": {key: src for key, (_, _, src) in zip(results, inputs)},
            "settings": {"limit": limit, "batch_size": args.batch_size, "max_length": args.max_length,
                         "max_new_tokens": args.max_new_tokens, "device": device},
            "seconds": round(seconds, 1),
        }
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
    return 0
